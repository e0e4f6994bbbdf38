"""A faithful rewrite: what transform emits is the original model plus the treatments.

Each test names one way the emitted model used to differ silently from the user's model.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import ConfigError, InputError, TreatmentError
from orthofx.pipeline import plan_of
from orthofx.verify import verify_rewrite


def _cov_sqrt(f: torch.Tensor) -> torch.Tensor:
    f = f.flatten(2)
    f = f - f.mean(-1, keepdim=True)
    cov = f @ f.mT / f.shape[-1] + 1e-3 * torch.eye(f.shape[1], dtype=f.dtype)
    lam, u = torch.linalg.eigh(cov)
    return (u @ torch.diag_embed(lam.clamp_min(1e-8).sqrt()) @ u.mT).flatten(1)


# ----------------------------------------------------------------------------- training mode
class WhitenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_wm, training):
        c = x.shape[1]
        xf = x.transpose(0, 1).reshape(c, -1)
        xc = xf - xf.mean(1, keepdim=True)
        if training:
            e, u = torch.linalg.eigh(xc @ xc.t() / xf.shape[1] + 1e-2 * torch.eye(c))
            wm = u @ torch.diag(e.rsqrt()) @ u.t()
            running_wm.mul_(0.9).add_(0.1 * wm)
        else:
            wm = running_wm
        ctx.save_for_backward(wm)
        return (wm @ xc).reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)

    @staticmethod
    def backward(ctx, g):
        (wm,) = ctx.saved_tensors
        c = g.shape[1]
        gf = g.transpose(0, 1).reshape(c, -1)
        return (wm.t() @ gf).reshape(c, g.shape[0], *g.shape[2:]).transpose(0, 1), None, None


class Whiten(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_wm", torch.eye(c))
        self.f = WhitenFn.apply  # bound in __init__

    def forward(self, x):
        return self.f(x, self.running_wm, self.training)


class WhitenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.white = Whiten(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.white(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("config", ["svd", "nog+olr", "ol"])
def test_training_flag_and_custom_backward_are_kept(config: str) -> None:
    model, x = WhitenNet(), torch.randn(6, 3, 5, 5)
    gm, report = orthofx.transform(model, x, config=config)
    assert report.producers == ["conv"]
    for training in (True, False):
        a, b = copy.deepcopy(model).train(training), copy.deepcopy(gm).train(training)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(b.white.running_wm, a.white.running_wm)  # eval leaves it alone
        if training:
            ya.square().sum().backward()
            yb.square().sum().backward()
            for (n, p), q in zip(a.named_parameters(), b.parameters()):
                torch.testing.assert_close(q.grad, p.grad, msg=n)  # the hand-written backward ran


# ----------------------------------------------------------------------------- complete state
class StyleNet(nn.Module):
    """WCT-like: encoders the training loop calls but forward does not, an unused buffer, a
    constant built in forward, and a raw eigh on a covariance."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.c_encoder = nn.Conv2d(3, 4, 3, padding=1)  # used by the training loop only
        self.s_encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("unused", torch.arange(3.0))
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(_cov_sqrt(self.encoder(x)) + 1e-3 * torch.eye(4).flatten())


def test_everything_the_user_had_is_kept_and_strip_loads_strictly() -> None:
    model, x = StyleNet(), torch.randn(4, 3, 4, 4)
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, i, o: seen.append(o))
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(o))
    gm, report = orthofx.transform(model, x, config="nog")
    assert seen == []  # hooks never ran during transform (and never on FakeTensors)
    assert set(gm.state_dict()) == set(model.state_dict())
    assert {n for n, _ in gm.named_modules()} >= {n for n, _ in model.named_modules()}
    assert gm.unused is not None and hasattr(gm, "c_encoder")
    gm(x)
    assert len(seen) == 2 and all(type(t) is torch.Tensor for t in seen)  # root hook kept too
    fresh = StyleNet()
    fresh.load_state_dict(orthofx.strip(gm).state_dict(), strict=True)


