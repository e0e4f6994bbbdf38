"""orthofx.graph.analyze (symbolic engine): meta-layer forms, covariance forms, usages, producers, stops, report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import ConfigError, TraceFailure
from orthofx.graph import AnalysisConfig, MetaSpec, analyze, analyze_graph, trace
from orthofx.report import AnalysisReport


class Net(nn.Module):
    """conv → bn → relu → ``body`` (a function of the feature map) returning a tensor."""

    def __init__(self, body, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.body = body

    def forward(self, x):
        return self.body(F.relu(self.bn(self.conv(x))))


def run(body, **kw) -> AnalysisReport:
    model = Net(body)
    report = analyze(model, **kw)
    out = model(torch.randn(2, 3, 6, 6))  # the body is valid torch code
    assert torch.is_tensor(out)
    return report


def cov(x):
    x = x.flatten(2)
    return x @ x.mT / x.shape[-1]


# ----------------------------------------------------------------------------- meta-layer forms
@pytest.mark.parametrize("body, kind", [
    (lambda x: torch.linalg.eigh(cov(x))[0], "eigh"),
    (lambda x: torch.linalg.eigh(cov(x)).eigenvalues, "eigh"),
    (lambda x: torch.linalg.eigvalsh(cov(x)), "eigvalsh"),
    (lambda x: torch.linalg.svd(cov(x))[1], "svd"),
    (lambda x: torch.linalg.svd(cov(x)).S, "svd"),
    (lambda x: torch.linalg.svdvals(cov(x)), "svdvals"),
    (lambda x: torch.svd(cov(x))[1], "svd"),
    (lambda x: cov(x).svd()[1], "svd"),
    (lambda x: cov(x).svd().S, "svd"),
])
def test_every_call_form_of_the_torch_meta_layers(body, kind) -> None:
    report = run(body)
    assert report.producers == ["conv"]
    (entry,) = report.entries
    assert entry.kind == kind
    assert entry.usage == "eigenvalues"
    assert entry.source == "torch"
    assert entry.producer.param == "conv.weight"
    assert entry.producer.weight_shape == (4, 3, 3, 3)
    assert entry.producer.flat_shape == (4, 27)
    node = next(n for n in report.graph_module.graph.nodes if n.name == entry.node)
    assert node.op in ("call_function", "call_method")


# ----------------------------------------------------------------------------- usage
def _eig(x):
    r = torch.linalg.eigh(cov(x) + 1e-3 * torch.eye(x.shape[1]))
    return r[0], r[1]  # a Python tuple: fx cannot star-unpack a Proxy


@pytest.mark.parametrize("body, usage", [
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.clamp_min(0).sqrt()) @ u.mT)(*_eig(x)), "sqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(torch.sqrt(l)) @ u.transpose(-1, -2))(*_eig(x)), "sqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.pow(0.5)) @ u.mT)(*_eig(x)), "sqrtm"),
    (lambda x: (lambda l, u: (u * (l ** 0.5).unsqueeze(-2)) @ u.mT)(*_eig(x)), "sqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.rsqrt()) @ u.mT)(*_eig(x)), "invsqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.pow(-0.5)) @ u.mT)(*_eig(x)), "invsqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(1 / l.sqrt()) @ u.mT)(*_eig(x)), "invsqrtm"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.sqrt().reciprocal()) @ u.mT)(*_eig(x)), "invsqrtm"),
    (lambda x: (lambda l, u: (u / l.sqrt().unsqueeze(-2)) @ u.mT)(*_eig(x)), "invsqrtm"),
    (lambda x: (lambda l, u: l.sum(-1))(*_eig(x)), "eigenvalues"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l.log()) @ u.mT)(*_eig(x)), "unknown"),
    (lambda x: (lambda l, u: u @ torch.diag_embed(l) @ u.mT)(*_eig(x)), "unknown"),
    (lambda x: (lambda l, u: u.sum((-1, -2)))(*_eig(x)), "unknown"),
])
def test_usage_of_the_decomposition(body, usage) -> None:
    report = run(body)
    (entry,) = report.entries
    assert entry.usage == usage


def test_svd_reassembly_is_sqrtm() -> None:
    def body(x):
        u, s, vh = torch.linalg.svd(cov(x))
        return u @ torch.diag_embed(s.sqrt()) @ vh

    assert run(body).entries[0].usage == "sqrtm"


# ----------------------------------------------------------------------------- covariance forms
def _center(x):
    x = x.flatten(2)
    return x - x.mean(-1, keepdim=True)


@pytest.mark.parametrize("body, form, expr, centered, scaled, eps", [
    (lambda x: torch.linalg.eigvalsh(_center(x) @ _center(x).transpose(1, 2)), "matmul", "X Xᵀ", True, False, None),
    (lambda x: torch.linalg.eigvalsh(torch.matmul(x.flatten(2), x.flatten(2).permute(0, 2, 1))), "matmul", "X Xᵀ", False, False, None),
    (lambda x: torch.linalg.eigvalsh(torch.bmm(x.flatten(2), x.flatten(2).mT) / 36.0), "bmm", "X Xᵀ", False, True, None),
    (lambda x: torch.linalg.eigvalsh(torch.mm(x[0].flatten(1), x[0].flatten(1).t())), "mm", "X Xᵀ", False, False, None),
    (lambda x: torch.linalg.eigvalsh(x.flatten(2).mT @ x.flatten(2)), "matmul", "Xᵀ X", False, False, None),
    (lambda x: torch.linalg.eigvalsh(torch.einsum("bcm,bdm->bcd", x.flatten(2), x.flatten(2))), "einsum", "bcm,bdm->bcd", False, False, None),
    (lambda x: torch.linalg.eigvalsh(torch.einsum("bmc,bmd->bcd", x.flatten(2).mT, x.flatten(2).mT)), "einsum", "bmc,bmd->bcd", False, False, None),
    (lambda x: torch.linalg.eigvalsh(torch.cov(x[0].flatten(1))), "torch.cov", "torch.cov(X)", True, True, None),
    (lambda x: torch.linalg.eigvalsh(cov(x) + 1e-4 * torch.eye(4)), "matmul", "X Xᵀ", False, True, 1e-4),
    (lambda x: torch.linalg.eigvalsh(cov(x) + torch.eye(4) * 0.5), "matmul", "X Xᵀ", False, True, 0.5),
    (lambda x: torch.linalg.eigvalsh(cov(x) + 0.1), "matmul", "X Xᵀ", False, True, True),
    (lambda x: torch.linalg.eigvalsh(0.5 * (cov(x) + cov(x).mT)), "matmul", "X Xᵀ", False, True, None),
])
def test_covariance_forms(body, form, expr, centered, scaled, eps) -> None:
    report = run(body)
    assert report.producers == ["conv"], report
    c = report.entries[0].covariance
    assert (c.form, c.expression, c.centered, c.scaled) == (form, expr, centered, scaled)
    if isinstance(eps, float):
        assert c.eps == pytest.approx(eps)
    else:
        assert c.eps == eps


def test_centring_matrix() -> None:
    def body(x):
        x = x.flatten(2)
        m = x.shape[-1]
        j = torch.eye(m) - 1.0 / m
        return torch.linalg.eigvalsh(x @ j @ x.mT / m)

    c = run(body).entries[0].covariance
    assert c.expression == "X J Xᵀ" and c.centered and c.scaled


def test_symmetrisation_is_recorded() -> None:
    def body(x):
        a = cov(x)
        return torch.linalg.eigvalsh((a + a.transpose(-1, -2)) / 2)

    c = run(body).entries[0].covariance
    assert c.symmetrized


def test_repeated_centring_expression_counts_as_one_tensor() -> None:
    def body(x):
        x = x.flatten(2)
        return torch.linalg.eigvalsh((x - x.mean(-1, keepdim=True)) @ (x - x.mean(-1, keepdim=True)).mT)

    assert run(body).producers == ["conv"]


def test_svd_of_the_feature_matrix_itself() -> None:
    report = run(lambda x: torch.linalg.svdvals(x.flatten(2)))
    assert report.producers == ["conv"]
    assert report.entries[0].covariance.form == "none"


def test_eigh_of_a_non_covariance_is_skipped() -> None:
    report = run(lambda x: torch.linalg.eigvalsh(x[:, :, :4, :4]))
    assert report.producers == []
    assert report.skipped


def test_eigh_of_features_without_covariance_is_skipped_with_reason() -> None:
    report = run(lambda x: torch.linalg.eigvalsh(x.flatten(2)[:, :, :4]))
    (s,) = report.skipped
    assert "indexing" in s.reason


def test_cross_covariance_of_two_tensors_is_not_a_covariance() -> None:
    def body(x):
        a = x.flatten(2)
        return torch.linalg.svdvals(a @ F.relu(a).mT)

    (s,) = run(body).skipped
    assert "two different tensors" in s.reason


def test_relu_on_the_covariance_stops() -> None:
    (s,) = run(lambda x: torch.linalg.eigvalsh(F.relu(cov(x)))).skipped
    assert "covariance matrix" in s.reason


# ----------------------------------------------------------------------------- producers
class Functional(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 5, 1)
        self.proj = nn.Module()
        if form == "conv2d":
            self.proj.w = nn.Parameter(torch.randn(4, 5, 3, 3))
        elif form in ("linear", "matmul_t", "matmul_left"):
            self.proj.w = nn.Parameter(torch.randn(4, 5))
        elif form in ("matmul", "buffer"):
            self.proj.w = nn.Parameter(torch.randn(5, 4))
        if form == "buffer":
            self.proj.register_buffer("b", torch.randn(5, 4))
        if form == "computed":
            self.proj.w = nn.Parameter(torch.randn(4, 5, 1, 1))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        t = x.flatten(2).mT  # (N, M, 5)
        if self.form == "conv2d":
            y = F.conv2d(x, self.proj.w, padding=1).flatten(2)
        elif self.form == "linear":
            y = F.linear(t, self.proj.w).mT
        elif self.form == "matmul":
            y = (t @ self.proj.w).mT
        elif self.form == "matmul_t":
            y = (t @ self.proj.w.t()).mT
        elif self.form == "matmul_left":
            y = self.proj.w @ x.flatten(2)
        elif self.form == "buffer":
            y = (t @ self.proj.b).mT
        elif self.form == "computed":
            w = self.proj.w / self.proj.w.norm()
            y = F.conv2d(x, w).flatten(2)
        return torch.linalg.eigvalsh(y @ y.mT)


@pytest.mark.parametrize("form, flat, transposed", [
    ("conv2d", (4, 45), False),
    ("linear", (4, 5), False),
    ("matmul", (4, 5), True),
    ("matmul_t", (4, 5), False),
    ("matmul_left", (4, 5), False),
])
def test_functional_producers_report_the_parameter(form, flat, transposed) -> None:
    model = Functional(form)
    model(torch.randn(2, 3, 5, 5))
    report = analyze(model)
    (e,) = report.entries
    assert e.producer.name == "proj" and e.producer.param == "proj.w"
    assert e.producer.form == "functional"
    assert e.producer.flat_shape == flat
    assert e.producer.transposed is transposed
    assert e.producer.weight_shape == tuple(model.proj.w.shape)


@pytest.mark.parametrize("form, reason", [
    ("buffer", "non-trainable"),
    ("computed", "not an nn.Parameter"),
])
def test_functional_maps_without_a_parameter_stop(form, reason) -> None:
    model = Functional(form)
    model(torch.randn(2, 3, 5, 5))
    (s,) = analyze(model).skipped
    assert reason in s.reason


def test_linear_producer_on_tokens() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.drop = nn.Dropout(0.1)

        def forward(self, t):
            t = self.drop(F.gelu(self.embed(t)))
            t = t - t.mean(1, keepdim=True)
            return torch.linalg.eigvalsh(t.transpose(1, 2) @ t / t.shape[1])

    (e,) = analyze(Tokens()).entries
    assert e.producer.name == "embed" and e.producer.flat_shape == (8, 6)
    assert e.covariance.expression == "Xᵀ X" and e.covariance.centered
    roles = [s.role for s in e.chain]
    assert roles == ["producer", "activation", "dropout", "center", "reshape", "covariance",
                     "scale", "meta"] or roles[0] == "producer"


# ----------------------------------------------------------------------------- stops
@pytest.mark.parametrize("body, reason", [
    (lambda x: torch.linalg.eigvalsh(cov(torch.cat([x, x * 2], 1))), "concatenation"),
    (lambda x: torch.linalg.eigvalsh(cov(F.softmax(x, dim=1))), "softmax"),
    (lambda x: torch.linalg.eigvalsh(cov(torch.cumsum(x, 1))), "unknown function"),
    (lambda x: torch.linalg.eigvalsh(cov(x.cummax(1)[0])), "unknown method"),
    (lambda x: torch.linalg.eigvalsh(cov(x[:, :2])), "indexing"),
    (lambda x: torch.linalg.eigvalsh(cov(F.layer_norm(x, x.shape[1:]))), "layer_norm"),
])
def test_ops_that_mix_or_are_unknown_stop_the_walk(body, reason) -> None:
    report = run(body)
    assert report.producers == []
    (s,) = report.skipped
    assert reason in s.reason
    assert s.stop_node is not None
    assert s.chain[-1].role == "meta"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x, mode: str = "add"):
        y = self.a(x)
        if mode == "add":
            y = y + self.b(x)
        elif mode == "gate":
            y = y * torch.sigmoid(self.b(x))
        elif mode == "groupnorm":
            y = self.norm(y)
        y = y.flatten(2)
        return torch.linalg.eigvalsh(y @ y.mT)


@pytest.mark.parametrize("mode, reason", [("add", "adds another tensor"),
                                          ("gate", "multiplies by another tensor"),
                                          ("groupnorm", "GroupNorm")])
def test_second_branches_stop_the_walk(mode, reason) -> None:
    report = analyze_graph(trace(Residual(), concrete_args={"mode": mode}))
    (s,) = report.skipped
    assert reason in s.reason


def test_scalar_arith_bn_pool_dropout_identity_are_crossed() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.seq = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU6(), nn.MaxPool2d(2),
                                     nn.Dropout2d(0.1), nn.Identity(), nn.Flatten(2))

        def forward(self, x):
            y = self.seq(2.0 * self.conv(x) + 1.0) / 3.0
            y = y.unsqueeze(0).squeeze(0).contiguous().float()
            return torch.linalg.eigvalsh(y @ y.mT)

    report = analyze(M())
    assert report.producers == ["conv"]
    roles = [s.role for s in report.entries[0].chain]
    assert roles[0] == "producer" and roles[-1] == "meta"
    assert {"norm", "pool", "dropout", "identity", "scale", "shift", "cast", "reshape"} <= set(roles)


def test_extra_transparent_ops_from_config() -> None:
    body = lambda x: torch.linalg.eigvalsh(cov(torch.cumsum(x, 1)))  # noqa: E731
    assert run(body).skipped
    report = run(body, config=AnalysisConfig(transparent_functions=(torch.cumsum,)))
    assert report.producers == ["conv"]


def test_strict_raises_on_skipped_meta_layer() -> None:
    with pytest.raises(TraceFailure, match="could not be determined"):
        analyze(Net(lambda x: torch.linalg.eigvalsh(cov(torch.cumsum(x, 1)))),
                config=AnalysisConfig(strict=True))


# ----------------------------------------------------------------------------- user meta-layers
def user_isqrt(a):
    lam, u = torch.linalg.eigh(a)
    return u @ torch.diag_embed(lam.clamp_min(1e-5).rsqrt()) @ u.mT


class UserDecomp(nn.Module):
    def forward(self, a):
        return torch.linalg.eigvalsh(a)


class MyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class SetupStyle(torch.autograd.Function):
    @staticmethod
    def forward(a, eps):
        lam, u = torch.linalg.eigh(a + eps * torch.eye(a.shape[-1]))
        return u @ torch.diag_embed(lam.clamp_min(0).rsqrt()) @ u.mT

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return g, None


class Users(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.dec = UserDecomp()

    def forward(self, x):
        a = cov(self.conv(x))
        return user_isqrt(a).sum() + self.dec(a).sum() + MyFn.apply(a).sum() \
            + SetupStyle.apply(a, 1e-3).sum()


def test_user_registered_functions_modules_and_autograd_functions() -> None:
    cfg = AnalysisConfig(meta_functions={user_isqrt: "invsqrtm"},
                         meta_modules={UserDecomp: MetaSpec("eigvalsh")},
                         meta_autograd_functions={MyFn: "svd"})
    report = analyze(Users(), config=cfg)
    got = {e.target: (e.kind, e.source, e.usage) for e in report.entries}
    assert got[f"{__name__}.user_isqrt"][:2] == ("invsqrtm", "config")
    assert got["UserDecomp"] == ("eigvalsh", "config", "eigenvalues")
    assert got["MyFn.apply"][:2] == ("svd", "config")
    assert got["SetupStyle.apply"] == ("eigh", "autograd.Function", "invsqrtm")
    assert report.producers == ["conv"]
    assert not report.skipped
    # user_isqrt stayed one node
    gm = report.graph_module
    assert sum(n.target is user_isqrt for n in gm.graph.nodes) == 1
    # without config, the user function is inlined: its eigh is found directly
    plain = analyze(Users())
    kinds = sorted(e.kind for e in plain.entries)
    assert kinds == ["eigh", "eigh", "eigvalsh"]  # user_isqrt's eigh, UserDecomp inlined, SetupStyle


def test_autograd_function_inner_meta_walks_out_to_the_producer() -> None:
    report = analyze(Users())
    e = next(e for e in report.entries if e.source == "autograd.Function")
    graphs = {s.graph for s in e.chain}
    assert graphs == {"", "SetupStyle.forward"}
    assert e.chain[0].node == "conv" and e.chain[-1].node == e.node
    assert e.covariance.scaled  # from the outer graph (/ M)
    assert e.covariance.eps == pytest.approx(1e-3)  # from the inner graph


# ----------------------------------------------------------------------------- meta modules
class CovPool(nn.Module):
    orthofx_meta = SimpleNamespace(kind="sqrtm", input="features")

    def __init__(self, c: int, reduced: int | None) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1, bias=False) if reduced else None

    def orthofx_internal_producer(self):
        return "reduce" if self.reduce is not None else None

    def forward(self, x):
        if self.reduce is not None:
            x = self.reduce(x)
        x = x.flatten(2)
        lam, u = torch.linalg.eigh(x @ x.mT + 1e-3 * torch.eye(x.shape[1]))
        return u @ torch.diag_embed(lam.sqrt()) @ u.mT


class CovIn(nn.Module):
    orthofx_meta = SimpleNamespace(kind="invsqrtm", input="covariance")

    def forward(self, a):
        lam, u = torch.linalg.eigh(a)
        return u @ torch.diag_embed(lam.rsqrt()) @ u.mT


class WithMetaModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.gcp = CovPool(6, 3)
        self.gcp_plain = CovPool(6, None)
        self.white = CovIn()

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.gcp(y).sum() + self.gcp_plain(y).sum() + self.white(cov(y) + torch.eye(6)).sum()


def test_orthofx_style_meta_modules() -> None:
    model = WithMetaModules()
    model(torch.randn(2, 3, 4, 4))
    report = analyze(model)
    by_node = {e.node: e for e in report.entries}
    assert by_node["gcp"].producer.name == "gcp.reduce"
    assert by_node["gcp"].producer.form == "internal"
    assert by_node["gcp"].producer.flat_shape == (3, 6)
    assert by_node["gcp_plain"].producer.name == "conv"
    assert by_node["gcp_plain"].covariance.form == "module"
    assert by_node["white"].producer.name == "conv"
    assert by_node["white"].usage == "invsqrtm"
    assert by_node["white"].covariance.eps == pytest.approx(1.0)
    assert report.producers == ["gcp.reduce", "conv"]
    assert all(e.source == "orthofx" for e in report.entries)


def test_real_orthofx_nn_modules_if_available() -> None:
    onn = pytest.importorskip("orthofx.nn")
    if not hasattr(onn, "CovariancePooling") or not hasattr(onn, "DecorrelatedBatchNorm"):
        pytest.skip("orthofx.nn incomplete")

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.white = onn.DecorrelatedBatchNorm(8)
            self.body = nn.Conv2d(8, 16, 3, padding=1)
            self.head = onn.CovariancePooling(16, reduced=6)

        def forward(self, x):
            return self.head(F.relu(self.body(F.relu(self.white(self.conv1(x))))))

    report = analyze(M())
    assert report.producers == ["conv1", "head.reduce"]


# ----------------------------------------------------------------------------- report & purity
def test_report_views(tmp_path) -> None:
    model = WithMetaModules()
    report = analyze(model, torch.randn(2, 3, 4, 4))
    d = report.to_dict()
    json.loads(json.dumps(d))
    assert d["producers"] == report.producers
    text = str(report)
    assert "gcp.reduce" in text and "meta-layer" in text
    dot = report.to_dot()
    assert dot.startswith("digraph") and "cluster_e0" in dot and "->" in dot
    png = report.to_png(str(tmp_path / "chains.png"))
    data = (tmp_path / "chains.png").read_bytes()
    assert png.endswith("chains.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    # shapes were recorded from the example inputs (the recorded analysis names ops, not fx nodes)
    (white,) = [e for e in report.entries if e.scope.startswith("white")]
    assert white.chain[0].role == "producer" and white.chain[0].shape == (2, 6, 4, 4)
    assert white.chain[-2].role == "covariance" and white.chain[-2].shape[-2:] == (6, 6)
    assert white.chain[-1].role == "meta"


def test_analyze_is_pure_even_in_train_mode_with_example_inputs() -> None:
    model = WithMetaModules().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(2, 3, 4, 4))
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_analyze_graph_reuses_a_trace_and_names_its_nodes() -> None:
    model = WithMetaModules()
    gm = trace(model)
    report = analyze_graph(gm)
    assert report.graph_module is gm
    names = {n.name for n in gm.graph.nodes}
    for e in report.entries:
        assert e.node in names and e.producer.node in names
    assert analyze(model).to_dict() == report.to_dict()


def test_config_accepts_objects_with_analysis_attribute() -> None:
    holder = SimpleNamespace(analysis=AnalysisConfig(strict=True))
    with pytest.raises(TraceFailure):
        analyze(Net(lambda x: torch.linalg.eigvalsh(cov(torch.cumsum(x, 1)))), config=holder)
    assert analyze(Net(lambda x: torch.linalg.eigvalsh(cov(x))),
                   config=SimpleNamespace(analysis=None)).producers == ["conv"]
    with pytest.raises(ConfigError):
        analyze(Net(lambda x: x), config=42)


def test_orthoconfig_embeds_the_analysis_config() -> None:
    cfgmod = pytest.importorskip("orthofx.config")
    cfg = cfgmod.OrthoConfig(analysis=AnalysisConfig(transparent_functions=(torch.cumsum,)))
    report = analyze(Net(lambda x: torch.linalg.eigvalsh(cov(torch.cumsum(x, 1)))), config=cfg)
    assert report.producers == ["conv"]


def test_analysis_config_round_trip_and_validation() -> None:
    cfg = AnalysisConfig(leaf_modules=("a.b",), meta_functions={user_isqrt: "invsqrtm"},
                         meta_modules={UserDecomp: "eigvalsh", "head.dec": ("eigh", "covariance")},
                         meta_autograd_functions={MyFn: "svd"},
                         transparent_functions=(torch.cumsum,), transparent_methods=("cummax",),
                         transparent_modules=(nn.GroupNorm,), strict=True)
    d = cfg.to_dict()
    json.dumps(d)
    back = AnalysisConfig.from_dict(d)
    assert back.to_dict() == d
    assert back.meta_functions[user_isqrt] == MetaSpec("invsqrtm")
    assert back.meta_modules["head.dec"] == MetaSpec("eigh", "covariance")
    with pytest.raises(ConfigError):
        AnalysisConfig(meta_functions={user_isqrt: "logm"})
    with pytest.raises(ConfigError):
        AnalysisConfig(leaf_modules="block")
    with pytest.raises(ConfigError):
        AnalysisConfig(meta_autograd_functions={int: "eigh"})
    with pytest.raises(ConfigError):
        AnalysisConfig.from_dict({"nope": 1})
    hash(cfg)


def test_registered_function_called_through_its_module_stays_one_node() -> None:
    import orthofx.testing.models as tm

    original = tm.user_sqrtm

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return tm.user_sqrtm(y @ y.mT)  # attribute form, not a global of this module

    report = analyze(M(), config=AnalysisConfig(meta_functions={tm.user_sqrtm: "sqrtm"}))
    (e,) = report.entries
    assert (e.kind, e.source, e.usage) == ("sqrtm", "config", "sqrtm")
    assert sum(n.target is tm.user_sqrtm for n in report.graph_module.graph.nodes) == 1
    assert tm.user_sqrtm is original  # the module attribute was restored after tracing
    assert not any(n.target is torch.linalg.eigh for n in report.graph_module.graph.nodes)


@pytest.mark.parametrize("form", ["conv2d", "linear", "matmul", "matmul_t"])
def test_parametrized_producers_are_still_found_under_their_user_names(form) -> None:
    """After a rewrite registers a parametrization (OW/SN) on the weight, a second analysis
    finds the same producer and parameter name (idempotence of the pass)."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, w):
            return w * 2

    model = Functional(form)
    before = analyze(model).to_dict()
    parametrize.register_parametrization(model.proj, "w", Twice())
    parametrize.register_parametrization(model.stem, "weight", Twice())
    after = analyze(model)
    (e,) = after.entries
    assert (e.producer.name, e.producer.param) == ("proj", "proj.w")
    assert before["entries"][0]["producer"] == e.producer.to_dict()


def test_parametrized_module_producer_keeps_its_class_name() -> None:
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, w):
            return w * 2

    model = Net(lambda x: torch.linalg.eigvalsh(cov(x)))
    parametrize.register_parametrization(model.conv, "weight", Twice())
    (e,) = analyze(model).entries
    assert (e.producer.name, e.producer.type, e.producer.param) == ("conv", "Conv2d", "conv.weight")
