"""NOG's two choices: ``scale`` ("unit" | "frobenius") and ``deficient`` ("partial" | "full").

References are float64 ``torch.linalg.svd`` of exactly the gradient given (rank-deficient
gradients are products of small-integer factors, so they are exactly rank-r in float32 and
float64 alike). Plumbing: OrthoConfig → orthofx.transform → orthofx.attach / OrthoSGD → the
step the optimizer takes, on a conv stem + ZCA whitening written with torch.linalg.eigh."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import orthofx
from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError
from orthofx.linalg.polar import polar
from orthofx.optim import OrthoSGD
from orthofx.syncs import cuda_policy, sync_audit
from orthofx.treatments import attach, default_chain, guard, named_chain, nog
from orthofx.treatments.options import parse_options

METHODS = ["auto", "svd", "eigh", "ns", "polar_express"]
FULL_METHODS = ["auto", "svd"]  # the methods that can lift the null space (an SVD)


# ----------------------------------------------------------------------------- helpers
def _int_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    """float64 m×n = A B with integer A (m×r), B (r×n) in [-4, 4]: exact in float32 too."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-4, 5, (m, r), generator=g).double()
    b = torch.randint(-4, 5, (r, n), generator=g).double()
    return a @ b


def _svd64(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(U, σ, Vᵀ, numerical rank) of the float64 thin SVD of g (rank: σ > max(m,n)·eps64·σ_max)."""
    u, s, vh = torch.linalg.svd(g.double().cpu(), full_matrices=False)
    tol = s[:1] * max(g.shape[-2:]) * torch.finfo(torch.float64).eps if s.numel() else s
    return u, s, vh, int((s > tol).sum()) if s.numel() else 0


def _run(g: torch.Tensor, method: str = "auto", **kw) -> tuple[torch.Tensor, int, int]:
    """NOG of one gradient g (any shape (out, *)); (result, zero count, non-finite count)."""
    t = nog(method, **kw)
    state = t.init([g])
    upd, new = t.update([g], state, [g])
    return upd.grads[0], int(new.zero), int(new.nonfinite)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).double().cpu()


# Tolerances per method on a well-conditioned range (nonzero σ of integer products within
# ~1e-2 of each other): exact methods ~1e-6 in float32; Polar Express (float32 iterations)
# leaves its rounding, amplified ~1e4 by the odd polynomials, on the null space; Muon's "ns"
# does not converge (singular values in [0.68, 1.2], polar.py's module doc).
RANGE_TOL = {"auto": 1e-4, "svd": 1e-5, "eigh": 1e-5, "polar_express": 1e-3, "ns": None}
NULL_TOL = {"auto": 1e-3, "svd": 1e-6, "eigh": 1e-6, "polar_express": 1e-3, "ns": 1e-4}


# ----------------------------------------------------------------------------- scale
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (40, 12), (6, 5, 2, 2)])
def test_frobenius_scale_keeps_norm_and_direction(device, method, dtype, shape) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    g = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3e-3).to(device, dtype)
    unit, _, _ = _run(g, method, scale="unit")
    frob, zero, nonfinite = _run(g, method, scale="frobenius")
    assert frob.shape == g.shape and frob.dtype == dtype and (zero, nonfinite) == (0, 0)
    gnorm = g.double().norm()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(frob.double().norm() / gnorm - 1) < rtol  # ‖out‖_F = ‖G‖_F
    # same direction as the unit step: out = U Vᵀ·‖G‖_F/‖U Vᵀ‖_F
    torch.testing.assert_close(frob.double() / gnorm, unit.double() / unit.double().norm(), rtol=0, atol=rtol)
    if method != "ns":  # against the float64 reference U Vᵀ·‖G‖_F/√min(m, n)
        u, _, vh, _ = _svd64(_flat(g))
        ref = (u @ vh) * gnorm.cpu() / math.sqrt(min(u.shape[0], vh.shape[1]))
        err = (_flat(frob) - ref).norm() / ref.norm()
        assert err < (1e-5 if dtype == torch.float32 else 1e-9), (method, err)
        assert abs(unit.double().norm().item() - math.sqrt(min(u.shape[0], vh.shape[1]))) < 1e-4  # unit: √k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("log_scale", [-30.0, 0.0, 30.0])
def test_frobenius_scale_is_scale_safe_and_zero_stays_zero(device, dtype, log_scale) -> None:
    gen = torch.Generator().manual_seed(1)
    g = (torch.randn(3, 8, 9, generator=gen, dtype=torch.float64) * 10.0**log_scale).to(device, dtype)
    g[1] = 0.0
    g[2, 0, 0] = math.nan
    t = nog("auto", scale="frobenius")
    state = t.init(list(g))
    upd, new = t.update(list(g), state, list(g))
    out = upd.grads
    assert (int(new.zero), int(new.nonfinite)) == (1, 1)
    assert not out[1].any() and not out[2].any()  # zero stays 0, non-finite becomes 0
    assert torch.isfinite(out[0]).all()
    rel = abs(out[0].double().norm() / g[0].double().norm() - 1).item()
    assert rel < {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype], rel


# ----------------------------------------------------------------------------- deficient
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (27, 16)], ids=["16x27-conv", "27x16-tall"])
def test_partial_is_the_partial_isometry(device, method, dtype, shape) -> None:
    m, n = shape[0], math.prod(shape[1:])
    g64 = _int_rank(m, n, 5, seed=7)
    u, _, vh, r = _svd64(g64)
    assert r == 5
    g = g64.reshape(shape).to(device, dtype)
    out, _, _ = _run(g, method, deficient="partial")
    s = torch.linalg.svdvals(_flat(out))
    assert s[r:].max() < NULL_TOL[method], (method, s)  # null directions stay (near) 0
    if RANGE_TOL[method] is None:  # "ns": approximate on the range by design
        assert ((s[:r] > 0.6) & (s[:r] < 1.25)).all(), s
        return
    assert (s[:r] - 1).abs().max() < RANGE_TOL[method], (method, s)
    ref = u[:, :r] @ vh[:r]  # U_r V_rᵀ of the float64 SVD
    assert (_flat(out) - ref).abs().max() < RANGE_TOL[method]


@pytest.mark.parametrize("method", FULL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (27, 16)], ids=["16x27-conv", "27x16-tall"])
def test_full_lifts_the_null_space(device, method, dtype, shape) -> None:
    m, n = shape[0], math.prod(shape[1:])
    g64 = _int_rank(m, n, 5, seed=7)
    u, _, vh, r = _svd64(g64)
    g = g64.reshape(shape).to(device, dtype)
    out, _, _ = _run(g, method, deficient="full")
    q = _flat(out)
    s = torch.linalg.svdvals(q)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert s.numel() == min(m, n) and (s - 1).abs().max() < tol  # all min(m, n) singular values 1
    # on the range it is U Vᵀ of the float64 thin SVD: Q V_r = U_r and Qᵀ U_r = V_r
    assert (q @ vh[:r].T - u[:, :r]).abs().max() < tol
    assert (q.T @ u[:, :r] - vh[:r].T).abs().max() < tol


@pytest.mark.parametrize("method", ["eigh", "ns", "polar_express"])
def test_full_with_a_partial_method_is_a_config_error(method) -> None:
    with pytest.raises(ConfigError, match="deficient='full'.*null-space"):
        nog(method, deficient="full")
    with pytest.raises(ConfigError, match="deficient='full'"):
        polar(torch.ones(2, 3), method=method, deficient="full")


def test_svd_partial_tolerance_is_max_mn_eps_sigma_max() -> None:
    """"svd"+"partial" drops σ ≤ max(m, n)·eps(d)·σ_max, d the SVD's dtype (float64 here)."""
    gen = torch.Generator().manual_seed(3)
    m, n = 6, 10
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    tol = max(m, n) * torch.finfo(torch.float64).eps
    s = torch.tensor([1.0, 0.5, 1e3 * tol, 1e-3 * tol, 0.0, 0.0], dtype=torch.float64)
    g = (u * s) @ v.T
    kept = torch.linalg.svdvals(polar(g, method="svd", deficient="partial"))
    assert int((kept > 0.5).sum()) == 3 and kept[3:].max() < 1e-12
    lifted = torch.linalg.svdvals(polar(g, method="svd", deficient="full"))
    assert (lifted - 1).abs().max() < 1e-12


def test_svd_default_nog_is_now_partial_and_auto_default_is_bitwise_unchanged(device) -> None:
    g = _int_rank(16, 27, 5, seed=11).float().to(device).reshape(16, 3, 3, 3)
    out, _, _ = _run(g, "svd")  # nog's default deficient="partial"
    assert int((torch.linalg.svdvals(_flat(out)) > 0.5).sum()) == 5
    lifted, _, _ = _run(g, "svd", deficient="full")
    assert int((torch.linalg.svdvals(_flat(lifted)) > 0.5).sum()) == 16
    # the defaults spelled out give exactly the polar factor of "auto" (no change to the default)
    gen = torch.Generator().manual_seed(2)
    for gg in (g, torch.randn(16, 3, 3, 3, generator=gen).to(device)):
        a, _, _ = _run(gg)
        b, _, _ = _run(gg, "auto", scale="unit", deficient="partial")
        assert torch.equal(a, b)
        assert torch.equal(a, polar(gg.reshape(16, 27), method="auto").reshape(gg.shape))


@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(0, 12),
    method=st.sampled_from(["auto", "svd", "eigh"]),
    deficient=st.sampled_from(["partial", "full"]),
    scale=st.sampled_from(["unit", "frobenius"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_nog_options_hypothesis(m, n, r, method, deficient, scale, dtype, seed) -> None:
    if deficient == "full" and method == "eigh":
        with pytest.raises(ConfigError):
            nog(method, scale=scale, deficient=deficient)
        return
    g64 = _int_rank(m, n, min(r, m, n), seed)
    _, _, _, rank = _svd64(g64)
    out, zero, _ = _run(g64.to(dtype), method, scale=scale, deficient=deficient)
    if rank == 0:
        assert zero == 1 and not out.any()
        return
    s = torch.linalg.svdvals(out.double())
    k = rank if deficient == "partial" else min(m, n)
    if scale == "frobenius":
        s = s * math.sqrt(k) / g64.norm()  # back to unit singular values
        assert abs(out.double().norm() / g64.norm() - 1) < 1e-5
    assert (s[:k] - 1).abs().max() < 1e-5, (s, rank)
    assert s[k:].numel() == 0 or s[k:].max() < 1e-6, (s, rank)


@pytest.mark.parametrize("scale", ["unit", "frobenius"])
def test_cuda_path_has_no_host_sync(device, scale) -> None:
    """The sync-free path ("auto" under the CUDA policy) stays sync-free with either scale."""
    g = [torch.randn(16, 3, 3, 3, device=device), torch.randn(16, 3, 3, 3, device=device)]
    t = nog("auto", scale=scale, deficient="partial")
    state = t.init(g)
    with cuda_policy(), sync_audit() as audit:
        upd, _ = t.update(g, state, g)
    assert audit.syncs == {}, audit.syncs
    ref = torch.stack([x.reshape(16, 27).double().cpu() for x in g])
    u, _, vh = torch.linalg.svd(ref, full_matrices=False)
    want = u @ vh
    if scale == "frobenius":
        want = want * ref.norm(dim=(-2, -1), keepdim=True) / math.sqrt(16)
    got = torch.stack([x.reshape(16, 27).double().cpu() for x in upd.grads])
    assert ((got - want).norm() / want.norm()) < 1e-4


# ----------------------------------------------------------------------------- plumbing
class ZCAWhiten(nn.Module):
    """Batch ZCA whitening of (N, C, H, W) features over N·H·W samples, via eigh."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        f = x.permute(1, 0, 2, 3).reshape(c, -1)
        f = f - f.mean(dim=1, keepdim=True)
        cov = f @ f.T / f.shape[1] + self.eps * torch.eye(c, dtype=x.dtype, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        white = u @ torch.diag(lam.rsqrt()) @ u.T
        return (white @ f).reshape(c, n, h, w).permute(1, 0, 2, 3)


class StemNet(nn.Module):
    """A 3×3 conv stem (8×27 weight) on 3×3 inputs without padding: one output position per
    image, so a batch of 4 gives a stem gradient of rank ≤ 4 (rank-deficient)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, bias=False)
        self.white = ZCAWhiten()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.white(self.stem(x)).flatten(1))


def _batch(seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 3, (4,), generator=g).to(device))


