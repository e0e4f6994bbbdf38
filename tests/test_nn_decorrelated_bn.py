"""DecorrelatedBatchNorm in eval mode (issue 12): the default running statistic is the EMA of Σ,
and eval whitens with (Σ_run + εI)^{-1/2}, which stays as good as training-mode whitening on
rank-deficient features whose null space rotates from batch to batch (where an EMA of the
whitening matrices, the old default, blows up)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from orthofx.nn import DecorrelatedBatchNorm
from orthofx.syncs import cuda_policy, sync_audit

C = 16


def _rotating_subspace(n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """(256, 16) float32 batches on a rank-6 subspace that turns by a small random rotation
    each batch, plus noise of std 1e-3 (variance 1e-6, below ε = 1e-5: numerically rank 6)."""
    g = torch.Generator().manual_seed(seed)
    r = 6
    basis, _ = torch.linalg.qr(torch.randn(C, r, generator=g, dtype=torch.float64))
    scale = torch.linspace(0.5, 3.0, r, dtype=torch.float64)
    mean = torch.randn(C, 1, generator=g, dtype=torch.float64)
    for _ in range(n_batches):
        k = torch.randn(C, C, generator=g, dtype=torch.float64)
        basis = torch.linalg.matrix_exp((k - k.T) * 0.05 / C**0.5) @ basis
        z = torch.randn(r, 256, generator=g, dtype=torch.float64) * scale[:, None]
        f = basis @ z + mean + 1e-3 * torch.randn(C, 256, generator=g, dtype=torch.float64)
        yield f.T.float()


def _conv_stem(n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """A 1→16 3×3 stem (Σ of rank ≤ 9) whose weights move a little each batch, as in training."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(1, C, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 3)
        for _ in range(n_batches):
            conv.weight.add_(0.05 * conv.weight.std() * torch.randn(conv.weight.shape, generator=g))
            yield conv(torch.randn(16, 1, 10, 10, generator=g))


def _whitening_error(y: torch.Tensor) -> float:
    """‖cov(y) − I‖_F over the channels of (N, C, *S) outputs, in float64."""
    f = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
    f = f - f.mean(dim=1, keepdim=True)
    cov = f @ f.T / f.shape[1]
    return torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=torch.float64)).item()


def _train_then_hold_out(m: DecorrelatedBatchNorm, source) -> tuple[float, float, torch.Tensor]:
    *train, held = list(source(31))
    for x in train:
        m(x)
    with torch.no_grad():
        train_err = _whitening_error(copy.deepcopy(m).train()(held))  # the held-out batch's own statistics
        y = m.eval()(held)
    return train_err, _whitening_error(y), y


@pytest.mark.parametrize("source", [_rotating_subspace, _conv_stem], ids=["rotating-subspace", "conv-stem"])
@pytest.mark.parametrize("backend", ["auto", "svd"])
def test_eval_whitens_rank_deficient_rotating_features_as_well_as_training(source, backend: str) -> None:
    """Default module, default ε = 1e-5 and momentum: after 30 training batches, eval mode whitens a
    held-out batch within 1.5× of training mode's ‖cov − I‖_F (training mode leaves the ≥ 7 null
    directions at ≈ 0 variance, hence a training error of √7 ≈ 2.6 or more), and stays finite.
    The old default, still available as ``running="whitening"``, is > 100× worse on the same data
    (measured ≈ 10³–10⁴)."""
    torch.manual_seed(0)
    m = DecorrelatedBatchNorm(C, affine=False, backend=backend)
    train_err, eval_err, y = _train_then_hold_out(m, source)
    assert torch.isfinite(y).all()
    assert 2.0 < train_err < 5.0, train_err
    assert eval_err < 1.5 * train_err, (eval_err, train_err)
    old = DecorrelatedBatchNorm(C, affine=False, backend=backend, running="whitening")
    assert "running_whitening" in dict(old.named_buffers()) and "running_covariance" not in dict(old.named_buffers())
    old_train_err, old_eval_err, _ = _train_then_hold_out(old, source)
    assert old_train_err == pytest.approx(train_err, rel=1e-6)
    assert old_eval_err > 100 * train_err, (old_eval_err, train_err)