def test_rewrite_is_verified_or_the_original_is_kept() -> None:
    class Reassigns(nn.Module):  # traceable, but the trace drops the buffer update
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("running", torch.zeros(16))

        def forward(self, x):
            y = _cov_sqrt(self.conv(x))
            self.running = 0.9 * self.running + 0.1 * y.detach().mean(0)
            return y

    model, x = Reassigns(), torch.randn(4, 3, 3, 3)
    gm, report = orthofx.transform(model, x)
    # the root graph diverges (it drops the reassignment) and is not emitted, as the report says;
    # the user's module is kept and its raw eigh answered at run time, verified (buffers too)
    assert type(gm) is Reassigns, report.notes
    assert [(s.scope, s.via) for s in report.swapped] == [("", "call")], report.notes
    assert any("no graph swap" in n and "diverges" in n and "'running'" in n for n in report.notes), report.notes
    assert any("(call" in n and "verified" in n and "train buffers" in n for n in report.notes), report.notes
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.train()(x)
    assert not torch.equal(gm.running, torch.zeros(16))
    ref = copy.deepcopy(model).train()
    ref(x)
    torch.testing.assert_close(gm.running, ref.running)  # the same buffer update as the user's model
    assert torch.equal(model.running, torch.zeros(16))  # the user's model is not changed
    assert type(orthofx.strip(gm).forward).__name__ == "method"  # strip gives the class's own forward back


# ----------------------------------------------------------------------------- exact by default
class RawGCP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(3, 5, 1)
        self.fc = nn.Linear(25, 2)

    def forward(self, x):
        return self.fc(_cov_sqrt(F.relu(self.reduce(x))))


def test_default_config_keeps_float64_gradients_of_a_healthy_model() -> None:
    torch.manual_seed(0)
    model = RawGCP().double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    gm, report = orthofx.transform(model, x)
    assert report.swapped, report.notes  # the raw eigh was replaced by the stable one, verified
    ya, yb = model(x), gm(x)
    ya.sum().backward()
    yb.sum().backward()
    for (n, p), q in zip(model.named_parameters(), gm.parameters()):
        rel = (q.grad - p.grad).norm() / p.grad.norm()
        assert rel <= 1e-8, (n, float(rel))


def test_nan_input_raises_naming_the_meta_layer_and_weights_stay_finite() -> None:
    model, x = RawGCP(), torch.randn(4, 3, 5, 5)
    gm, report = orthofx.transform(model, x)
    assert report.swapped
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="eigh"):
        gm(bad)
    assert all(torch.isfinite(p).all() for p in gm.parameters())


def test_none_default_keyword_is_not_baked_in() -> None:
    class Net(RawGCP):
        def forward(self, x, idx=None):
            y = super().forward(x)
            return y if idx is None else y[:, idx]

    model, x = Net(), torch.randn(4, 3, 5, 5)
    gm, report = orthofx.transform(model, x)
    # no graph of the root (it would bake idx=None in, as the report says); the user's forward
    # is kept with its keyword, its raw eigh answered at run time
    assert type(gm) is Net and [s.via for s in report.swapped] == ["call"], report.notes
    torch.testing.assert_close(gm(x, idx=1), model(x, idx=1))
    torch.testing.assert_close(gm(x), model(x))
    assert any("idx=None" in n for n in report.notes)


# ----------------------------------------------------------------------------- weights
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1, bias=False)
        self.b = nn.Conv2d(3, 3, 1, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return _cov_sqrt(self.a(x)) + self.b(x).mean((2, 3)).repeat(1, 3)


def test_tied_weights_are_refused_for_ow_and_sn_and_kept_for_gradient_treatments() -> None:
    x = torch.randn(4, 3, 3, 3)
    for config in ("ow", "sn"):
        with pytest.raises(ConfigError, match="a.weight, b.weight"):
            orthofx.transform(Tied(), x, config=config)
    gm, _ = orthofx.transform(Tied(), x, config="nog")
    assert gm.a.weight is gm.b.weight
    plain = orthofx.strip(gm)
    assert plain.a.weight is plain.b.weight


@pytest.mark.parametrize("config", ["ow", "sn", "nog+ow+olr"])
def test_root_level_parameter_producer(config: str) -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 1, 1))

        def forward(self, x):
            return _cov_sqrt(F.conv2d(x, self.w))

    x = torch.randn(4, 3, 3, 3)
    gm, report = orthofx.transform(Root(), x, config=config)
    assert report.producers == [""] and report.analysis.producer_params == ["w"]
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    orthofx.attach(opt, gm)
    gm(x).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in gm.parameters())
    Root().load_state_dict(orthofx.strip(gm).state_dict(), strict=True)