def _model(device, **cfg) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = StemNet().double().to(device)
    x, _ = _batch(0, device)
    gm, report = orthofx.transform(model, (x,), config=OrthoConfig(nog=True, **cfg))
    assert report.producers == ["stem"]
    scale, deficient = cfg.get("nog_scale", "unit"), cfg.get("nog_deficient", "partial")
    assert f"nog: method={cfg.get('nog_method', 'auto')}, scale={scale}, deficient={deficient}" in str(report)
    assert report.to_dict()["plan"]["config"]["gradients"]["nog_scale"] == scale
    return gm, dict(gm.named_parameters())["stem.weight"]


def _check_step(d: torch.Tensor, g: torch.Tensor, scale: str, deficient: str, atol: float = 1e-9) -> None:
    """``d`` (flat, float64) is NOG's step for the gradient ``g`` against the float64 SVD of g:
    on the range U_r V_rᵀ (·c), on the null space 0 ("partial") or a lift with singular
    values 1 (·c) along some orthonormal basis ("full": not unique, so not compared entrywise);
    c = 1 ("unit") or ‖G‖_F/‖U Vᵀ‖_F ("frobenius")."""
    u, _, vh, r = _svd64(_flat(g))
    k = r if deficient == "partial" else min(u.shape[0], vh.shape[1])
    c = g.double().norm().cpu() / math.sqrt(k) if scale == "frobenius" else 1.0
    torch.testing.assert_close(d @ vh[:r].T, c * u[:, :r], rtol=0, atol=atol)  # D V_r = c·U_r
    torch.testing.assert_close(d.T @ u[:, :r], c * vh[:r].T, rtol=0, atol=atol)  # Dᵀ U_r = c·V_r
    s = torch.linalg.svdvals(d)
    assert (s[:k] / c - 1).abs().max() < atol and (s[k:].numel() == 0 or s[k:].max() < atol), s
    if scale == "frobenius":
        assert abs(d.norm() / g.double().norm().cpu() - 1) < atol


