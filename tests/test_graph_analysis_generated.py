"""Property tests: analyze() on generated models finds exactly the planted Pre-SVD layers.

Example counts come from the loaded Hypothesis profile (tests/conftest.py): "ci" by default,
HYPOTHESIS_PROFILE=slow for many more.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthofx.graph import analyze
from orthofx.report import MetaLayerEntry, SkippedEntry
from orthofx.testing import (
    DISTRACTORS,
    META_KINDS,
    GeneratedModel,
    generated_models,
    model_fingerprint,
)
from orthofx.testing.fingerprint import close

# deadline/health checks only: the number of examples comes from the loaded profile
_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                           HealthCheck.data_too_large])


def _entries_by_head(report, model: GeneratedModel) -> dict[int, MetaLayerEntry | SkippedEntry]:
    out: dict[int, MetaLayerEntry | SkippedEntry] = {}
    for e in [*report.entries, *report.skipped]:
        head = e.scope.split(".")
        assert head[0] == "heads", f"meta-layer outside a head: {e}"
        i = int(head[1])
        assert i not in out, f"two meta-layers found for head {i}: {out[i]} and {e}"
        out[i] = e
    return out


@_settings
@given(generated_models())
def test_producers_equal_planted_set(model: GeneratedModel) -> None:
    report = analyze(model, config=model.analysis_config)
    truth = model.truth
    assert set(report.producers) == truth.producers, f"{model.specs}\n{report}"
    assert not report.auto_leaves, report
    by_head = _entries_by_head(report, model)
    assert sorted(by_head) == list(range(truth.n_meta)), report
    for i, expected in enumerate(truth.heads):
        got = by_head[i]
        assert got.kind == expected.kind, (model.specs[i], got)
        assert got.usage == expected.usage, (model.specs[i], got)
        if expected.producer is None:
            assert isinstance(got, SkippedEntry), (model.specs[i], got)
            assert expected.reason in got.reason, (model.specs[i], got.reason)
            continue
        assert isinstance(got, MetaLayerEntry), (model.specs[i], got, str(report))
        assert got.producer.name == expected.producer
        assert got.producer.param == expected.param
        # the reported weight is the real parameter, flattened as (out, in·k·k)
        w = model.get_parameter(got.producer.param)
        assert got.producer.weight_shape == tuple(w.shape)
        out_dim = w.shape[1] if got.producer.transposed else w.shape[0]
        assert got.producer.flat_shape == (out_dim, w.numel() // out_dim)
        assert got.covariance.form == expected.covariance, (model.specs[i], got.covariance)
        if expected.centered is not None:
            assert got.covariance.centered == expected.centered, (model.specs[i], got.covariance)
        if expected.eps is not None:
            assert (got.covariance.eps is not None) == expected.eps, (model.specs[i], got.covariance)
            if expected.eps:
                assert got.covariance.eps == pytest.approx(1e-3)
        # the chain starts at the producer and ends at the meta-layer
        assert got.chain[0].role == "producer" and got.chain[-1].role == "meta"
    json.dumps(report.to_dict())
    assert str(report)


@pytest.mark.slow
@_settings
@given(generated_models(max_heads=2))
def test_analyze_leaves_model_untouched(model: GeneratedModel) -> None:
    torch.manual_seed(0)
    before = model_fingerprint(model, model.example_inputs)
    report = analyze(model, model.example_inputs, config=model.analysis_config)
    after = model_fingerprint(model, model.example_inputs)
    assert before.diff(after) == []
    assert set(report.producers) == model.truth.recorded_producers
    analyze(model, config=model.analysis_config)  # the symbolic analysis is pure too
    assert before.diff(model_fingerprint(model, model.example_inputs)) == []
    # the traced GraphModule computes the same outputs and gradients (Function backward kept);
    # in float64, so that ill-conditioned eigen-gradients do not amplify rounding noise
    twin = copy.deepcopy(model).double()
    gm = analyze(twin, config=model.analysis_config).graph_module
    x = model.example_inputs[0].double()
    torch.manual_seed(0)
    expected = twin(x)
    torch.manual_seed(0)
    got = gm(x)
    assert close(got, expected)
    model = twin
    params = [p for p in model.parameters()]
    g1 = torch.autograd.grad(expected.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(got.sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g1, g2):
        assert close(a, b), name


@_settings
@given(generated_models(distractors=True, max_ops=8), st.booleans())
def test_analyze_never_crashes(model: GeneratedModel, with_inputs: bool) -> None:
    report = analyze(model, model.example_inputs if with_inputs else None,
                     config=model.analysis_config)
    # one entry per (meta-layer, producer): count meta-layers by node
    assert len({e.node for e in report.entries} | {s.node for s in report.skipped}) == model.truth.n_meta
    assert report.to_dot().startswith("digraph")
    json.dumps(report.to_dict())


@pytest.mark.parametrize("meta", META_KINDS)
def test_every_meta_kind_is_generated_and_found(meta: str) -> None:
    """Each planted meta-layer kind, once without distractors (deterministic draw)."""
    strategy = generated_models(max_heads=1, meta_kinds=[meta], distractors=False)
    model = _draw(strategy)
    if model.specs[0].meta != meta:
        pytest.skip(f"{meta} not available here")
    report = analyze(model, config=model.analysis_config)
    assert set(report.producers) == model.truth.producers, report
    assert len(report.entries) == 1


@pytest.mark.parametrize("distractor", sorted(DISTRACTORS))
def test_every_distractor_stops_the_walk(distractor: str) -> None:
    from orthofx.testing import Op, PlantedTruth, head_truth
    from orthofx.testing.models import HeadSpec
    from orthofx.graph import AnalysisConfig

    arg = 1 if distractor in ("distract_cat", "distract_softmax") else (4 if distractor == "opaque" else None)
    form = "module" if distractor == "opaque" else "function"
    ch = 8 if distractor == "distract_cat" else (3 if distractor == "distract_slice" else 4)
    spec = HeadSpec(producer="conv2d", producer_form="module", channels=4,
                    pre=(Op(distractor, form, arg), Op("relu", "method"), Op("flatten", "method")),
                    cov="matmul", post=("eps",), meta="eigh", use="sqrt", layout="NCM",
                    cov_channels=ch, distractor=distractor)
    truth = PlantedTruth((head_truth(spec, 0),))
    cfg = AnalysisConfig(leaf_modules=("OpaqueBlock",)) if distractor == "opaque" else None
    model = GeneratedModel(3, 4, [spec], truth, cfg)
    model(*model.example_inputs)  # the planted model runs
    report = analyze(model, config=cfg)
    assert report.producers == []
    assert len(report.skipped) == 1
    assert DISTRACTORS[distractor] in report.skipped[0].reason
    assert report.skipped[0].stop_node is not None


def _draw(strategy):
    """Draw one (the simplest) example deterministically, outside @given."""
    from hypothesis import find

    return find(strategy, lambda m: True, settings=settings(database=None, derandomize=True,
                                                             max_examples=1))
