"""Packaging: metadata, the core's dependencies, and ImportErrors that name the extra."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import orthofx
from orthofx._optional import EXTRAS, MissingExtraError, require
from orthofx.errors import OrthofxError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CORE = {"torch", "networkx", "numpy"}
# parts of the package that may import optional packages (each through require() or lazily)
NON_CORE = ("cli.py", "__main__.py", "_optional.py", "models.py", "experiment", "integrations", "testing")


def _req_name(req: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(req).name


def _hide(monkeypatch: pytest.MonkeyPatch, *tops: str) -> None:
    """Make ``import top`` (and its submodules) fail as if the package were not installed."""
    for name in [m for m in sys.modules if m.partition(".")[0] in tops] + list(tops):
        monkeypatch.setitem(sys.modules, name, None)


def test_license_and_typed_marker_ship() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the orthofx authors" in text
    assert (ROOT / "orthofx" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["orthofx"]
    # PEP 639 license expressions need setuptools >= 77
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if _req_name(r) == "setuptools"]
    from packaging.requirements import Requirement

    assert Requirement(req).specifier.contains("77") and not Requirement(req).specifier.contains("76.9")


def test_core_dependencies_are_what_the_core_imports() -> None:
    assert {_req_name(r) for r in PROJECT["dependencies"]} == CORE
    extras = PROJECT["optional-dependencies"]
    assert set(EXTRAS.values()) <= set(extras), "every extra named in an error message exists"
    everything = {e.partition("[")[2].rstrip("]") for e in extras["all"]}
    assert set(",".join(everything).split(",")) == set(extras) - {"all", "demo"}


def test_torch_floor_is_the_tested_release() -> None:
    """The suite runs on the oldest torch the floor admits (same major.minor as installed)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    (req,) = [Requirement(r) for r in PROJECT["dependencies"] if _req_name(r) == "torch"]
    (floor,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    assert Version(torch.__version__.split("+")[0]).release[:2] == floor.release[:2]


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    tops: set[str] = set()
    for node in tree.body:  # module level only; imports inside functions are lazy
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                tops |= {a.name.partition(".")[0] for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                tops.add(sub.module.partition(".")[0])
    return tops


def test_core_modules_import_only_core_packages() -> None:
    allowed = CORE | {"orthofx", "typing_extensions"} | set(sys.stdlib_module_names)
    bad = {}
    for path in sorted((ROOT / "orthofx").rglob("*.py")):
        rel = path.relative_to(ROOT / "orthofx")
        if rel.parts[0] in NON_CORE:
            continue
        extra = _module_level_imports(path) - allowed
        if extra:
            bad[str(rel)] = sorted(extra)
    assert not bad, f"core modules import optional packages at module level: {bad}"


def test_core_workflow_runs_without_optional_packages() -> None:
    """transform → attach → step → checkpoint → load → strip with every optional package hidden."""
    hidden = sorted(set(EXTRAS) - CORE | {"pytorch_lightning", "PIL"})
    code = f"""
import io, sys
for name in {hidden!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec returns None
import torch, orthofx
from torch import nn
from orthofx.nn import CovariancePooling
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), CovariancePooling(8, reduced=4), nn.Linear(10, 2))
x = torch.randn(4, 3, 8, 8)
gm, report = orthofx.transform(model, (x,), "nog+ow+olr")
str(report)
opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
orthofx.attach(opt, gm)
gm(x).sum().backward(); opt.step()
buf = io.BytesIO(); orthofx.save_checkpoint(gm, buf); buf.seek(0)
orthofx.load_checkpoint(model, buf)
orthofx.strip(gm)
leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.partition(".")[0] in {hidden!r})
assert not leaked, leaked
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_require_returns_the_module() -> None:
    import json

    assert require("json", "cli") is json


@pytest.mark.parametrize("module,extra", [("matplotlib.pyplot", "plot"), ("torchvision", "cli"), ("lightning", "lightning")])
def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, extra: str) -> None:
    _hide(monkeypatch, module.partition(".")[0])
    with pytest.raises(MissingExtraError) as info:
        require(module, purpose="this feature")
    err = info.value
    assert isinstance(err, ImportError) and isinstance(err, OrthofxError)
    assert err.extra == extra and err.name == module
    assert f"pip install 'orthofx[{extra}]'" in str(err) and "this feature needs" in str(err)


def test_require_explicit_extra_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "torchvision")
    with pytest.raises(MissingExtraError, match=r"orthofx\[models\]"):
        require("torchvision", "models")


def test_public_builders_name_the_models_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import orthofx.models

    _hide(monkeypatch, "torchvision")
    with pytest.raises(MissingExtraError, match=r"resnet18_gcp needs 'torchvision'.*orthofx\[models\]"):
        orthofx.models.resnet18_gcp(10)


@pytest.mark.parametrize("module,package,extra", [
    ("orthofx.integrations.lightning", "lightning", "lightning"),
    ("orthofx.integrations.huggingface", "transformers", "hf"),
    ("orthofx.integrations.timm", "timm", "timm"),
])
def test_integrations_name_their_extra(monkeypatch: pytest.MonkeyPatch, module: str, package: str, extra: str) -> None:
    import importlib

    _hide(monkeypatch, package)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingExtraError, match=rf"orthofx\[{extra}\]"):
        importlib.import_module(module)
    assert orthofx.__version__  # the core is untouched


def test_report_png_and_demo_plots_name_their_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without matplotlib, Report.to_png and the demo's plots raise MissingExtraError naming
    the extra to install, not a bare ImportError from deep inside."""
    from orthofx.experiment import demo as demo_mod

    report = orthofx.analyze(torch.nn.Sequential(torch.nn.Linear(3, 3)), (torch.randn(2, 3),))
    _hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError, match=r"orthofx\[plot\]"):
        report.to_png(str(tmp_path / "r.png"))
    with pytest.raises(MissingExtraError, match=r"orthofx\[demo\]"):
        demo_mod.plot_error([], tmp_path / "e.png", "t")
    assert not (tmp_path / "r.png").exists()


def test_report_png_leaves_the_pyplot_backend_alone(tmp_path: Path) -> None:
    import matplotlib

    saved = matplotlib.get_backend()
    matplotlib.use("svg")  # a user's choice that drawing a report must not override
    try:
        report = orthofx.analyze(torch.nn.Sequential(torch.nn.Linear(3, 3)), (torch.randn(2, 3),))
        assert report.to_png(str(tmp_path / "r.png")) == str(tmp_path / "r.png")
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(saved)