def test_default_running_statistic_is_the_covariance_and_eval_uses_its_inverse_sqrt() -> None:
    """The default keeps ``running_covariance`` (an EMA of Σ without εI) and eval applies
    (Σ_run + εI)^{-1/2} to x − μ_run, checked against scipy in float64."""
    eps, mom = 1e-3, 0.3
    m = DecorrelatedBatchNorm(6, eps=eps, momentum=mom, affine=False).double()
    assert m.running == "covariance"
    assert "running_covariance" in dict(m.named_buffers()) and "running_whitening" not in dict(m.named_buffers())
    assert "running='covariance'" in repr(m)
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) @ mix + 1.0 for _ in range(3)]
    mu, cov = np.zeros((6, 1)), np.eye(6)
    for x in xs:
        m(x)
        f = x.numpy().T
        mb = f.mean(axis=1, keepdims=True)
        mu = (1 - mom) * mu + mom * mb
        cov = (1 - mom) * cov + mom * (f - mb) @ (f - mb).T / f.shape[1]
    np.testing.assert_allclose(m.running_covariance[0].numpy(), cov, rtol=1e-12, atol=1e-12)
    w = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(cov + eps * np.eye(6))))
    held = torch.randn(10, 6, generator=g, dtype=torch.float64) @ mix
    ref = (w @ (held.numpy().T - mu)).T
    np.testing.assert_allclose(m.eval()(held).numpy(), ref, rtol=1e-9, atol=1e-10)


def test_eval_whitening_is_decomposed_once_per_change_of_the_statistics() -> None:
    """The first eval forward decomposes Σ_run once; later eval forwards reuse it (no eigh, no
    host sync on the CUDA path); a training step invalidates it."""
    m = DecorrelatedBatchNorm(C)
    batches = list(_rotating_subspace(3))
    m(batches[0])
    m.eval()
    with cuda_policy(), sync_audit() as first:
        m(batches[1])
    with cuda_policy(), sync_audit() as again:
        y = m(batches[1])
    assert first.syncs.get("aten._linalg_eigh") == 1, first.syncs
    assert again.syncs == {}, again.syncs
    m.train()(batches[2])
    m.eval()
    with cuda_policy(), sync_audit() as after:
        y2 = m(batches[1])
    assert after.syncs.get("aten._linalg_eigh") == 1 and not torch.equal(y, y2)


@pytest.mark.parametrize("saved,loaded", [("whitening", "covariance"), ("covariance", "whitening")])
def test_a_state_dict_of_the_other_running_choice_loads_with_the_same_eval_whitening(saved: str, loaded: str) -> None:
    """A checkpoint of the old default (running_whitening) loads into the new default, strictly,
    and the loaded module's eval output equals the saved one's (and the reverse)."""
    old = DecorrelatedBatchNorm(C, eps=1e-3, running=saved).double()
    *train, held = [x.double() for x in _rotating_subspace(6)]
    for x in train:
        old(x)
    new = DecorrelatedBatchNorm(C, eps=1e-3, running=loaded).double()
    result = new.load_state_dict(old.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert f"running_{saved}" not in dict(new.named_buffers())
    torch.testing.assert_close(new.eval()(held), old.eval()(held), rtol=1e-8, atol=1e-8)
    nested = nn.Sequential(nn.Identity(), DecorrelatedBatchNorm(C, eps=1e-3, running=loaded).double())
    nested.load_state_dict(nn.Sequential(nn.Identity(), old).state_dict())
    torch.testing.assert_close(nested.eval()(held), old(held), rtol=1e-8, atol=1e-8)
