"""Does CurvatureMonitor warn before training blows up, how early, and does it cry wolf?

A scenario suite, each run as a new user would: ``CurvatureMonitor(model, loss_fn,
batch, optimizer=opt)`` at its defaults (a check every 200 steps after early checks at
steps 1, 4, 16, ..., adaptive; track every 20 steps), called after every optimizer step.

Scenarios (all on CPU, float32, seeded):

(a) ``gd``: full-batch gradient descent on 500 sklearn digits, tanh MLP 64-64-64-10, MSE
    on one-hot targets (Cohen et al. 2021's setting): progressive sharpening drives
    ``lr x lambda_max`` to 2. Learning rates ``f x 2 / lambda_0``: ``f < 1`` start stable
    and reach the edge of stability (healthy); ``f > 1`` start beyond it.
(b) ``adamw``: AdamW (wd 0.01, no warmup) on a tiny GPT-2 (2 layers, width 32, 2 heads,
    context 32) on character-level text of the Python standard library (batch 16), at
    learning rates from safe to divergent.
(c) ``warmup``: SGD with momentum 0.9 on a small CNN (conv 8-16, 3x3, ReLU; 8x8 digits,
    batch 64, cross-entropy) with linear warmup to a peak learning rate over 1500 steps,
    then constant: a tuned peak 0.05 (healthy) and over-aggressive peaks 20 and 50 (the
    run blows up during the warmup, at lr ~13-15); and peak 20 warmed up over 6000 steps
    (slow onset: the same blow-up, four times later).
(d) healthy runs at tuned learning rates: the ``f < 1`` GD runs of (a), AdamW 3e-3,
    curvlab's SOAP (3e-3) and Muon (0.02; AdamW 3e-3 for embeddings / head / norms) on the
    tiny GPT-2, SGD warmup to a tuned peak.
Held out (never run while the warning rule was designed): ``llama`` (AdamW on a tiny
Llama, safe and divergent lr) and ``nesterov`` (SGD Nesterov on the CNN, aggressive
warmup); reported separately. They were run (not tuned on) alongside later rounds, so a
second held-out set ``held-out2`` was added once the second round's rules were frozen:
full-batch GD on a ReLU MLP at f = 5, AdamW on the tiny Llama at lr 0.1, Adam on the CNN
without warmup at lr 1e-3 and 0.3. A third, ``held-out3``, was added once session 7's
rules (unsettled preconditioner, progress lost, the loss above its start confirming a
runaway) were frozen: SGD momentum on a tanh MLP 64-128-128-10 (cross-entropy, batch 64)
warmed up over 3000 steps to peak 5 and over 300 to 0.1, full-batch GD on the ReLU MLP at
f = 0.8, RMSprop on the CNN at lr 1e-3 and 0.1.

Definitions, computed mechanically per run:

* diverged: the first step whose training loss is non-finite or above 10x the loss at
  step 1 (before any update took effect); a run is stopped 20 steps later.
* warning: an event of severity ``warning`` or ``error`` (``diverging``, ``nonfinite``,
  ``check_failed``); ``approaching`` / ``crossed`` / jumps are information and are
  tabulated separately. First warning: the first at or before divergence.
* false warnings: warnings in a run that never diverges (all of them are counted).
* transient warnings: in a run that diverges, warnings followed (before the divergence) by
  a check the monitor itself called ``stable``: they warned of a transient that passed, so
  they are not a lead (column ``trans``; counted with the false warnings in the summary).
* lead time: diverged - first warning that is not transient. ``last``: the last warning at
  or before divergence.
* first measurable trend: the first step of the last unbroken stretch of monitor checks
  before divergence whose regime is not ``stable`` (sharpening: forecast to reach the
  threshold within the horizon; edge of stability; progress lost; runaway; or a
  preconditioner still forming, ``unsettled``): where the instability the monitor
  measures begins; if there is none, the first step of the
  last unbroken rise of the monitor-batch loss over checks. ``lead share`` = lead /
  (diverged - trend). Slow-onset runs are those with diverged - trend >= 1000 steps.
* max ratio: over the checks with a settled preconditioner (not ``unsettled``).

Targets (the issue): every divergence warned; median lead >= 1000 steps on slow-onset
runs, lead share >= 50% on fast ones; zero false warnings on healthy runs. Stricter than
the issue, "MET" also needs zero transient warnings in the runs that diverge.

Run: python benchmarks/bench_monitor_warning.py [--quick] [--only a,b,...] [--out FILE]
     [--plot DIR]   (each run's loss / stability-ratio / events plot, plot_monitor)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from curvlab.bench.problems.char_lm import VOCAB, char_batch, load_char_corpus
from curvlab.bench.problems.digits import load_digits_tensors
from curvlab.diagnostics import CurvatureMonitor
from curvlab.linalg import lanczos
from curvlab.linops import HessianOperator

DIVERGE_FACTOR = 10.0


@dataclass
class Scenario:
    group: str
    name: str
    build: Callable[[], tuple]  # -> (model, loss_fn, monitor batch, opt, sched, batch_fn, call)
    steps: int
    expect_healthy: bool
    held_out: bool = False
    result: dict = field(default_factory=dict)


# ---- problems -------------------------------------------------------------------------
def _digits():
    (X, y), _ = load_digits_tensors()
    return X, y


def gd_scenario(f: float, lam0: float, X: torch.Tensor, Y: torch.Tensor,
                act: type = nn.Tanh):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 64), act(),
                              nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=f * 2 / lam0)
        loss_fn = nn.MSELoss()
        return model, loss_fn, (X, Y), opt, None, lambda step: (X, Y), None
    return build


def gpt2_scenario(opt_name: str, lr: float, ids: torch.Tensor, arch: str = "gpt2"):
    def build():
        import transformers as tf

        torch.manual_seed(0)
        if arch == "gpt2":
            cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(VOCAB),
                                n_positions=32, attn_implementation="eager")
            model = tf.GPT2LMHeadModel(cfg)
        else:
            cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 vocab_size=len(VOCAB), max_position_embeddings=32,
                                 attn_implementation="eager")
            model = tf.LlamaForCausalLM(cfg)
        model.train()
        if opt_name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        else:
            from curvlab.integrations import build_optimizer

            kw = {"adamw_lr": 3e-3} if opt_name == "muon" else {}
            opt = build_optimizer(model, opt_name, lr=lr, **kw)
        g = torch.Generator().manual_seed(1)
        mx, _ = char_batch(ids, 16, 32, torch.Generator().manual_seed(123))
        monitor_batch = {"input_ids": mx, "labels": mx}

        def batch_fn(step):
            x, _ = char_batch(ids, 16, 32, g)
            return x

        def call(model, x):
            return model(input_ids=x, labels=x).loss
        return model, None, monitor_batch, opt, None, batch_fn, call
    return build


def cnn_scenario(peak: float, X: torch.Tensor, y: torch.Tensor, warmup: int = 1500,
                 nesterov: bool = False, adam: bool = False, rmsprop: bool = False,
                 mlp: bool = False):
    def build():
        torch.manual_seed(0)
        model = (nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                               nn.Linear(128, 10)) if mlp else
                 nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(),
                               nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),
                               nn.Linear(16 * 4 * 4, 10)))
        opt = (torch.optim.Adam(model.parameters(), lr=peak) if adam else
               torch.optim.RMSprop(model.parameters(), lr=peak) if rmsprop else
               torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, nesterov=nesterov))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        g = torch.Generator().manual_seed(1)
        gm = torch.Generator().manual_seed(2)
        idx = torch.randperm(len(y), generator=gm)[:256]

        def batch_fn(step):
            i = torch.randint(0, len(y), (64,), generator=g)
            return X[i], y[i]
        return model, nn.CrossEntropyLoss(), (X[idx], y[idx]), opt, sched, batch_fn, None
    return build


# ---- one run --------------------------------------------------------------------------
def run(sc: Scenario, plot_dir: str | None = None) -> dict:
    model, loss_fn, mbatch, opt, sched, batch_fn, call = sc.build()
    monitor = CurvatureMonitor(model, loss_fn, mbatch, optimizer=opt,
                               generator=torch.Generator().manual_seed(0))
    first_losses, diverged = [], None
    t0 = time.perf_counter()
    step = 0
    for step in range(1, sc.steps + 1):
        batch = batch_fn(step)
        opt.zero_grad()
        if call is not None:
            loss = call(model, batch)
        else:
            xb, yb = batch
            loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        monitor.step(loss)
        value = float(loss.detach())
        if not first_losses:
            first_losses.append(value)
        base = first_losses[0]
        if diverged is None and (not math.isfinite(value) or value > DIVERGE_FACTOR * base):
            diverged = step
        if diverged is not None and step >= diverged + 20:
            break
    seconds = time.perf_counter() - t0
    if plot_dir is not None:
        from curvlab.diagnostics.plots import plot_monitor

        slug = "".join(ch if ch.isalnum() else "_" for ch in f"{sc.group}_{sc.name}")
        plot_monitor(monitor, Path(plot_dir) / f"{slug}.png", title=f"({sc.group}) {sc.name}")
    warn = [e for e in monitor.warnings if diverged is None or e.step <= diverged]
    info = [e for e in monitor.events if e.severity == "info"
            and (diverged is None or e.step <= diverged)]
    ratio_key = next(iter(monitor.thresholds))
    c = monitor.thresholds[ratio_key]
    checks = [ch for ch in monitor.checks if diverged is None or ch["step"] <= diverged]
    # a warning followed, before the divergence, by a check the monitor called stable
    # (all clear) warned of a transient, not of the blow-up: it is not a lead
    calm = [ch["step"] for ch in checks if ch.get("regime") == "stable"]
    transient = [e for e in warn if diverged is not None and any(e.step < s for s in calm)]
    first = next((e for e in warn if e not in transient), None)
    trend = None
    if diverged is not None and checks:
        i = len(checks)
        while i > 0 and checks[i - 1].get("regime") != "stable":
            i -= 1
        if i < len(checks):
            trend = checks[i]["step"]
        else:
            i = len(checks) - 1
            while i > 0 and checks[i - 1].get("check_loss", math.inf) < checks[i].get(
                    "check_loss", -math.inf):
                i -= 1
            trend = checks[i]["step"]
    lead = diverged - first.step if (first and diverged) else None
    window = (diverged - trend) if (diverged is not None and trend is not None) else None
    return {
        "group": sc.group, "name": sc.name, "held_out": sc.held_out,
        "expect_healthy": sc.expect_healthy, "diverged": diverged,
        "first_warning": first.step if first else None,
        "first_warning_kind": first.kind if first else None,
        "last_warning": warn[-1].step if warn else None,
        "warnings": len(warn),
        "forecast_horizon": first.horizon if first else None,
        "forecast_confidence": first.confidence if first else None,
        "lead": lead, "trend": trend, "window": window,
        "lead_share": (lead / window) if (lead is not None and window) else None,
        "false_warnings": len(warn) if diverged is None else 0,
        "transient_warnings": len(transient),
        "info_events": [(e.step, e.kind, e.regime) for e in info][:6],
        "max_ratio": max((ch[ratio_key] for ch in checks if ch.get("regime") != "unsettled"),
                         default=math.nan),
        "threshold": c, "ratio": ratio_key, "rule": monitor.stability.name,
        "regimes": sorted({ch.get("regime", "?") for ch in checks}),
        "checks": len(monitor.checks), "steps_run": step, "seconds": seconds,
        "overhead": monitor.overhead,
    }


def scenarios(quick: bool) -> list[Scenario]:
    X, y = _digits()
    Xg, Yg = X[:500], nn.functional.one_hot(y[:500], 10).float()
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                       nn.Linear(64, 10))
    lam0 = float(lanczos(HessianOperator(m0, nn.MSELoss(), (Xg, Yg)), 1, tol=1e-6)
                 .eigenvalues[0])
    ids, _, _ = load_char_corpus(max_chars=300_000)
    gd_steps = 1500 if quick else 4000
    lm_steps = 300 if quick else 1000
    cnn_steps = 2500 if quick else 4000
    out = []
    for f in ((0.6,) if quick else (0.3, 0.6, 0.9)):
        out.append(Scenario("a", f"GD f={f}", gd_scenario(f, lam0, Xg, Yg), gd_steps, True))
    for f in ((3.0,) if quick else (1.5, 3.0, 10.0)):
        out.append(Scenario("a", f"GD f={f}", gd_scenario(f, lam0, Xg, Yg), gd_steps, False))
    for lr in ((1e-1, 1.0) if quick else (3e-2, 1e-1, 3e-1, 1.0)):
        out.append(Scenario("b", f"AdamW lr={lr:g}", gpt2_scenario("adamw", lr, ids), lm_steps,
                            False))
    for peak in ((50.0,) if quick else (20.0, 50.0)):
        out.append(Scenario("c", f"SGD warmup peak={peak:g}", cnn_scenario(peak, X, y),
                            cnn_steps, False))
    if not quick:  # slow onset: the same over-aggressive peak, warmed up over 6000 steps
        out.append(Scenario("c", "SGD warmup peak=20 (6000)",
                            cnn_scenario(20.0, X, y, warmup=6000), 8000, False))
    out.append(Scenario("d", "AdamW lr=3e-3", gpt2_scenario("adamw", 3e-3, ids), lm_steps, True))
    if not quick:
        out.append(Scenario("d", "SOAP lr=3e-3", gpt2_scenario("soap", 3e-3, ids), lm_steps,
                            True))
        out.append(Scenario("d", "Muon lr=0.02", gpt2_scenario("muon", 0.02, ids), lm_steps,
                            True))
    out.append(Scenario("d", "SGD warmup peak=0.05", cnn_scenario(0.05, X, y), cnn_steps, True))
    # held out: never run while the rule was designed
    out.append(Scenario("held-out", "Llama AdamW lr=3e-3",
                        gpt2_scenario("adamw", 3e-3, ids, "llama"), lm_steps, True, True))
    out.append(Scenario("held-out", "Llama AdamW lr=1", gpt2_scenario("adamw", 1.0, ids, "llama"),
                        lm_steps, False, True))
    if not quick:
        out.append(Scenario("held-out", "SGD Nesterov warmup peak=30",
                            cnn_scenario(30.0, X, y, nesterov=True), cnn_steps, False, True))
    # a second held-out set, added after the rules of this round were frozen and run once
    if not quick:
        out.append(Scenario("held-out2", "GD ReLU MLP f=5",
                            gd_scenario(5.0, lam0, Xg, Yg, nn.ReLU), gd_steps, False, True))
        out.append(Scenario("held-out2", "Llama AdamW lr=0.1",
                            gpt2_scenario("adamw", 0.1, ids, "llama"), lm_steps, False, True))
        out.append(Scenario("held-out2", "CNN Adam lr=1e-3 no warmup",
                            cnn_scenario(1e-3, X, y, warmup=1, adam=True), cnn_steps, True,
                            True))
        out.append(Scenario("held-out2", "CNN Adam lr=0.3 no warmup",
                            cnn_scenario(0.3, X, y, warmup=1, adam=True), cnn_steps, False,
                            True))
    # a third held-out set, added when the rules of session 7 were frozen and run once
    if not quick:
        out.append(Scenario("held-out3", "MLP SGD warmup peak=5 (3000)",
                            cnn_scenario(5.0, X, y, warmup=3000, mlp=True), 5000, False, True))
        out.append(Scenario("held-out3", "MLP SGD warmup peak=0.1",
                            cnn_scenario(0.1, X, y, warmup=300, mlp=True), 3000, True, True))
        out.append(Scenario("held-out3", "GD ReLU MLP f=0.8",
                            gd_scenario(0.8, lam0, Xg, Yg, nn.ReLU), gd_steps, True, True))
        out.append(Scenario("held-out3", "CNN RMSprop lr=1e-3",
                            cnn_scenario(1e-3, X, y, warmup=1, rmsprop=True), cnn_steps, True,
                            True))
        out.append(Scenario("held-out3", "CNN RMSprop lr=0.1",
                            cnn_scenario(0.1, X, y, warmup=1, rmsprop=True), cnn_steps, False,
                            True))
    return out


def _fmt(v, spec="d"):
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 2 minutes)")
    ap.add_argument("--only", default=None,
                    help="comma-separated groups: a,b,c,d,held-out,held-out2,held-out3")
    ap.add_argument("--out", default=None, help="write the raw results as JSON")
    ap.add_argument("--plot", default=None, help="write each run's monitor plot to this dir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("curvlab").setLevel(logging.ERROR)  # events are tabulated below
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="curvlab does not know")
    only = set(args.only.split(",")) if args.only else None
    results = []
    head = (f"{'grp':<10}{'scenario':<28}{'rule':>10}{'thr':>6}{'max ratio':>10}"
            f"{'diverged':>9}{'warned':>7}{'last':>6}{'kind':>11}{'lead':>6}{'trend':>6}{'share':>6}"
            f"{'false':>6}{'trans':>6}{'horizon':>8}{'conf':>5}{'sec':>6}  regimes")
    print(head)
    print("-" * len(head))
    for sc in scenarios(args.quick):
        if only and sc.group not in only:
            continue
        r = run(sc, args.plot)
        results.append(r)
        print(f"{r['group']:<10}{r['name']:<28}{r['rule']:>10}{r['threshold']:>6.3g}"
              f"{r['max_ratio']:>10.3g}{_fmt(r['diverged']):>9}{_fmt(r['first_warning']):>7}"
              f"{_fmt(r['last_warning']):>6}"
              f"{r['first_warning_kind'] or '-':>11}{_fmt(r['lead']):>6}{_fmt(r['trend']):>6}"
              f"{_fmt(r['lead_share'], '.0%'):>6}{r['false_warnings']:>6}"
              f"{r['transient_warnings']:>6}"
              f"{_fmt(r['forecast_horizon'], '.0f'):>8}{_fmt(r['forecast_confidence'], '.2f'):>5}"
              f"{r['seconds']:>6.1f}  {','.join(r['regimes'])}", flush=True)
    for label, sel in (("tuned-on", [r for r in results if not r["held_out"]]),
                       ("held-out", [r for r in results if r["group"] == "held-out"]),
                       ("held-out2", [r for r in results if r["group"] == "held-out2"]),
                       ("held-out3", [r for r in results if r["group"] == "held-out3"])):
        if not sel:
            continue
        div = [r for r in sel if r["diverged"] is not None]
        healthy = [r for r in sel if r["diverged"] is None]
        missed = [r["name"] for r in div if r["lead"] is None or r["lead"] < 0]
        slow = [r for r in div if r["window"] is not None and r["window"] >= 1000]
        fast = [r for r in div if r not in slow]
        slow_leads = [r["lead"] or 0 for r in slow]
        fast_ok = [r["lead_share"] is not None and r["lead_share"] >= 0.5 for r in fast]
        false = sum(r["false_warnings"] for r in healthy)
        transient = sum(r["transient_warnings"] for r in div)
        unexpected = [r["name"] for r in sel if r["expect_healthy"] and r["diverged"]]
        print(f"\n{label}: {len(div)} diverged, {len(healthy)} healthy; missed: {missed or 0}; "
              f"slow-onset median lead: "
              f"{statistics.median(slow_leads) if slow_leads else '-'} (n={len(slow)}); "
              f"fast runs with lead share >= 50%: {sum(fast_ok)}/{len(fast)}; false warnings on "
              f"healthy runs: {false}; transient warnings in diverged runs: {transient}"
              + (f"; expected healthy but diverged: {unexpected}" if unexpected else ""))
        ok = (not missed and (not slow_leads or statistics.median(slow_leads) >= 1000)
              and all(fast_ok) and false == 0 and transient == 0)
        print(f"{label} targets: {'MET' if ok else 'NOT MET'}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
