"""orthofx.nn meta-layers against float64 references (scipy), gradcheck, modes, tracing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.fx
from torch import nn

from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm, StableDecomposition, is_meta_layer


def _zca_reference(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """float64 ZCA whitening of (N, C, *S) features by scipy, per channel group."""
    n, c = x.shape[:2]
    feats = np.moveaxis(x, 1, 0).reshape(groups, c // groups, -1)
    out = np.empty_like(feats)
    for g in range(groups):
        xc = feats[g] - feats[g].mean(axis=1, keepdims=True)
        cov = xc @ xc.T / xc.shape[1] + eps * np.eye(xc.shape[0])
        w = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov)))
        out[g] = w @ xc
    return np.moveaxis(out.reshape(c, n, *x.shape[2:]), 0, 1)


def _correlated(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    return torch.einsum("dc,nc...->nd...", mix, x) + 3.0


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("shape", [(16, 8, 5, 5), (256, 8)])
def test_dbn_matches_scipy_zca(device, groups, shape):
    x = _correlated(shape)
    eps = 1e-5
    dbn = DecorrelatedBatchNorm(8, groups=groups, eps=eps, affine=False).to(device, torch.float64)
    y = dbn(x.to(device)).cpu().numpy()
    ref = _zca_reference(x.numpy(), groups, eps)
    np.testing.assert_allclose(y, ref, rtol=1e-7, atol=1e-8)


def test_dbn_output_covariance_is_identity_in_training(device):
    x = _correlated((64, 16, 4, 4), seed=1).float().to(device)
    dbn = DecorrelatedBatchNorm(16, groups=1, eps=1e-6).to(device)
    y = dbn(x).detach().double()
    feats = y.transpose(0, 1).reshape(16, -1)
    feats = feats - feats.mean(dim=1, keepdim=True)
    cov = feats @ feats.T / feats.shape[1]
    torch.testing.assert_close(cov, torch.eye(16, dtype=torch.float64, device=device), atol=1e-3, rtol=0)


def test_dbn_eval_uses_running_statistics(device):
    x1 = _correlated((32, 6, 3, 3), seed=2).to(device)
    x2 = _correlated((8, 6, 3, 3), seed=3).to(device)
    dbn = DecorrelatedBatchNorm(6, eps=1e-4, momentum=1.0, affine=False).to(device, torch.float64)
    dbn(x1)  # momentum 1: running stats become exactly batch 1's statistics
    dbn.eval()
    y2 = dbn(x2)
    f1 = x1.transpose(0, 1).reshape(6, -1)
    mu = f1.mean(dim=1, keepdim=True)
    cov = (f1 - mu) @ (f1 - mu).T / f1.shape[1] + 1e-4 * torch.eye(6, dtype=torch.float64, device=device)
    w = torch.from_numpy(np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov.cpu().numpy())))).to(device)
    ref = (w @ (x2.transpose(0, 1).reshape(6, -1) - mu)).reshape(6, 8, 3, 3).transpose(0, 1)
    torch.testing.assert_close(y2, ref, rtol=1e-7, atol=1e-8)
    assert int(dbn.num_batches_tracked) == 1


def test_dbn_running_statistics_ema(device):
    dbn = DecorrelatedBatchNorm(4, momentum=0.1, affine=False, running="whitening").to(device, torch.float64)
    x = _correlated((50, 4), seed=4).to(device)
    dbn(x)
    mu = x.mean(dim=0).view(1, 4, 1)
    torch.testing.assert_close(dbn.running_mean, 0.1 * mu)
    # the whitening EMA moved 10% of the way from I to the batch whitening matrix
    dbn2 = DecorrelatedBatchNorm(4, momentum=1.0, affine=False, running="whitening").to(device, torch.float64)
    dbn2(x)
    eye = torch.eye(4, dtype=torch.float64, device=device)
    torch.testing.assert_close(dbn.running_whitening[0], 0.9 * eye + 0.1 * dbn2.running_whitening[0])


def test_dbn_affine_parameters_apply_per_channel(device):
    x = _correlated((40, 4), seed=5).to(device)
    dbn = DecorrelatedBatchNorm(4, eps=1e-5).to(device, torch.float64)
    with torch.no_grad():
        dbn.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        dbn.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    plain = DecorrelatedBatchNorm(4, eps=1e-5, affine=False).to(device, torch.float64)
    torch.testing.assert_close(dbn(x), plain(x) * dbn.weight + dbn.bias)


def test_dbn_gradcheck():
    x = _correlated((12, 4), seed=6).requires_grad_(True)
    dbn = DecorrelatedBatchNorm(4, eps=1e-3).double()
    assert torch.autograd.gradcheck(lambda t: dbn(t), (x,), atol=1e-6, rtol=1e-5)


def test_dbn_rank_deficient_stem_has_finite_gradients(device):
    # a 1->16 3x3 stem: the covariance has rank <= 9 < 16, the paper's ill-conditioned case
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, bias=False), DecorrelatedBatchNorm(16)).to(device)
    x = torch.randn(8, 1, 12, 12, device=device)
    out = model(x)
    out.square().mean().backward()
    assert torch.isfinite(model[0].weight.grad).all()
    assert model[0].weight.grad.abs().sum() > 0


def test_dbn_autocast_keeps_float32_decomposition(device):
    dtype = torch.bfloat16
    x = _correlated((32, 8, 2, 2), seed=7).float().to(device)
    dbn = DecorrelatedBatchNorm(8).to(device)
    with torch.autocast(device.type, dtype=dtype):
        y = dbn(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all()
    ref = DecorrelatedBatchNorm(8).to(device)(x.to(dtype).float())
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_dbn_bad_input():
    with pytest.raises(ValueError, match="multiple of groups"):
        DecorrelatedBatchNorm(10, groups=3)
    dbn = DecorrelatedBatchNorm(4)
    with pytest.raises(ValueError, match="expects"):
        dbn(torch.randn(3, 5))
    with pytest.raises(ValueError, match="more than one sample"):
        dbn(torch.randn(1, 4))


# ------------------------------------------------------------------ covariance pooling
def _gcp_reference(x: np.ndarray, eps: float) -> np.ndarray:
    n, c = x.shape[:2]
    out = []
    for i in range(n):
        f = x[i].reshape(c, -1)
        fc = f - f.mean(axis=1, keepdims=True)
        cov = fc @ fc.T / f.shape[1] + eps * np.eye(c)
        out.append(np.real(scipy.linalg.sqrtm(cov)))
    return np.stack(out)


@pytest.mark.parametrize("output", ["full", "triu"])
def test_gcp_matches_scipy_sqrtm_on_singular_covariances(device, output):
    # C = 12 channels from M = 3x3 = 9 positions: rank <= 8 < C, singular without eps
    x = _correlated((3, 12, 3, 3), seed=8).to(device)
    eps = 1e-5
    head = CovariancePooling(12, eps=eps, output=output).to(device)
    y = head(x.float()).double().cpu()
    ref = torch.from_numpy(_gcp_reference(x.cpu().numpy(), eps))
    if output == "triu":
        i, j = torch.triu_indices(12, 12)
        ref = ref[:, i, j]
    else:
        ref = ref.reshape(3, -1)
    assert y.shape == (3, head.out_features)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_gcp_gradcheck_and_internal_producer():
    head = CovariancePooling(4, reduced=3, eps=1e-3, output="triu").double()
    assert head.orthofx_internal_producer() == "reduce"
    assert isinstance(head.reduce, nn.Conv2d) and head.reduce.kernel_size == (1, 1)
    assert CovariancePooling(4).orthofx_internal_producer() is None
    head.eval()  # BN in eval mode keeps gradcheck deterministic
    x = _correlated((2, 4, 3, 3), seed=9).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: head(t), (x,), atol=1e-6, rtol=1e-5)


def test_gcp_records_eigenvalues_for_the_monitor():
    head = CovariancePooling(6, eps=1e-4)
    head.orthofx_record = True
    x = _correlated((2, 6, 2, 2), seed=10).float()
    head(x)
    lam = head.orthofx_last_eigenvalues
    f = x.double().reshape(2, 6, -1)
    f = f - f.mean(-1, keepdim=True)
    cov = f @ f.mT / 4 + 1e-4 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(cov), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ tracing
def test_meta_layers_are_leaves_under_plain_symbolic_trace():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), DecorrelatedBatchNorm(8), nn.ReLU(), CovariancePooling(8, reduced=4)
    )
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1", "2", "3"]
    assert is_meta_layer(gm.get_submodule("1")) and is_meta_layer(gm.get_submodule("3"))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))  # eval mode not baked in at trace time


def test_stable_decomposition_matches_torch_forward_and_is_finite_on_repeated_eigenvalues():
    g = torch.Generator().manual_seed(11)
    f = torch.randn(2, 16, 5, generator=g, dtype=torch.float64)
    cov = f @ f.mT / 5 + 1e-4 * torch.eye(16, dtype=torch.float64)  # eigenvalue 1e-4 repeated 11 times
    for target in (torch.linalg.eigh, torch.linalg.svd, torch.svd, torch.linalg.svdvals, torch.linalg.eigvalsh):
        mod = StableDecomposition.for_target(target)
        assert mod.orthofx_meta.kind == mod.kind
        ours, theirs = mod(cov), target(cov)
        if target is torch.linalg.eigh:
            torch.testing.assert_close(ours.eigenvalues, theirs.eigenvalues)
            rebuilt = ours.eigenvectors @ torch.diag_embed(ours.eigenvalues) @ ours.eigenvectors.mT
            torch.testing.assert_close(rebuilt, cov)
        elif target is torch.linalg.svd:
            torch.testing.assert_close(ours.S, theirs.S)
            torch.testing.assert_close(ours.U @ torch.diag_embed(ours.S) @ ours.Vh, cov)
        elif target is torch.svd:
            torch.testing.assert_close(ours.S, theirs.S)
            torch.testing.assert_close(ours.U @ torch.diag_embed(ours.S) @ ours.V.mT, cov)
        else:
            torch.testing.assert_close(ours, theirs)
    a = cov.clone().requires_grad_(True)
    lam, vec = StableDecomposition.for_target(torch.linalg.eigh)(a)
    (vec[..., -3:].square().sum() + lam.sum()).backward()
    assert torch.isfinite(a.grad).all()


def test_dbn_running_covariance_mode(device):
    x1 = _correlated((32, 6, 3, 3), seed=12).to(device)
    x2 = _correlated((8, 6, 3, 3), seed=13).to(device)
    dbn = DecorrelatedBatchNorm(6, eps=1e-3, momentum=1.0, affine=False, running="covariance").to(device, torch.float64)
    assert "running_covariance" in dict(dbn.named_buffers()) and "running_whitening" not in dict(dbn.named_buffers())
    y_train = dbn(x1)
    dbn.eval()
    # momentum 1: eval with batch 1's statistics reproduces the training-mode output exactly
    torch.testing.assert_close(dbn(x1), y_train)
    ref2 = DecorrelatedBatchNorm(6, eps=1e-3, momentum=1.0, affine=False, running="whitening").to(
        device, torch.float64
    )
    ref2(x1)
    ref2.eval()
    torch.testing.assert_close(dbn(x2), ref2(x2))
    # the cached eval whitening follows new statistics
    dbn.train()
    dbn(x2)
    dbn.eval()
    torch.testing.assert_close(dbn(x2), DecorrelatedBatchNorm(6, eps=1e-3, affine=False).to(device, torch.float64)(x2))
    with pytest.raises(ValueError, match="running"):
        DecorrelatedBatchNorm(6, running="cov")


def test_dbn_cumulative_average_with_momentum_none(device):
    xs = [_correlated((16, 4), seed=20 + i).to(device) for i in range(3)]
    dbn = DecorrelatedBatchNorm(4, momentum=None, affine=False, running="covariance").to(device, torch.float64)
    dbn.reset_running_stats()
    for x in xs:
        dbn(x)
    covs = []
    for x in xs:
        xc = x - x.mean(0)
        covs.append(xc.T @ xc / x.shape[0])
    torch.testing.assert_close(dbn.running_covariance[0], sum(covs) / 3)
    torch.testing.assert_close(dbn.running_mean[0, :, 0], sum(x.mean(0) for x in xs) / 3)
    assert int(dbn.num_batches_tracked) == 3


def test_gcp_gram_backend_matches_scipy_and_records(device):
    x = _correlated((3, 12, 3, 3), seed=14).to(device)
    head = CovariancePooling(12, eps=1e-4, backend="gram", output="full").to(device)
    head.orthofx_record = True
    y = head(x).cpu()
    ref = torch.from_numpy(_gcp_reference(x.cpu().numpy(), 1e-4)).reshape(3, -1)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    assert head.orthofx_last_eigenvalues.shape == (3, 12)
    with pytest.raises(ValueError, match="eps > 0"):
        CovariancePooling(12, eps=0.0, backend="gram")
    auto = CovariancePooling(12, eps=1e-4, backend="auto", output="full").to(device)
    torch.testing.assert_close(auto(x).cpu(), ref, rtol=1e-5, atol=1e-6)
