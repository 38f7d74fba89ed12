# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --quiet -c constraints.txt
STAMP   = $(VENV)/.curvlab-installed

.PHONY: demo test test-peers browser bench-deps docs lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e ".[dev,cli,plot,hf]"
	touch $(STAMP)

# The main job: curvature diagnosis of the built-in model, then the quick benchmark
# (report in curvlab-bench/report.html).
demo: $(STAMP) bench-deps
	$(VENV)/bin/curvlab diagnose --out curvlab-report
	$(VENV)/bin/curvlab bench --quick --out curvlab-bench

test: $(STAMP) test-peers browser
	$(PY) -m pytest

# Peers the tests compare against (curvlinops, laplace-torch); tests that need one are
# skipped where it did not install. They drag in torchvision, which cannot import beside
# the pinned CPU torch (and would break `import transformers`), so it is removed again.
PEERS_STAMP = $(VENV)/.curvlab-peers-installed
test-peers: $(PEERS_STAMP)
$(PEERS_STAMP): $(STAMP)
	$(PIP) -e ".[peers]" || echo "note: some test peers did not install; their tests will be skipped"
	$(PY) -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true
	touch $(PEERS_STAMP)

# Headless Chromium for the report's browser test (Debian package; the test is skipped
# where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "note: chromium is not installed; the browser test will be skipped"; }

# Peers for the side-by-side benchmarks (not needed by the tests); a peer that fails to
# install is skipped by the benchmarks with a notice.
BENCH_STAMP = $(VENV)/.curvlab-bench-installed
bench-deps: $(BENCH_STAMP)
$(BENCH_STAMP): $(STAMP)
	$(PIP) -e ".[bench]" || echo "note: some benchmark peers did not install; they will be skipped"
	$(PY) -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true
	touch $(BENCH_STAMP)

# The documentation site (build/docs/html/index.html): API reference, guides and the
# gallery, whose examples run (and assert what they show) during the build. Warnings are
# errors. tests/test_docs_browser.py checks the built site in headless Chromium.
DOCS_STAMP = $(VENV)/.curvlab-docs-installed
docs: $(DOCS_STAMP)
	MPLBACKEND=Agg $(PY) -m sphinx -b html -W --keep-going -q docs build/docs/html
	@echo "docs: build/docs/html/index.html"
$(DOCS_STAMP): $(STAMP)
	$(PIP) -e ".[docs]"
	touch $(DOCS_STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples docs

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache docs/api docs/auto_examples
