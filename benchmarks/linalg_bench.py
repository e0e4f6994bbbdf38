"""Benchmark of orthofx.linalg: time and accuracy of every sqrtm/invsqrtm backend, the eigh forward
backends, and every polar method.

    python benchmarks/linalg_bench.py [--quick] [--device cpu|cuda] [--json PATH]

Cases (float32 inputs, as a network feeds them; errors against float64 references computed on
the same float32-rounded input):

* ``gcp``: batch × 256² covariances from M = 49 positions (rank 48), ε = 1e-5 (covariance pooling);
* ``dbn``: batch × 64² covariances of rank 27 (3×3×3 stem), ε = 1e-2 (decorrelated BN).

For sqrtm/invsqrtm each row is forward + backward time (median), the forward's relative Frobenius
error and the gradient's relative error (upstream gradient fixed, random) against the float64
Daleckii–Krein gradient (validated against a Sylvester-equation reference in
tests/test_linalg_spectral.py). ``ratio`` is the time relative to the "ns" row of the same case.
Polar rows: time and distance to the float64 SVD polar factor, ``ratio`` relative to "svd".
Absolute times only mean something on a GPU; the machine this was written on has 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orthofx.linalg as ol  # noqa: E402
from orthofx.testing.matrices import dbn_like, gcp_like  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> float:
    """Median wall time of fn() in ms (CUDA events on GPU). Callers run fn() once before."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, quick: bool) -> tuple[Any, float]:
    """(first result, ms). Quick mode times that first call alone (it includes one-time setup
    costs); otherwise the median of ``repeats`` further calls."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = (time.perf_counter() - t0) * 1e3
    return out, (first if quick else time_ms(fn, device, repeats))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def with_ratios(group: list[dict[str, Any]], base: float | None = None) -> list[dict[str, Any]]:
    """Set ``ratio`` = time_ms / base on every row (base: the first row's time) and return them."""
    base = group[0]["time_ms"] if base is None else base
    for r in group:
        r["ratio"] = r["time_ms"] / base
    return group


SPECTRAL_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("ns", {"backend": "ns", "iters": 5}),
    ("ns-10", {"backend": "ns", "iters": 10}),
    ("eigh-fp64", {"backend": "eigh"}),
    ("eigh-fp32", {"backend": "eigh", "compute_dtype": torch.float32}),
    ("svd-fp64", {"backend": "svd", "compute_dtype": torch.float64}),
    ("svd-fp32", {"backend": "svd", "compute_dtype": torch.float32}),
    ("torch-eigh-autograd-fp32", {}),  # plain torch.linalg.eigh + autograd, the usual baseline
]


def _plain_torch(a: torch.Tensor, eps: float, inverse: bool) -> torch.Tensor:
    lam, u = torch.linalg.eigh((a + a.mT) / 2)
    lam = (lam + eps).clamp_min(torch.finfo(a.dtype).tiny)
    f = lam.rsqrt() if inverse else lam.sqrt()
    return (u * f.unsqueeze(-2)) @ u.mT


