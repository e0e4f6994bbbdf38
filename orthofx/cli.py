"""Command line: ``orthofx report | demo | study | train``.

    orthofx report resnet18 --head gcp            # what the pass finds, as a table
    orthofx report resnet50 --stem whiten --format dot > chain.dot
    orthofx report mypkg.models:build --format json
    orthofx demo [--quick] [--experiment both|dbn|gcp|dbn-small] [--out DIR] [--seeds N] [--jobs N] [--extended]
    orthofx study [--quick] [--report] [--experiment both|dbn|gcp] [--rows LABEL ...] [--seeds N] [--steps N] [--profile cpu|gpu]
    orthofx train --config examples/resnet50_dbn_cifar100.json [--epochs 1 --treatment nog]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from orthofx.errors import ConfigError, OptionError, OrthofxError

__all__ = ["main", "build_spec"]

#: ExperimentConfig field -> the ``orthofx train`` flag that sets it
_TRAIN_FLAGS = {
    "treatment": "--treatment", "epochs": "--epochs", "seed": "--seed", "out": "--out", "data_dir": "--data",
    "device": "--device", "train_limit": "--train-limit", "test_limit": "--test-limit", "dataset": "--dataset",
    "model": "--model", "backend": "--backend", "batch_size": "--batch-size", "lr": "--lr",
}


def _resolve_spec(spec: str) -> Callable[[int], Any]:
    """Check ``spec`` without building anything; return ``num_classes -> model or (model, example)``.

    Raises :class:`OptionError` (option ``spec``) for an empty spec, a module or attribute that
    cannot be imported, or an unknown torchvision model name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise OptionError("spec", spec, "must be a torchvision model name or module:callable")
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        if not mod_name or not attr:
            raise OptionError("spec", spec, "module:callable needs both a module and an attribute")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise OptionError("spec", spec, f"cannot load it: {e}") from None
        return lambda num_classes: _call(obj)
    import difflib

    from orthofx._optional import require

    torchvision = require("torchvision", "cli", purpose="a torchvision model name")

    names = torchvision.models.list_models()
    if spec not in names:
        close = difflib.get_close_matches(spec, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise OptionError(
            "spec", spec, f"unknown model (a torchvision name such as resnet18, or module:callable){hint}"
        )
    return lambda num_classes: torchvision.models.get_model(spec, weights=None, num_classes=num_classes)


def _call(obj: Any) -> Any:
    """A module as is, a callable called (model or ``(model, example)``), anything else as is."""
    from torch import nn

    return obj if isinstance(obj, nn.Module) or not callable(obj) else obj()


def build_spec(spec: str, head: str | None = None, stem: str | None = None, num_classes: int = 10) -> Any:
    """``(model, example_inputs or None)`` from ``spec``: a torchvision model name
    (weights=None) or ``module:callable``.

    ``head="gcp"`` adds a user-style GCP head, ``stem="whiten"`` a user-style whitening stem
    (ResNet-style models). A callable may return a model or ``(model, example_inputs)``.
    An unknown or unloadable spec raises :class:`OptionError` (option ``spec``).
    """
    from torch import nn

    from orthofx.experiment.surgery import add_gcp_head, add_whitening_stem

    model = _resolve_spec(spec)(num_classes)
    example = None
    if isinstance(model, tuple) and len(model) == 2:
        model, example = model
    if not isinstance(model, nn.Module):
        raise OptionError("spec", spec, f"gave a {type(model).__name__}, not an nn.Module")
    if head == "gcp":
        model = add_gcp_head(model)
    if stem == "whiten":
        model = add_whitening_stem(model)
    return model, example


# ---------------------------------------------------------------------------- option checks
def _check_int(value: Any, option: str, minimum: int) -> None:
    if value is not None and value < minimum:
        raise OptionError(option, value, f"must be >= {minimum}")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_out_dir(path: str, option: str) -> None:
    """``path`` is (or can be created as) a writable directory."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OptionError(option, path, "exists and is not a directory")
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise OptionError(option, path, f"cannot create it: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OptionError(option, path, f"cannot write into {base}")


def _check_out_file(path: str, option: str) -> None:
    """``path`` can be written as a file: its folder exists and is writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OptionError(option, path, "is a directory, not a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OptionError(option, path, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionError(option, path, f"cannot write into {folder}")


def _check_data_dir(path: str | None, option: str, download: bool) -> None:
    """An explicit data directory must exist (orthofx would otherwise fall back to the system
    copy silently); with ``--download`` it may be missing (the download creates it)."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise OptionError(option, path, "is not a directory")
    elif not download:
        raise OptionError(option, path, "directory does not exist (pass --download to fetch the dataset into it)")
    else:
        _check_out_dir(path, option)


def _check_device(device: str | None, option: str = "--device") -> None:
    from orthofx.experiment.config import DEVICES

    if device is None:
        return
    if device not in DEVICES:
        raise OptionError(option, device, f"must be one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OptionError(option, device, "CUDA is not available (torch.cuda.is_available() is False)")


# ---------------------------------------------------------------------------- commands
def _cmd_report(a: argparse.Namespace) -> Callable[[], int]:
    _check_int(a.input_size, "--input-size", 0)
    if a.png is not None:
        _check_out_file(a.png, "--png")
    if ":" in a.spec and os.getcwd() not in sys.path and "" not in sys.path:
        # `orthofx report mymod:build` from mymod.py's folder: a console script, unlike
        # `python -m`, does not put the working directory on sys.path
        sys.path.insert(0, os.getcwd())
    _resolve_spec(a.spec)

    def work() -> int:
        import torch

        import orthofx

        model, example = build_spec(a.spec, a.head, a.stem)
        if example is None and a.input_size:
            example = (torch.randn(2, 3, a.input_size, a.input_size),)
        report = orthofx.analyze(model, example)
        if a.format == "json":
            print(json.dumps(report.to_dict(), indent=2))
        elif a.format == "dot":
            print(report.to_dot())
        else:
            print(report)
        if a.png:
            print(f"wrote {report.to_png(a.png)}", file=sys.stderr)
        if not report.entries and example is None:
            _line("no meta-layer found by symbolic tracing, which cannot see inside autograd.Functions or "
                  "data-dependent code; pass --input-size S to analyse a real forward of a 2x3xSxS batch "
                  "(or return (model, example_inputs) from the callable)", "orthofx report: ")
        return 0 if report.entries else 1

    return work


def _is_main_process() -> bool:
    """False on every rank but 0 of a ``torchrun``/DDP job (read from the process group when
    it is initialised, else from ``$RANK``), so that results are printed once."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("RANK", "0") in ("", "0")


def _cmd_demo(a: argparse.Namespace) -> Callable[[], int]:
    _check_int(a.seeds, "--seeds", 1)
    _check_int(a.first_seed, "--first-seed", 0)
    _check_int(a.threads, "--threads", 0)
    _check_int(a.jobs, "--jobs", 0)
    _check_out_dir(a.out, "--out")
    _check_data_dir(a.data, "--data", a.download)
    _check_device(a.device)

    def work() -> int:
        from orthofx.experiment.demo import demo

        demo(
            a.out, quick=a.quick, seeds=a.seeds, first_seed=a.first_seed, experiment=a.experiment, data_dir=a.data, download=a.download,
            device=a.device, progress=not a.no_progress, timing=False if a.no_timing else None,
            threads=a.threads or None, jobs=a.jobs or None, extended=a.extended,
        )
        return 0

    return work


def _cmd_study(a: argparse.Namespace) -> Callable[[], int]:
    from orthofx.experiment.study import PROFILES, plan_study

    _check_int(a.seeds, "--seeds", 1)
    _check_int(a.steps, "--steps", 1)
    _check_int(a.jobs, "--jobs", 0)
    out = a.out or ("out/study-quick" if a.quick else "out/study")
    _check_out_dir(out, "--out")
    _check_data_dir(a.data, "--data", False)
    try:  # unknown --rows labels, before any work
        plan_study(out, rows=a.rows, seeds=1, profile="quick" if a.quick else a.profile, steps=1)
    except OptionError as e:
        raise OptionError(f"--{e.option}", e.value, e.problem) from None
    if a.profile == "gpu" and not a.quick:
        _check_device(PROFILES["gpu"].device)

    def work() -> int:
        from orthofx.experiment.study import study

        try:
            study(out, experiment=a.experiment, rows=a.rows, seeds=a.seeds, jobs=a.jobs or None, profile=a.profile,
                  steps=a.steps, quick=a.quick, data_dir=a.data, progress=not a.no_progress, report_only=a.report)
        except OptionError as e:
            raise OptionError(f"--{e.option}", e.value, e.problem) from None
        return 0

    return work


def _cmd_train(a: argparse.Namespace) -> Callable[[], int]:
    from orthofx.experiment.config import ExperimentConfig, load_config

    overrides: dict[str, Any] = dict(
        treatment=a.treatment, epochs=a.epochs, seed=a.seed, out=a.out, data_dir=a.data,
        device=a.device, train_limit=a.train_limit, test_limit=a.test_limit, dataset=a.dataset,
        model=a.model, backend=a.backend, batch_size=a.batch_size, lr=a.lr,
    )
    if a.download:
        overrides["download"] = True
    if a.no_resume:
        overrides["resume"] = False
    if a.no_progress:
        overrides["progress"] = False
    if a.amp:
        overrides["amp"] = True

    def option(field: str) -> str:
        flag = _TRAIN_FLAGS.get(field)
        if flag is not None and overrides.get(field) is not None:
            return flag
        return f"--config: {a.config}: {field}" if a.config else field

    try:
        if a.config:
            cfg = load_config(a.config, **overrides)
        else:
            cfg = ExperimentConfig(**{k: v for k, v in overrides.items() if v is not None})
    except OptionError as e:
        raise OptionError(option(e.option), e.value, e.problem) from None
    except ConfigError as e:
        raise OptionError("--config", a.config, str(e)) from None
    _check_data_dir(cfg.data_dir, option("data_dir"), cfg.download)
    _check_out_dir(cfg.out, option("out"))
    _check_device(cfg.device, option("device"))

    def work() -> int:
        from orthofx.experiment.train import run

        res = run(cfg)
        if not _is_main_process():  # under DDP only rank 0 prints the results line
            return 0
        k = next(iter(res["kappa"].values()), {})
        print(json.dumps({"run": res["run"], "final_test_error": res["final_test_error"],
                          "kappa_median": k.get("kappa_median"), "ms_per_step": res["ms_per_step"],
                          "results": f"{cfg.out}/results.json"}))
        return 0

    return work


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``orthofx: <option>: <problem>`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message, re.S)
        unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
        if unknown:
            message = (f"{unknown.group(1)}: unknown option(s); `orthofx --help` lists the commands, "
                       "`orthofx <command> --help` their options")
        _line(f"{m.group(1)}: {m.group(2)}" if m else message)
        raise SystemExit(2)


def _line(text: str, prefix: str = "orthofx: ") -> None:
    """Print ``prefix + text`` to stderr as one line (whitespace runs collapsed)."""
    print(prefix + " ".join(text.split()), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    import orthofx
    from orthofx.config import PRESETS
    from orthofx.experiment.demo import EXPERIMENT_CHOICES
    from orthofx.experiment.config import BACKENDS, DATASETS, MODEL_NAMES

    p = _Parser(prog="orthofx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"orthofx {orthofx.__version__}",
                   help="print the orthofx version and exit")
    # not required=True: argparse would then answer a bad flag (`orthofx --bogus`) with
    # "the following arguments are required: cmd"; main() names a missing command itself
    sub = p.add_subparsers(dest="cmd", metavar="{report,demo,study,train}")

    r = sub.add_parser("report", help="inspect a model: meta-layers, Pre-SVD layers, chains")
    r.add_argument("spec", help="torchvision model name (resnet18, ...) or module:callable")
    r.add_argument("--head", choices=["gcp"], help="replace the average pool by a GCP head (ResNet-style)")
    r.add_argument("--stem", choices=["whiten"], help="replace bn1 by ZCA whitening (ResNet-style)")
    r.add_argument("--format", choices=["table", "json", "dot"], default="table",
                   help="output format on stdout (default: table)")
    r.add_argument("--png", help="also write the chain picture to this PNG")
    r.add_argument("--input-size", type=int, default=0, help="record tensor shapes with a 2x3xSxS example")
    r.set_defaults(fn=_cmd_report)

    d = sub.add_parser("demo", help="the paper's decorrelated-BN and GCP experiments on Fashion-MNIST (CPU scale)")
    d.add_argument("--quick", action="store_true", help="smoke run of every row (< 50 s on 2 CPU cores)")
    d.add_argument("--experiment", choices=list(EXPERIMENT_CHOICES), default="both",
                   help="which experiment: dbn (5x5 1->64 stem + ZCA whitening), gcp (covariance pooling), "
                        "both (default), or dbn-small (the earlier 3x3 1->16 variant)")
    d.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    d.add_argument("--seeds", type=int, default=1, help="seeds per row; reports mean ± std")
    d.add_argument("--first-seed", type=int, default=0,
                   help="first seed (default 0): split seeds over processes sharing one --out")
    d.add_argument("--data", help="directory with Fashion-MNIST IDX files")
    d.add_argument("--download", action="store_true", help="download Fashion-MNIST via torchvision if missing")
    d.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    d.add_argument("--no-timing", action="store_true",
                   help="skip the interleaved step-time measurement (the 'step time vs SVD' column)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, the fastest measured for these small models; "
                        "0 keeps torch's default)")
    d.add_argument("--extended", action="store_true",
                   help="also the DBN rows SN, OL, NOG+SN, NOG+OL, NOG+OLR, OW+OLR (the rest of the paper's "
                        "Tables 1-3; about 2 more minutes per seed on 2 cores)")
    d.add_argument("--jobs", type=int, default=0,
                   help="runs at once, each in its own worker process (default 0: one per CPU core, 1 on CUDA); "
                        "results do not depend on it")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(fn=_cmd_demo)

    st = sub.add_parser("study", help="paired-seed study of every treatment (>= 2000 steps, >= 6 seeds; resumable)")
    st.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, ~20 steps, tiny data (not evidence)")
    st.add_argument("--experiment", choices=["both", "dbn", "gcp"], default="both", help="which experiment (default both)")
    st.add_argument("--rows", nargs="+", metavar="ROW",
                    help="only these rows, by label or slug (e.g. SVD 'NOG+OW(expm, A)' nog-ow-expm-a); default every row")
    st.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 6; --quick 2)")
    st.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the profile's, cpu 2000)")
    st.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                    help="cpu (default: small models, ~1 min per run on one thread) or gpu (larger models, batch 128)")
    st.add_argument("--jobs", type=int, default=0,
                    help="worker processes, one single-threaded run each (default 0: one per CPU core, 1 on CUDA)")
    st.add_argument("--out", default=None, help="output directory (default out/study, --quick: out/study-quick)")
    st.add_argument("--data", help="directory with Fashion-MNIST IDX files")
    st.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished run)")
    st.add_argument("--report", action="store_true",
                    help="run nothing: write results.md/json from the runs already in --out (a study in progress)")
    st.set_defaults(fn=_cmd_study)

    t = sub.add_parser("train", help="a full experiment from a JSON/TOML config (torchrun-ready)")
    t.add_argument("--config", help="ExperimentConfig as JSON/TOML; flags below override it")
    t.add_argument("--dataset", choices=list(DATASETS), help="dataset (default: fashion-mnist)")
    t.add_argument("--model", choices=list(MODEL_NAMES), help="model of the paper (default: small-resnet-dbn)")
    t.add_argument("--treatment", help=f"orthofx preset (default: svd); one of {', '.join(PRESETS)}")
    t.add_argument("--backend", choices=list(BACKENDS) + ["gram"],
                   help="meta-layer backend (default: auto, the layer's fastest exact route); "
                        "ns = Newton-Schulz; gram only for the GCP models")
    t.add_argument("--epochs", type=int, help="training epochs (default: 2)")
    t.add_argument("--batch-size", type=int, help="training batch size (default: 128)")
    t.add_argument("--lr", type=float, help="SGD learning rate (default: 0.1)")
    t.add_argument("--seed", type=int, help="seed of the weights and the data order (default: 0)")
    t.add_argument("--train-limit", type=int, help="train on a fixed random subset of this many images")
    t.add_argument("--test-limit", type=int, help="test on a fixed random subset of this many images")
    t.add_argument("--data", help="dataset directory")
    t.add_argument("--download", action="store_true", help="let torchvision download the dataset if missing")
    t.add_argument("--out", help="output directory: results.json, kappa.csv, checkpoint.pt (default: out/run)")
    t.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    t.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 + GradScaler on CUDA")
    t.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(fn=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthofx`` command.

    Every option is checked before any work (no data loaded, no model built): an invalid one
    prints ``orthofx: <option>: <problem>`` on one line to stderr and returns 2 (argparse's
    own errors exit with 2 the same way). A missing dataset also returns 2; another orthofx
    error during the work prints ``orthofx <command>: <message>`` and returns 1.
    """
    from orthofx.data import DatasetNotFound

    parser = _parser()
    a = parser.parse_args(argv)
    if a.cmd is None:
        parser.error("a command is required: report, demo, study or train (orthofx --help)")
    try:
        work = a.fn(a)
        return int(work() or 0)
    except OptionError as e:
        got = "" if str(e.value) in e.problem else f" (got {e.value!r})"
        _line(f"{e.option}: {e.problem}{got}")
        return 2
    except DatasetNotFound as e:
        _line(str(e), f"orthofx {a.cmd}: ")
        return 2
    except OrthofxError as e:
        _line(str(e), f"orthofx {a.cmd}: ")
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
