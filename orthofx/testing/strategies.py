"""Hypothesis strategies that generate valid models with planted Pre-SVD layers.

Generation is NNSmith-style: every op declares the feature layout it accepts and the layout
it produces (``NCHW`` conv maps, ``NCM`` channels-first matrices, ``NMC`` token matrices), so
only valid programs are drawn, and the ground truth is built while drawing:

* producers in module form (nn.Conv2d / nn.Conv1d / nn.Linear) and functional form
  (F.conv2d / F.conv1d / F.linear / ``X @ W`` / ``W @ X`` with an nn.Parameter), or none of
  its own (the stem conv is then the Pre-SVD layer);
* chains of transparent ops in module, function and method forms (activations, BatchNorm,
  dropout, identity, pooling, scalar arithmetic, casts, (un)squeeze, flatten/view/reshape,
  permute/transpose, mean-centring);
* every covariance form (``@``, ``torch.matmul`` method, ``bmm``, ``einsum``, a centring
  matrix ``X J Xᵀ``, ``torch.cov``) with optional scaling, ``+ εI`` and symmetrisation;
* meta-layers of several kinds (eigh / eigvalsh / svd / torch.svd / ``x.svd()`` / svdvals,
  orthofx-style meta modules taking a covariance or features, with an internal producer,
  a custom ``autograd.Function``, a config-registered function and module, orthofx.linalg
  when importable) and uses of the result (sqrt / inverse sqrt reassembly, values only);
* distractors that must stop the walk (a second branch added / gating / concatenated,
  softmax across channels, an unknown function, channel slicing, a config leaf module).

Use::

    from hypothesis import given
    from orthofx.testing import generated_models

    @given(generated_models())
    def test(model):
        report = orthofx.analyze(model, config=model.analysis_config)
        assert set(report.producers) == model.truth.producers
"""

from __future__ import annotations

from typing import Any, Sequence

from hypothesis import strategies as st

from orthofx.graph.config import AnalysisConfig
from orthofx.testing.models import (
    GeneratedModel,
    HeadSpec,
    HeadTruth,
    Op,
    PlantedTruth,
    UserEighModule,
    user_sqrtm,
)

__all__ = [
    "META_KINDS",
    "DISTRACTORS",
    "head_specs",
    "generated_models",
    "head_truth",
]

PRODUCERS = ("conv2d", "conv1d", "linear", "matmul", "matmul_left", "stem")
_LAYOUT_OF_PRODUCER = {"conv2d": "NCHW", "stem": "NCHW", "conv1d": "NCM", "linear": "NMC",
                       "matmul": "NMC", "matmul_left": "NCM"}

#: meta-layers the strategies can plant
META_KINDS: tuple[str, ...] = (
    "eigh", "eigvalsh", "svd", "torch.svd", "method.svd", "svdvals", "standin_cov",
    "standin_features", "standin_internal", "function", "user_function", "user_module",
    "orthofx.sqrtm", "orthofx.eigh",
)
_FEATURE_METAS = ("standin_features", "standin_internal")
_VECTOR_METAS = ("eigh", "svd", "torch.svd", "method.svd", "user_module", "orthofx.eigh")
_KIND = {"eigh": "eigh", "eigvalsh": "eigvalsh", "svd": "svd", "torch.svd": "svd",
         "method.svd": "svd", "svdvals": "svdvals", "standin_cov": "invsqrtm",
         "standin_features": "sqrtm", "standin_internal": "sqrtm", "function": "eigh",
         "user_function": "sqrtm", "user_module": "eigh", "orthofx.sqrtm": "sqrtm",
         "orthofx.eigh": "eigh"}

#: distractor -> a substring of the skip reason the analysis must give
DISTRACTORS: dict[str, str] = {
    "distract_add": "another tensor",
    "distract_gate": "another tensor",
    "distract_cat": "concatenation",
    "distract_softmax": "softmax",
    "distract_unknown": "unknown function",
    "distract_slice": "indexing",
    "opaque": "opaque leaf",
}

