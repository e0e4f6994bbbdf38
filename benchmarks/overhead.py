"""Per-step cost of the treatments and of the exact meta-layer, measured side by side.

    python benchmarks/overhead.py [--quick] [--device cpu|cuda] [--json PATH]

Sections (all in one run, so ratios compare like with like):

1. ``step``: training-step time (forward, backward, SGD with momentum 0.9 and weight decay
   5e-4, orthofx.attach hooks) of each treatment preset against the same transformed model
   with preset "svd" (``plain_ms``), for two workloads:
   * ``dbn``: CIFAR ResNet-50, batch 128, 32×32, ZCA whitening after the 3×3 stem;
   * ``gcp``: ResNet-18, batch 256, 224², 1×1 reduction to 256 + covariance pooling (bf16
     autocast on CUDA);
   * ``mlp``: MLP 784→256→256→256→256→10, each hidden Linear followed by a Cholesky whitening
     written as real code writes it (``torch.linalg.cholesky`` of the batch covariance + 1e-3·I,
     then ``torch.linalg.solve_triangular``), batch 1024 (``--quick``: batch 256); every hidden
     Linear is a Pre-SVD producer, so OW runs on one 256×784 and three 256×256 weights.
   Presets are timed in interleaved rounds (plain, nog, olr, ... , plain, nog, ...; the order
   rotates each round); ``ratio`` is the median over rounds of the row's time over the same
   round's plain time, so drifting clocks and noisy neighbours hit every row alike.
   ``--quick`` uses small stand-ins (a small whitening ResNet at 28×28, a GCP ResNet-18 at 64²
   reducing to 32 channels, the MLP at batch 256); the step section finishes in well under a
   minute on 2 CPU cores.
   Next to the presets: ``nog(svd)`` (the paper's literal SVD polar factor, which synchronises
   on CUDA), ``ow(expm)`` and ``nog+ow+olr(expm)`` (the paper's exponential; ``ow``
   is the default Cayley map) and ``nog+ow+olr(W)``.
2. ``hook``: the NOG/OLR optimizer hooks alone on fixed gradients, as a share of the plain
   training step (low noise on a shared CPU).
3. ``audit``: per step, the synchronising ops and the kernel-launching ops each preset
   dispatches (``orthofx.sync_audit`` under ``cuda_policy``; on CUDA also the syncs that
   ``torch.cuda.set_sync_debug_mode`` sees) — the structural reason for the step times.
4. ``metalayer``: forward+backward of every sqrtm/invsqrtm backend (benchmarks/linalg_bench.py),
   and ``gcp_head``: the whole GCP meta-layer from features (Newton–Schulz vs the exact Gram
   route ``covariance_sqrtm`` vs the dense exact routes).
5. ``polar``: every polar method (the NOG direction), time and distance to the exact factor.
6. ``expm``: OW's exponential, torch.linalg.matrix_exp against orthofx.linalg.expm.
7. ``transform``: orthofx.analyze / orthofx.transform time against torch.fx.symbolic_trace.

Absolute times mean something only on a GPU; on the 2-core CPU here, read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import orthofx  # noqa: E402
from linalg_bench import bench_expm, bench_gcp_head, bench_polar, bench_spectral, print_table  # noqa: E402
from orthofx.models import SmallResNetDBN  # noqa: E402
from orthofx.models.resnet import cifar_resnet50_dbn, resnet18_gcp  # noqa: E402

PRESETS = ("svd", "nog", "olr", "nog+olr", "ow", "nog+ow+olr")
# variants timed next to the presets: the paper's literal SVD polar factor, the Cayley map
VARIANTS = {"nog(svd)": ("nog", {"nog_method": "svd"}),
            # the paper's exponential beside the default Cayley map (orthofx.vocab.DEFAULT_OW_METHOD)
            "ow(expm)": ("ow", {"ow_method": "expm"}), "nog+ow+olr(expm)": ("nog+ow+olr", {"ow_method": "expm"}),
            # NOG/OLR on the orthogonal weight (re-based every step) instead of the generator
            "nog+ow+olr(W)": ("nog+ow+olr", {"ow_target": "weight"})}
ROWS = PRESETS + tuple(VARIANTS)
# ops that only create views or metadata (no kernel launch)
_VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.transpose", "aten.t", "aten.unsqueeze", "aten.squeeze",
    "aten.detach", "aten.expand", "aten.as_strided", "aten.slice", "aten.select", "aten.permute",
    "aten.alias", "aten.reshape", "aten.split", "aten.unbind", "aten.lift_fresh", "aten.empty",
    "aten.empty_like", "aten.new_empty", "aten.empty_strided", "aten.new_empty_strided",
})


class CholeskyWhitening(nn.Module):
    """x ↦ (x − μ) L⁻ᵀ with L Lᵀ = Cov(x) + eps·I (eps = 1e-3, float32): batch whitening as a
    user writes it, Cholesky + triangular solve (orthofx sees the covariance meta-layer)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(0, keepdim=True)
        cov = xc.T @ xc / x.shape[0]
        eye = torch.eye(cov.shape[0], dtype=x.dtype, device=x.device)
        L = torch.linalg.cholesky(cov + self.eps * eye)
        return torch.linalg.solve_triangular(L, xc.T, upper=False).T


