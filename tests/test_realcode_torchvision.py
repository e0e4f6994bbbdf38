"""A corpus of real torchvision architectures with meta-layers written the way people write
them (raw ``torch.linalg`` code, not orthofx.nn), and the Pre-SVD layers the analysis must find.

Models are built with ``weights=None`` and run once on small inputs to show the corpus
entries are valid models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from orthofx.graph import analyze

torch.set_grad_enabled(True)


# ----------------------------------------------------------------------------- user-written meta-layers
class GCPHead(nn.Module):
    """Global covariance pooling (MPN-COV / iSQRT-COV style): optional 1×1 reduction conv +
    BN + ReLU, centred covariance, matrix square root by eigh, upper triangle, classifier."""

    def __init__(self, in_channels: int, reduced: int | None = 32, num_classes: int = 10,
                 eps: float = 1e-5) -> None:
        super().__init__()
        c = reduced or in_channels
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, reduced, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(inplace=True),
        ) if reduced else None
        self.eps = eps
        self.c = c
        self.register_buffer("iu", torch.triu_indices(c, c), persistent=False)
        self.fc = nn.Linear(c * (c + 1) // 2, num_classes)

    def forward(self, x):
        if self.reduce is not None:
            x = self.reduce(x)
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w)
        x = x - x.mean(dim=2, keepdim=True)
        cov = x.bmm(x.transpose(1, 2)) / (h * w)
        cov = cov + self.eps * torch.eye(c, device=x.device, dtype=x.dtype)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp(min=1e-10)
        sqrt_cov = eigvecs @ torch.diag_embed(eigvals.sqrt()) @ eigvecs.transpose(-1, -2)
        feats = sqrt_cov[:, self.iu[0], self.iu[1]]
        return self.fc(feats)


class SVDPooling(nn.Module):
    """Covariance pooling written with ``torch.svd``: U diag(√S) Vᵀ."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(channels * channels, num_classes)

    def forward(self, x):
        x = torch.flatten(x, start_dim=2)
        x = x - torch.mean(x, dim=-1, keepdim=True)
        cov = torch.matmul(x, x.permute(0, 2, 1)) / x.size(-1) + 1e-4 * torch.eye(x.size(1))
        u, s, v = torch.svd(cov)
        out = u @ torch.diag_embed(torch.sqrt(s)) @ v.mT
        return self.fc(out.flatten(1))


