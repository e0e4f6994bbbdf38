"""Discovery grounded in one recorded forward (orthofx.graph.recorded.discover / analyze with inputs).

Models here are written the way real projects write them: custom autograd.Functions with
hand-written backwards, shape-built constants, ``self.training`` arguments and branches,
running statistics updated in place inside Functions, buffers reassigned in forward.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import ConfigError, TraceFailure
from orthofx.graph import AnalysisConfig
from orthofx.graph.recorded.record import record


# ----------------------------------------------------------------------------- real-style pieces
class WhiteningFn(torch.autograd.Function):
    """ZCA whitening with running statistics updated in place inside the Function."""

    @staticmethod
    def forward(ctx, x, running_mean, running_wm, eps, momentum, training):
        c = x.size(1)
        xf = x.transpose(0, 1).contiguous().view(c, -1)
        if training:
            mean = xf.mean(-1, keepdim=True)
            xc = xf - mean
            sigma = torch.addmm(torch.eye(c).to(x) * eps, xc, xc.t(), beta=1, alpha=1.0 / xf.size(1))
            e, u = torch.linalg.eigh(sigma)
            wm = u @ torch.diag(e.rsqrt()) @ u.t()
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
            running_wm.copy_(momentum * wm + (1 - momentum) * running_wm)
        else:
            xc = xf - running_mean
            wm = running_wm
        ctx.save_for_backward(wm)
        y = wm.mm(xc)
        return y.view(c, x.size(0), *x.size()[2:]).transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, g):  # a deliberately simple hand-written backward (treats wm as constant)
        (wm,) = ctx.saved_tensors
        c = g.size(1)
        gf = g.transpose(0, 1).contiguous().view(c, -1)
        gx = wm.t().mm(gf).view(c, g.size(0), *g.size()[2:]).transpose(0, 1)
        return gx, None, None, None, None, None


class Whitening(nn.Module):
    def __init__(self, c: int, eps: float = 1e-3, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(c, 1))
        self.register_buffer("running_wm", torch.eye(c))
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a plain attribute mutated in forward
        return WhiteningFn.apply(x, self.running_mean, self.running_wm, self.eps, self.momentum,
                                 self.training)


class WhitenNet(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        layers, c = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(c, 6, 3, padding=1), Whitening(6), nn.ReLU(), nn.Dropout(0.3)]
            c = 6
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def _producers(depth: int) -> list[str]:
    return [f"features.{4 * i}" for i in range(depth)]


# ----------------------------------------------------------------------------- finding
def test_finds_every_producer_inside_functions_in_train_and_eval_models() -> None:
    model = WhitenNet(4)
    x = torch.randn(4, 3, 6, 6)
    for mode in (True, False):
        model.train(mode)
        report = orthofx.analyze(model, x)
        assert sorted(report.producers) == sorted(_producers(4)), str(report)
        assert {e.kind for e in report.entries} == {"eigh"}
        assert all(e.target == "WhiteningFn" and e.source == "autograd.Function" for e in report.entries)
        assert all(e.scope.startswith("features.") for e in report.entries)
        assert model.training is mode


def test_symbolic_analysis_does_not_see_these_models() -> None:
    # the reason the recorded analysis exists: symbolic fx finds nothing here
    report = orthofx.analyze(WhitenNet(2))
    assert report.producers == []


def test_recording_leaves_the_model_exactly_as_it_was() -> None:
    model = WhitenNet(2).eval()
    seen: list[torch.Tensor] = []
    model.features[0].register_forward_hook(lambda m, i, o: seen.append(o))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v for k, v in model.named_buffers()}
    calls = model.features[1].calls
    x = torch.randn(4, 3, 6, 6)
    torch.manual_seed(3)
    random.seed(3)
    expect_torch, expect_py = torch.rand(3), random.random()
    torch.manual_seed(3)
    random.seed(3)
    orthofx.analyze(model, x)
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py  # RNGs
    assert not model.training and not any(m.training for m in model.modules())
    assert seen == []  # the user's hook did not run (and holds no recording tensors)
    assert model.features[1].calls == calls
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(b is buffers[k] for k, b in model.named_buffers())


class ReassignsBuffers(nn.Module):
    """A DBN-style module that reassigns its running buffer in forward, with data-dependent
    control flow (so symbolic tracing fails half-way)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.register_buffer("running_projection", torch.eye(c))

    def forward(self, x):
        x = self.conv(x)
        c = x.shape[1]
        xf = x.transpose(0, 1).reshape(c, -1)
        xc = xf - xf.mean(1, keepdim=True)
        sigma = xc @ xc.t() / xf.shape[1] + 1e-3 * torch.eye(c)
        u, e, _ = sigma.svd()
        wm = u @ e.rsqrt().diag() @ u.t()
        self.running_projection = 0.9 * self.running_projection + 0.1 * wm.detach()
        if float(e.min()) > 0:  # data-dependent branch
            return (wm @ xc).sum()
        return xc.sum()


def test_failed_symbolic_trace_leaves_no_proxies_in_the_model() -> None:
    model = ReassignsBuffers()
    before = model.running_projection
    orthofx.analyze(model)  # symbolic: fails inside, falls back
    assert model.running_projection is before and isinstance(before, torch.Tensor)
    report = orthofx.analyze(model, torch.randn(2, 3, 4, 4))  # a second analysis still works
    assert report.producers == ["conv"]
    assert model.running_projection is before


