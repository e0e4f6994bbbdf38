"""Benchmark of the graph analysis on the CPU: ``orthofx.analyze`` against the model's own cost.

    python benchmarks/analyze_bench.py [--quick] [--json PATH] [--repeats N] [--models ...]

Two tables, each measured in one run, interleaved and in a rotating order, medians over the
rounds (21 by default; 7 for a model whose analyze + forward+backward takes over 2 s; 11 for
the symbolic table). Only ratios are meaningful across machines; on a shared CPU only ratios
measured side by side are meaningful at all.

**Recorded analysis** (the issue's target): ``orthofx.analyze(model, example_inputs)`` records
one concrete forward at the ATen level and analyses the recording. For torchvision
``resnet50`` (``weights=None``, batch 2 × 3×224×224) and one model of each style of the
real-code corpus (``tests/corpora/realcode``), the median wall time of

* ``analyze``: ``orthofx.analyze(model, inputs)``;
* ``fwd+bwd``: one forward + backward in train mode on the same inputs
  (loss = Σ outputs · a fixed random cotangent; ``.grad`` cleared outside the timing);
* ``fx``: ``torch.fx.symbolic_trace`` of a fresh copy of the untouched model where it works
  (else ``n/a``; a failed symbolic trace can leave Proxies on a model whose forward assigns
  attributes, so fx never sees the model the other two use).

``ratio`` = analyze / fwd+bwd (medians), target ≤ 3×; ``paired`` = median over the rounds of
the same round's analyze / fwd+bwd; ``best`` = fastest analyze / fastest fwd+bwd (the least
disturbed pair on a loaded machine); ``/fx`` = analyze / fx.

Threads: ``--threads`` (default 1). On a shared, oversubscribed CPU two intra-op threads make
every small op wait on a descheduled partner and the times spread over two orders of magnitude;
one thread keeps them within ~2× of each other. ``--threads 0`` keeps torch's default.

**Symbolic analysis**: ``orthofx.analyze(model)`` without inputs (``torch.fx`` tracing +
networkx walk) against plain ``torch.fx.symbolic_trace`` on torchvision models, each with a
user-written covariance-pooling head (1×1 reduction conv → BN → ReLU → centred covariance →
``torch.linalg.eigh`` → U diag(√λ) Uᵀ) so the analysis has a meta-layer and a Pre-SVD layer to
find; ``trace`` is ``orthofx.graph.trace(model)`` alone. Target ≤ 2×.

``--quick`` (the smoke test) runs a few small real-code models and resnet18 with 2 repeats.
"""

from __future__ import annotations

import argparse
import copy
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
# the real-code corpus is test data (tests/corpora/realcode), not library code: import it from tests/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from corpora.realcode import CASES  # noqa: E402
from orthofx.graph import analyze, trace  # noqa: E402

TARGET = 3.0          # recorded analyze / one forward+backward
TARGET_SYMBOLIC = 2.0  # symbolic analyze / symbolic_trace


# =========================================================================================
# Recorded analysis: analyze(model, inputs) vs one forward+backward
# =========================================================================================
#: one real-code model per style (tests/corpora/realcode)
STYLES: dict[str, str] = {
    "gcp_isqrt": "GCP, iSQRT-COV (Newton–Schulz Function)",
    "gcp_svd": "GCP, MPN-COV (svd)",
    "iternorm_vgg": "IterNorm whitening",
    "dbn_vgg16": "DBN (ZCA by svd)",
    "zca_pade": "ZCA, Padé sqrt",
    "sovit_head": "second-order ViT head",
    "wct": "WCT style transfer",
    "spd_net": "SPDNet",
    "cholesky_whiten": "Cholesky whitening",
}
RESNET50_INPUT = (2, 3, 224, 224)


def _resnet50() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None), (torch.randn(*RESNET50_INPUT),)


def _case(name: str) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    return lambda: (CASES[name].build(), tuple(CASES[name].inputs()))


