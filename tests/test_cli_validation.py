"""``orthofx`` command line: every invalid option is one stderr line ``orthofx: <option>: ...``
and exit status 2, found before any data is loaded or model built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import orthofx.experiment.train as train_mod
from orthofx.cli import main


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as training or running the demo."""

    def boom(*a, **k):
        raise AssertionError("the command started working before validating its options")

    monkeypatch.setattr(train_mod, "run", boom)
    monkeypatch.setattr("orthofx.experiment.demo.demo", boom)
    monkeypatch.setattr("orthofx.experiment.train._load_data", boom)


def _one_line(capsys, option: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"orthofx: {option}: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return int(e.code)


def test_missing_data_directory_is_an_error(tmp_path, capsys, no_work):
    # measured: --data /nonexistent silently trained on the system copy and exited 0
    argv = ["train", "--dataset", "fashion-mnist", "--data", str(tmp_path / "nonexistent"),
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert _code(argv) == 2
    assert "does not exist" in _one_line(capsys, "--data")
    assert _code(["demo", "--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "d")]) == 2
    _one_line(capsys, "--data")


def test_demo_zero_seeds_is_an_error(tmp_path, capsys, no_work):
    # measured: demo --seeds 0 exited 0 with empty results
    assert _code(["demo", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert ">= 1" in _one_line(capsys, "--seeds")


def test_missing_config_file(tmp_path, capsys, no_work):
    assert _code(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in _one_line(capsys, "--config")


def test_malformed_config_file(tmp_path, capsys, no_work):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"epochs": 1,')
    assert _code(["train", "--config", str(cfg)]) == 2
    assert "not valid JSON" in _one_line(capsys, "--config")


def test_string_number_in_config_file(tmp_path, capsys, no_work):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dataset": "synthetic", "lr": "0.1", "out": str(tmp_path / "o")}))
    assert _code(["train", "--config", str(cfg)]) == 2
    line = _one_line(capsys, "--config")
    assert "lr" in line and "0.1" in line


def test_bad_value_from_a_flag_names_the_flag(tmp_path, capsys, no_work):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dataset": "synthetic", "out": str(tmp_path / "o")}))
    assert _code(["train", "--config", str(cfg), "--lr", "nan"]) == 2
    assert "finite" in _one_line(capsys, "--lr")


def test_batch_size_zero(tmp_path, capsys, no_work):
    assert _code(["train", "--dataset", "synthetic", "--batch-size", "0", "--out", str(tmp_path)]) == 2
    assert ">= 1" in _one_line(capsys, "--batch-size")


def test_negative_input_size(capsys, monkeypatch):
    monkeypatch.setattr("orthofx.analyze", lambda *a, **k: pytest.fail("analysed before validating"))
    assert _code(["report", "resnet18", "--input-size", "-3"]) == 2
    _one_line(capsys, "--input-size")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, no_work):
    assert _code(["train", "--dataset", "synthetic", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA" in _one_line(capsys, "--device")
    assert _code(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    _one_line(capsys, "--device")


def test_unknown_preset(tmp_path, capsys, no_work):
    assert _code(["train", "--dataset", "synthetic", "--treatment", "nog+bogus", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in _one_line(capsys, "--treatment")


def test_png_into_a_missing_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("orthofx.analyze", lambda *a, **k: pytest.fail("analysed before validating"))
    assert _code(["report", "resnet18", "--head", "gcp", "--png", str(tmp_path / "missing" / "c.png")]) == 2
    assert "does not exist" in _one_line(capsys, "--png")


def test_out_that_is_a_file(tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    assert _code(["train", "--dataset", "synthetic", "--out", str(f)]) == 2
    _one_line(capsys, "--out")


def test_argparse_errors_are_one_line(capsys):
    assert _code(["train", "--epochs", "x"]) == 2
    assert "invalid int value" in _one_line(capsys, "--epochs")
    assert _code(["report", "resnet18", "--format", "svg"]) == 2
    _one_line(capsys, "--format")


def test_unknown_model_spec(capsys):
    assert _code(["report", "no_such_model"]) == 2
    _one_line(capsys, "spec")
    assert _code(["report", "no_such_module_xyz:build"]) == 2
    _one_line(capsys, "spec")


def test_valid_options_still_train(tmp_path, capsys):
    argv = ["train", "--dataset", "synthetic", "--train-limit", "32", "--test-limit", "16", "--batch-size", "16",
            "--epochs", "1", "--treatment", "svd", "--out", str(tmp_path / "o"), "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run"] == "SVD"
    assert (Path(tmp_path) / "o" / "results.json").exists()


# ---------------------------------------------------------------------------- issue 15: CLI polish
def test_version(capsys):
    import orthofx

    assert _code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"orthofx {orthofx.__version__}"


def test_every_flag_of_every_subcommand_has_help():
    import argparse

    from orthofx.cli import _parser

    p = _parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in [("orthofx", p), *subs.choices.items()]:
        for action in sp._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def _fake_results(monkeypatch, seen: dict) -> None:
    def fake_run(cfg, **k):
        seen["cfg"] = cfg
        return {"run": cfg.run_name, "final_test_error": 1.0, "kappa": {}, "ms_per_step": 2.0}

    monkeypatch.setattr(train_mod, "run", fake_run)


def test_train_backend_auto_is_accepted_and_the_default(tmp_path, capsys, monkeypatch):
    seen: dict = {}
    _fake_results(monkeypatch, seen)
    assert _code(["train", "--dataset", "synthetic", "--backend", "auto", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].backend == "auto"
    assert _code(["train", "--dataset", "synthetic", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].backend == "auto"
    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.json")):
        cfg = json.loads(path.read_text())  # every example config loads, "backend": "auto" included
        assert train_mod.load_config(path, out=str(tmp_path)).backend == cfg.get("backend", "auto")
    assert _code(["train", "--dataset", "synthetic", "--backend", "gram", "--out", str(tmp_path)]) == 2
    assert "gram" in _one_line(capsys, "--backend")


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_only_rank_zero_prints_the_results_line(tmp_path, capsys, monkeypatch, rank, printed):
    _fake_results(monkeypatch, {})
    monkeypatch.setenv("RANK", rank)
    assert _code(["train", "--dataset", "synthetic", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert (len(out) == 1 and json.loads(out[0])["run"] == "SVD") if printed else out == []


def test_demo_experiment_and_first_seed_options(tmp_path, capsys, no_work):
    assert _code(["demo", "--experiment", "imagenet", "--out", str(tmp_path)]) == 2
    _one_line(capsys, "--experiment")
    assert _code(["demo", "--first-seed", "-1", "--out", str(tmp_path)]) == 2
    assert ">= 0" in _one_line(capsys, "--first-seed")
    assert _code(["demo", "--jobs", "-2", "--out", str(tmp_path)]) == 2
    assert ">= 0" in _one_line(capsys, "--jobs")


def test_demo_passes_experiment_to_the_demo(tmp_path, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr("orthofx.experiment.demo.demo", lambda out, **k: seen.update(k, out=out))
    assert _code(["demo", "--experiment", "gcp", "--first-seed", "2", "--seeds", "3", "--no-timing",
                  "--jobs", "3", "--out", str(tmp_path)]) == 0
    assert (seen["experiment"], seen["first_seed"], seen["seeds"], seen["timing"]) == ("gcp", 2, 3, False)
    assert seen["jobs"] == 3
    assert _code(["demo", "--out", str(tmp_path)]) == 0
    assert seen["jobs"] is None  # 0 (the default): one per CPU core, decided by the demo
