"""Small models written in the style of public research code, each with its planted truth.

The generated models of :mod:`orthofx.testing.strategies` are written to be easy to trace.
The models here are not: they imitate how covariance / whitening / second-order pooling
networks are actually written in research repositories —

* ``torch.autograd.Function`` s with hand-written backwards, concrete shapes read from
  ``x.data.shape``, index buffers built with ``nonzero``, ``torch.zeros`` scratch buffers
  filled in place, identity matrices built with ``.repeat`` from Python ints;
* running statistics updated in place inside a Function, or by *reassigning* the buffer in
  ``forward`` (``self.running_projection = ...``);
* Python control flow on tensor values (``while err.item() > tol``, ``if (s_e < 1e-5).any()``),
  ``.item()`` in a meta-layer's forward, bound ``Function.apply`` attributes, submodules that
  ``forward`` never calls, buffers that nothing reads;
* covariance helpers that are also called on features whose covariance reaches no matrix
  function (decoys), attention ``q kᵀ`` that is *not* a meta-layer.

Every model is tiny (a few channels, 8×8–32×32 inputs, batch 4) so the whole corpus runs in
seconds on a CPU. Each :class:`RealCodeCase` carries its ground truth: the Pre-SVD modules
(``producers``), their weight parameters (``producer_params``), the number of distinct
covariances that reach a matrix function (``n_meta_layers``) and the kinds of those matrix
functions (``kinds``, among :data:`KINDS`).

All code here was written for orthofx; the docstrings say which real code pattern each model
imitates.
"""

from __future__ import annotations

from corpora.case import KINDS, RealCodeCase, _images
from corpora.realcode import extras, pooling, style, transformer, whitening
from corpora.realcode.extras import (
    _build_buffer_reassign_untraceable, _build_cholesky_whiten, _build_decoy_cov, _build_item_forward,
    _build_spd_net, _spd_inputs, _token_inputs,
)
from corpora.realcode.pooling import (
    Covpool, Sqrtm, SqrtmSVD, Triuvec, _build_gcp_isqrt, _build_gcp_no_matfn, _build_gcp_svd,
)
from corpora.realcode.style import MatSqrtInvFn, _build_wct, _wct_inputs
from corpora.realcode.transformer import _build_sovit_head, _build_sovit_head_chunk, _build_vit_plain
from corpora.realcode.whitening import (
    DBN, MPA_Lya, IterNorm, _build_dbn_vgg16, _build_iternorm_vgg, _build_zca_pade, _vgg_conv_names, _VGG16_CFG,
    _VGG16E_CFG, iterative_normalization_py, pade_coefficients,
)

__all__ = [
    "KINDS",
    "RealCodeCase",
    "CASES",
    "NEGATIVE_CASES",
    "ALL_CASES",
    # autograd Functions with hand-written backwards (gradchecked in tests/test_realcode.py)
    "Covpool",
    "Sqrtm",
    "Triuvec",
    "SqrtmSVD",
    "iterative_normalization_py",
    "MPA_Lya",
    "MatSqrtInvFn",
    "pade_coefficients",
    # the whitening modules the tests inspect
    "IterNorm",
    "DBN",
    "MODULES",
]

#: the modules that define the corpus's models (the tests gradcheck every ``autograd.Function`` in them)
MODULES = (pooling, whitening, transformer, style, extras)


# =========================================================================================
# The corpus
# =========================================================================================
def _params(names) -> frozenset[str]:
    return frozenset(f"{n}.weight" for n in names)


_ITERNORM_CONVS = _vgg_conv_names(_VGG16_CFG, "features", 3)
_DBN_CONVS = _vgg_conv_names(_VGG16E_CFG, "features", 3)


def _case(name, build, inputs, producers, n_meta, kinds, description, params=None) -> RealCodeCase:
    producers = frozenset(producers)
    return RealCodeCase(
        name=name, build=build, inputs=inputs, producers=producers,
        producer_params=frozenset(params) if params is not None else _params(producers),
        n_meta_layers=n_meta, kinds=frozenset(kinds), description=description,
    )


CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gcp_isqrt", _build_gcp_isqrt, _images(100), ["layer_reduce.0"], 1, ["ns_sqrt"],
          "iSQRT-COV ResNet: layer_reduce (1x1 conv, BN, ReLU) -> Covpool -> Sqrtm (coupled NS, 5 iters, "
          "trace-normalised) -> Triuvec -> fc; all three autograd.Functions with hand-written backwards."),
    _case("gcp_svd", _build_gcp_svd, _images(101), ["representation.conv_dr_block.0"], 1, ["svd"],
          "MPN-COV block with conv_dr_block; square root by torch.svd in float64 inside a Function with the "
          "1/(λi−λj) backward."),
    _case("iternorm_vgg", _build_iternorm_vgg, _images(102, h=32), _ITERNORM_CONVS, len(_ITERNORM_CONVS),
          ["ns_invsqrt"],
          "VGG-16 (13 convs, 8-16 channels) with IterNorm (groups of 4 channels, T=5 NS inverse-sqrt steps by "
          "baddbmm, running stats updated in place inside the Function) after every conv."),
    _case("dbn_vgg16", _build_dbn_vgg16, _images(103, h=32), _DBN_CONVS, len(_DBN_CONVS), ["svd"],
          "VGG with 16 convs (the 'E' layout, 8 channels) each followed by DBN: sigma.svd() ZCA whitening, "
          "running_projection reassigned in forward; eval uses running_projection."),
    _case("zca_pade", _build_zca_pade, _images(104), ["conv2"], 1, ["pade"],
          "ZCA whitening: covariance -> MPA_Lya (Padé [5/5] square root via linalg.solve, Lyapunov backward) "
          "-> torch.inverse; an unused registered buffer (running_subspace). conv1 feeds conv2, only conv2 is "
          "the Pre-SVD layer."),
    _case("sovit_head", _build_sovit_head, _images(105), ["so_head.proj_q", "so_head.proj_k"], 1,
          ["power_iteration"],
          "ViT (2 blocks of softmax attention, not meta-layers) + So-ViT-like head: token_reduce Linear on the "
          "token axis, proj_q / proj_k, cross-covariance qᵀk/N, power iteration with `while ... err.item() > "
          "tol`. token_reduce precedes the projections, so it is not a producer."),
    _case("sovit_head_chunk", _build_sovit_head_chunk, _images(106), ["so_head.proj_qk"], 1, ["power_iteration"],
          "As sovit_head, but q, k = proj_qk(x).chunk(2, -1): one Linear produces both sides."),
    _case("wct", _build_wct, _wct_inputs, ["encoder.9"], 2, ["eigh", "svd"],
          "WCT generator forward(content, style): the shared encoder's last conv (encoder.9, then ReLU) feeds "
          "both the content covariance (whitened by MatSqrtInvFn.apply bound as self.sqrt_inv: eigh inside a "
          "Function) and the style covariance (coloured via torch.svd). c_encoder / s_encoder are never called "
          "by forward and hold no producer."),
    _case("spd_net", _build_spd_net, _spd_inputs, ["bimap1", "bimap2"], 2, ["eigh"],
          "SPDNet: covariance of raw signals formed in forward, BiMap (bare nn.Parameter W, Wᵀ X W) -> ReEig "
          "(eigh, clamp) -> BiMap -> ReEig -> LogEig (eigh, log). The covariances are the two congruences "
          "W1ᵀΣW1 and W2ᵀ X1 W2; LogEig decomposes ReEig2's output (no new covariance, producer still bimap2).",
          params=["bimap1.W", "bimap2.W"]),
    _case("cholesky_whiten", _build_cholesky_whiten, _images(111), ["conv1", "conv2"], 2, ["cholesky"],
          "Group whitening by Cholesky (2 groups): linalg.cholesky, solve_triangular for L^{-1}, applied by "
          "F.conv2d(x, w.view(C, C//G, 1, 1), groups=G); after conv1 and after conv2."),
    _case("decoy_cov", _build_decoy_cov, _images(112), ["conv3"], 1, ["eigh"],
          "Per-sample ZCA after conv3 (eigh). The same covariance helper is applied to conv1's and conv2's "
          "outputs (DeCov Frobenius penalty, returned) and to the whitened output (logged via .item()); those "
          "reach no matrix function. forward returns (logits, penalty)."),
    _case("item_forward", _build_item_forward, _token_inputs, ["proj"], 1, ["eigh"],
          "Token features -> Linear proj -> covariance square root whose ε is computed with .item() in the "
          "meta-layer's forward (eigh)."),
]}

NEGATIVE_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gcp_no_matfn", _build_gcp_no_matfn, _images(120), [], 0, [],
          "Bilinear pooling (bmm covariance) -> signed sqrt -> L2 normalise -> fc: a covariance, no matrix "
          "function."),
    _case("vit_plain", _build_vit_plain, _images(121), [], 0, [],
          "Plain ViT: attention q kᵀ -> softmax -> @ v only."),
    _case("buffer_reassign_untraceable", _build_buffer_reassign_untraceable, _images(122), [], 0, [],
          "Running buffers reassigned in forward, data-dependent `if`/`while` on tensor values (symbolic fx "
          "tracing fails); no covariance, no matrix function."),
]}

#: positive and negative cases together
ALL_CASES: dict[str, RealCodeCase] = {**CASES, **NEGATIVE_CASES}
