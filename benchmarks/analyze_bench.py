"""Benchmark of the graph analysis: ``orthofx.analyze`` time against plain ``torch.fx.symbolic_trace``.

    python benchmarks/analyze_bench.py [--quick] [--json PATH] [--repeats N]

Each torchvision model (``weights=None``) gets a user-written covariance-pooling head (1×1
reduction conv → BN → ReLU → centred covariance → ``torch.linalg.eigh`` → U diag(√λ) Uᵀ), so
the analysis has a meta-layer and a Pre-SVD layer to find. For every model, in one run and
interleaved (fx, orthofx trace, orthofx analyze, fx, ...), the median wall time of

* ``fx``: ``torch.fx.symbolic_trace(model)``;
* ``trace``: ``orthofx.graph.trace(model)`` (leaf rules, scopes, Function leaves);
* ``analyze``: ``orthofx.graph.analyze(model)`` (trace + networkx walk + report).

``ratio`` = analyze / fx; the target is ≤ 2×. Only the ratio is meaningful across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthofx.graph import analyze, trace  # noqa: E402

TARGET = 2.0


class GCPHead(nn.Module):
    """A covariance-pooling head as users write it (raw torch.linalg)."""

    def __init__(self, in_channels: int, reduced: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, reduced, 1, bias=False)
        self.bn = nn.BatchNorm2d(reduced)
        self.fc = nn.Linear(reduced * reduced, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.reduce(x)))
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w)
        x = x - x.mean(-1, keepdim=True)
        cov = x @ x.transpose(1, 2) / (h * w) + 1e-5 * torch.eye(c, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        s = u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)
        return self.fc(s.flatten(1))


class TokenGCP(nn.Module):
    def __init__(self, dim: int, reduced: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, reduced)

    def forward(self, t):
        t = self.proj(t)
        t = t - t.mean(1, keepdim=True)
        lam, u = torch.linalg.eigh(t.transpose(1, 2) @ t / t.shape[1])
        return (u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)).flatten(1)


class ViTGCP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = torchvision.models.vit_b_16(weights=None, image_size=64)
        self.head = TokenGCP(768)

    def forward(self, x):
        x = self.vit._process_input(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = self.vit.encoder(torch.cat([cls, x], dim=1))
        return self.head(x[:, 1:])


def _with_head(name: str, channels: int, attr: str = "avgpool", clear: str | None = None) -> nn.Module:
    m = getattr(torchvision.models, name)(weights=None)
    setattr(m, attr, GCPHead(channels))
    if clear:
        setattr(m, clear, nn.Identity())
    return m


class DenseNetGCP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.densenet121(weights=None).features
        self.head = GCPHead(1024)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: _with_head("resnet18", 512, clear="fc"),
    "resnet50": lambda: _with_head("resnet50", 2048, clear="fc"),
    "vgg16": lambda: _with_head("vgg16", 512, clear="classifier"),
    "mobilenet_v3_large": lambda: _with_head("mobilenet_v3_large", 960, clear="classifier"),
    "efficientnet_b0": lambda: _with_head("efficientnet_b0", 1280, clear="classifier"),
    "densenet121": DenseNetGCP,
    "regnet_y_400mf": lambda: _with_head("regnet_y_400mf", 440, clear="fc"),
    "vit_b_16": ViTGCP,
}
QUICK = ("resnet18", "resnet50", "mobilenet_v3_large", "densenet121")


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_model(name: str, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MODELS[name]()
    report = analyze(model)  # warm-up (imports, caches) and the result we report
    fx.symbolic_trace(model)
    t_fx, t_trace, t_an = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gm = fx.symbolic_trace(model)
        t1 = time.perf_counter()
        trace(model)
        t2 = time.perf_counter()
        analyze(model)
        t3 = time.perf_counter()
        t_fx.append(t1 - t0)
        t_trace.append(t2 - t1)
        t_an.append(t3 - t2)
    fx_ms, tr_ms, an_ms = _median_ms(t_fx), _median_ms(t_trace), _median_ms(t_an)
    return {
        "model": name,
        "nodes": len(gm.graph.nodes),
        "fx_ms": round(fx_ms, 2),
        "trace_ms": round(tr_ms, 2),
        "analyze_ms": round(an_ms, 2),
        "ratio": round(an_ms / fx_ms, 3),
        "within_target": an_ms / fx_ms <= TARGET,
        "producers": report.producers,
        "skipped": len(report.skipped),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, fewer repeats")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    args = ap.parse_args(argv)
    names = args.models or (list(QUICK) if args.quick else list(MODELS))
    repeats = args.repeats or (5 if args.quick else 11)
    rows = []
    header = f"{'model':<20} {'nodes':>6} {'fx ms':>9} {'trace ms':>9} {'analyze ms':>11} {'ratio':>6}  producers"
    print(header)
    print("-" * len(header))
    for name in names:
        row = bench_model(name, repeats)
        rows.append(row)
        flag = "" if row["within_target"] else "  (> target)"
        print(f"{name:<20} {row['nodes']:>6} {row['fx_ms']:>9.2f} {row['trace_ms']:>9.2f} "
              f"{row['analyze_ms']:>11.2f} {row['ratio']:>6.2f}  {','.join(row['producers'])}{flag}",
              flush=True)
    worst = max(r["ratio"] for r in rows)
    geo = statistics.geometric_mean([r["ratio"] for r in rows])
    print(f"\nratio analyze/fx: geometric mean {geo:.2f}, worst {worst:.2f} (target <= {TARGET:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "analyze_vs_symbolic_trace",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "target_ratio": TARGET,
            "geomean_ratio": round(geo, 3),
            "worst_ratio": worst,
            "rows": rows,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