def test_user_parametrizations_are_named_in_a_clear_error() -> None:
    x = torch.randn(4, 3, 5, 5)
    model = RawGCP()
    torch.nn.utils.parametrizations.weight_norm(model.reduce)
    with pytest.raises(TreatmentError, match="reduce.weight.*_WeightNorm"):
        orthofx.transform(model, x, config="nog")
    old = RawGCP()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(old.reduce)
    with pytest.raises(TreatmentError, match="weight_norm"):
        orthofx.transform(old, x, config="ow")  # the hook-based weight_norm (copied detached)
    with pytest.raises(TreatmentError, match="weight_norm"):
        orthofx.transform(old, x, config=orthofx.OrthoConfig.from_preset("ow", inplace=True))


# ----------------------------------------------------------------------------- wrappers, pickling
def test_wrappers_are_refused_with_the_fix_and_attach_unwraps() -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(InputError, match="model.module"):
        orthofx.transform(nn.DataParallel(RawGCP()), x)
    with pytest.raises(InputError, match="_orig_mod"):
        orthofx.transform(torch.compile(RawGCP()), x)
    gm, _ = orthofx.transform(RawGCP(), x, config="nog")
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    assert orthofx.attach(opt, nn.DataParallel(gm)) is not None


def test_plan_survives_pickle_torch_save_and_deepcopy() -> None:
    x = torch.randn(4, 3, 5, 5)
    gm, _ = orthofx.transform(WhitenNet(), x, config="nog+ol")
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(gm)), torch.load(buf, weights_only=False), copy.deepcopy(gm)):
        plan = plan_of(copy_)
        assert plan is not None and [p.param for p in plan.producers] == ["conv.weight"]
        assert orthofx.orthogonality_loss(copy_) > 0
        assert orthofx.attach(torch.optim.SGD(copy_.parameters(), lr=0.1), copy_) is not None


def test_verify_rewrite_catches_a_dropped_custom_backward() -> None:
    class _Ctx:
        def save_for_backward(self, *tensors):
            pass

    class Inlined(nn.Module):  # WhitenNet with the Function inlined: autograd's own backward
        def __init__(self, src: WhitenNet) -> None:
            super().__init__()
            self.conv, self.white, self.fc = src.conv, src.white, src.fc

        def forward(self, x):
            y = WhitenFn.forward(_Ctx(), self.conv(x), self.white.running_wm, self.training)
            return self.fc(y.mean((2, 3)))

    model = WhitenNet()
    check = verify_rewrite(model, Inlined(copy.deepcopy(model)), (torch.randn(6, 3, 5, 5),))
    assert not check.ok and "gradient" in check.reason, check.reason
    assert verify_rewrite(model, copy.deepcopy(model), (torch.randn(6, 3, 5, 5),)).ok


def test_checkpoint_replays_the_recorded_plan_on_a_fresh_model(tmp_path) -> None:
    """Producers found only by the recorded analysis (inside a Function) are replayed from the
    plan, not re-analysed symbolically (which would find none)."""
    x = torch.randn(6, 3, 5, 5)
    gm, _ = orthofx.transform(WhitenNet(), x, config="nog+ow+olr")
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    orthofx.attach(opt, gm)
    gm(x).square().sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    orthofx.save_checkpoint(gm, path)
    back = orthofx.load_checkpoint(WhitenNet(), path)
    assert [p.param for p in plan_of(back).producers] == ["conv.weight"]
    gm.eval(), back.eval()
    torch.testing.assert_close(back(x), gm(x))
    with pytest.raises(ConfigError, match="conv.weight"):
        class Other(WhitenNet):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 5, 1)
        orthofx.load_checkpoint(Other(), path)


