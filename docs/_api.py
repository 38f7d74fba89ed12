"""The public API of curvlab: which modules and names the reference documents.

Shared by ``docs/conf.py`` (which writes one reference page per module from it) and
``tests/test_docs.py`` (which fails on a public name without a docstring).

A public module's names are its ``__all__``; a package without ``__all__`` (``linalg``,
``optim``, ``integrations``) exports the names it binds with ``from ... import X as X``.
Each object is documented once, on the page of the last public module in
``PUBLIC_MODULES`` that exports it (the most specific one: ``curvlab.hvp`` is documented on
``curvlab.autodiff``); the other modules link to it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import types

#: (module, title) in the order of the reference; integrations.hf / .lightning need their
#: optional dependencies (the ``hf`` extra).
PUBLIC_MODULES = [
    ("curvlab", "curvlab (top level)"),
    ("curvlab.autodiff", "Automatic differentiation"),
    ("curvlab.objective", "Objectives"),
    ("curvlab.losses", "Loss conventions"),
    ("curvlab.linops", "Curvature operators"),
    ("curvlab.linalg", "Linear algebra on operators"),
    ("curvlab.diagnostics", "Diagnostics"),
    ("curvlab.minimize", "Classical solvers"),
    ("curvlab.minimize.problems", "Test problems"),
    ("curvlab.optim", "Optimizers"),
    ("curvlab.optim.base", "The optimizer contract"),
    ("curvlab.optim.stability", "Stability models"),
    ("curvlab.optim.preconditioners", "Block preconditioners (writing an optimizer)"),
    ("curvlab.distributed", "Distributed helpers and checkpoints"),
    ("curvlab.integrations", "Integrations"),
    ("curvlab.integrations.hf", "Hugging Face Trainer"),
    ("curvlab.integrations.lightning", "PyTorch Lightning"),
    ("curvlab.cli", "Command line"),
]


def public_names(module: types.ModuleType) -> list[str]:
    """The public names of ``module`` (``__all__``, or its ``X as X`` re-exports)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)
            and getattr(v, "__module__", "").startswith("curvlab")]


def kind(obj) -> str:
    """``module``, ``class``, ``exception``, ``function`` or ``data``."""
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj) or (callable(obj) and getattr(obj, "__module__", "").startswith(
            "curvlab")):
        return "function"
    return "data"


def owners() -> dict[str, list[tuple[str, str]]]:
    """module -> [(name, kind)] of the objects documented on that module's page."""
    seen: dict[int, tuple[str, str, str]] = {}
    order: list[int] = []
    for modname, _title in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for name in public_names(mod):
            obj = getattr(mod, name)
            k = kind(obj)
            if k == "module":
                continue
            key = id(obj) if k != "data" else hash((modname, name))
            if key not in seen:
                order.append(key)
            seen[key] = (modname, name, k)
    out: dict[str, list[tuple[str, str]]] = {m: [] for m, _ in PUBLIC_MODULES}
    for key in order:
        modname, name, k = seen[key]
        out[modname].append((name, k))
    return out


def _comment_doc(path: str, name: str) -> str:
    """The ``#:`` comment lines right above the module-level assignment of ``name``."""
    with open(path) as fh:
        source = fh.read()
    lines = source.splitlines()
    for node in ast.parse(source).body:
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                   if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            doc, i = [], node.lineno - 2
            while i >= 0 and lines[i].lstrip().startswith("#:"):
                doc.insert(0, lines[i].lstrip()[2:].strip())
                i -= 1
            return "\n".join(doc).strip()
    return ""


def _attr_doc(module: types.ModuleType, name: str) -> str:
    """The ``#:`` comment documenting module-level data ``name``, searched in the module
    and its submodules (where a re-exported constant is defined)."""
    mods = [module]
    if hasattr(module, "__path__"):
        mods += [importlib.import_module(f"{module.__name__}.{m.name}")
                 for m in pkgutil.iter_modules(module.__path__)]
    for mod in mods:
        if getattr(mod, "__file__", None) and vars(mod).get(name) is getattr(module, name):
            doc = _comment_doc(mod.__file__, name)
            if doc:
                return doc
    return ""


def _own_doc(obj) -> str:
    doc = obj.__doc__ if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj):
        if "__doc__" not in vars(obj):
            return ""
        if dataclasses.is_dataclass(obj) and (doc or "").startswith(obj.__name__ + "("):
            return ""  # the signature dataclasses write in place of a missing docstring
    return (doc or "").strip()


def _member_doc(cls: type, name: str) -> str:
    """A member's docstring, inherited along the MRO as autodoc shows it."""
    for base in cls.__mro__:
        if name in vars(base):
            v = vars(base)[name]
            f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
            doc = (getattr(f, "__doc__", None) or "").strip()
            if doc:
                return doc
    return ""


def missing_docstrings() -> list[str]:
    """Every public name, and every public method / property a public class defines,
    that has no docstring."""
    missing = []
    for modname, names in owners().items():
        mod = importlib.import_module(modname)
        for name, k in names:
            obj = getattr(mod, name)
            qual = f"{modname}.{name}"
            doc = _attr_doc(mod, name) if k == "data" else _own_doc(obj)
            if not doc:
                missing.append(qual)
            if k in ("class", "exception"):
                for member, v in vars(obj).items():
                    if member.startswith("_") or not (callable(v) or isinstance(
                            v, (property, classmethod, staticmethod))):
                        continue
                    if not _member_doc(obj, member):
                        missing.append(f"{qual}.{member}")
    return missing


if __name__ == "__main__":
    print("\n".join(missing_docstrings()) or "every public name has a docstring")
