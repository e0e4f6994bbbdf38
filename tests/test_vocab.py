"""orthofx.vocab is the one vocabulary (issue 13): every module reads kinds, inputs, roles,
method names and the torch decomposition table from it, and nn and graph share one MetaSpec."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from orthofx import vocab
from orthofx.errors import ConfigError


def test_every_module_reads_the_one_definition() -> None:
    import orthofx.config as config
    import orthofx.graph as graph
    import orthofx.graph.recorded.ops as ops
    import importlib

    polar = importlib.import_module("orthofx.linalg.polar")  # the module, not the function
    import orthofx.nn as onn
    import orthofx.nn.stable as stable
    import orthofx.treatments._common as common
    from orthofx.treatments.weight import OW_METHODS

    assert graph.MetaSpec is vocab.MetaSpec and not hasattr(importlib.import_module("orthofx.nn.meta"), "MetaLayerInfo")
    with pytest.warns(DeprecationWarning, match=r"orthofx\.nn\.MetaLayerInfo is deprecated and will be removed in orthofx 0.3.0; use orthofx\.vocab\.MetaSpec"):
        assert onn.MetaLayerInfo is vocab.MetaSpec
    assert ops.KINDS is vocab.KINDS and ops.MatFn is vocab.MatFn
    assert polar.POLAR_METHODS is common.POLAR_METHODS is vocab.POLAR_METHODS
    assert tuple(OW_METHODS) == vocab.OW_METHOD_NAMES
    assert config._TOKENS[3:] == vocab.WEIGHT_TREATMENTS
    assert stable.STABLE_KINDS == tuple(dict.fromkeys(d.kind for d in vocab.TORCH_DECOMPOSITIONS.values()))
    assert not hasattr(importlib.import_module("orthofx.nn.meta"), "INPUTS")
    assert importlib.import_module("orthofx.graph.config").INPUTS is vocab.INPUTS


def test_metaspec_validates_and_stores_plain_strings() -> None:
    s = vocab.MetaSpec(vocab.Kind.SQRTM, vocab.MetaInput.FEATURES)
    assert type(s.kind) is str and type(s.input) is str
    assert s == vocab.MetaSpec("sqrtm", "features")
    assert json.dumps({"k": s.kind}) == '{"k": "sqrtm"}'
    assert vocab.MetaSpec.coerce(("eigh", "covariance")) == vocab.MetaSpec("eigh")
    with pytest.raises(ConfigError, match="kind"):
        vocab.MetaSpec("cholesky")
    with pytest.raises(ConfigError, match="input"):
        vocab.MetaSpec("eigh", "matrix")


class _Marked(nn.Module):
    orthofx_meta = vocab.MetaSpec("invsqrtm", "features")


class _DuckMarked(nn.Module):
    orthofx_meta = SimpleNamespace(kind="sqrtm", input="features")


def test_one_meta_layer_test_for_nn_graph_and_monitor() -> None:
    from orthofx.nn import CovariancePooling, StableDecomposition, is_meta_layer

    assert is_meta_layer is vocab.is_meta_layer
    for m in (_Marked(), _DuckMarked(), CovariancePooling(4), StableDecomposition.for_target(torch.linalg.svd)):
        assert vocab.is_meta_layer(m)
    assert not vocab.is_meta_layer(nn.Linear(2, 2))
    assert vocab.meta_spec_of(_DuckMarked()) == vocab.MetaSpec("sqrtm", "features")
    # an instance refines its class's marker
    assert vocab.meta_spec_of(StableDecomposition.for_target(torch.linalg.svdvals)).kind == "svdvals"
    assert vocab.meta_spec_of(nn.Linear(2, 2)) is None


def test_str_enums_compare_as_their_values() -> None:
    assert vocab.Role.BATCH_SELECT == "batch-select" and str(vocab.Role.META) == "meta"
    assert vocab.POLAR_METHODS == ("auto", "svd", "eigh", "ns", "polar_express")
    assert vocab.SN_METHODS == ("exact", "power")
    assert vocab.OW_TARGETS == ("weight", "generator")


def test_one_ow_method_enum() -> None:
    """Issue 24: the OW method names have one enum (vocab.OWMethod, no second OWMethod in the
    treatments), which register_orthogonal takes and stores as its plain value."""
    import orthofx.treatments.weight as weight
    from orthofx.treatments import register_orthogonal

    assert weight.OWMethod is vocab.OWMethod
    lin = nn.Linear(4, 3)
    assert register_orthogonal(lin, method=vocab.OWMethod.CAYLEY)
    assert lin.parametrizations.weight[0].method == "cayley"
    assert type(lin.parametrizations.weight[0].method) is str
    w = lin.weight.detach().double()  # a float32 orthogonal weight: W Wᵀ = I to float32 rounding
    torch.testing.assert_close(w @ w.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)