RECORDED: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "resnet50": _resnet50,
    **{name: _case(name) for name in STYLES},
}
QUICK_RECORDED = ("zca_pade", "spd_net")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.requires_grad else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _fwd_bwd(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One forward+backward in train mode; the cotangents are fixed on the first call."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in _tensors(model(*inputs))]

    def step() -> None:
        outs = _tensors(model(*inputs))
        loss = sum((o * c).sum() for o, c in zip(outs, cot))
        loss.backward()

    return step


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _fx_or_none(model: nn.Module) -> str | None:
    try:
        fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 — any failure means "n/a"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None


#: a model whose warm-up analyze + forward+backward takes longer than this gets HEAVY_ROUNDS
HEAVY_S = 2.0
HEAVY_ROUNDS = 7


def bench_recorded(name: str, repeats: int) -> dict[str, Any]:
    model, inputs = RECORDED[name]()
    # symbolic_trace runs forward on Proxies: a forward that assigns attributes (a buffer
    # reassigned in forward) would leave Proxies on the model, so fx always gets a copy
    # of the untouched model (made outside the timing).
    pristine = copy.deepcopy(model)
    step = _fwd_bwd(model, inputs)
    t0 = time.perf_counter()
    report = analyze(model, inputs)  # the first call: imports, caches; and the result we report
    cold = time.perf_counter() - t0
    _clear_grads(model)
    t0 = time.perf_counter()
    step()  # warm-up
    warm_fb = time.perf_counter() - t0
    fx_error = _fx_or_none(copy.deepcopy(pristine))
    model.train()
    rounds = min(repeats, HEAVY_ROUNDS) if cold + warm_fb > HEAVY_S else repeats
    fx_copy: list[nn.Module] = []

    def run_analyze() -> None:
        analyze(model, inputs)

    def run_fb() -> None:
        step()

    def run_fx() -> None:
        fx.symbolic_trace(fx_copy[0])

    jobs: list[tuple[str, Callable[[], None]]] = [("analyze", run_analyze), ("fb", run_fb)]
    if fx_error is None:
        jobs.append(("fx", run_fx))
    times: dict[str, list[float]] = {k: [] for k, _ in jobs}
    for r in range(rounds):
        for k, fn in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:  # rotating order
            _clear_grads(model)
            if k == "fx":
                fx_copy[:] = [copy.deepcopy(pristine)]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    _clear_grads(model)
    an_ms, fb_ms = _median_ms(times["analyze"]), _median_ms(times["fb"])
    fx_ms = _median_ms(times["fx"]) if fx_error is None else None
    paired = statistics.median(a / b for a, b in zip(times["analyze"], times["fb"]))
    best = min(times["analyze"]) / min(times["fb"])
    return {
        "model": name,
        "style": STYLES.get(name, "torchvision, no meta-layer"),
        "inputs": [list(t.shape) for t in inputs],
        "rounds": rounds,
        "analyze_ms": round(an_ms, 2),
        "analyze_first_ms": round(cold * 1e3, 2),
        "fwd_bwd_ms": round(fb_ms, 2),
        "fx_ms": None if fx_ms is None else round(fx_ms, 2),
        "fx_error": fx_error,
        "ratio": round(an_ms / fb_ms, 3),
        "paired_ratio": round(paired, 3),
        "best_ratio": round(best, 3),
        "ratio_fx": None if fx_ms is None else round(an_ms / fx_ms, 3),
        "within_target": an_ms / fb_ms <= TARGET,
        "producers": report.producers,
    }


# =========================================================================================
# Symbolic analysis: analyze(model) vs torch.fx.symbolic_trace
# =========================================================================================
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
QUICK = ("resnet18",)


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
        "within_target": an_ms / fx_ms <= TARGET_SYMBOLIC,
        "producers": report.producers,
        "skipped": len(report.skipped),
    }


# =========================================================================================
def _fmt(x: float | None, w: int, p: int = 1) -> str:
    return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.{p}f}"


