"""A held-out real-code corpus: ten more models in the style of public research code.

These were written *after* :mod:`corpora.realcode`, by a user who did not look at
orthofx's discovery code, to check that the discovery generalises. Each model imitates a
pattern of a published repository (re-written from scratch for orthofx, tiny channels) and
carries its planted truth as a :class:`~corpora.case.RealCodeCase`:

* ``sw_resnet`` — Switchable Whitening (BW/IW/BN/IN statistics mixed by learned softmax
  weights, group whitening by ``torch.svd`` of the mixed covariance) after the convs of a
  ResNet BasicBlock, before the residual add;
* ``gw_after_add`` — group whitening *after* each residual block's add;
* ``concept_whitening`` — ZCA whitening (eigh) followed by an orthogonal rotation buffer
  applied with ``einsum``, concept statistics accumulated under ``no_grad``;
* ``wmse_loss`` — W-MSE: a model whose ``forward`` returns the self-supervised loss, with
  Cholesky whitening (``torch.triangular_solve``, applied as a 1×1 ``conv2d``) per view,
  sub-batches picked by ``torch.randperm`` and written back with index assignment;
* ``mpncov_fn`` — MPN-COV ResNet head: one ``autograd.Function`` forms the covariance *and*
  the matrix power by a per-sample ``torch.svd`` loop, hand-written backward;
* ``gw_mlp_deep`` — a 32-layer MLP, Linear → group whitening (``baddbmm`` covariance,
  batched ``eigh``) → ReLU;
* ``soca_sr`` — SAN-style second-order channel attention *inside* a super-resolution net
  (cropped covariance → plain-autograd Newton–Schulz sqrt → row mean → 1×1 convs → sigmoid
  reweighting), more convs after it;
* ``dbn_groups`` — grouped DBN (``x.view(G, C//G, -1)``, batched ``torch.linalg.eigh``,
  ``momentum=None`` cumulative averages, ``float(num_batches_tracked)``) after convs and
  after a Linear;
* negatives ``gram_style`` (Gatys style transfer, PyTorch-tutorial layout: Gram matrices
  only compared by MSE, losses stored as module attributes in ``forward``) and
  ``vit_cov_reg`` (einsum attention ``q kᵀ`` + a VICReg/Barlow-style covariance regulariser
  feeding only trace / Frobenius / off-diagonal sums).
"""

from __future__ import annotations

from corpora.case import RealCodeCase, _images
from corpora.realcode_extra import negative, second_order, whitening
from corpora.realcode_extra.negative import _build_gram_style, _build_vit_cov_reg, _style_inputs
from corpora.realcode_extra.second_order import MPNCOVFunction, _build_mpncov_fn, _build_soca_sr
from corpora.realcode_extra.whitening import (
    _GW_DEPTH, _build_concept_whitening, _build_dbn_groups, _build_gw_after_add, _build_gw_mlp_deep,
    _build_sw_resnet, _build_wmse, _vec_inputs, _wmse_inputs,
)

__all__ = [
    "EXTRA_CASES",
    "EXTRA_NEGATIVE_CASES",
    "ALL_EXTRA_CASES",
    "MPNCOVFunction",
    "MODULES",
]

#: the modules that define the held-out models (the tests gradcheck every ``autograd.Function`` in them)
MODULES = (whitening, second_order, negative)


# =========================================================================================
# The held-out corpus
# =========================================================================================
def _case(name, build, inputs, producers, n_meta, kinds, description) -> RealCodeCase:
    producers = frozenset(producers)
    return RealCodeCase(
        name=name, build=build, inputs=inputs, producers=producers,
        producer_params=frozenset(f"{p}.weight" for p in producers),
        n_meta_layers=n_meta, kinds=frozenset(kinds), description=description,
    )