class SpectrumHead(nn.Module):
    """Eigen-spectrum features: einsum covariance, eigvalsh, log of the spectrum."""

    def __init__(self, channels: int, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = x.flatten(2)
        x = x - x.mean(-1, keepdim=True)
        cov = torch.einsum("bcm,bdm->bcd", x, x) / x.shape[-1]
        lam = torch.linalg.eigvalsh(cov + 1e-3 * torch.eye(cov.shape[-1], device=cov.device))
        return self.fc(torch.log(lam.clamp_min(1e-6)))


class ZCAWhitening(nn.Module):
    """Decorrelated batch norm (ZCA whitening over the batch), as in the paper's experiment:
    Σ = X̄ X̄ᵀ / (NHW) + εI, output Σ^{-1/2} X̄ followed by an affine."""

    def __init__(self, num_features: int, eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, 1))
        self.bias = nn.Parameter(torch.zeros(num_features, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        xf = x.transpose(0, 1).reshape(c, -1)
        mean = xf.mean(1, keepdim=True)
        xc = xf - mean
        cov = xc @ xc.t() / xc.shape[1] + self.eps * torch.eye(c, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        whitening = u @ torch.diag_embed(lam.rsqrt()) @ u.t()
        y = whitening @ xc
        y = y * self.weight + self.bias
        return y.reshape(c, n, h, w).transpose(0, 1)


class TokenWhitening(nn.Module):
    """ZCA whitening of transformer tokens (N, L, D) over all tokens of the batch."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, tokens):
        n, l, d = tokens.shape
        x = tokens.reshape(n * l, d)
        x = x - x.mean(dim=0, keepdim=True)
        cov = x.T @ x / (n * l) + self.eps * torch.eye(d)
        lam, u = torch.linalg.eigh(cov)
        w = u @ torch.diag_embed(lam.pow(-0.5)) @ u.T
        return (x @ w).reshape(n, l, d)


# ----------------------------------------------------------------------------- corpus
def resnet18_gcp():
    m = torchvision.models.resnet18(weights=None)
    m.avgpool = GCPHead(512, reduced=32)
    m.fc = nn.Identity()
    return m, ["avgpool.reduce.0"], 0, None


def resnet18_gcp_no_reduction():
    """GCP straight on layer4: the last op is a residual add, so no single Pre-SVD layer."""
    m = torchvision.models.resnet18(weights=None)
    m.avgpool = GCPHead(512, reduced=None)
    m.fc = nn.Identity()
    return m, [], 1, "adds another tensor"


def resnet50_whitening_stem():
    m = torchvision.models.resnet50(weights=None)
    m.bn1 = ZCAWhitening(64)
    return m, ["conv1"], 0, None


def vgg11_svd_pooling():
    m = torchvision.models.vgg11(weights=None)
    m.avgpool = SVDPooling(512)
    m.classifier = nn.Identity()
    return m, ["features.18"], 0, None


def mobilenet_v3_gcp():
    m = torchvision.models.mobilenet_v3_small(weights=None)
    m.avgpool = GCPHead(576, reduced=None)
    m.classifier = nn.Identity()
    return m, ["features.12.0"], 0, None


class DenseNetGCP(nn.Module):
    def __init__(self, reduced: int | None) -> None:
        super().__init__()
        self.features = torchvision.models.densenet121(weights=None).features
        self.head = GCPHead(1024, reduced=reduced)

    def forward(self, x):
        return self.head(F.relu(self.features(x)))


def densenet_gcp():
    return DenseNetGCP(32), ["head.reduce.0"], 0, None


def densenet_gcp_no_reduction():
    """Straight after the last dense block: norm5 sees a concatenation of many layers."""
    return DenseNetGCP(None), [], 1, "concatenation"


def efficientnet_spectrum():
    m = torchvision.models.efficientnet_b0(weights=None)
    m.avgpool = SpectrumHead(1280)
    m.classifier = nn.Identity()
    return m, ["features.8.0"], 0, None


class WhitenedViT(nn.Module):
    """ViT-B/16 with whitening on the patch tokens and a GCP head on the output tokens."""

    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.vit = torchvision.models.vit_b_16(weights=None, image_size=image_size)
        self.white = TokenWhitening()
        self.proj = nn.Linear(768, 16)
        self.head_plain = SpectrumTokens()

    def forward(self, x):
        x = self.vit._process_input(x)  # conv_proj + reshape + permute: (N, L, 768)
        x = self.white(x)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = self.vit.encoder(torch.cat([cls, x], dim=1))
        t = self.proj(x[:, 1:])  # (N, L, 16)
        t = t - t.mean(1, keepdim=True)
        cov = t.transpose(1, 2) @ t / t.shape[1]
        lam, u = torch.linalg.eigh(cov + 1e-4 * torch.eye(16))
        gcp = (u * lam.clamp_min(0).sqrt().unsqueeze(1)) @ u.transpose(1, 2)
        return gcp.flatten(1), self.head_plain(x)


class SpectrumTokens(nn.Module):
    """Spectrum of the encoder's output tokens (after the final LayerNorm)."""

    def forward(self, x):
        return torch.linalg.eigvalsh(torch.einsum("bld,ble->bde", x, x))


def vit_whitening():
    return WhitenedViT(), ["vit.conv_proj", "proj"], 1, "LayerNorm"


CORPUS = {
    "resnet18_gcp": resnet18_gcp,
    "resnet18_gcp_no_reduction": resnet18_gcp_no_reduction,
    "resnet50_whitening_stem": resnet50_whitening_stem,
    "vgg11_svd_pooling": vgg11_svd_pooling,
    "mobilenet_v3_gcp": mobilenet_v3_gcp,
    "densenet_gcp": densenet_gcp,
    "densenet_gcp_no_reduction": densenet_gcp_no_reduction,
    "efficientnet_spectrum": efficientnet_spectrum,
    "vit_whitening": vit_whitening,
}


#: corpus entries whose forward is expensive on CPU (20-90 s here: rank-deficient eigh of
#: 512² to 1280² covariances, ViT-B): their run check is marked slow; their analysis is
#: always tested
HEAVY = {"efficientnet_spectrum", "vit_whitening", "densenet_gcp_no_reduction",
         "resnet18_gcp_no_reduction", "vgg11_svd_pooling", "mobilenet_v3_gcp"}


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_producers(name: str) -> None:
    torch.manual_seed(0)
    model, producers, n_skipped, reason = CORPUS[name]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze(model)
    assert report.producers == producers, str(report)
    assert len(report.skipped) == n_skipped, str(report)
    if reason is not None:
        assert reason in report.skipped[0].reason, str(report)
    assert not report.auto_leaves and not report.partial
    for e in report.entries:
        w = model.get_parameter(e.producer.param)
        assert e.producer.weight_shape == tuple(w.shape)
        assert e.producer.flat_shape == (w.shape[0], w[0].numel())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in CORPUS])
def test_corpus_models_run_and_trace_faithfully(name: str) -> None:
    """Each corpus entry is a valid model, and its traced graph computes the same outputs."""
    torch.manual_seed(0)
    model = CORPUS[name]()[0].eval()
    x = torch.randn(2, 3, 64, 64)
    report = analyze(model)
    with torch.no_grad():
        torch.testing.assert_close(report.graph_module(x), model(x))


def test_corpus_usages_and_forms() -> None:
    report = analyze(resnet18_gcp()[0])
    (e,) = report.entries
    assert (e.kind, e.usage, e.scope) == ("eigh", "sqrtm", "avgpool")
    assert e.covariance.form == "bmm" and e.covariance.centered and e.covariance.scaled
    assert e.covariance.eps == pytest.approx(1e-5)
    assert [s.node for s in e.chain[:3]] == ["avgpool_reduce_0", "avgpool_reduce_1", "avgpool_reduce_2"]

    (w,) = analyze(resnet50_whitening_stem()[0]).entries
    assert (w.kind, w.usage, w.scope) == ("eigh", "invsqrtm", "bn1")
    assert w.covariance.centered and w.covariance.eps == pytest.approx(1e-2)
    assert w.producer.flat_shape == (64, 147)

    (s,) = analyze(vgg11_svd_pooling()[0]).entries
    assert (s.kind, s.usage) == ("svd", "sqrtm")

    (sp,) = analyze(efficientnet_spectrum()[0]).entries
    assert (sp.kind, sp.usage, sp.covariance.form) == ("eigvalsh", "eigenvalues", "einsum")


def test_corpus_with_example_inputs_records_shapes() -> None:
    model = resnet50_whitening_stem()[0].train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze(model, torch.randn(2, 3, 64, 64))
    (e,) = report.entries
    assert e.chain[0].shape == (2, 64, 32, 32)  # conv1's output
    cov = next(s for s in e.chain if s.role == "covariance")
    assert cov.shape == (64, 64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
