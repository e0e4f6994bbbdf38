"""StableDecomposition is exact by default (issue 11): float64 gradients equal the raw torch
call's wherever every relative eigengap is ≥ 1e-3, for every kind; finite on degenerate spectra;
non-finite input raises naming the layer, or is skipped and counted."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orthofx.linalg as ol
from orthofx.errors import ConfigError, InputError
from orthofx.testing.matrices import random_spd, spd_with_spectrum
from orthofx.nn import StableDecomposition
from orthofx.syncs import cuda_policy, sync_audit

TARGETS = [torch.linalg.eigh, torch.linalg.eigvalsh, torch.linalg.svd, torch.svd, torch.linalg.svdvals]
IDS = ["eigh", "eigvalsh", "linalg.svd", "torch.svd", "svdvals"]


def _loss(out, w: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """A sign-invariant loss of every output of a decomposition (w: (..., n, n))."""
    if isinstance(out, torch.Tensor):  # eigvalsh / svdvals
        return (out * w[..., 0, :]).sum()
    parts = list(out)
    values = parts[1] if len(parts) == 3 else parts[0]
    total = (values * w[..., 0, :]).sum()
    for m in parts:
        if m.dim() == w.dim():
            total = total + (m.square() * w).sum()
    return total


def _grad(fn, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = a.clone().requires_grad_()
    _loss(fn(x), w).backward()
    assert x.grad is not None
    return x.grad


@st.composite
def _ratio_gapped(draw: st.DrawFn) -> list[float]:
    """Ascending positive spectra of size 2–12 with every ratio λ_{k+1}/λ_k in [10^0.0005, 10]."""
    n = draw(st.integers(2, 12))
    lam = [10.0 ** draw(st.floats(-4.0, 1.0))]
    for _ in range(n - 1):
        lam.append(lam[-1] * 10.0 ** draw(st.floats(0.0005, 1.0)))  # ratio ≥ 1.00115: gap ≥ 1.1e-3
    return lam


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15)
@given(spectrum=_ratio_gapped(), seed=st.integers(0, 2**16))
def test_default_gradient_equals_raw_torch_call(target, spectrum: list[float], seed: int, device: torch.device) -> None:  # type: ignore[no-untyped-def]
    n = len(spectrum)
    a = spd_with_spectrum(torch.tensor([spectrum], dtype=torch.float64), seed=seed, device=device)
    w = torch.randn(1, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(device)
    mod = StableDecomposition.for_target(target)
    ref = _grad(lambda x: target((x + x.mT) / 2), a, w)
    ours = _grad(mod, a, w)
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-8


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_ratio_09_pair_is_exact_and_taylor_is_still_available(target, device: torch.device) -> None:  # type: ignore[no-untyped-def]
    a = spd_with_spectrum(torch.tensor([[0.01, 0.9, 1.0, 2.0]], dtype=torch.float64), seed=31, device=device)
    w = torch.randn(1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(32)).to(device)
    ref = _grad(lambda x: target((x + x.mT) / 2), a, w)
    rel = lambda g: ((g - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(_grad(StableDecomposition.for_target(target), a, w)) <= 1e-10
    taylor = StableDecomposition.for_target(target, taylor_degree=9)
    assert "taylor_degree=9" in repr(taylor)
    if target not in (torch.linalg.eigvalsh, torch.linalg.svdvals):  # eigenvalue gradients are exact anyway
        assert rel(_grad(taylor, a, w)) > 1e-2


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
@pytest.mark.parametrize(
    "spectrum",
    [[0.0, 0.0, 0.0, 1.0, 2.0], [0.5, 0.5, 0.5, 1.0, 3.0], [2.0] * 5, [0.0] * 5],
    ids=["rank-deficient", "repeated", "all-equal", "zero"],
)
def test_finite_on_degenerate_spectra(target, spectrum: list[float], device: torch.device) -> None:  # type: ignore[no-untyped-def]
    lam = torch.tensor([spectrum], dtype=torch.float64)
    w = torch.randn(1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(33)).to(device)
    mod = StableDecomposition.for_target(target)
    for a in (spd_with_spectrum(lam, seed=34, device=device), torch.diag_embed(lam).to(device)):
        assert bool(torch.isfinite(_grad(mod, a, w)).all())
    # K of exact ties is 0 (Taylor: 10/λ) and the default K never exceeds 1/(δ·max(|λi|, |λj|))
    k = ol.stable_k(lam)
    assert bool(torch.isfinite(k).all()) and bool((k[..., lam[0] == lam[0, -1], :][..., lam[0] == lam[0, -1]] == 0).all())


def test_nonfinite_input_raises_naming_the_layer(device: torch.device) -> None:
    a = random_spd((2,), 4, seed=35, device=device)
    a[0, 1, 1] = float("inf")
    mod = StableDecomposition.for_target(torch.linalg.eigh, name="features.cov_pool.eigh")
    with pytest.raises(InputError, match=r"'features\.cov_pool\.eigh'.*torch\.linalg.*eigh.*NaN or Inf.*on_nonfinite='skip'"):
        mod(a)
    unnamed = StableDecomposition.for_target(torch.linalg.svd)
    with pytest.raises(InputError, match=r"StableDecomposition\(kind='svd', replaces torch\.linalg\.svd\)"):
        unnamed(a)
    with pytest.raises(InputError, match="NaN or Inf"):
        StableDecomposition.for_target(torch.linalg.eigvalsh, name="x")(a)
    with pytest.raises(ConfigError, match="on_nonfinite"):
        StableDecomposition("eigh", "linalg_eigh", on_nonfinite="propagate")


@pytest.mark.parametrize("target", TARGETS, ids=IDS)
def test_skip_returns_finite_identity_and_counts(target, device: torch.device) -> None:  # type: ignore[no-untyped-def]
    a = random_spd((3,), 4, seed=36, device=device)
    a[2, 0, 3] = float("nan")
    mod = StableDecomposition.for_target(target, on_nonfinite="skip", name="head.eigh")
    stats = ol.solver_stats()
    stats.reset()
    x = a.clone().requires_grad_()
    out = mod(x)
    assert stats.nonfinite == 1 and stats.failures == 0
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    assert all(bool(torch.isfinite(t).all()) for t in outs)
    values = outs[0] if len(outs) != 3 else outs[1]
    torch.testing.assert_close(values[2], torch.ones(4, dtype=torch.float64, device=device))
    good = target((a[:2] + a[:2].mT) / 2)
    good_values = good if isinstance(good, torch.Tensor) else (good[1] if len(good) == 3 else good[0])
    torch.testing.assert_close(values[:2], good_values)
    w = torch.ones(3, 4, 4, dtype=torch.float64, device=device)
    _loss(out, w).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and bool((x.grad[2] == 0).all())
    stats.reset()


def test_nonfinite_check_adds_no_synchronising_op() -> None:
    """Under cuda_policy the CPU runs the CUDA code: the only sync is the solver's own."""
    a = random_spd((2,), 6, seed=37).requires_grad_()
    for mode in ("raise", "skip"):
        mod = StableDecomposition.for_target(torch.linalg.eigh, on_nonfinite=mode)
        with cuda_policy(), sync_audit() as audit:
            lam, vec = mod(a)
            (lam.sum() + vec.square().sum()).backward()
        assert audit.syncs == {"aten._linalg_eigh": 1}, (mode, audit.syncs)
