"""The command line where users' habits lead (issue 23): ``report mymod:build`` from the module's
folder, a hint for ``--input-size``, a bad flag named, the demo's extras checked before training,
``demo --quick`` results marked as a smoke run, and a foreign ``train --out`` naming what differs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orthofx.cli import main
from orthofx.errors import ConfigError

_MYMOD = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            f = self.conv(x).flatten(2)
            f = f - f.mean(-1, keepdim=True)
            if float(f.detach().abs().max()) > 0:  # data-dependent: symbolic tracing cannot follow it
                f = f * 1.0
            cov = f @ f.transpose(1, 2) / f.shape[-1] + 1e-3 * torch.eye(8)
            w, v = torch.linalg.eigh(cov)
            return self.fc(((v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)).mean(-1))


    def build():
        return Net()
''')


def _script() -> Path:
    exe = Path(sys.executable).parent / "orthofx"
    if not exe.exists():
        pytest.skip("the orthofx console script is not installed next to this python")
    return exe


def test_report_module_from_the_working_directory(tmp_path: Path) -> None:
    """A console script does not put the working directory on sys.path (``python -m`` does)."""
    (tmp_path / "habits_mymod.py").write_text(_MYMOD)
    out = subprocess.run([str(_script()), "report", "habits_mymod:build", "--input-size", "6"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "No module named" not in out.stderr and "1 meta-layer(s) with a Pre-SVD layer" in out.stdout


def test_report_without_input_size_suggests_it(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "habits_mymod2.py").write_text(_MYMOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["report", "habits_mymod2:build"]) == 1
    err = capsys.readouterr().err
    assert "pass --input-size S" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "habits_mymod2:build", "--input-size", "6"]) == 0
    assert "--input-size" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--bogus"], ["report", "resnet18", "--bogus"]])
def test_an_unknown_flag_is_named(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("orthofx: --bogus: unknown option")
    assert "required" not in err and len(err.strip().splitlines()) == 1


def test_no_command_is_still_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "a command is required" in capsys.readouterr().err


def test_demo_checks_matplotlib_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    import orthofx.experiment.jobs as jobs

    def no_training(*a, **k):
        raise AssertionError("trained before checking the extras")

    monkeypatch.setattr(jobs, "run_tasks", no_training)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails: as if not installed
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress", "--jobs", "1"]) == 1
    err = capsys.readouterr().err
    assert "matplotlib" in err and "demo" in err and not (tmp_path / "d" / "results.json").exists()


def test_quick_demo_results_say_they_are_a_smoke_run(tmp_path: Path) -> None:
    from orthofx.data import DatasetNotFound, find_fashion_mnist
    from orthofx.experiment.demo import demo

    try:
        find_fashion_mnist()
    except DatasetNotFound:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    kw = dict(experiment="dbn", rows=["SVD"], jobs=1, progress=False, timing=False, log=lambda s: None)
    res = demo(tmp_path / "q", quick=True, **kw)
    md = (tmp_path / "q" / "results.md").read_text()
    data = json.loads((tmp_path / "q" / "results.json").read_text())
    steps = res["experiments"]["dbn"]["runs"][0]["steps"]
    assert md.startswith("**Smoke run") and f"{steps} optimizer step(s) per row" in md.splitlines()[0]
    assert data["smoke_run"] == res["smoke_run"] and "not results" in data["smoke_run"]


def test_train_out_of_another_run_names_only_the_fields_that_differ(tmp_path: Path) -> None:
    from orthofx.experiment.train import ExperimentConfig, run

    def cfg(**kw):
        base = dict(dataset="synthetic", train_limit=32, test_limit=16, batch_size=16, epochs=1,
                    out=str(tmp_path / "run"), progress=False, monitor_every=1, treatment="olr")
        return ExperimentConfig(**{**base, **kw})

    run(cfg(), log=lambda s: None)
    with pytest.raises(ConfigError) as e:
        run(cfg(epochs=2, treatment="svd", lr=0.05), log=lambda s: None)
    msg = str(e.value)
    assert "treatment 'olr' there, 'svd' here" in msg and "--no-resume" in msg
    assert "batch_size" not in msg and "{" not in msg and len(msg) < 250