class WhitenedMLP(nn.Module):
    """784→256→256→256→256→10; Linear, Cholesky whitening, ReLU per hidden layer."""

    def __init__(self, dims: tuple[int, ...] = (784, 256, 256, 256, 256), classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.white = nn.ModuleList(CholeskyWhitening() for _ in dims[1:])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, white in zip(self.layers, self.white):
            x = torch.relu(white(layer(x)))
        return self.head(x)


def _config(row: str) -> Any:
    from orthofx.config import resolve_config

    if row in VARIANTS:
        base, changes = VARIANTS[row]
        return resolve_config(base).replace(**changes)  # flat keywords (composed OrthoConfig)
    return resolve_config(row)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _workloads(quick: bool, device: torch.device) -> dict[str, dict[str, Any]]:
    backend = "auto"  # gesvda route on CUDA, float64 eigh on CPU
    if quick:
        return {
            "dbn": dict(build=lambda: SmallResNetDBN(1, 10, whitening_backend=backend), batch=64, shape=(1, 28, 28),
                        classes=10, amp=None, desc="small whitening ResNet, bs64, 28²"),
            "gcp": dict(build=lambda: resnet18_gcp(10, reduced=32, backend=backend), batch=8, shape=(3, 64, 64),
                        classes=10, amp=None, desc="ResNet-18 GCP (reduce to 32), bs8, 64²"),
            "mlp": dict(build=WhitenedMLP, batch=256, step_only=True, trace_inputs=True, shape=(784,), classes=10, amp=None,
                        desc="MLP 784-256×4, Cholesky whitening per layer, bs256"),
        }
    amp = torch.bfloat16 if device.type == "cuda" else None
    return {
        "dbn": dict(build=lambda: cifar_resnet50_dbn(10, backend), batch=128, shape=(3, 32, 32), classes=10,
                    amp=None, desc="CIFAR ResNet-50 + whitening stem, bs128, 32²"),
        "gcp": dict(build=lambda: resnet18_gcp(1000, reduced=256, backend=backend), batch=256, shape=(3, 224, 224),
                    classes=1000, amp=amp, desc="ResNet-18 + GCP (1×1 to 256), bs256, 224²"),
        "mlp": dict(build=WhitenedMLP, batch=1024, step_only=True, trace_inputs=True, shape=(784,), classes=10, amp=None,
                    desc="MLP 784-256×4, Cholesky whitening per layer, bs1024"),
    }


def _make_step(wl: dict[str, Any], preset: str, device: torch.device) -> Callable[[], None]:
    return _setup(wl, preset, device)[0]


def _setup(wl: dict[str, Any], preset: str, device: torch.device) -> tuple[Callable[[], None], torch.optim.Optimizer, Any]:
    """(training step, its SGD optimizer, the attach handle) of ``preset`` on workload ``wl``."""
    torch.manual_seed(0)
    model = wl["build"]()
    x = torch.randn(wl["batch"], *wl["shape"], device=device)
    y = torch.randint(0, wl["classes"], (wl["batch"],), device=device)
    # the MLP's Cholesky whitening is found by tracing with inputs (orthofx.transform(m, (x,)))
    gm, _ = orthofx.transform(model, (x,) if wl.get("trace_inputs") else None, config=_config(preset))
    gm.to(device).train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    handle = orthofx.attach(opt, gm)
    amp = wl["amp"]

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(gm(x).float(), y) + orthofx.orthogonality_loss(gm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt, handle


def _time_once(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    """ms per call over ``iters`` back-to-back calls (CUDA events on GPU)."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def bench_steps(device: torch.device, quick: bool, rounds: int, iters: int,
                only: set[str] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, wl in _workloads(quick, device).items():
        if only and name not in only:
            continue
        steps = {p: _make_step(wl, p, device) for p in ROWS}
        for fn in steps.values():  # warm-up: allocator, cuDNN autotune, lazy init
            for _ in range(2):
                fn()
        samples: dict[str, list[float]] = {p: [] for p in ROWS}
        order = list(steps)
        for r in range(rounds):  # rotate the order each round: no row is always first
            for p in order[r % len(order):] + order[: r % len(order)]:
                samples[p].append(_time_once(steps[p], device, iters))
        plain = statistics.median(samples["svd"])
        for p in ROWS:
            ms = statistics.median(samples[p])
            # paired: each round's time over the same round's plain time, then the median, so
            # slow drifts of a shared machine cancel
            paired = statistics.median(a / b for a, b in zip(samples[p], samples["svd"]))
            rows.append({
                "group": "step", "workload": name, "treatment": p, "plain_ms": round(plain, 3),
                "step_ms": round(ms, 3), "ratio": round(paired, 4),
                "overhead_pct": round(100 * (paired - 1), 2), "ratio_of_medians": round(ms / plain, 4),
                "desc": wl["desc"],
            })
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_hooks(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    """The gradient treatments alone: the attach pre-hook (+ post-hook) per step on fixed
    gradients, as a share of the plain training step of the same workload.

    Low noise: SGD itself (a per-parameter loop on the CPU) is not inside the timing. The cost
    of OLR's extra param group inside SGD shows in the ``step`` rows."""
    rows: list[dict[str, Any]] = []
    for name, wl in _workloads(quick, device).items():
        if wl.get("step_only"):  # the mlp workload is timed in the step section only
            continue
        plain = _make_step(wl, "svd", device)
        plain()  # warm-up
        plain_step = statistics.median(_time_once(plain, device, 2) for _ in range(5))
        del plain
        for p in ("nog", "olr", "nog+olr", "nog(svd)"):
            step, opt, handle = _setup(wl, p, device)
            step()
            step()  # gradients and optimizer state exist; the hooks are timed on them

            def hooks(h: Any = handle, o: torch.optim.Optimizer = opt) -> None:
                h._pre_hook(o, (o,), {})
                if h.olr and h.lr_mode == "fold":
                    h._post_hook(o, (o,), {})

            ms = statistics.median(_time_once(hooks, device, 10) for _ in range(repeats))
            rows.append({"group": "hook", "workload": name, "treatment": p, "hook_ms": round(ms, 4),
                         "plain_step_ms": round(plain_step, 3), "pct_of_step": round(100 * ms / plain_step, 2),
                         "lr_mode": handle.lr_mode, "nog_method": handle.nog_method if handle.nog else None})
            del step, opt, handle
    return rows


def bench_audit(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Per training step: synchronising ops and kernel-launching ops dispatched, per preset.

    Structural (independent of timing noise): run under ``orthofx.syncs.cuda_policy()`` so the
    CPU takes the code path CUDA takes. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")``
    additionally counts the synchronisations the driver actually sees (``cuda_syncs``)."""
    import warnings

    from orthofx.syncs import cuda_policy, sync_audit

    rows: list[dict[str, Any]] = []
    for name, wl in _workloads(True if device.type == "cpu" else quick, device).items():
        if wl.get("step_only"):
            continue
        base: dict[str, Any] = {}
        for p in ROWS:
            with cuda_policy():
                step = _make_step(wl, p, device)
                step()
                step()
                with sync_audit() as audit:
                    step()
            cuda_syncs = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        step()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
            kernels = sum(n for op, n in audit.ops.items() if op not in _VIEW_OPS)
            if p == "svd":
                base = {"syncs": audit.count, "kernels": kernels}
            rows.append({
                "group": "audit", "workload": name, "treatment": p, "sync_ops": audit.count,
                "extra_sync_ops": audit.count - base["syncs"], "which": ",".join(sorted(audit.syncs)),
                "kernel_ops": kernels, "extra_kernel_ops": kernels - base["kernels"],
                "cuda_syncs": cuda_syncs,
            })
    return rows


def bench_transform(quick: bool, repeats: int) -> list[dict[str, Any]]:
    import torchvision

    rows = []
    models = {"resnet18-gcp": lambda: resnet18_gcp(10, reduced=32), "resnet50-dbn": lambda: cifar_resnet50_dbn(10)}
    if not quick:
        models["mobilenet_v3_large"] = lambda: torchvision.models.mobilenet_v3_large(weights=None)
    for name, build in models.items():
        model = build()
        fx.symbolic_trace(model)
        orthofx.transform(model, config="nog+ow+olr")
        t_fx, t_an, t_tr = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fx.symbolic_trace(model)
            t1 = time.perf_counter()
            orthofx.analyze(model)
            t2 = time.perf_counter()
            orthofx.transform(model, config="nog+ow+olr")
            t3 = time.perf_counter()
            t_fx.append(t1 - t0)
            t_an.append(t2 - t1)
            t_tr.append(t3 - t2)
        fx_ms = statistics.median(t_fx) * 1e3
        an_ms = statistics.median(t_an) * 1e3
        tr_ms = statistics.median(t_tr) * 1e3
        rows.append({"group": "transform", "model": name, "fx_ms": round(fx_ms, 2), "analyze_ms": round(an_ms, 2),
                     "transform_ms": round(tr_ms, 2), "analyze_ratio": round(an_ms / fx_ms, 3),
                     "transform_ratio": round(tr_ms / fx_ms, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workloads (< 50 s on 2 CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--only", choices=["step", "hook", "audit", "metalayer", "polar", "expm", "transform"],
                   action="append",
                   default=None)
    p.add_argument("--workload", choices=["dbn", "gcp", "mlp"], action="append", default=None,
                   help="step section: only these workloads (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = device.type == "cuda"
    only = set(a.only or ["step", "hook", "audit", "metalayer", "polar", "expm", "transform"])
    rounds = a.rounds or (12 if a.quick else 7)
    iters = 1 if a.quick else (10 if device.type == "cuda" else 3)
    t0 = time.perf_counter()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows: list[dict[str, Any]] = []
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("step", lambda: bench_steps(device, a.quick, rounds, iters, set(a.workload or ()))),
        ("hook", lambda: bench_hooks(device, a.quick, 15 if a.quick else 30)),
        ("audit", lambda: bench_audit(device, a.quick)),
        ("metalayer", lambda: [dict(r, group="metalayer") for r in bench_spectral(device, a.quick, 3 if a.quick else 10)]
         + bench_gcp_head(device, a.quick, 3 if a.quick else 10)),
        ("polar", lambda: [dict(r, group="polar") for r in bench_polar(device, a.quick, 3 if a.quick else 10)]),
        ("expm", lambda: bench_expm(device, a.quick, 3 if a.quick else 10)),
        ("transform", lambda: bench_transform(a.quick, 3 if a.quick else 7)),
    ]
    for name, run in sections:
        if name not in only:
            continue
        new = run()
        rows += new
        print_table(new)
        sys.stdout.flush()
        if a.json:  # written after every section, so a run cut short keeps what it measured
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"device": dev, "torch": torch.__version__, "quick": a.quick,
                                          "date": time.strftime("%Y-%m-%d"),
                                          "elapsed_s": round(time.perf_counter() - t0, 1), "rows": rows}, indent=1))
    elapsed = time.perf_counter() - t0
    print(f"# orthofx overhead benchmark on {dev}, torch {torch.__version__}, {'quick' if a.quick else 'full'}, "
          f"{elapsed:.1f} s")
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