def test_batch_of_one_is_recorded_in_eval_with_a_note() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.bn(self.lin(x)).unsqueeze(0)
            return torch.linalg.eigvalsh(h.mT @ h + torch.eye(4))

    report = orthofx.analyze(Net(), torch.randn(1, 5))
    assert report.producers == ["lin"]
    assert any("eval mode" in n for n in report.notes)


def test_a_failing_forward_is_a_trace_failure() -> None:
    with pytest.raises(TraceFailure, match="failed on the example inputs"):
        orthofx.analyze(WhitenNet(1), torch.randn(4, 5, 6, 6))


def test_nothing_found_says_what_was_seen() -> None:
    report = orthofx.analyze(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(2, 3))
    assert report.entries == [] and report.skipped == []
    assert any(n.startswith("no meta-layer found: the forward ran") for n in report.notes)


def test_covariance_of_the_input_is_skipped_with_a_reason() -> None:
    class Net(nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x.mT @ x)[0]

    report = orthofx.analyze(Net(), torch.randn(6, 3))
    assert report.entries == [] and len(report.skipped) == 1
    assert "model input" in report.skipped[0].reason


def test_bound_apply_and_item_in_forward() -> None:
    class SqrtInv(torch.autograd.Function):
        @staticmethod
        def forward(ctx, cov):
            e, v = torch.linalg.eigh(cov)
            if e.min().item() < 0:  # .item() in forward
                e = e.clamp_min(1e-6)
            return v @ torch.diag_embed(e.rsqrt()) @ v.mT

        @staticmethod
        def backward(ctx, g):
            return -0.5 * g

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Conv2d(3, 5, 3)
            self.sqrt_inv = SqrtInv.apply  # bound in __init__

        def forward(self, x):
            f = self.enc(x).flatten(2)
            f = f - f.mean(-1, keepdim=True)
            return self.sqrt_inv(f @ f.mT / f.shape[-1] + 1e-3 * torch.eye(5)) @ f

    report = orthofx.analyze(Net(), torch.randn(2, 3, 6, 6))
    assert report.producers == ["enc"] and report.entries[0].target == "SqrtInv"


def test_attention_scores_are_not_meta_layers() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    report = orthofx.analyze(layer, torch.randn(2, 5, 8))
    assert report.entries == []


def test_many_untraceable_modules_do_not_crash_symbolic_analysis() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) if float(x.mean()) > -1e9 else x

    model = nn.Sequential(nn.Conv2d(3, 4, 1), *[Branchy() for _ in range(12)])
    orthofx.analyze(model)  # used to raise TraceFailure at the automatic-leaf limit
    assert orthofx.analyze(model, torch.randn(1, 3, 2, 2)).entries == []


def test_config_entries_that_match_nothing_that_runs_are_errors() -> None:
    class Unused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    model = WhitenNet(1)
    model.spare = nn.Conv2d(6, 6, 1)  # registered, never called by forward
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ConfigError, match="spare"):
        orthofx.analyze(model, x, config=AnalysisConfig(leaf_modules=("spare",)))
    with pytest.raises(ConfigError, match="Unused"):
        orthofx.analyze(model, x, config=AnalysisConfig(meta_autograd_functions={Unused: "eigh"}))


def test_per_sample_loop_is_one_meta_layer() -> None:
    class WCT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            f = self.enc(x)
            out = []
            for i in range(f.shape[0]):
                fi = f[i].reshape(4, -1)
                fi = fi - fi.mean(1, keepdim=True)
                u, s, _ = torch.svd(fi @ fi.t() / fi.shape[1] + 1e-4 * torch.eye(4))
                out.append(u @ torch.diag(s.rsqrt()) @ u.t() @ fi)
            return torch.stack(out)

    report = orthofx.analyze(WCT(), torch.randn(3, 3, 4, 4))
    assert report.producers == ["enc"] and len(report.entries) == 1
    assert "×3 calls" in report.entries[0].covariance.expression


def test_recording_keys_parameters_by_their_user_names() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    rec = record(model, torch.randn(1, 3, 2, 2))
    assert set(rec.param_tensors) == {"0.bias", "0.parametrizations.weight.original0",
                                      "0.parametrizations.weight.original1"}


def test_parametrized_producer_is_named_by_its_weight() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reduce = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 1))

        def forward(self, x):
            f = self.reduce(x).flatten(2)
            return torch.linalg.eigvalsh(f @ f.mT + torch.eye(4))

    (e,) = orthofx.analyze(Net(), torch.randn(2, 3, 3, 3)).entries
    assert e.producer.param == "reduce.weight" and e.producer.name == "reduce"


def test_a_forward_that_cannot_be_recorded_falls_back_to_symbolic_analysis() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    class Picky(nn.Module):  # runs, but refuses to run under a dispatch mode
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            if _get_current_dispatch_mode_stack():
                raise RuntimeError("no modes here")
            h = self.lin(x)
            return torch.linalg.eigvalsh(h.t() @ h)

    report = orthofx.analyze(Picky(), torch.randn(5, 3))
    assert report.producers == ["lin"]
    assert "could not be recorded op by op" in report.notes[0]
    gm, rep = orthofx.transform(Picky(), torch.randn(5, 3), config="nog")
    assert rep.producers == ["lin"]