@pytest.mark.parametrize("scale", ["unit", "frobenius"])
@pytest.mark.parametrize("deficient", ["partial", "full"])
@pytest.mark.parametrize("how", ["attach", "orthosgd"])
def test_config_to_optimizer_step(device, scale, deficient, how) -> None:
    gm, w = _model(device, nog_method="svd", nog_scale=scale, nog_deficient=deficient)
    lr = 0.05
    if how == "attach":
        opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.0)
        handle = orthofx.attach(opt, gm)
    else:
        opt = OrthoSGD(gm, lr=lr, momentum=0.0, nog_method="svd", nog_scale=scale, nog_deficient=deficient)
        handle = opt.handle
    assert handle.options["nog_scale"] == scale and handle.options["nog_deficient"] == deficient
    stats = handle.stats()
    assert (stats["nog_method"], stats["nog_scale"], stats["nog_deficient"]) == ("svd", scale, deficient)
    assert handle.guard_state.scale == scale and handle.guard_state.deficient == deficient
    for step in range(2):
        x, y = _batch(step, device)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        g = w.grad.detach().clone()
        assert _svd64(_flat(g))[3] <= 4  # the stem gradient is rank-deficient
        before = w.detach().clone()
        opt.step()
        _check_step(_flat((before - w.detach()) / lr), g, scale, deficient)