# op name -> (layouts it accepts, forms). Pointwise ops keep the layout.
_POINTWISE: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "relu": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function", "method")),
    "gelu": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function")),
    "tanh": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function", "method")),
    "sigmoid": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function", "method")),
    "hardswish": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function")),
    "dropout": (frozenset({"NCHW", "NCM", "NMC"}), ("module", "function")),
    "identity": (frozenset({"NCHW", "NCM", "NMC"}), ("module",)),
    "bn2d": (frozenset({"NCHW"}), ("module",)),
    "bn1d": (frozenset({"NCM"}), ("module",)),
    "maxpool": (frozenset({"NCHW"}), ("module", "function")),
    "avgpool": (frozenset({"NCHW"}), ("module", "function")),
    "scale": (frozenset({"NCHW", "NCM", "NMC"}), ("function", "method")),
    "div": (frozenset({"NCHW", "NCM", "NMC"}), ("function",)),
    "shift": (frozenset({"NCHW", "NCM", "NMC"}), ("function", "method")),
    "neg": (frozenset({"NCHW", "NCM", "NMC"}), ("function",)),
    "contiguous": (frozenset({"NCHW", "NCM", "NMC"}), ("method",)),
    "cast": (frozenset({"NCHW", "NCM", "NMC"}), ("method",)),
    "unsqueeze_squeeze": (frozenset({"NCHW", "NCM", "NMC"}), ("method", "function")),
    "center": (frozenset({"NCM", "NMC"}), ("function", "method")),
}
# layout-changing ops: name -> {from layout: to layout}, forms
_TRANSITIONS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "flatten": ({"NCHW": "NCM"}, ("module", "function", "method", "view", "reshape")),
    "to_tokens": ({"NCHW": "NMC"}, ("function",)),
    "transpose": ({"NCM": "NMC", "NMC": "NCM"}, ("method", "function", "permute")),
}


def _channel_dim(layout: str) -> int:
    return 2 if layout == "NMC" else 1


@st.composite
def _op(draw: st.DrawFn, layout: str, channels: int) -> tuple[Op, str]:
    """One transparent op valid for ``layout``: (op, new layout)."""
    names = [n for n, (lay, _) in _POINTWISE.items() if layout in lay]
    names += [n for n, (moves, _) in _TRANSITIONS.items() if layout in moves]
    name = draw(st.sampled_from(sorted(names)))
    if name in _TRANSITIONS:
        moves, forms = _TRANSITIONS[name]
        form = draw(st.sampled_from(forms))
        if form in ("view", "reshape", "permute"):
            arg, form = (form, "module_free")
            return Op(name, "other", arg), moves[layout]
        return Op(name, form), moves[layout]
    form = draw(st.sampled_from(_POINTWISE[name][1]))
    arg: Any = None
    if name in ("bn2d", "bn1d"):
        arg = channels
    elif name == "scale":
        arg = draw(st.sampled_from([0.5, 2.0, 3.0]))
    elif name == "div":
        arg = draw(st.sampled_from([2.0, 4.0]))
    elif name == "shift":
        arg = draw(st.sampled_from([0.1, -0.25]))
    elif name == "center":
        arg = layout
    return Op(name, form, arg), layout


@st.composite
def head_specs(
    draw: st.DrawFn,
    stem_channels: int,
    *,
    meta_kinds: Sequence[str] = META_KINDS,
    distractors: bool = True,
    max_ops: int = 5,
) -> HeadSpec:
    """A random valid :class:`HeadSpec` (one producer → ops → covariance → meta-layer)."""
    producer = draw(st.sampled_from(PRODUCERS))
    form = "module" if producer == "stem" else draw(st.sampled_from(["module", "functional"]))
    if producer in ("matmul", "matmul_left"):
        form = "functional"
    channels = stem_channels if producer == "stem" else draw(st.integers(2, 5))
    layout = _LAYOUT_OF_PRODUCER[producer]
    ch = channels
    pre: list[Op] = []
    distractor = None
    if distractors and draw(st.integers(0, 3)) == 0:
        distractor = draw(st.sampled_from(sorted(DISTRACTORS)))
        if distractor == "distract_slice" and (ch < 3 or layout == "NMC"):
            distractor = "distract_softmax"
        cdim = _channel_dim(layout)
        if distractor == "distract_cat":
            pre.append(Op(distractor, "function", cdim))
            ch *= 2
        elif distractor == "distract_softmax":
            pre.append(Op(distractor, "function", cdim))
        elif distractor == "distract_slice":
            pre.append(Op(distractor, "function"))
            ch -= 1
        elif distractor == "opaque":
            pre.append(Op("opaque", "module", ch))
        else:
            pre.append(Op(distractor, "function"))
    for _ in range(draw(st.integers(0, max_ops))):
        op, layout = draw(_op(layout, ch))
        pre.append(op)
    meta = draw(st.sampled_from(list(meta_kinds)))
    if meta in _FEATURE_METAS:
        if layout == "NMC":
            pre.append(Op("transpose", "method"))
            layout = "NCM"
        cov, post = "none", ()
    else:
        if layout == "NCHW":
            pre.append(Op("flatten", "method"))
            layout = "NCM"
        cov = draw(st.sampled_from(["matmul", "bmm", "method", "einsum", "center_matrix",
                                    "torch.cov"]))
        post = tuple(p for p in ("scale", "eps", "sym") if draw(st.booleans()))
    use = "values"
    if meta in _VECTOR_METAS:
        use = draw(st.sampled_from(["sqrt", "sqrt_pow", "invsqrt", "invsqrt_div", "invsqrt_pow",
                                    "values"]))
    return HeadSpec(producer=producer, producer_form=form, channels=channels, pre=tuple(pre),
                    cov=cov, post=post, meta=meta, use=use, layout=layout, cov_channels=ch,
                    distractor=distractor)


