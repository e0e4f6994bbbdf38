"""NOG / OLR / guard / chain as pure gradient transforms: update(updates, state, params, ctx) -> (Updates, state)."""

from __future__ import annotations

import math

import pytest
import torch

import orthofx.treatments.gradient.transforms as gradient_mod
from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import DeviceHistory, chain, guard, nog, olr, olr_eta


def _uvt64(g: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(g.reshape(g.shape[0], -1).double().cpu(), full_matrices=False)
    return (U @ Vh).reshape(g.shape)


def test_nog_is_polar_factor_and_batched_per_shape(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    shapes = [(64, 3, 3, 3), (16, 64), (64, 3, 3, 3), (16, 64), (8, 4, 1, 1)]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    calls: list[tuple[int, ...]] = []
    real = gradient_mod.polar

    def counting(G: torch.Tensor, method: str, deficient: str | None = None) -> torch.Tensor:
        calls.append(tuple(G.shape))
        return real(G, method, deficient)

    monkeypatch.setattr(gradient_mod, "polar", counting)
    t = nog("svd")
    state = t.init(params)
    before = [g.clone() for g in grads]
    upd, new = t.update(grads, state, params)
    out = upd.grads
    assert upd.lr is None
    assert sorted(calls) == sorted([(2, 64, 27), (2, 16, 64), (1, 8, 4)])  # one call per shape
    for g, g0, o in zip(grads, before, out):
        assert torch.equal(g, g0)  # inputs untouched
        assert o.shape == g.shape and o.dtype == g.dtype
        torch.testing.assert_close(o.double().cpu(), _uvt64(g0), atol=2e-5, rtol=0)
        # no rescaling: ‖U Vᵀ‖_F = √min(m, n)
        m, n = g.shape[0], g[0].numel()
        assert abs(o.double().norm().item() - math.sqrt(min(m, n))) < 1e-4
    assert int(new.zero) == 0 and int(new.nonfinite) == 0 and new.steps == 1 and state.steps == 0


def test_nog_zero_and_nonfinite_are_zeroed_and_counted(device: torch.device) -> None:
    params = [torch.randn(6, 5, device=device) for _ in range(4)]
    grads = [
        torch.zeros(6, 5, device=device),
        torch.full((6, 5), float("nan"), device=device),
        torch.randn(6, 5, device=device),
        None,
    ]
    grads[2][1, 1] = float("inf")
    t = nog()
    state = t.init(params)
    out, state = t.update(grads, state, params)
    out = out.grads
    for o in out[:3]:
        assert torch.equal(o, torch.zeros_like(o))
    assert out[3] is None
    assert state.zero.device.type == device.type
    assert int(state.zero) == 1 and int(state.nonfinite) == 2


def test_guard_zeroes_nonfinite_only(device: torch.device) -> None:
    params = [torch.randn(3, 3, device=device) for _ in range(3)]
    good = torch.randn(3, 3, device=device)
    bad = good.clone()
    bad[0, 0] = float("nan")
    t = guard()
    s = t.init(params)
    out, s = t.update([good, bad, torch.zeros(3, 3, device=device)], s, params)
    out = out.grads
    assert torch.equal(out[0], good)
    assert torch.equal(out[1], torch.zeros_like(bad))
    assert int(s.nonfinite) == 1 and int(s.zero) == 1


def _olr_ref(w: torch.Tensor, l: torch.Tensor, lr: float) -> tuple[float, float]:
    w, l = w.double().flatten().cpu(), l.double().flatten().cpu()
    eta = (w @ w) * (l @ w) / ((w @ w) * (l @ l) + 2 * (l @ w) ** 2)
    eta = eta.item()
    return eta, (eta if 0 < eta < lr else lr)


def test_olr_formula_and_fallbacks(device: torch.device) -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 3, 3, 3, device=device)
    r = torch.randn_like(w)
    r = r - (r * w).sum() / (w * w).sum() * w  # orthogonal to w
    grads = [
        w.clone(),  # l = w: η* = 1/3
        -w,  # η* = −1/3 ≤ 0 → lr
        0.1 * w + r,  # small positive η*
        torch.zeros_like(w),  # 0/0 → lr
        None,  # no gradient: NaN η*, lr
    ]
    params = [w] * len(grads)
    t = olr()
    state = t.init(params)
    for lr in (1.0, 0.2):
        upd, state = t.update(grads, state, params, {"lrs": [lr] * len(grads)})
        assert all(a is b for a, b in zip(upd.grads, grads)) and torch.equal(upd.lr, state.lr)  # gradients pass through, lr is output
        eta = state.eta.cpu()
        chosen = state.lr.cpu()
        assert state.eta.device.type == device.type and state.eta.dtype == torch.float64
        for i, g in enumerate(grads[:3]):
            e_ref, lr_ref = _olr_ref(w, g, lr)
            assert eta[i].item() == pytest.approx(e_ref, rel=1e-12, abs=1e-15)
            assert chosen[i].item() == pytest.approx(lr_ref, rel=1e-12)
        assert math.isnan(eta[3].item()) and chosen[3].item() == lr
        assert math.isnan(eta[4].item()) and chosen[4].item() == lr
    assert state.eta[0].item() == pytest.approx(1 / 3)
    h = state.read_history()
    assert h["lr"].shape == (2, 5)
    assert h["lr"][0, 0].item() == pytest.approx(1 / 3) and h["lr"][1, 0].item() == 0.2  # η* ≥ lr → lr
    assert torch.all(h["base"][1] == 0.2)
    # tensor lrs (0-d, no grad) work as well
    upd, state = t.update(grads, state, params, {"lrs": [torch.tensor(1.0)] * len(grads)})
    assert state.lr[0].item() == pytest.approx(1 / 3) and upd.lr[0].item() == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        t.update(grads, state, params)


def test_olr_eta_matches_float64_for_float32_inputs() -> None:
    torch.manual_seed(2)
    w = torch.randn(1000)
    l = torch.randn(1000) + 0.05 * w
    e = olr_eta(w.double(), l.double())
    assert e.item() == pytest.approx(_olr_ref(w, l, 1.0)[0], rel=1e-12)


def test_chain_runs_olr_on_nog_gradient() -> None:
    torch.manual_seed(3)
    w = torch.randn(12, 20)
    g = torch.randn(12, 20)
    t = chain(nog(), olr())
    s = t.init([w])
    out, s = t.update([g], s, [w], {"lrs": [10.0]})
    torch.testing.assert_close(out.grads[0].double(), _uvt64(g), atol=2e-6, rtol=0)
    e_ref, _ = _olr_ref(w, _uvt64(g), 10.0)
    assert s[1].eta[0].item() == pytest.approx(e_ref, rel=1e-5)
    assert s["1"] is s[1] and torch.equal(out.lr, s[1].lr)
    with pytest.raises(ConfigError):
        chain(nog(), "olr")  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        nog("qr")
    t = nog()
    s = t.init([torch.zeros(3)])
    with pytest.raises(TreatmentError, match="2 dims"):
        t.update([torch.ones(3)], s, [torch.zeros(3)])
    sp = torch.eye(3).to_sparse()
    with pytest.raises(TreatmentError, match="sparse"):
        t.update([sp], s, [torch.zeros(3, 3)])


def test_device_history_growth_and_ring() -> None:
    h = DeviceHistory()
    for i in range(150):
        h.append(torch.tensor([float(i), -float(i)]))
    r = h.read()
    assert r.shape == (150, 2) and torch.equal(r[:, 0], torch.arange(150.0))
    ring = DeviceHistory(max_len=10)
    for i in range(25):
        ring.append(torch.tensor(float(i)))
    assert len(ring) == 10
    assert torch.equal(ring.read(), torch.arange(15.0, 25.0))
    with pytest.raises(ConfigError):
        DeviceHistory(max_len=0)


def test_earlier_update_form_mutates_the_state() -> None:
    """update(grads, params, state, **ctx) -> grads (orthofx 0.1) still works for the built-in
    transforms until 0.3.0, with a DeprecationWarning: the state in third position is updated
    in place."""
    w = torch.randn(6, 4)
    g = w.clone()
    t = olr()
    s = t.init([w])
    with pytest.warns(DeprecationWarning, match="0.3.0"):
        out = t.update([g], [w], s, lrs=[1.0])
    assert isinstance(out, list) and out[0] is g
    assert s.steps == 1 and s.lr[0].item() == pytest.approx(1 / 3)
    n = nog()
    ns = n.init([w])
    with pytest.warns(DeprecationWarning, match="0.3.0"):
        n.update([torch.zeros_like(w)], [w], ns)
    assert ns.steps == 1 and int(ns.zero) == 1
