"""Command line: ``orthofx report | demo | train``.

    orthofx report resnet18 --head gcp            # what the pass finds, as a table
    orthofx report resnet50 --stem whiten --format dot > chain.dot
    orthofx report mypkg.models:build --format json
    orthofx demo [--quick] [--out DIR] [--seeds N]
    orthofx train --config examples/resnet50_dbn_cifar100.json [--epochs 1 --treatment nog]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Sequence

__all__ = ["main", "build_spec"]


def build_spec(spec: str, head: str | None = None, stem: str | None = None, num_classes: int = 10) -> Any:
    """A model from ``spec``: a torchvision model name (weights=None) or ``module:callable``.

    ``head="gcp"`` adds a user-style GCP head, ``stem="whiten"`` a user-style whitening stem
    (ResNet-style models). A callable may return a model or ``(model, example_inputs)``.
    """
    from orthofx.experiment.surgery import add_gcp_head, add_whitening_stem

    example = None
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"orthofx: cannot load {spec!r}: {e}") from e
        from torch import nn

        model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
        if isinstance(model, tuple):
            model, example = model
        if not isinstance(model, nn.Module):
            raise SystemExit(f"orthofx: {spec!r} gave a {type(model).__name__}, not an nn.Module")
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(spec, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as e:
            raise SystemExit(
                f"orthofx: unknown model {spec!r} (a torchvision name such as resnet18, or module:callable)"
            ) from e
    if head == "gcp":
        model = add_gcp_head(model)
    if stem == "whiten":
        model = add_whitening_stem(model)
    return model, example


def _cmd_report(a: argparse.Namespace) -> int:
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
    return 0 if report.entries else 1


def _cmd_demo(a: argparse.Namespace) -> int:
    from orthofx.data import DatasetNotFound
    from orthofx.experiment.demo import demo

    try:
        demo(
            a.out, quick=a.quick, seeds=a.seeds, data_dir=a.data, download=a.download,
            device=a.device, progress=not a.no_progress,
        )
    except DatasetNotFound as e:
        print(f"orthofx demo: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from orthofx.data import DatasetNotFound
    from orthofx.experiment.train import ExperimentConfig, load_config, run

    overrides = dict(
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
    try:
        if a.config:
            cfg = load_config(a.config, **overrides)
        else:
            cfg = ExperimentConfig(**{k: v for k, v in overrides.items() if v is not None})
        res = run(cfg)
    except DatasetNotFound as e:
        print(f"orthofx train: {e}", file=sys.stderr)
        return 2
    k = next(iter(res["kappa"].values()), {})
    print(json.dumps({"run": res["run"], "final_test_error": res["final_test_error"],
                      "kappa_median": k.get("kappa_median"), "ms_per_step": res["ms_per_step"],
                      "results": f"{cfg.out}/results.json"}))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orthofx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("report", help="inspect a model: meta-layers, Pre-SVD layers, chains")
    r.add_argument("spec", help="torchvision model name (resnet18, ...) or module:callable")
    r.add_argument("--head", choices=["gcp"], help="replace the average pool by a GCP head (ResNet-style)")
    r.add_argument("--stem", choices=["whiten"], help="replace bn1 by ZCA whitening (ResNet-style)")
    r.add_argument("--format", choices=["table", "json", "dot"], default="table")
    r.add_argument("--png", help="also write the chain picture to this PNG")
    r.add_argument("--input-size", type=int, default=0, help="record tensor shapes with a 2x3xSxS example")
    r.set_defaults(fn=_cmd_report)

    d = sub.add_parser("demo", help="the paper's decorrelated-BN experiment on Fashion-MNIST (CPU scale)")
    d.add_argument("--quick", action="store_true", help="smoke run (< 50 s on 2 CPU cores)")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--seeds", type=int, default=1, help="seeds per row; reports mean ± std")
    d.add_argument("--data", help="directory with Fashion-MNIST IDX files")
    d.add_argument("--download", action="store_true", help="download Fashion-MNIST via torchvision if missing")
    d.add_argument("--device", default="auto")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    t = sub.add_parser("train", help="a full experiment from a JSON/TOML config (torchrun-ready)")
    t.add_argument("--config", help="ExperimentConfig as JSON/TOML; flags below override it")
    t.add_argument("--dataset", choices=["fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"])
    t.add_argument("--model", choices=["small-resnet-dbn", "resnet50-dbn", "resnet18-gcp"])
    t.add_argument("--treatment", help="orthofx preset, e.g. nog+ow+olr")
    t.add_argument("--backend", choices=["eigh", "ns"])
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--train-limit", type=int)
    t.add_argument("--test-limit", type=int)
    t.add_argument("--data", help="dataset directory")
    t.add_argument("--download", action="store_true")
    t.add_argument("--out")
    t.add_argument("--device")
    t.add_argument("--amp", action="store_true")
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orthofx`` command."""
    a = _parser().parse_args(argv)
    return int(a.fn(a) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