def bench_spectral(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cases = {
        "gcp": dict(make=lambda: gcp_like(batch=4 if quick else 64, eps=0.0, seed=0), eps=1e-5),
        "dbn": dict(make=lambda: dbn_like(batch=8 if quick else 64, eps=0.0, seed=1), eps=1e-2),
    }
    for case, spec in cases.items():
        base64 = spec["make"]().float().double()  # the float32-rounded matrix, exactly
        eps = spec["eps"]
        a32 = base64.float().to(device)
        gen = torch.Generator().manual_seed(2)
        g64 = torch.randn(base64.shape, generator=gen, dtype=torch.float64)
        g32 = g64.float().to(device)
        for fname, inverse in (("sqrtm", False), ("invsqrtm", True)):
            fn = ol.invsqrtm if inverse else ol.sqrtm
            x_ref = base64.clone().requires_grad_()
            y_ref = fn(x_ref, eps=eps, backend="eigh")
            (y_ref * g64).sum().backward()
            grad_ref = x_ref.grad
            assert grad_ref is not None
            y_ref = y_ref.detach()
            group: list[dict[str, Any]] = []
            for label, kw in SPECTRAL_CONFIGS:
                def step(kw: dict[str, Any] = kw) -> tuple[torch.Tensor, torch.Tensor]:
                    x = a32.clone().requires_grad_()
                    if kw:
                        y = fn(x, eps=eps, validate=False, **kw)
                    else:
                        y = _plain_torch(x, eps, inverse)
                    (y * g32).sum().backward()
                    assert x.grad is not None
                    return y.detach(), x.grad

                try:
                    (y, grad), t = timed(step, device, repeats, quick)
                    fwd_err, grad_err = rel(y.cpu(), y_ref), rel(grad.cpu(), grad_ref)
                    if not torch.isfinite(grad).all():
                        grad_err = float("nan")
                    note = ""
                except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
                    t, fwd_err, grad_err, note = float("nan"), float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:80]
                group.append(dict(group="spectral", case=case, fn=fname, config=label, batch=int(a32.shape[0]),
                                  n=int(a32.shape[-1]), time_ms=t, fwd_err=fwd_err, grad_err=grad_err, note=note))
            rows += with_ratios(group, next(r["time_ms"] for r in group if r["config"] == "ns"))
    return rows


GCP_HEAD_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("ns", {"backend": "ns", "iters": 5}),
    ("gram-auto", {"gram": True}),
    ("gram-fp64", {"gram": True, "compute_dtype": torch.float64}),
    ("dense-auto", {"backend": "auto"}),
    ("dense-eigh-fp64", {"backend": "eigh"}),
]


