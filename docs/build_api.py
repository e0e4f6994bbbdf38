"""Build the HTML API reference from the docstrings with pdoc.

    python docs/build_api.py [--out out/docs/api]      (``make docs``)

Writes one page per module: the ``orthofx`` package (its page lists the public top-level names,
which the package imports lazily) and every importable submodule (private ``_x`` modules
excluded); a selected module without a page fails the build. A module whose optional
dependency is not installed (``lightning`` for ``orthofx.integrations.lightning``,
``torchvision`` for the command line, ...) is left out with a note, so the core's reference
builds with the core's dependencies alone. Any other import
error, and any pdoc warning except an annotation pdoc cannot resolve for display (listed,
harmless), fails the build: exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
import warnings
from dataclasses import dataclass, field
from collections.abc import Collection
from pathlib import Path
from types import ModuleType

#: top-level packages that only extras of orthofx install (kept in step with orthofx._optional)
OPTIONAL_PACKAGES = frozenset({
    "torchvision", "tqdm", "matplotlib", "tensorboard", "lightning", "pytorch_lightning",
    "transformers", "accelerate", "timm", "hypothesis", "scipy", "pdoc",
})

#: pdoc warnings that do not fail the build: a type annotation it cannot evaluate for display
#: (re-exported NamedTuples, Hypothesis-wrapped strategies); the page still shows it as text
HARMLESS = re.compile(r"^Error parsing type annotation ")


@dataclass
class Selection:
    """The modules to document and the ones left out because an optional package is missing."""

    modules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> missing package


def _optional_packages() -> frozenset[str]:
    try:
        from orthofx._optional import EXTRAS
    except ImportError:
        return OPTIONAL_PACKAGES
    return OPTIONAL_PACKAGES | frozenset(EXTRAS)


def missing_optional(error: ImportError, optional: frozenset[str]) -> str | None:
    """The optional package whose absence caused ``error``, or None when the error is a real
    bug (an orthofx module, or a core dependency, failed to import)."""
    name = getattr(error, "name", None) or ""
    top = name.partition(".")[0]
    return top if top in optional else None


def select(package: str = "orthofx") -> Selection:
    """Import ``package`` and all its public submodules; sort them into documented and skipped.

    Raises the ImportError of a module that fails for any reason other than a missing
    optional package."""
    optional = _optional_packages()
    root = importlib.import_module(package)
    sel = Selection(modules=[package])
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        name = info.name
        if any(part.startswith("_") for part in name.split(".")):
            continue
        if any(name.startswith(s + ".") for s in sel.skipped):
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = missing_optional(e, optional)
            if missing is None:
                raise
            sel.skipped[name] = missing
            continue
        sel.modules.append(name)
    return sel


def expose_public_names(module: ModuleType) -> list[str]:
    """Give a package without ``__all__`` one listing its public names, so that pdoc documents
    them on the package's page: the lazily imported names of its ``_LAZY`` table (PEP 562
    ``__getattr__``, loaded into the module's namespace here) and the classes/functions of the
    package it re-exports. A package with ``__all__`` keeps it; its lazy names are loaded into
    the namespace all the same. Returns the list. Only the docs build calls this."""
    existing = getattr(module, "__all__", None)
    if existing is not None:
        for name in existing:  # pdoc reads the module's __dict__, not __getattr__
            if name not in vars(module):
                setattr(module, name, getattr(module, name))
        return list(existing)
    lazy = set(getattr(module, "_LAZY", {}) or {})
    names = []
    for name in dir(module):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if isinstance(obj, ModuleType):
            continue
        if name in lazy or (getattr(obj, "__module__", None) or "").startswith(module.__name__ + "."):
            setattr(module, name, obj)  # pdoc reads the module's __dict__, not __getattr__
            names.append(name)
    module.__all__ = names
    return names


def build(out: Path, package: str = "orthofx", only: Collection[str] | None = None) -> tuple[Selection, list[str]]:
    """Render one page per selected module into ``out``; return the selection and the harmless
    warnings. ``only`` renders just those of the selected modules (a quick partial build).

    Raises RuntimeError listing every other pdoc warning."""
    import pdoc.doc
    import pdoc.render

    sel = select(package)
    for name in sel.modules:  # pdoc reads a package's __dict__, not its lazy __getattr__
        module = sys.modules[name]
        if hasattr(module, "__path__") and (hasattr(module, "_LAZY") or hasattr(module, "__all__")):
            expose_public_names(module)
    pdoc.render.configure(docformat="google", footer_text=f"{package} API reference", show_source=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # exactly the selected modules: pdoc's own walk follows a package's __all__, and
        # orthofx.__all__ lists only the top-level names, so it would skip every submodule
        names = [m for m in sel.modules if only is None or m in only]
        docs = {name: pdoc.doc.Module.from_name(name) for name in names}
        for name, module in docs.items():
            path = page_path(out, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(pdoc.render.html_module(module, docs), encoding="utf-8")
        (out / "index.html").write_text(pdoc.render.html_index(docs), encoding="utf-8")
        (out / "search.js").write_text(pdoc.render.search_index(docs), encoding="utf-8")
    harmless, errors = [], []
    for w in caught:
        text = str(w.message)
        if issubclass(w.category, DeprecationWarning) and "pdoc" not in w.filename:
            continue  # a library's own deprecation, raised while pdoc imports it
        (harmless if HARMLESS.match(text) else errors).append(text.splitlines()[0])
    if errors:
        raise RuntimeError("pdoc reported problems:\n  " + "\n  ".join(errors))
    return sel, harmless


def page_path(out: Path, module: str) -> Path:
    """Where pdoc writes ``module``'s page under ``out`` (``orthofx/nn.html`` for ``orthofx.nn``)."""
    return out.joinpath(*module.split(".")).with_suffix(".html")


def written_pages(out: Path, modules: list[str]) -> list[Path]:
    """The pages of ``modules`` under ``out``; raises RuntimeError naming any module without one."""
    missing = [m for m in modules if not page_path(out, m).is_file()]
    if missing:
        raise RuntimeError(f"no page written for {len(missing)} module(s): {', '.join(missing)}")
    return [page_path(out, m) for m in modules]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/docs/api"), help="output folder (default: out/docs/api)")
    args = p.parse_args(argv)
    try:
        sel, harmless = build(args.out)
        pages = written_pages(args.out, sel.modules)
    except (ImportError, RuntimeError) as e:
        print(f"docs: build failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    for mod, pkg in sel.skipped.items():
        print(f"docs: {mod} left out: optional package {pkg!r} is not installed")
    if harmless:
        print(f"docs: {len(harmless)} annotation(s) shown as text (pdoc could not resolve them)")
    print(f"docs: {len(pages)} module pages -> {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