def _producers(ps: list[str], n: int = 3) -> str:
    return ",".join(ps[:n]) + (f",…(+{len(ps) - n})" if len(ps) > n else "") if ps else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"only {', '.join(QUICK_RECORDED)} and {', '.join(QUICK)}, 2 repeats")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1, see the module docstring; 0: torch's default)")
    ap.add_argument("--models", nargs="*", default=None, choices=sorted(RECORDED),
                    help="recorded-analysis models (default: all, or the quick ones)")
    ap.add_argument("--symbolic-models", nargs="*", default=None, choices=sorted(MODELS),
                    help="symbolic-analysis models (default: all, or the quick ones)")
    args = ap.parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args: argparse.Namespace) -> int:
    names = args.models if args.models is not None else (list(QUICK_RECORDED) if args.quick else list(RECORDED))
    sym_names = (args.symbolic_models if args.symbolic_models is not None
                 else (list(QUICK) if args.quick else list(MODELS)))
    repeats = args.repeats or (2 if args.quick else 21)

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"Recorded analysis: orthofx.analyze(model, inputs) / one forward+backward "
          f"(target <= {TARGET:.0f}x), median of {repeats} interleaved rounds "
          f"({HEAVY_ROUNDS} for models slower than {HEAVY_S:.0f} s)")
    header = (f"{'model':<16} {'inputs':<18} {'analyze ms':>10} {'fwd+bwd ms':>10} {'fx ms':>8} "
              f"{'ratio':>7} {'paired':>7} {'best':>6} {'/fx':>6}  producers")
    print(header)
    print("-" * len(header))
    for name in names:
        row = bench_recorded(name, repeats)
        rows.append(row)
        shape = "+".join("x".join(map(str, s)) for s in row["inputs"])
        flag = "" if row["within_target"] else "  (> target)"
        print(f"{name:<16} {shape:<18} {row['analyze_ms']:>10.1f} {row['fwd_bwd_ms']:>10.1f} "
              f"{_fmt(row['fx_ms'], 8)} {row['ratio']:>7.2f} {row['paired_ratio']:>7.2f} {row['best_ratio']:>6.2f} "
              f"{_fmt(row['ratio_fx'], 6, 2)}  {_producers(row['producers'])}{flag}", flush=True)
    summary: dict[str, Any] = {}
    if rows:
        ratios = [r["ratio"] for r in rows]
        met = [r["model"] for r in rows if r["within_target"]]
        summary = {"geomean_ratio": round(statistics.geometric_mean(ratios), 3),
                   "worst_ratio": max(ratios), "best_ratio": min(ratios),
                   "met": met, "not_met": [r["model"] for r in rows if not r["within_target"]]}
        print(f"\nratio analyze/fwd+bwd: geometric mean {summary['geomean_ratio']:.2f}, "
              f"range {summary['best_ratio']:.2f}-{summary['worst_ratio']:.2f} (target <= {TARGET:.0f}); "
              f"met on {len(met)}/{len(rows)}")

    sym_rows = []
    if sym_names:
        print(f"\nSymbolic analysis: orthofx.analyze(model) / torch.fx.symbolic_trace "
              f"(target <= {TARGET_SYMBOLIC:.0f}x), median of {min(repeats, 11)} rounds")
        header = f"{'model':<20} {'nodes':>6} {'fx ms':>9} {'trace ms':>9} {'analyze ms':>11} {'ratio':>6}  producers"
        print(header)
        print("-" * len(header))
    for name in sym_names:
        row = bench_model(name, min(repeats, 11))
        sym_rows.append(row)
        flag = "" if row["within_target"] else "  (> target)"
        print(f"{name:<20} {row['nodes']:>6} {row['fx_ms']:>9.2f} {row['trace_ms']:>9.2f} "
              f"{row['analyze_ms']:>11.2f} {row['ratio']:>6.2f}  {','.join(row['producers'])}{flag}",
              flush=True)
    sym_summary: dict[str, Any] = {}
    if sym_rows:
        ratios = [r["ratio"] for r in sym_rows]
        sym_summary = {"geomean_ratio": round(statistics.geometric_mean(ratios), 3),
                       "worst_ratio": max(ratios)}
        print(f"\nratio analyze/fx: geometric mean {sym_summary['geomean_ratio']:.2f}, "
              f"worst {sym_summary['worst_ratio']:.2f} (target <= {TARGET_SYMBOLIC:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "analyze_cpu",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "quick": args.quick,
            "repeats": repeats,
            "recorded": {"target_ratio": TARGET, **summary, "rows": rows},
            "symbolic": {"target_ratio": TARGET_SYMBOLIC, **sym_summary, "rows": sym_rows},
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