def bench_gcp_head(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    """The whole GCP meta-layer from features: X (batch, 256, 49) -> (Σ + 1e-5 I)^{1/2}, forward +
    backward, for the Newton–Schulz head, the Gram route and the dense routes; errors against a
    float64 dense eigh reference on the same float32-rounded features."""
    batch, c, m, eps = (4 if quick else 64), 256, 49, 1e-5
    gen = torch.Generator().manual_seed(5)
    x64 = torch.randn(batch, c, m, generator=gen, dtype=torch.float64).float().double()
    up64 = torch.randn(batch, c, c, generator=gen, dtype=torch.float64)
    xr = x64.clone().requires_grad_()
    y_ref = ol.sqrtm(ol.covariance(xr), eps=eps, backend="eigh")
    (y_ref * up64).sum().backward()
    g_ref, y_ref = xr.grad, y_ref.detach()
    x32, up32 = x64.float().to(device), up64.float().to(device)
    rows: list[dict[str, Any]] = []
    for label, kw in GCP_HEAD_CONFIGS:
        def step(kw: dict[str, Any] = kw) -> tuple[torch.Tensor, torch.Tensor]:
            x = x32.clone().requires_grad_()
            if kw.get("gram"):
                y = ol.covariance_sqrtm(x, eps=eps, compute_dtype=kw.get("compute_dtype"), validate=False)
            else:
                y = ol.sqrtm(ol.covariance(x, validate=False), eps=eps, validate=False, **kw)
            (y * up32).sum().backward()
            assert x.grad is not None
            return y.detach(), x.grad

        try:
            (y, grad), t = timed(step, device, repeats, quick)
            fwd_err, grad_err, note = rel(y.cpu(), y_ref), rel(grad.cpu(), g_ref), ""
        except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
            t, fwd_err, grad_err, note = float("nan"), float("nan"), float("nan"), f"{type(exc).__name__}: {exc}"[:80]
        rows.append(dict(group="gcp_head", case=f"{batch}x{c}x{m}", config=label, time_ms=t, fwd_err=fwd_err,
                         grad_err=grad_err, note=note))
    return with_ratios(rows)


def bench_eigh_forward(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case, make, eps in (("gcp", lambda: gcp_like(batch=4 if quick else 64, eps=1e-5, seed=0), 1e-5),
                            ("dbn", lambda: dbn_like(batch=8 if quick else 64, eps=1e-2, seed=1), 1e-2)):
        a64 = make().float().double()
        ref = torch.linalg.eigvalsh(a64)
        group = []
        for backend in ("eigh", "svd"):
            for dtype in (torch.float32, torch.float64):
                a = a64.to(device=device, dtype=dtype)
                def fwd(a: torch.Tensor = a, backend: str = backend) -> tuple[torch.Tensor, torch.Tensor]:
                    return ol.eigh(a, backend=backend, validate=False)
                stats = ol.solver_stats()
                before = stats.fallbacks.get("svd->eigh", 0)
                (lam, _), t = timed(fwd, device, repeats, quick)
                rejected = stats.fallbacks.get("svd->eigh", 0) - before
                # relative error of the eigenvalues, scaled by λ_min (the ones that matter for κ)
                err = float(((lam.double().cpu() - ref).abs() / ref.abs().clamp_min(eps)).max())
                group.append(dict(group="eigh_forward", case=case, config=f"{backend}-{str(dtype)[6:]}",
                                  batch=int(a.shape[0]), n=int(a.shape[-1]), time_ms=t, eig_rel_err=err,
                                  svd_rejected=rejected))
        rows += with_ratios(group)
    return rows


def bench_svd_route(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Raw quality of the SVD forward route (gesvda on CUDA) per batch element: relative residual
    ‖AV − VΛ‖/‖A‖, orthonormality ‖VᵀV − I‖/√n and λ_min/‖A‖, against the acceptance tolerance."""
    from orthofx.testing.matrices import random_spd
    from orthofx.linalg._solver import svd_residual_tol

    rows: list[dict[str, Any]] = []
    b = 2 if quick else 64
    cases = {
        "gcp+0": gcp_like(batch=b, eps=0.0, seed=0),
        "gcp+1e-5": gcp_like(batch=b, eps=1e-5, seed=0),
        "dbn+0": dbn_like(batch=b, eps=0.0, seed=1),
        "dbn+1e-2": dbn_like(batch=b, eps=1e-2, seed=1),
        "spd-k1e3": random_spd((b,), 256, cond=1e3, seed=3),
    }
    for case, a64 in cases.items():
        for dtype in (torch.float32, torch.float64):
            a = a64.to(device=device, dtype=dtype)
            n = a.shape[-1]
            try:
                _, _, vh = torch.linalg.svd(a, full_matrices=False, driver="gesvda" if a.is_cuda else None)
            except torch.linalg.LinAlgError as exc:
                rows.append(dict(group="svd_route", case=case, dtype=str(dtype)[6:], n=n, tol=float("nan"),
                                 resid_med=float("nan"), resid_max=float("nan"), orth_max=float("nan"),
                                 lmin_min=float("nan"), rejected=b, batch=b, note=f"LinAlgError: {str(exc)[:60]}"))
                continue
            v = vh.mT
            av = a @ v
            lam = (v * av).sum(-2)
            na = torch.linalg.matrix_norm(a)
            resid = torch.linalg.matrix_norm(av - v * lam.unsqueeze(-2)) / na
            orth = torch.linalg.matrix_norm(v.mT @ v - torch.eye(n, dtype=dtype, device=device)) / n**0.5
            lmin = lam.min(-1).values / na
            tol = svd_residual_tol(n, dtype)
            rejected = int(((resid > tol) | (orth > tol) | (lmin < -tol)).sum())
            rows.append(dict(group="svd_route", case=case, dtype=str(dtype)[6:], n=n, tol=tol,
                             resid_med=float(resid.median()), resid_max=float(resid.max()),
                             orth_max=float(orth.max()), lmin_min=float(lmin.min()), rejected=rejected, batch=b))
    return rows


def bench_polar(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    shapes = [(64, 27), (256, 512), (512, 4608)]
    configs: list[tuple[str, dict[str, Any]]] = [
        ("svd", {"method": "svd"}),
        ("eigh", {"method": "eigh"}),
        ("ns", {"method": "ns"}),
        ("polar_express-0polish", {"method": "polar_express", "polish": 0}),
        ("polar_express", {"method": "polar_express"}),
        ("polar_express-bf16", {"method": "polar_express", "compute_dtype": torch.bfloat16}),
        ("auto", {"method": "auto"}),
    ]
    for m, n in shapes:
        g = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n))
        u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
        ref = u @ vh
        gd = g.to(device)
        group = []
        for label, kw in configs:
            def call(kw: dict[str, Any] = kw) -> torch.Tensor:
                return ol.polar(gd, validate=False, **kw)
            q, t = timed(call, device, repeats, quick)
            group.append(dict(group="polar", case=f"{m}x{n}", config=label, time_ms=t, err=rel(q.cpu(), ref)))
        rows += with_ratios(group)
    return rows


def bench_expm(device: torch.device, quick: bool, repeats: int) -> list[dict[str, Any]]:
    """OW's exponential, forward+backward: torch.linalg.matrix_exp against orthofx.linalg.expm
    (device-decided squarings, block-matrix backward), float32, on skew-symmetric S with
    ‖S‖₁ ≈ 8 (a few squarings); error = distance to the float64 exponential, orth = ‖QᵀQ − I‖_max."""
    import scipy.linalg as sla

    rows: list[dict[str, Any]] = []
    for n in ((64, 128) if quick else (64, 512, 1024)):
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        s64 = (a - a.T) * (8.0 / (a - a.T).abs().sum(0).max())
        ref = torch.from_numpy(sla.expm(s64.numpy()))
        up = torch.randn(n, n, generator=gen).to(device)
        group = []
        for label, fn in (("torch.matrix_exp", torch.linalg.matrix_exp), ("orthofx.expm", ol.expm)):
            def call(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> torch.Tensor:
                x = s64.float().to(device).requires_grad_()
                q = fn(x)
                (q * up).sum().backward()
                return q.detach()

            q, t = timed(call, device, max(repeats, 5), False)  # cheap: always the median
            q = q.double().cpu()
            orth = float((q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max())
            group.append(dict(group="expm", case=f"{n}x{n}", config=label, time_ms=t, err=rel(q, ref), orth=orth))
        rows += with_ratios(group)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for name, rs in groups.items():
        keys = [k for k in rs[0] if k not in ("group", "note")]
        print(f"\n## {name}")
        print(" | ".join(keys))
        for r in rs:
            line = " | ".join(fmt(r.get(k, "")) for k in keys)
            if r.get("note"):
                line += f"  ({r['note']})"
            print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small batches, each row timed once (< 50 s on 2 idle CPU cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write {device, torch, rows} here")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", choices=["spectral", "gcp_head", "eigh", "svd_route", "polar"], action="append",
                   default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    repeats = args.repeats or 10
    only = set(args.only or ["spectral", "gcp_head", "eigh", "svd_route", "polar"])
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "spectral" in only:
        rows += bench_spectral(device, args.quick, repeats)
    if "gcp_head" in only:
        rows += bench_gcp_head(device, args.quick, repeats)
    if "eigh" in only:
        rows += bench_eigh_forward(device, args.quick, repeats)
    if "svd_route" in only:
        rows += bench_svd_route(device, args.quick, repeats)
    if "polar" in only:
        rows += bench_polar(device, args.quick, repeats)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# orthofx.linalg benchmark on {dev_name}, torch {torch.__version__}, "
          f"{'quick' if args.quick else 'full'}, {time.perf_counter() - t0:.1f} s")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
