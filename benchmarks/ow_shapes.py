"""OW against torch's own orthogonal parametrization, per weight shape, measured side by side.

    python benchmarks/ow_shapes.py [--quick] [--threads N] [--device cpu|cuda] [--json PATH]
                                   [--shapes 256x784,256x256,...] [--clock wall|cpu]
                                   [--rho 0,0.003,0.1,1]

One ``nn.Linear`` (weight out×in, float32), batch 1024, loss ``mean((Wx + b − y)²)``, a
training step = forward + backward + SGD (lr 1e-2, momentum 0.9). Rows:

* ``plain``: the untreated layer;
* ``torch matrix_exp`` / ``torch cayley`` / ``torch householder``:
  ``torch.nn.utils.parametrizations.orthogonal(layer, orthogonal_map=...)`` (its default
  trivialization: the parameter is a generator around the registration-time base);
* ``orthofx expm`` / ``orthofx cayley``: ``orthofx.treatments.register_orthogonal(layer,
  method=..., lowrank=choose_lowrank(k, n', method))``: the route that
  :func:`orthofx.treatments.stiefel.choose_lowrank` picks (low-rank for 256×784 and 256×2048,
  dense for the squares), passed explicitly so the row does not depend on the auto rule of
  the FlatOrthogonal checkout (which used ``4k ≤ n'`` before it called ``choose_lowrank``).

Every parametrization starts at its generator = 0 (the weight at registration) and is timed in
interleaved rounds (the order rotates each round); ``x plain`` and ``x torch best`` are medians
over rounds of the row's time over the same round's plain time / the same round's fastest torch
map (min of the three). ``--quick`` uses 3 rounds of 1 step (instead of 7 rounds of 2 steps);
the torch maps on 256×2048 dominate the run (≈ 11 s a round on 1 CPU thread).
Absolute times mean something only on a quiet machine; on a shared CPU read the ratios
(``--clock cpu`` with ``--threads 1`` leaves out the time spent waiting for a core).

The training steps start at generator 0 and stay small (‖S‖₂ ≲ 0.01 after the 7 steps of
``--rounds 3``), where the exponential needs a low Taylor degree. ``--rho`` times the map alone
(forward + backward of the parametrized weight) of orthofx's expm and cayley maps at fixed
generator norms instead, against torch's cayley map, whose cost does not depend on the norm.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthofx.treatments import register_orthogonal  # noqa: E402
from orthofx.treatments.stiefel import choose_lowrank  # noqa: E402

SHAPES = ((256, 784), (256, 256), (512, 512), (256, 2048))
TORCH_MAPS = ("matrix_exp", "cayley", "householder")
ROWS = ("plain",) + tuple(f"torch {m}" for m in TORCH_MAPS) + ("orthofx expm", "orthofx cayley")
BATCH = 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(row: str, shape: tuple[int, int], device: torch.device) -> Callable[[], None]:
    """A training step of one Linear(in, out) under ``row``'s parametrization."""
    out, inp = shape
    torch.manual_seed(0)
    layer = nn.Linear(inp, out).to(device)
    if row.startswith("torch "):
        nn.utils.parametrizations.orthogonal(layer, orthogonal_map=row.split()[1])
    elif row.startswith("orthofx "):
        method = row.split()[1]
        register_orthogonal(layer, method=method, lowrank=choose_lowrank(min(shape), max(shape), method))
    x = torch.randn(BATCH, inp, device=device)
    y = torch.randn(BATCH, out, device=device)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2, momentum=0.9)

    def step() -> None:
        loss = (layer(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


#: the clock of :func:`_time`: "wall" (``time.perf_counter``) or "cpu" (``time.process_time``:
#: the CPU time of this process, all its threads; with ``--threads 1`` on a CPU shared with
#: other jobs it leaves out the time the process waited for a core, which wall time counts)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    _sync(device)
    t0 = _clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return (_clock() - t0) * 1e3 / iters


def bench_shape(shape: tuple[int, int], device: torch.device, rounds: int, iters: int) -> list[dict[str, Any]]:
    steps = {r: make_step(r, shape, device) for r in ROWS}
    for fn in steps.values():  # warm-up (allocator, lazy init)
        fn()
    samples: dict[str, list[float]] = {r: [] for r in ROWS}
    order = list(ROWS)
    for i in range(rounds):
        for r in order[i % len(order):] + order[: i % len(order)]:
            samples[r].append(_time(steps[r], device, iters))
    torch_best = [min(samples[f"torch {m}"][i] for m in TORCH_MAPS) for i in range(rounds)]
    best_name = min(TORCH_MAPS, key=lambda m: statistics.median(samples[f"torch {m}"]))
    rows = []
    for r in ROWS:
        rows.append({
            "shape": f"{shape[0]}x{shape[1]}", "row": r, "ms": round(statistics.median(samples[r]), 3),
            "x_plain": round(statistics.median(a / b for a, b in zip(samples[r], samples["plain"])), 3),
            "x_torch_best": round(statistics.median(a / b for a, b in zip(samples[r], torch_best)), 3),
            "torch_best": f"torch {best_name}",
        })
    return rows


def _map_step(row: str, shape: tuple[int, int], device: torch.device, rho: float) -> Callable[[], None]:
    """Forward + backward of the parametrized weight alone (no layer, no optimizer) with its
    generator set so that the skew-symmetric argument of the map has spectral norm ``rho``:
    orthofx ``S = B − Bᵀ`` (square) or ``aY₀ᵀ − Y₀aᵀ`` (n'×n'), torch ``A = X̃ − X̃ᵀ`` (X̃ = tril(X)
    padded to n×n)."""
    out, inp = shape
    torch.manual_seed(1)
    layer = nn.Linear(inp, out).to(device)
    if row == "torch cayley":
        nn.utils.parametrizations.orthogonal(layer, orthogonal_map="cayley")
    else:
        method = row.split()[1]
        register_orthogonal(layer, method=method, lowrank=choose_lowrank(min(shape), max(shape), method))
    par = layer.parametrizations.weight
    with torch.no_grad():
        x = torch.randn_like(par.original, dtype=torch.float64)
        if row == "torch cayley":
            t = x.mT if out < inp else x
            t = torch.cat([t.tril(), t.new_zeros(t.shape[0], t.shape[0] - t.shape[1])], dim=-1)
            skew = t - t.mT
        else:
            skew = par[0].skew(x)  # B − Bᵀ (square) or aY₀ᵀ − Y₀aᵀ: the same spectral norm
        x *= rho / torch.linalg.matrix_norm(skew, 2).clamp_min(1e-300)
        par.original.copy_(x)
    g = torch.randn(out, inp, device=device)

    def step() -> None:
        layer.weight.backward(g)

    return step


MAP_ROWS = ("torch cayley", "orthofx expm", "orthofx cayley")


def bench_map(shape: tuple[int, int], device: torch.device, rhos: list[float], rounds: int,
              iters: int) -> list[dict[str, Any]]:
    """Map-only timings (:func:`_map_step`) of torch cayley, orthofx expm and orthofx cayley at
    fixed ‖S‖₂, interleaved; ``x torch cayley`` = median of per-round ratios."""
    rows = []
    for rho in rhos:
        steps = {r: _map_step(r, shape, device, rho) for r in MAP_ROWS}
        for fn in steps.values():
            fn()
        samples: dict[str, list[float]] = {r: [] for r in steps}
        order = list(steps)
        for i in range(rounds):
            for r in order[i % len(order):] + order[: i % len(order)]:
                samples[r].append(_time(steps[r], device, iters))
        row: dict[str, Any] = {"shape": f"{shape[0]}x{shape[1]}", "rho": rho}
        for r in MAP_ROWS:
            key = r.replace(" ", "_")
            row[f"{key}_ms"] = round(statistics.median(samples[r]), 3)
            if r != "torch cayley":
                row[f"{key}_x_torch_cayley"] = round(statistics.median(
                    a / b for a, b in zip(samples[r], samples["torch cayley"])), 3)
        row["x_torch_cayley"] = row["orthofx_expm_x_torch_cayley"]  # the column of earlier files
        rows.append(row)
        print(f"| {row['shape']} | {rho:g} | {row['torch_cayley_ms']:.2f} | {row['orthofx_expm_ms']:.2f} | "
              f"{row['orthofx_expm_x_torch_cayley']:.2f} | {row['orthofx_cayley_ms']:.2f} | "
              f"{row['orthofx_cayley_x_torch_cayley']:.2f} |")
        sys.stdout.flush()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("| shape | row | ms | × plain | × torch best |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['row']} | {r['ms']:.1f} | {r['x_plain']:.2f} | {r['x_torch_best']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 rounds of 1 step per row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--shapes", default=None, help="comma-separated OUTxIN, default: the four of the issue")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rho", default=None,
                   help="comma-separated ‖S‖₂ values: time the map alone (forward + backward of the weight) "
                        "of torch cayley, orthofx expm and orthofx cayley at these generator norms instead of training steps")
    p.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                   help="wall: perf_counter (default); cpu: process_time (use with --threads 1 on a loaded machine)")
    a = p.parse_args(argv)
    global _clock
    _clock = CLOCK[a.clock]
    if a.clock == "cpu" and a.device != "cpu":
        p.error("--clock cpu times the host process only; use the wall clock on CUDA")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SHAPES if a.shapes is None else tuple(
        tuple(int(v) for v in s.split("x")) for s in a.shapes.split(","))
    rounds = a.rounds or (3 if a.quick else 7)
    iters = 1 if a.quick else 2
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if a.rho is not None:
        print("| weight | ‖S‖₂ | torch cayley ms | orthofx expm ms | × torch cayley | orthofx cayley ms | "
              "× torch cayley |\n|---|---|---|---|---|---|---|")
    for shape in shapes:
        if a.rho is not None:
            rows += bench_map(shape, device, [float(v) for v in a.rho.split(",")], rounds, iters)  # type: ignore[arg-type]
            continue
        rows += bench_shape(shape, device, rounds, iters)  # type: ignore[arg-type]
        print_rows([r for r in rows if r["shape"] == f"{shape[0]}x{shape[1]}"])
        sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    print(f"# OW per shape on {dev}, torch {torch.__version__}, batch {BATCH}, {rounds} rounds × {iters} steps, "
          f"{a.clock} clock, {elapsed:.1f} s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": dev, "torch": torch.__version__, "quick": a.quick, "batch": BATCH,
                                      "rounds": rounds, "iters": iters, "clock": a.clock, "rho": a.rho,
                                      "date": time.strftime("%Y-%m-%d"), "elapsed_s": round(elapsed, 1),
                                      "rows": rows}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