def head_truth(spec: HeadSpec, index: int) -> HeadTruth:
    """The expected analysis result of head ``index`` built from ``spec``."""
    scope = f"heads.{index}"
    kind = _KIND[spec.meta]
    if spec.meta in ("eigvalsh", "svdvals"):
        usage = "eigenvalues"
    elif spec.meta in _VECTOR_METAS:
        usage = {"sqrt": "sqrtm", "sqrt_pow": "sqrtm", "invsqrt": "invsqrtm",
                 "invsqrt_div": "invsqrtm", "invsqrt_pow": "invsqrtm",
                 "values": "eigenvalues"}[spec.use]
    elif spec.meta == "function":
        usage = "sqrtm"
    else:
        usage = kind
    if spec.meta == "standin_internal":
        name = f"{scope}.meta.reduce"
        return HeadTruth(scope, name, f"{name}.weight", usage, kind, "module")
    if spec.producer == "stem":
        name, param = "stem.0", "stem.0.weight"
    elif spec.producer_form == "module":
        name, param = f"{scope}.producer", f"{scope}.producer.weight"
    else:
        name, param = scope, f"{scope}.fweight"
    if spec.meta in _FEATURE_METAS:
        cov_form, centered, eps = "module", None, None
    else:
        cov_form = {"matmul": "matmul", "bmm": "bmm", "method": "matmul", "einsum": "einsum",
                    "center_matrix": "matmul", "torch.cov": "torch.cov"}[spec.cov]
        centered = spec.cov in ("center_matrix", "torch.cov") or any(
            op.name == "center" for op in spec.pre)
        eps = "eps" in spec.post
    if spec.distractor is not None:
        recorded: tuple[str, ...] = (name,)
        if spec.distractor in ("distract_add", "distract_gate", "distract_cat"):
            side = "side" if spec.producer in ("conv2d", "stem") else "side_lin"
            recorded += (f"{scope}.{side}",)
        return HeadTruth(scope, None, None, usage, kind, None,
                         reason=DISTRACTORS[spec.distractor], recorded=recorded)
    return HeadTruth(scope, name, param, usage, kind, cov_form, centered=centered, eps=eps)


def _orthofx_linalg_available() -> bool:
    try:
        import orthofx.linalg as ol

        return callable(getattr(ol, "sqrtm", None)) and callable(getattr(ol, "eigh", None))
    except Exception:  # noqa: BLE001
        return False


@st.composite
def generated_models(
    draw: st.DrawFn,
    *,
    max_heads: int = 3,
    meta_kinds: Sequence[str] | None = None,
    distractors: bool = True,
    max_ops: int = 5,
) -> GeneratedModel:
    """A random :class:`GeneratedModel` with its planted truth.

    Args:
        max_heads: at most this many meta-layer heads.
        meta_kinds: restrict the planted meta-layers (default: all of :data:`META_KINDS`;
            orthofx.linalg ones only when importable).
        distractors: plant ops that must stop the walk (about one head in four).
        max_ops: at most this many transparent ops per head (plus layout fixes).

    The model has attributes ``truth`` (:class:`PlantedTruth`), ``analysis_config`` (the
    ``AnalysisConfig`` it needs) and ``example_inputs``.
    """
    kinds = list(meta_kinds if meta_kinds is not None else META_KINDS)
    if not _orthofx_linalg_available():
        kinds = [k for k in kinds if not k.startswith("orthofx.")] or ["eigh"]
    in_channels = draw(st.integers(1, 3))
    stem_channels = draw(st.integers(2, 4))
    n_heads = draw(st.integers(1, max_heads))
    specs = [draw(head_specs(stem_channels, meta_kinds=kinds, distractors=distractors,
                             max_ops=max_ops)) for _ in range(n_heads)]
    truth = PlantedTruth(tuple(head_truth(s, i) for i, s in enumerate(specs)))
    metas = {s.meta for s in specs}
    cfg_kwargs: dict[str, Any] = {}
    if "user_function" in metas:
        cfg_kwargs["meta_functions"] = {user_sqrtm: "sqrtm"}
    if "user_module" in metas:
        cfg_kwargs["meta_modules"] = {UserEighModule: "eigh"}
    if any(op.name == "opaque" for s in specs for op in s.pre):
        cfg_kwargs["leaf_modules"] = ("OpaqueBlock",)
    config = AnalysisConfig(**cfg_kwargs)
    torch_seed = draw(st.integers(0, 2**16))
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(torch_seed)
        model = GeneratedModel(in_channels, stem_channels, specs, truth, config)
    return model
