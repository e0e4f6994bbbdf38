"""orthofx.graph.symbolic.trace: leaves, scopes, autograd.Function leaves, friendly failures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ConfigError, TraceFailure
from orthofx.graph import AnalysisConfig, analyze, function_leaf, function_of, trace, trace_info
from orthofx.graph.symbolic.trace import FUNCTION_KEY, SCOPE_KEY, SCOPE_TYPE_KEY

try:  # a module-level "from ... import" (fx autowrap patches module globals, not locals)
    from orthofx.linalg import sqrtm as ol_sqrtm
except Exception:  # noqa: BLE001 - orthofx.linalg is optional for these tests
    ol_sqrtm = None


class TimesThree(torch.autograd.Function):
    """Forward doubles; the custom backward multiplies by 3 (so it is NOT autograd's 2)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x * 2.0 * scale

    @staticmethod
    def backward(ctx, g):
        return g * 3.0 * ctx.scale, None


class UsesFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return TimesThree.apply(self.lin(x), 1.5).sum()


def test_plain_fx_loses_the_custom_backward() -> None:
    """The reason for the Function leaf: fx inlines apply and autograd's gradient wins."""
    model = UsesFunction()
    x = torch.randn(3, 4, requires_grad=True)
    model(x).backward()
    eager = x.grad.clone()
    x.grad = None
    fx.symbolic_trace(model)(x).backward()
    assert not torch.allclose(x.grad, eager)


def test_function_apply_is_one_node_and_keeps_the_custom_backward() -> None:
    model = UsesFunction()
    gm = trace(model)
    leaves = [n for n in gm.graph.nodes if function_of(n.target) is TimesThree]
    assert len(leaves) == 1
    node = leaves[0]
    assert node.op == "call_function"
    assert node.target is function_leaf(TimesThree)
    assert node.meta[FUNCTION_KEY] is TimesThree
    assert node.args[1] == 1.5
    # the Function's forward ops are not inlined
    assert not any(n.target is torch.mul or n.op == "call_method" and n.target == "mul"
                   for n in gm.graph.nodes)
    x = torch.randn(3, 4, requires_grad=True)
    model(x).backward()
    eager_x, eager_w = x.grad.clone(), model.lin.weight.grad.clone()
    x.grad = None
    model.lin.weight.grad = None
    gm(x).backward()
    torch.testing.assert_close(x.grad, eager_x)
    torch.testing.assert_close(model.lin.weight.grad, eager_w)
    assert trace_info(gm).functions == (TimesThree,)
    # patch is removed after tracing
    assert "apply" in torch.autograd.Function.__dict__
    assert torch.autograd.Function.__dict__["apply"] is torch.autograd.function.Function.__dict__["apply"]
    assert not isinstance(TimesThree.apply(torch.ones(1), 1.0), fx.Proxy)


def test_function_leaf_is_cached_and_named() -> None:
    leaf = function_leaf(TimesThree)
    assert function_leaf(TimesThree) is leaf
    assert function_of(leaf) is TimesThree
    assert function_of(torch.relu) is None
    assert "TimesThree" in leaf.__name__
    assert leaf.__module__ == "orthofx.graph.symbolic.trace"


def test_function_leaf_survives_retrace_and_deepcopy() -> None:
    import copy

    gm = trace(UsesFunction())
    gm2 = trace(gm)  # retrace the GraphModule: still one leaf node
    assert sum(function_of(n.target) is TimesThree for n in gm2.graph.nodes) == 1
    gm3 = copy.deepcopy(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm3(x), gm(x))


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.relu(self.conv(x)) * 2


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Inner()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.block(x).mean((2, 3))
        return self.lin(y)


def test_scopes_record_the_module_that_created_each_node() -> None:
    gm = trace(Outer())
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name["block_conv"].meta[SCOPE_KEY] == "block.conv"
    assert by_name["block_conv"].meta[SCOPE_TYPE_KEY] == "Conv2d"
    relu = next(n for n in gm.graph.nodes if n.target is F.relu)
    assert relu.meta[SCOPE_KEY] == "block"
    assert relu.meta[SCOPE_TYPE_KEY] == "Inner"
    mean = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mean")
    assert mean.meta[SCOPE_KEY] == ""
    assert trace_info(gm).module_types["block"] == "Inner"


def test_node_names_are_stable_across_traces() -> None:
    model = Outer()
    names1 = [n.name for n in trace(model).graph.nodes]
    names2 = [n.name for n in trace(model).graph.nodes]
    assert names1 == names2


@pytest.mark.parametrize("leaf", ["block", "Inner", "tests.test_graph_trace.Inner"])
def test_leaf_modules_by_qualified_or_class_name(leaf: str) -> None:
    if leaf.startswith("tests."):
        leaf = f"{Inner.__module__}.{Inner.__qualname__}"
    gm = trace(Outer(), AnalysisConfig(leaf_modules=(leaf,)))
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["block", "lin"]
    assert "block" in trace_info(gm).leaf_modules


def test_unknown_leaf_name_raises_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match="blok.*Did you mean 'block'"):
        trace(Outer(), AnalysisConfig(leaf_modules=("blok",)))