def test_a_graph_is_emitted_only_when_it_keeps_everything() -> None:
    class WithMethod(RawGCP):
        def features(self, x):  # called by the user's training loop
            return self.reduce(x)

    x = torch.randn(4, 3, 5, 5)
    # a root graph would lose the class's methods or the root's hooks: no graph is emitted (the
    # report says why); the user's module is kept and its raw eigh answered at run time
    model = WithMethod()
    gm, report = orthofx.transform(model, x)
    assert type(gm) is WithMethod and [s.via for s in report.swapped] == ["call"], report.notes
    assert any("methods of WithMethod" in n for n in report.notes)
    torch.testing.assert_close(gm.features(x), model.features(x))  # the method is still there
    calls: list[int] = []
    model = RawGCP()
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    gm, report = orthofx.transform(model, x)
    assert type(gm) is RawGCP and any("hooks registered on the root" in n for n in report.notes)
    assert [s.via for s in report.swapped] == ["call"], report.notes
    assert calls == []  # the user's hook did not run during transform
    gm(x)
    assert calls == [1]  # and it is kept on the root
    model = RawGCP()
    model.num_classes = 2
    gm, report = orthofx.transform(model, x)
    assert [s.via for s in report.swapped] == ["graph"] and gm.num_classes == 2, report.notes


def test_shape_recording_never_shows_hooks_a_fake_tensor() -> None:
    model = RawGCP()
    seen: list[torch.Tensor] = []
    model.reduce.register_forward_hook(lambda m, i, o: seen.append(o))
    gm = orthofx.graph.trace(model)
    orthofx.analyze_graph(gm, example_inputs=torch.randn(4, 3, 5, 5))
    assert seen == []


def test_plan_of_a_rewritten_graph_survives_pickle_then_deepcopy() -> None:
    x = torch.randn(4, 3, 5, 5)
    gm, report = orthofx.transform(RawGCP(), x, config="nog")
    assert report.swapped  # a GraphModule
    back = copy.deepcopy(pickle.loads(pickle.dumps(gm)))
    assert [p.param for p in plan_of(back).producers] == ["reduce.weight"]
    assert plan_of(copy.deepcopy(gm)) is not None
    plain = orthofx.strip(back, keep_stable=True)
    assert plan_of(plain) is None


def _ns_sqrt(a: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Reference (A)^{1/2} by coupled Newton–Schulz in float64: autograd through the converged
    iteration gives the exact derivative, also for repeated eigenvalues."""
    n = a.shape[-1]
    norm = a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y, z = a / norm, torch.eye(n, dtype=a.dtype).expand_as(a)
    eye3 = 3 * torch.eye(n, dtype=a.dtype)
    for _ in range(iters):
        t = 0.5 * (eye3 - z @ y)
        y, z = y @ t, t @ z
    return y * norm.sqrt()


def test_eigh_reconstruction_is_fused_into_the_exact_meta_layer_on_repeated_eigenvalues() -> None:
    class Net(nn.Module):
        def __init__(self, sqrt=None) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(3, 5, 1)
            self.sqrt = sqrt

        def forward(self, x):
            f = self.reduce(x).flatten(2)  # 5 channels, 2 positions: rank <= 2
            cov = f @ f.mT / f.shape[-1] + 1e-2 * torch.eye(5, dtype=f.dtype)  # λ = 1e-2 three times
            if self.sqrt is not None:
                return self.sqrt(cov).sum((1, 2))
            lam, u = torch.linalg.eigh(cov)
            return (u @ torch.diag_embed(lam.sqrt()) @ u.mT).sum((1, 2))

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(3, 3, 1, 2, dtype=torch.float64)
    gm, report = orthofx.transform(model, x)
    assert [s.kind for s in report.swapped] == ["sqrtm"], report.notes
    ref = Net(_ns_sqrt).double()
    ref.load_state_dict(model.state_dict())
    gm(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(gm.reduce.weight.grad, ref.reduce.weight.grad, rtol=1e-8, atol=1e-10)