EXTRA_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("sw_resnet", _build_sw_resnet, _images(301),
          ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2"], 4, ["svd"],
          "ResNet whose BasicBlocks use SwitchWhiten2d (BW+IW+BN+IN mixed by softmax weights, torch.svd of the "
          "per-sample/per-group mixed covariance) after conv1 and conv2, before the residual add. The stem conv "
          "and the downsample conv feed no SW covariance (the stem reaches only layer1.0.conv1, which is the "
          "nearest producer; the downsample joins after sw2)."),
    _case("gw_after_add", _build_gw_after_add, _images(302),
          ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.0.downsample.0"], 3, ["eigh"],
          "ResNet with GroupWhitening (per-sample ZCA over 4 channel groups, eigh) applied AFTER each block's "
          "residual add. Truth = the nearest conv on every path into the add: layer1.0's add <- layer1.0.conv2 "
          "(via bn2) and the identity <- the stem conv1 (via bn1/relu); layer1.1's add <- layer1.1.conv2 and the "
          "identity, which walks back through layer1.0's whitening to layer1.0.conv2 and conv1 again; layer2.0's "
          "add <- layer2.0.conv2 and the 1x1 downsample conv layer2.0.downsample.0. The conv1 of each block feeds "
          "only its conv2 and is not a producer."),
    _case("concept_whitening", _build_concept_whitening, _images(303),
          ["conv2"], 1, ["eigh"],
          "Concept whitening after conv2: batch ZCA (eigh), then an orthogonal rotation buffer via einsum, "
          "concept stats accumulated under no_grad with index assignment (mode=0). conv1 precedes conv2; conv3 "
          "follows the whitening."),
    _case("wmse_loss", _build_wmse, _wmse_inputs,
          ["head.3"], 1, ["cholesky"],
          "W-MSE: forward(x1, x2) returns the loss. The last projection Linear head.3 (after BN1d/ReLU) feeds the "
          "Whitening2d covariance, called once per view (two covariances of one module with one producer: orthofx "
          "counts them as ONE meta-layer with 2 calls, by design): Cholesky + torch.triangular_solve, applied as "
          "a 1x1 conv2d; sub-batches from torch.randperm, written back by index assignment."),
    _case("mpncov_fn", _build_mpncov_fn, _images(305),
          ["layer_reduce"], 1, ["svd"],
          "MPN-COV ResNet: layer_reduce 1x1 conv + BN + ReLU, then ONE autograd.Function that forms the "
          "covariance x Î xᵀ and its matrix power (α=0.5) by a per-sample torch.svd loop in float64 "
          "(hand-written backward); triu indices as a non-persistent buffer."),
    _case("gw_mlp_deep", _build_gw_mlp_deep, _vec_inputs,
          [f"layers.{i}.0" for i in range(_GW_DEPTH)], _GW_DEPTH, ["eigh"],
          f"{_GW_DEPTH} x (Linear -> GroupWhitening1d (baddbmm covariance, batched eigh) -> ReLU) -> classifier; "
          "every hidden Linear is a producer, the classifier is not."),
    _case("soca_sr", _build_soca_sr, _images(307),
          ["groups.0.conv_last", "groups.1.conv_last"], 2, ["ns_sqrt"],
          "SAN-style SR net: each residual group ends conv_last -> SOCA (centre crop 12x12 of 16x16, covariance, "
          "plain-autograd NS sqrt, row mean, 1x1 conv_du bottleneck + sigmoid, reweights the input). The SOCA "
          "conv_du convs, body_tail, upsample and tail convs come after the matrix function."),
    _case("dbn_groups", _build_dbn_groups, _images(308, n=8),
          ["conv1", "conv2", "fc1"], 3, ["eigh"],
          "Grouped DBN (2 groups, batched linalg.eigh, momentum=None cumulative averages with "
          "1/float(num_batches_tracked), in-place updates under no_grad) after conv1, conv2 and fc1."),
]}

EXTRA_NEGATIVE_CASES: dict[str, RealCodeCase] = {c.name: c for c in [
    _case("gram_style", _build_gram_style, _style_inputs, [], 0, [],
          "Gatys style transfer (PyTorch tutorial): Gram matrices compared by MSE to fixed targets, losses "
          "stored as module attributes in forward; no matrix function."),
    _case("vit_cov_reg", _build_vit_cov_reg, _images(310, n=8), [], 0, [],
          "ViT with einsum q kᵀ attention and a covariance that only feeds off-diagonal/trace/Frobenius "
          "regularisers; no matrix function."),
]}

#: positive and negative held-out cases together
ALL_EXTRA_CASES: dict[str, RealCodeCase] = {**EXTRA_CASES, **EXTRA_NEGATIVE_CASES}