class MetaStandIn(nn.Module):
    orthofx_meta = SimpleNamespace(kind="sqrtm", input="features")

    def orthofx_internal_producer(self):
        return None

    def forward(self, x):  # traced through, this would inline eigh
        x = x.flatten(2)
        lam, u = torch.linalg.eigh(x @ x.mT)
        return u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.mT


def test_meta_modules_are_leaves() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.cov = MetaStandIn()

        def forward(self, x):
            return self.cov(self.conv(x))

    gm = trace(M())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "cov"]
    assert not any(n.target is torch.linalg.eigh for n in gm.graph.nodes)


def test_orthofx_linalg_functions_stay_single_nodes() -> None:
    ol = pytest.importorskip("orthofx.linalg")
    if not all(hasattr(ol, f) for f in ("eigh", "sqrtm", "covariance")):
        pytest.skip("orthofx.linalg incomplete")
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)

        def forward(self, x):
            c = ol.covariance(self.conv(x), eps=1e-3)  # attribute form
            lam, u = ol.eigh(c, validate=False)
            return ol_sqrtm(c, validate=False) + u * lam.unsqueeze(-2)

    gm = trace(M())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ol.covariance in targets and ol.eigh in targets and ol.sqrtm in targets
    model = M()
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(trace(model)(x), model(x))
    report = analyze(model)
    assert report.producers == ["conv"]
    kinds = sorted(e.kind for e in report.entries)
    assert kinds == ["eigh", "sqrtm"]
    assert all(e.source == "orthofx" for e in report.entries)
    assert all(e.covariance.form == "orthofx.linalg.covariance" for e in report.entries)
    assert all(e.covariance.eps == pytest.approx(1e-3) for e in report.entries)


# ----------------------------------------------------------------------------- failures
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Identity(), DataDependent())

    def forward(self, x):
        return self.inner(x)


class WithBadBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.backbone = Deep()
        self.reduce = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        x = self.reduce(self.backbone(self.stem(x))).flatten(2)
        return torch.linalg.eigvalsh(x @ x.mT)


def test_strict_raises_trace_failure_naming_the_innermost_module_and_the_fix() -> None:
    with pytest.raises(TraceFailure) as info:
        trace(WithBadBlock(), AnalysisConfig(strict=True))
    err = info.value
    assert err.module == "backbone.inner.1"
    assert err.hint == "AnalysisConfig(leaf_modules=('backbone.inner.1',))"
    assert "DataDependent" in str(err) and "control flow" in str(err)
    assert isinstance(err.__cause__, Exception)  # the torch error is chained, not raised bare


def test_the_hint_works() -> None:
    gm = trace(WithBadBlock(), AnalysisConfig(strict=True, leaf_modules=("backbone.inner.1",)))
    assert "backbone.inner.1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_auto_leaf_retries_with_the_failing_module_and_records_it() -> None:
    model = WithBadBlock()
    report = analyze(model)
    assert [a.name for a in report.auto_leaves] == ["backbone.inner.1"]
    assert report.auto_leaves[0].type == "DataDependent"
    assert "control flow" in report.auto_leaves[0].error
    assert report.producers == ["reduce"]
    assert "backbone.inner.1" in str(report)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(report.graph_module(x), model(x))


def test_auto_leaf_off_raises() -> None:
    with pytest.raises(TraceFailure, match="auto_leaf is off"):
        trace(WithBadBlock(), AnalysisConfig(auto_leaf=False))


class RootControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = HeadOK()

    def forward(self, x):
        if x.mean() > 0:
            x = x * 2
        return self.head(x)


class HeadOK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.proj(x).flatten(2)
        return torch.linalg.eigvalsh(x @ x.mT)


def test_root_failure_raises_with_root_module_and_hint() -> None:
    with pytest.raises(TraceFailure) as info:
        trace(RootControlFlow())
    assert info.value.module == ""
    assert "RootControlFlow" in str(info.value)
    assert "concrete_args" in info.value.hint


def test_root_failure_falls_back_to_tracing_submodules() -> None:
    report = analyze(RootControlFlow())
    assert report.partial
    assert report.producers == ["head.proj"]
    assert report.entries[0].graph == "head"
    assert report.entries[0].scope == "head"
    assert report.graph_module is None
    with pytest.raises(TraceFailure):
        analyze(RootControlFlow(), config=AnalysisConfig(strict=True))


def test_root_submodule_named_meta_gives_a_clear_error() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.meta = nn.Linear(2, 2)

        def forward(self, x):
            return self.meta(x)

    with pytest.raises(TraceFailure, match="rename"):
        trace(M())


def test_unregistered_module_gives_a_trace_failure() -> None:
    class Bad(nn.Module):
        def forward(self, x):
            return nn.ReLU()(x)  # created in forward: fx cannot name it

    with pytest.raises(TraceFailure, match="not a registered submodule"):
        trace(Bad())


def test_trace_does_not_modify_the_model() -> None:
    model = Outer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = dict(model.named_modules())
    trace(model)
    assert dict(model.named_modules()) == children
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
