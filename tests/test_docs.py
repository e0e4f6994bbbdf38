"""The user docs say what the code does.

* Every ```python block of README.md preceded by ``<!-- doc-test -->`` runs as written (CPU,
  fresh namespace, seeded); every other python block must say why it does not run
  (``<!-- not-run: reason -->``), so no snippet goes unchecked by accident.
* The README's first command block keeps ``make demo`` / ``make test`` (CI runs the README's
  test command).
* Relative links of the user docs point to files that exist.
* The commands of examples/README.md's table run (slow: each script trains a few steps).
* The API reference build (docs/build_api.py) leaves out a module whose optional package is
  missing and fails on any other import error, and writes a page per public module that
  documents its classes and functions.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USER_DOCS = [README, ROOT / "docs" / "internals.md", ROOT / "docs" / "concepts.md", ROOT / "benchmarks" / "README.md",
             ROOT / "examples" / "README.md"]

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_MARK = re.compile(r"<!--\s*(doc-test|not-run:[^>]*)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    lang: str
    code: str
    mark: str | None   # "doc-test", "not-run: ...", or None

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the marker comment just above each."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        out.append(Block(path, line, m.group(1), m.group(2), mark.group(1) if mark else None))
    return out


def _python_blocks() -> list[Block]:
    return [b for b in blocks(README) if b.lang == "python"]


def test_every_python_block_is_run_or_says_why() -> None:
    unmarked = [b.id for b in _python_blocks() if b.mark is None]
    assert not unmarked, f"python blocks without <!-- doc-test --> or <!-- not-run: reason -->: {unmarked}"
    assert any(b.mark == "doc-test" for b in _python_blocks())


@pytest.mark.parametrize("block", [b for b in _python_blocks() if b.mark == "doc-test"], ids=lambda b: b.id)
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU only: the README's snippets are written for the CPU (tensors made without a device)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    code = compile("\n" * (block.line) + block.code, str(block.path), "exec")  # tracebacks show README lines
    exec(code, {"__name__": "__readme__"})


def test_readme_starts_with_the_two_commands() -> None:
    first = blocks(README)[0]
    assert first.lang == "bash"
    commands = [ln.split("#")[0].strip() for ln in first.code.splitlines()]
    assert commands[:2] == ["make demo", "make test"]


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc: Path) -> None:
    targets = [t for t in _LINK.findall(doc.read_text(encoding="utf-8")) if "://" not in t]
    missing = [t for t in targets if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def _build_api(monkeypatch: pytest.MonkeyPatch):
    """docs/build_api.py as a module (registered in sys.modules for its dataclass)."""
    spec = importlib.util.spec_from_file_location("orthofx_docs_build_api", ROOT / "docs" / "build_api.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    pkg = tmp_path / "fakepkg_docs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A fake package."""\n')
    (pkg / "core.py").write_text('"""Core."""\n\ndef f() -> int:\n    """One."""\n    return 1\n')
    (pkg / "extra.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("fakepkg_docs")]:
        monkeypatch.delitem(sys.modules, name)
    return "fakepkg_docs"


def test_api_build_leaves_out_a_module_whose_optional_package_is_missing(tmp_path, monkeypatch) -> None:
    build_api = _build_api(monkeypatch)
    pkg = _fake_package(tmp_path, monkeypatch, "import lightning_not_installed_xyz\n")
    monkeypatch.setattr(build_api, "OPTIONAL_PACKAGES", frozenset({"lightning_not_installed_xyz"}))
    monkeypatch.setattr(build_api, "_optional_packages", lambda: build_api.OPTIONAL_PACKAGES)
    sel = build_api.select(pkg)
    assert sel.modules == ["fakepkg_docs", "fakepkg_docs.core"]
    assert sel.skipped == {"fakepkg_docs.extra": "lightning_not_installed_xyz"}


def test_api_build_fails_on_a_real_import_error(tmp_path, monkeypatch) -> None:
    build_api = _build_api(monkeypatch)
    pkg = _fake_package(tmp_path, monkeypatch, "from fakepkg_docs.core import does_not_exist\n")
    with pytest.raises(ImportError, match="does_not_exist"):
        build_api.select(pkg)


def test_api_build_lists_lazily_imported_top_level_names(tmp_path, monkeypatch) -> None:
    """A PEP 562 lazy name (``_LAZY`` + ``__getattr__``) is not in the package's ``__dict__``,
    so pdoc would leave the landing page empty; the build puts it there and in ``__all__``."""
    build_api = _build_api(monkeypatch)
    pkg = _fake_package(tmp_path, monkeypatch, '"""Extra."""\n')
    (tmp_path / pkg / "__init__.py").write_text(
        '"""A lazy package."""\nimport importlib\n_LAZY = {"f": "fakepkg_docs.core"}\n\n'
        "def __getattr__(name):\n"
        "    if name in _LAZY:\n"
        "        return getattr(importlib.import_module(_LAZY[name]), name)\n"
        "    raise AttributeError(name)\n\n"
        "def __dir__():\n    return sorted(set(globals()) | set(_LAZY))\n"
    )
    mod = importlib.import_module(pkg)
    assert "f" not in vars(mod)
    assert build_api.expose_public_names(mod) == ["f"]
    assert vars(mod)["f"]() == 1 and mod.__all__ == ["f"]


_EXAMPLES = ROOT / "examples"


def _example_commands() -> list[list[str]]:
    """``python examples/...`` commands of the examples table (the last column)."""
    text = (_EXAMPLES / "README.md").read_text(encoding="utf-8")
    return [shlex.split(c) for c in re.findall(r"\|\s*`(python examples/[^`]+)`\s*\|\s*$", text, re.M)]


def test_examples_table_lists_every_script() -> None:
    listed = {cmd[1] for cmd in _example_commands()}
    scripts = {f"examples/{p.name}" for p in _EXAMPLES.glob("*.py")}
    assert scripts == listed


@pytest.mark.slow
@pytest.mark.parametrize("cmd", _example_commands(), ids=lambda c: c[1])
def test_example_command_runs(cmd: list[str], tmp_path: Path) -> None:
    """CPU; plot_runs.py gets a κ CSV of a short monitored run instead of the glob."""
    if cmd[1].endswith("plot_runs.py"):
        import torch.nn.functional as F
        from torch import nn

        import orthofx

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(8),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        gm, _ = orthofx.transform(model, (x,), config="olr")
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        orthofx.attach(opt, gm)
        mon = orthofx.ConditioningMonitor(gm, every=1, run="smoke")
        mon.attach_to(opt)
        for _ in range(3):
            opt.zero_grad(); F.cross_entropy(gm(x), y).backward(); opt.step()
        mon.to_csv(tmp_path / "kappa.csv")
        cmd = [cmd[0], cmd[1], str(tmp_path / "kappa.csv"), "--out", str(tmp_path / "kappa.png")]
    out = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if cmd[1].endswith("plot_runs.py"):
        assert (tmp_path / "kappa.png").stat().st_size > 0


def test_api_build_loads_lazy_names_of_an_existing_all(tmp_path, monkeypatch) -> None:
    build_api = _build_api(monkeypatch)
    pkg = _fake_package(tmp_path, monkeypatch, '"""Extra."""\n')
    (tmp_path / pkg / "__init__.py").write_text(
        '"""A lazy package with __all__."""\nimport importlib\n__all__ = ["f"]\n\n'
        "def __getattr__(name):\n"
        "    if name == 'f':\n"
        "        return importlib.import_module('fakepkg_docs.core').f\n"
        "    raise AttributeError(name)\n"
    )
    mod = importlib.import_module(pkg)
    assert build_api.expose_public_names(mod) == ["f"]
    assert vars(mod)["f"]() == 1


_API_PAGES = ["orthofx", "orthofx.nn", "orthofx.optim", "orthofx.monitor", "orthofx.linalg", "orthofx.testing",
              "orthofx.integrations", "orthofx.integrations.lightning", "orthofx.integrations.huggingface",
              "orthofx.integrations.timm"]


def _public_api(name: str) -> list[str]:
    """The classes and functions a module documents: those of its ``__all__``, else the ones it
    defines."""
    import inspect

    mod = importlib.import_module(name)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    return [n for n in names if (inspect.isclass(obj := getattr(mod, n)) or inspect.isfunction(obj))
            and (hasattr(mod, "__all__") or obj.__module__ == name)]


def test_api_build_writes_a_page_per_public_module(tmp_path, monkeypatch) -> None:
    """The reference once had a single page: pdoc follows ``orthofx.__all__``, which lists only
    top-level names, and skipped every submodule. Every selected module gets its page (this
    renders the listed ones; ``make docs`` renders all and fails on a missing page)."""
    build_api = _build_api(monkeypatch)
    sel, _ = build_api.build(tmp_path, only=_API_PAGES)
    assert set(_API_PAGES) <= set(sel.modules) and len(sel.modules) > 60
    pages = build_api.written_pages(tmp_path, _API_PAGES)
    assert pages[1] == tmp_path / "orthofx" / "nn.html"
    for name, page in zip(_API_PAGES, pages):
        html = page.read_text(encoding="utf-8")
        public = _public_api(name)
        assert name == "orthofx.integrations" or public, name
        missing = [c for c in public if f'id="{c}"' not in html]
        assert not missing, f"{name}'s page does not document {missing}"
    assert 'id="transform"' in pages[0].read_text(encoding="utf-8")
    with pytest.raises(RuntimeError, match="orthofx.graph"):
        build_api.written_pages(tmp_path, ["orthofx", "orthofx.graph"])


def test_concepts_page_is_linked_and_covers_every_option() -> None:
    """docs/concepts.md: meta-layer, Pre-SVD layer, each treatment with its options, ow_target,
    which κ to read; linked from the README."""
    from orthofx.config import GradientSpec, WeightSpec

    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    assert "](docs/concepts.md)" in README.read_text(encoding="utf-8")
    for word in ("Meta-layer", "Pre-SVD layer", "| OW |", "| SN |", "| OL |", "| NOG |", "| OLR |",
                 '"expm"', '"cayley"', '"soc"', "ow_generator", "nog_scale", "nog_deficient", "ow_target",
                 '"generator"', '"weight"', "kappa_median", "(kappa.md)"):
        assert word in text, word
    # the defaults it states are the code's
    assert WeightSpec().ow_method == "cayley" and WeightSpec().ow_generator == "free"
    assert '`ow_method="cayley"` (the default' in text
    assert (GradientSpec().nog_scale, GradientSpec().nog_deficient) == ("unit", "partial")
    assert 'ow_generator="free"` (default)' in text and 'nog_scale="unit"` (the paper)' in text
