"""orthofx.graph.symbolic (nodes, walk, covariance): the networkx node graph, data dependence, the walk graph, helpers."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

from orthofx.graph import trace
from orthofx.graph.symbolic.covariance import einsum_is_gram as _einsum_is_gram
from orthofx.graph.symbolic.nodes import NodeGraph
from orthofx.graph.symbolic.nodes import is_batch_index as _is_batch_index
from orthofx.graph.symbolic.nodes import swaps_last_two as _swaps_last_two
from orthofx.graph.symbolic.patterns import Patterns
from orthofx.graph.symbolic.walk import Walker
from orthofx.vocab import Role


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("shift", torch.ones(1, 4, 1, 1))

    def forward(self, x):
        y = torch.relu(self.conv(x)) + self.shift
        y = y.flatten(2)
        c = y.shape[1]
        eye = torch.eye(c, device=y.device)
        cov = y @ y.mT / y.size(-1) + 1e-3 * eye
        return torch.linalg.eigvalsh(cov)


def _graph():
    gm = trace(Small())
    ng = NodeGraph(gm)
    return gm, ng, {n.name: n for n in gm.graph.nodes}


def test_node_graph_mirrors_the_fx_graph() -> None:
    gm, ng, by = _graph()
    assert isinstance(ng.G, nx.DiGraph)
    assert ng.G.number_of_nodes() == len(gm.graph.nodes)
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            assert ng.G.has_edge(inp, n)
    assert nx.is_directed_acyclic_graph(ng.G)


def test_data_dependence_ignores_shape_only_paths() -> None:
    _, ng, by = _graph()
    assert ng.is_data(by["x"]) and ng.is_data(by["conv"]) and ng.is_data(by["matmul"])
    # eye(c) depends on x only through its shape/device: a constant for the walk
    assert not ng.is_data(by["eye"])
    assert not ng.is_data(by["shift"])  # a buffer
    assert not ng.is_data(by["getattr_1"])  # y.shape
    assert not ng.is_data(1.0)


def test_walk_graph_gives_one_path_per_meta_input() -> None:
    _, ng, by = _graph()
    w = Walker(ng, Patterns())
    assert all(w.wg.in_degree(n) <= 1 for n in w.wg.nodes)
    path = w.path_to(by["add_1"])
    assert [n.name for n in path] == ["conv", "relu", "add", "flatten", "matmul", "truediv", "add_1"]
    roles = [w.steps[n].role for n in path]
    assert roles == [Role.PRODUCER, Role.ACTIVATION, Role.SHIFT, Role.RESHAPE, Role.COVARIANCE,
                     Role.SCALE, Role.SHIFT]
    out = w.walk(by["add_1"], have_cov=False, need_cov=True)
    assert out.status == "producer" and out.producer.name == "conv"
    assert w.steps[by["add_1"]].eps == pytest.approx(1e-3)


def test_walk_phase_rules() -> None:
    _, ng, by = _graph()
    w = Walker(ng, Patterns())
    # a meta-layer taking features (no covariance expected) must not cross one
    out = w.walk(by["add_1"], have_cov=False, need_cov=False)
    assert out.status == "stopped" and "builds its own" in out.reason
    # starting below the covariance without expecting one is fine
    out = w.walk(by["flatten"], have_cov=False, need_cov=False)
    assert out.status == "producer"
    # expecting a covariance but never crossing one
    out = w.walk(by["flatten"], have_cov=False, need_cov=True)
    assert out.status == "stopped" and "no covariance" in out.reason
    # ... unless the decomposition is an SVD, which may act on the features directly
    out = w.walk(by["flatten"], have_cov=False, need_cov=True, allow_direct=True)
    assert out.status == "producer" and out.direct


@pytest.mark.parametrize("eq, ok", [
    ("bcm,bdm->bcd", True), ("nc,nd->cd", True), ("bmc,bmd->bcd", True), ("cm,dm->cd", True),
    ("...cm,...dm->...cd", True), ("cm, dm -> cd", True), ("cm,dm", True),
    ("bcm,bdm->bcdm", False), ("cm,cm->c", False), ("cm,dn->cd", False), ("cc,dc->cd", False),
    ("bcm,bdm->b", False), ("cm,md->cd", False),
])
def test_einsum_gram_equations(eq: str, ok: bool) -> None:
    assert _einsum_is_gram(eq) is ok


def test_index_and_permute_helpers() -> None:
    assert _is_batch_index(0) and _is_batch_index((0, Ellipsis)) and _is_batch_index(slice(None))
    assert _is_batch_index((slice(0, 2), slice(None), slice(None)))
    assert not _is_batch_index((slice(None), slice(1, None)))
    assert not _is_batch_index((slice(None), 0))
    assert _swaps_last_two((0, 2, 1)) and _swaps_last_two((1, 0)) and _swaps_last_two((0, 1, -1, -2))
    assert not _swaps_last_two((1, 0, 2)) and not _swaps_last_two((0, 2, 3, 1))


def test_step_fields_are_typed() -> None:
    """A Step's role data are typed fields (not an untyped ``info`` dict), and the walk and the
    covariance recognition share it from its own module."""
    import typing

    import torch.fx as fx

    from orthofx.graph.result import ProducerInfo
    from orthofx.graph.symbolic import covariance, walk
    from orthofx.graph.symbolic.step import CovarianceOp, Step

    assert walk.Step is Step and covariance.Step is Step
    assert typing.get_type_hints(Step) == {
        "node": fx.Node, "role": str, "source": fx.Node | None, "text": str, "reason": str,
        "producer": ProducerInfo | None, "cov": CovarianceOp | None, "eps": float | bool | None,
        "index": int | None,
    }