def test_explicit_keywords_override_the_config(device) -> None:
    gm, w = _model(device, nog_scale="unit")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.0)
    handle = orthofx.attach(opt, gm, nog_scale="frobenius", nog_deficient="full", nog_method="auto")
    assert (handle.options["nog_scale"], handle.options["nog_deficient"]) == ("frobenius", "full")
    x, y = _batch(5, device)
    F.cross_entropy(gm(x), y).backward()
    g = w.grad.detach().clone()
    before = w.detach().clone()
    opt.step()
    _check_step(_flat((before - w.detach()) / 0.1), g, "frobenius", "full")


def test_default_chain_passes_both_choices() -> None:
    t = default_chain(nog=True, nog_method="svd", nog_scale="frobenius", nog_deficient="full")
    g = _int_rank(8, 12, 3, seed=4)
    state = t.init([g])
    upd, new = t.update([g], state, [g])
    assert (new["nog"].scale, new["nog"].deficient) == ("frobenius", "full")
    _check_step(upd.grads[0], g, "frobenius", "full", atol=1e-12)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"nog": True, "nog_scale": "big"}, r"nog_scale='big': must be one of 'unit', 'frobenius'"),
        ({"nog": True, "nog_deficient": "lift"}, r"nog_deficient='lift': must be one of 'partial', 'full'"),
        ({"nog": True, "nog_method": "eigh", "nog_deficient": "full"},
         r"nog_deficient='full' with nog_method='eigh'.*nog_method='svd' or 'auto'"),
        ({"nog": True, "nog_method": "polar_express", "nog_deficient": "full"}, r"nog_method='polar_express'"),
    ],
)
def test_parse_options_errors_name_the_field(cfg, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_options(cfg)


def test_other_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"nog: scale='big'"):
        nog(scale="big")
    with pytest.raises(ConfigError, match=r"nog: deficient=None"):
        nog(deficient=None)  # type: ignore[arg-type]
    chain = named_chain(("guard", guard()))
    with pytest.raises(ConfigError, match=r"chain= or nog_scale="):
        parse_options(chain=chain, nog_scale="frobenius")
    m = StemNet().double()
    with pytest.raises(ConfigError, match="nog_scale/nog_deficient"):
        OrthoSGD(m.parameters(), producers=[(m.stem, "weight")], chain=chain, nog_deficient="full")
    with pytest.raises(ConfigError, match=r"nog_deficient='full' with nog_method='ns'"):
        OrthoSGD(m.parameters(), producers=[(m.stem, "weight")], nog_method="ns", nog_deficient="full")
    # a config that cannot be honoured is refused where it is written (GradientSpec checks its
    # options once, there), naming both fields; without NOG the pair means nothing and passes
    with pytest.raises(ConfigError, match=r"nog_deficient='full' with nog_method='eigh'"):
        OrthoConfig(nog=True, nog_method="eigh", nog_deficient="full")
    assert OrthoConfig(nog_method="eigh", nog_deficient="full").nog is False


def test_attach_twice_with_other_choices_is_refused() -> None:
    m = StemNet().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = attach(opt, [(m.stem, "weight")], nog=True)
    assert attach(opt, [(m.stem, "weight")], nog=True, nog_scale="unit") is h
    with pytest.raises(orthofx.errors.AttachError):
        attach(opt, [(m.stem, "weight")], nog=True, nog_scale="frobenius")
