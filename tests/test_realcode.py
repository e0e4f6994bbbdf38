"""The real-code corpus (tests/corpora/realcode): the models themselves, and orthofx on them.

The first part checks the corpus without orthofx's analysis: every case builds
deterministically, runs forward and backward in train and eval mode with finite results,
names producers that exist, and every hand-written ``autograd.Function`` backward agrees with
finite differences (``gradcheck`` in float64).

The second part checks orthofx on the
corpus: ``analyze`` finds exactly the planted producers, ``transform`` + ``attach`` train,
``strip`` round-trips the state dict, and the ``"svd"`` config leaves outputs unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from corpora import realcode as rc
from corpora.realcode import ALL_CASES, CASES, KINDS, NEGATIVE_CASES, RealCodeCase

_ALL = sorted(ALL_CASES)
_POS = sorted(CASES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: intra-op threads only add spin-wait overhead (severe on a shared
    2-core CPU), so this module runs single-threaded and restores the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tensors(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _loss(out: Any) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in _tensors(out) if t.is_floating_point())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- the corpus
def test_required_cases_present():
    required = {"gcp_isqrt", "gcp_svd", "iternorm_vgg", "dbn_vgg16", "zca_pade", "sovit_head",
                "sovit_head_chunk", "wct", "spd_net", "cholesky_whiten", "decoy_cov", "item_forward"}
    assert required <= set(CASES)
    assert {"gcp_no_matfn", "vit_plain", "buffer_reassign_untraceable"} <= set(NEGATIVE_CASES)
    assert not set(CASES) & set(NEGATIVE_CASES)


@pytest.mark.parametrize("name", _ALL)
def test_case_metadata(name: str):
    case = ALL_CASES[name]
    assert isinstance(case, RealCodeCase) and case.name == name and case.description
    assert case.kinds <= KINDS
    if name in NEGATIVE_CASES:
        assert not case.producers and not case.producer_params
        assert case.n_meta_layers == 0 and not case.kinds
    else:
        assert case.producers and case.kinds and case.n_meta_layers >= 1
        # each producer owns exactly one listed parameter, and every listed parameter's owner is a producer
        owners = {p.rsplit(".", 1)[0] for p in case.producer_params}
        assert owners == set(case.producers)
        assert len(case.producer_params) == len(case.producers)


@pytest.mark.parametrize("name", _ALL)
def test_case_runs_train_and_eval(name: str):
    case = ALL_CASES[name]
    model = case.build()
    inputs = case.inputs()
    assert isinstance(inputs, tuple) and all(torch.is_tensor(t) for t in inputs)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    assert case.producer_params <= set(params)
    assert case.producers <= set(modules)
    for p in case.producer_params:
        owner, attr = p.rsplit(".", 1)
        assert getattr(modules[owner], attr) is params[p]
    for training in (True, False):
        model.train(training)
        model.zero_grad(set_to_none=True)
        out = model(*inputs)
        outs = _tensors(out)
        assert outs and all(torch.isfinite(t).all() for t in outs), (name, training)
        _loss(out).backward()
        for p in sorted(case.producer_params):
            g = params[p].grad
            assert g is not None, (name, training, p)
            assert torch.isfinite(g).all(), (name, training, p)
            assert g.abs().sum() > 0, (name, training, p)
        for n, prm in params.items():
            if prm.grad is not None:
                assert torch.isfinite(prm.grad).all(), (name, training, n)
        for n, b in model.named_buffers():
            if b.is_floating_point():
                assert torch.isfinite(b).all(), (name, training, n)


@pytest.mark.parametrize("name", _ALL)
def test_case_deterministic(name: str):
    case = ALL_CASES[name]
    a, b = case.build(), case.build()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    xa, xb = case.inputs(), case.inputs()
    assert len(xa) == len(xb) and all(torch.equal(u, v) for u, v in zip(xa, xb))
    a.train()
    b.train()
    with torch.no_grad():
        oa, ob = _tensors(a(*xa)), _tensors(b(*xb))
    assert all(torch.equal(u, v) for u, v in zip(oa, ob))


def test_iternorm_updates_running_stats_inside_function():
    case = CASES["iternorm_vgg"]
    model = case.build().train()
    norm = model.features[1]
    assert isinstance(norm, rc.IterNorm)
    wm_id = id(norm.running_wm)
    before = _state(model)
    with torch.no_grad():
        model(*case.inputs())
    assert id(norm.running_wm) == wm_id  # updated in place
    assert not torch.equal(before["features.1.running_wm"], norm.running_wm)
    model.eval()
    after = _state(model)
    with torch.no_grad():
        model(*case.inputs())
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())


def test_dbn_reassigns_running_projection():
    case = CASES["dbn_vgg16"]
    model = case.build().train()
    dbn = model.features[1]
    assert isinstance(dbn, rc.DBN)
    old = dbn.running_projection
    with torch.no_grad():
        model(*case.inputs())
    assert dbn.running_projection is not old  # a new tensor assigned to the buffer
    assert "running_projection" in dict(dbn.named_buffers())
    assert not torch.equal(old, dbn.running_projection)


def test_untraceable_negative_defeats_symbolic_fx():
    model = NEGATIVE_CASES["buffer_reassign_untraceable"].build()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)


def test_wct_unused_encoders_get_no_gradient():
    case = CASES["wct"]
    model = case.build().train()
    _loss(model(*case.inputs())).backward()
    for enc in ("c_encoder", "s_encoder"):
        assert all(p.grad is None for p in getattr(model, enc).parameters())
    assert model.encoder[9].weight.grad is not None


def test_sovit_power_iteration_converges():
    case = CASES["sovit_head"]
    model = case.build()
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(3, 6, 6, generator=g))
    V, _ = torch.linalg.qr(torch.randn(3, 6, 6, generator=g))
    A = U @ torch.diag_embed(torch.tensor([3.0, 1.5, 1.0, 0.5, 0.2, 0.1]).expand(3, 6)) @ V.transpose(1, 2)
    u, sigma, v = model.so_head.power_iteration(A)
    top = torch.linalg.svdvals(A)[:, 0]
    torch.testing.assert_close(sigma.abs().flatten(), top, rtol=1e-3, atol=1e-4)


def test_pade_coefficients_approximate_sqrt():
    p, q = rc.pade_coefficients(5, 5)
    z = torch.linspace(-0.5, 0.6, 12, dtype=torch.float64)
    num = sum(c * z ** k for k, c in enumerate(p))
    den = sum(c * z ** k for k, c in enumerate(q))
    torch.testing.assert_close(num / den, torch.sqrt(1 - z), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- gradchecks
def _spd(b: int, d: int, low: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(b, d, d, dtype=torch.float64, generator=g))
    lam = torch.linspace(low, 1.0, d, dtype=torch.float64) * (1 + 0.1 * torch.rand(b, d, dtype=torch.float64, generator=g))
    return (Q @ torch.diag_embed(lam) @ Q.transpose(1, 2)).requires_grad_()


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def _iternorm(training: bool):
    rm = torch.zeros(2, 4, 1, dtype=torch.float64)
    rw = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1) * 0.7
    rm_eval = torch.randn(2, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return lambda X: rc.iterative_normalization_py.apply(
        X, rm if training else rm_eval, rw, 4, 5, 1e-5, 0.1, training)


_GRADCHECKS = {  # name: (the Function, the function checked, inputs, gradcheck options)
    "Covpool": (rc.Covpool, rc.Covpool.apply, lambda: (_rand(2, 3, 3, 4, seed=0),), {}),
    "Sqrtm_iter1": (rc.Sqrtm, lambda a: rc.Sqrtm.apply(a, 1), lambda: (_spd(2, 4, 0.3, 1),), {}),
    "Sqrtm_iter2": (rc.Sqrtm, lambda a: rc.Sqrtm.apply(a, 2), lambda: (_spd(2, 4, 0.3, 2),), {}),
    "Sqrtm_iter5": (rc.Sqrtm, lambda a: rc.Sqrtm.apply(a, 5), lambda: (_spd(2, 4, 0.3, 3),), {}),
    "Sqrtm_nonsymmetric": (rc.Sqrtm, lambda a: rc.Sqrtm.apply(a, 5),
                           lambda: ((_spd(2, 4, 0.3, 4) + 0.05 * _rand(2, 4, 4, seed=5)).detach().requires_grad_(),), {}),
    "Triuvec": (rc.Triuvec, rc.Triuvec.apply, lambda: (_rand(2, 4, 4, seed=6),), {}),
    # eigh / svd of a symmetric matrix: checked through a symmetrisation, as the models use them
    "SqrtmSVD": (rc.SqrtmSVD, lambda a: rc.SqrtmSVD.apply(_sym(a), 1e-6), lambda: (_spd(2, 4, 0.2, 7),), {}),
    "MatSqrtInvFn": (rc.MatSqrtInvFn, lambda a: rc.MatSqrtInvFn.apply(_sym(a)), lambda: (_spd(2, 4, 0.2, 8),), {}),
    "MatSqrtInvFn_repeated": (rc.MatSqrtInvFn, lambda a: rc.MatSqrtInvFn.apply(_sym(a)),
                              lambda: ((torch.eye(4, dtype=torch.float64) * 0.5).repeat(2, 1, 1).requires_grad_(),), {}),
    # the Padé forward approximates sqrt; the Lyapunov backward is the exact sqrt derivative
    "MPA_Lya": (rc.MPA_Lya, rc.MPA_Lya.apply, lambda: (_spd(2, 4, 0.6, 9),), {"atol": 1e-5, "rtol": 1e-4}),
    "iterative_normalization_train": (rc.iterative_normalization_py, _iternorm(True),
                                      lambda: (_rand(3, 8, 2, 3, seed=10),), {}),
    "iterative_normalization_eval": (rc.iterative_normalization_py, _iternorm(False),
                                     lambda: (_rand(3, 8, 2, 3, seed=11),), {}),
}


@pytest.mark.parametrize("name", sorted(_GRADCHECKS))
def test_custom_backward_gradcheck(name: str):
    _, fn, make, kw = _GRADCHECKS[name]
    assert gradcheck(fn, make(), **kw)


def test_all_custom_functions_gradchecked():
    import pkgutil

    from torch.autograd import Function

    # every module of the corpus package is listed in rc.MODULES, so none escapes the check
    assert {m.__name__ for m in rc.MODULES} == {f"{rc.__name__}.{i.name}" for i in pkgutil.iter_modules(rc.__path__)}
    defined = {obj for m in rc.MODULES for obj in vars(m).values()
               if isinstance(obj, type) and issubclass(obj, Function) and obj.__module__ == m.__name__}
    checked = {entry[0] for entry in _GRADCHECKS.values()}
    assert defined == checked, {f.__name__ for f in defined ^ checked}


# ----------------------------------------------------------------------------- orthofx on the corpus
@pytest.mark.parametrize("name", _ALL)
def test_analyze_finds_planted_truth(name: str):
    import orthofx

    case = ALL_CASES[name]
    model = case.build()
    before = _state(model)
    report = orthofx.analyze(model, case.inputs())
    assert set(report.producers) == set(case.producers)
    assert set(report.producer_params) == set(case.producer_params)
    # one entry per (meta-layer, producer): a cross-covariance qᵀk has two entries on one node
    assert len({(e.graph, e.node) for e in report.entries}) == case.n_meta_layers
    assert {e.kind for e in report.entries} == set(case.kinds)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "analyze modified the model"


@pytest.mark.filterwarnings("ignore:orthofx.attach. the model has no Pre-SVD layer")
@pytest.mark.parametrize("name", _ALL)
def test_transform_attach_train_strip(name: str):
    import orthofx

    case = ALL_CASES[name]
    inputs = case.inputs()
    gm, report = orthofx.transform(case.build(), inputs, config="nog+ow+olr")
    assert set(report.producers) == set(case.producers)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1e-2, momentum=0.9)
    orthofx.attach(opt, gm)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = _loss(gm(*inputs))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    for n, p in gm.named_parameters():
        assert torch.isfinite(p).all(), n
    plain = orthofx.strip(gm)
    fresh = case.build()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.train()
    assert all(torch.isfinite(t).all() for t in _tensors(fresh(*inputs)))


@pytest.mark.parametrize("name", _ALL)
def test_svd_config_keeps_outputs(name: str):
    import orthofx

    case = ALL_CASES[name]
    inputs = case.inputs()
    model = case.build()
    reference = copy.deepcopy(model)
    gm, _ = orthofx.transform(model, inputs, config="svd")
    for training in (True, False):
        ref = copy.deepcopy(reference).train(training)
        new = copy.deepcopy(gm).train(training)
        with torch.no_grad():
            expected, got = _tensors(ref(*inputs)), _tensors(new(*inputs))
        assert len(expected) == len(got)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
