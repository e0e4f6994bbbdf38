"""CUDA only: the per-step treatment code captures in a CUDA graph and replays to the eager
result (it has no host sync and no data-dependent host control flow). Skipped without CUDA;
benchmarks/gpu_run.sh runs it on the lent GPU."""

from __future__ import annotations

import pytest
import torch

from orthofx.linalg.expm import expm
from orthofx.treatments.gradient import chain, nog, olr

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
]


def _warm_then_capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def test_expm_forward_and_backward_replay_in_a_cuda_graph() -> None:
    gen = torch.Generator().manual_seed(0)
    a0 = torch.randn(32, 32, generator=gen)
    a = (a0 - a0.T).cuda().requires_grad_()
    up = torch.randn(32, 32, generator=gen).cuda()
    out: dict[str, torch.Tensor] = {}

    def step() -> None:
        a.grad = None
        y = expm(a)
        (y * up).sum().backward()
        out["y"], out["g"] = y.detach(), a.grad

    graph = _warm_then_capture(step)
    for scale in (0.01, 3.0, 200.0):  # different numbers of squarings, same graph
        with torch.no_grad():
            a.copy_((a0 - a0.T).cuda() * scale)
        graph.replay()
        ref = a.detach().clone().requires_grad_()
        y_ref = expm(ref)
        (y_ref * up).sum().backward()
        torch.testing.assert_close(out["y"], y_ref.detach(), rtol=1e-5, atol=1e-5 * max(1.0, scale))
        torch.testing.assert_close(out["g"], ref.grad, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def test_nog_olr_update_replays_in_a_cuda_graph() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 3, 3, 3, generator=gen).cuda()
    g = torch.randn(64, 3, 3, 3, generator=gen).cuda()
    t = chain(nog("auto"), olr(history=False))
    state = t.init([w])
    out: dict[str, torch.Tensor] = {}

    def update() -> None:  # the pure form: (updates, new_state) = t.update(updates, state, params, ctx)
        ups, _ = t.update([g], state, [w], {"lrs": [0.1]})
        out["g"], out["lr"] = ups.grads[0], ups.lr

    graph = _warm_then_capture(update)
    for seed in (2, 3):
        with torch.no_grad():
            g.copy_(torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        ref_t = chain(nog("auto"), olr(history=False))
        ref, _ = ref_t.update([g], ref_t.init([w]), [w], {"lrs": [0.1]})
        torch.testing.assert_close(out["g"], ref.grads[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["lr"], ref.lr)
