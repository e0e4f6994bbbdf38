"""One idea: the walk from a meta-layer back to its Pre-SVD layer.

:class:`Walker` classifies every node once (:class:`Step`: its role on a walk and the one
input the walk continues through) and builds the *walk graph*: an edge ``source → node``
for every node that the walk may cross. Each node has at most one incoming walk edge, so
the ancestors of a meta-layer's input in the walk graph form a single path; the root of
that path is where the walk ends: a producer, or a node that stops it (with the reason).
A walk then only checks the phase rules along that path: before the covariance only ops
that act per channel or reshape, after it only ops that keep the matrix a (scaled,
shifted, symmetrised) covariance.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable

import networkx as nx
import torch.fx as fx
from torch import nn

from orthofx.graph.result import ProducerInfo
from orthofx.graph.symbolic import patterns as P
from orthofx.graph.symbolic.covariance import (
    covariance_of_product,
    einsum_gram,
    eps_value,
    is_mean_of,
    symmetrized_source,
)
from orthofx.graph.symbolic.nodes import (
    NodeGraph,
    arg_of,
    describe_target,
    first_arg,
    fmt_index,
    is_batch_index,
)
from orthofx.graph.symbolic.patterns import Patterns
from orthofx.graph.symbolic.step import INPUT, CovarianceOp, Step
from orthofx.graph.symbolic.trace import FUNCTION_KEY, function_of, user_class
from orthofx.vocab import ROLES_AFTER_COV, ROLES_BEFORE_COV, Role

__all__: list[str] = []  # internal module: import what you need by name


@dataclass
class WalkOutcome:
    """The result of one walk.

    Attributes:
        steps: the crossed steps, from where the walk ended (first) to the start (last).
        status: ``"producer"``, ``"stopped"`` or ``"input"`` (reached placeholder ``input_index``
            of a Function's forward).
        reason: why it stopped.
        have_cov: whether a covariance was crossed (or was already crossed before the start).
        direct: the producer's output is decomposed without a covariance (SVD of features).
        input_index: for ``"input"``, the placeholder index.
    """

    steps: list[Step]
    status: str
    reason: str = ""
    have_cov: bool = False
    direct: bool = False
    input_index: int | None = None

    @property
    def producer(self) -> ProducerInfo | None:
        return self.steps[0].producer if self.status == "producer" else None

    @property
    def stop_step(self) -> Step | None:
        return self.steps[0] if self.status == "stopped" and self.steps else None


_SHAPE_ONLY_SECOND_ARG = frozenset({"view_as", "reshape_as", "type_as"})


class Walker:
    """Classifies every node of a :class:`NodeGraph` and walks back from meta-layer inputs.

    Args:
        ng: the node graph.
        patterns: registries merged with the config.
    """

    def __init__(self, ng: NodeGraph, patterns: Patterns) -> None:
        self.ng = ng
        self.patterns = patterns
        self.leaf_modules = set(ng.info.leaf_modules)
        self.auto_leaves = {a.name for a in ng.info.auto_leaves}
        self.steps: dict[fx.Node, Step] = {}
        wg = nx.DiGraph()
        wg.add_nodes_from(ng.nodes)
        for n in ng.nodes:
            if n.op == "output":
                continue
            step = self._classify(n)
            self.steps[n] = step
            if step.source is not None:
                wg.add_edge(step.source, n)
        self.wg = wg

    # ================================================================== walking
    def path_to(self, start: fx.Node) -> list[fx.Node]:
        """The walk path ending at ``start``: root first (networkx ancestors in the walk graph)."""
        anc = nx.ancestors(self.wg, start)
        if not anc:
            return [start]
        root = next(n for n in anc if self.wg.in_degree(n) == 0)
        return nx.shortest_path(self.wg, root, start)

    def walk(self, start: Any, *, have_cov: bool, need_cov: bool,
             allow_direct: bool = False) -> WalkOutcome:
        """Walk back from ``start`` (a meta-layer's first argument).

        Args:
            have_cov: a covariance was already crossed (inside a Function's forward).
            need_cov: the meta-layer decomposes a covariance (input="covariance").
            allow_direct: accept a producer without a covariance (SVD of the features).
        """
        if not isinstance(start, fx.Node):
            return WalkOutcome([], "stopped", f"the meta-layer's input is a constant ({start!r})")
        path = self.path_to(start)
        after = need_cov and not have_cov  # walking on the covariance matrix (towards X Xᵀ)
        direct = False  # an SVD of the feature map itself (no covariance), allow_direct only
        crossed: list[Step] = []
        for node in reversed(path):
            step = self.steps[node]
            crossed.append(step)
            role = step.role
            if role == Role.COVARIANCE:
                if direct:
                    return self._stop(crossed, (
                        f"{step.text}: a covariance further up than a per-channel op on the "
                        f"decomposed matrix; not a recognised pattern"))
                if not after:
                    why = ("a second covariance" if need_cov else
                           "a covariance, but this meta-layer builds its own from features")
                    return self._stop(crossed, f"{step.text}: {why} on the way to the meta-layer")
                after = False
                have_cov = True
                continue
            if role == Role.PRODUCER:
                if after:
                    if allow_direct:
                        return WalkOutcome(list(reversed(crossed)), "producer", have_cov=have_cov,
                                           direct=True)
                    return self._stop(crossed, (
                        f"reached {step.text} without crossing a covariance (X Xᵀ, torch.cov, ...): "
                        f"the decomposed matrix is not recognised as a covariance of its output"))
                return WalkOutcome(list(reversed(crossed)), "producer", have_cov=have_cov,
                                   direct=direct)
            if role == INPUT:
                if self.ng.name:  # inside a Function's forward: continue outside
                    return WalkOutcome(list(reversed(crossed)), "input", have_cov=have_cov,
                                       input_index=step.index)
                return self._stop(crossed, step.reason)
            if role == Role.STOP:
                return self._stop(crossed, step.reason)
            allowed = ROLES_AFTER_COV if after else ROLES_BEFORE_COV
            if after and allow_direct and role not in allowed and role in ROLES_BEFORE_COV:
                after, direct = False, True  # svd(f(X)): decomposes the features directly
                allowed = ROLES_BEFORE_COV
            if role not in allowed:
                if after:
                    return self._stop(crossed, (
                        f"no covariance (X Xᵀ, torch.cov, ...) was recognised before {step.text} "
                        f"({role}), which is not an op on a covariance matrix (only scaling, "
                        f"+ εI, symmetrising, casts and reshapes are)"))
                return self._stop(crossed, (
                    f"{step.text} ({role}) acts on the feature map before the covariance; orthofx "
                    f"does not treat it as transparent there"))
            if step.source is None:  # defensive: a transparent step always has a source
                return self._stop(crossed, f"{step.text}: no input to continue from")
        raise AssertionError("walk path did not end at a root")  # pragma: no cover

    @staticmethod
    def _stop(crossed: list[Step], reason: str) -> WalkOutcome:
        return WalkOutcome(list(reversed(crossed)), "stopped", reason)

    # ================================================================== classification
    def _classify(self, n: fx.Node) -> Step:
        try:
            if n.op == "placeholder":
                idx = self.ng.placeholders.index(n)
                return Step(n, INPUT, text=f"input {n.target}", index=idx,
                            reason=f"reached the model input {n.target!r} without a weighted layer")
            if n.op == "get_attr":
                return Step(n, Role.STOP, text=f"self.{n.target}",
                            reason=f"reached the attribute {n.target!r}, not a weighted layer")
            if n.op == "call_module":
                return self._classify_module(n)
            if n.op == "call_function":
                return self._classify_function(n)
            if n.op == "call_method":
                return self._classify_method(n)
        except Exception as exc:  # noqa: BLE001 - never crash on an odd node; stop there instead
            return Step(n, Role.STOP, text=describe_target(n, self.ng),
                        reason=f"could not classify {describe_target(n, self.ng)}: {exc}")
        return Step(n, Role.STOP, text=n.op, reason=f"unexpected node {n.op}")

    # -- helpers --------------------------------------------------------------------
    def _other_data(self, n: fx.Node, src: Any, exempt: Iterable[Any] = ()) -> list[fx.Node]:
        """Data nodes among ``n``'s inputs other than ``src``."""
        exempt = set(exempt)
        return [a for a in n.all_input_nodes
                if a is not src and a not in exempt and self.ng.is_data(a)]

    def _transparent(self, n: fx.Node, role: str, src: Any, text: str,
                     exempt: Iterable[Any] = ()) -> Step:
        if not isinstance(src, fx.Node) or not self.ng.is_data(src):
            return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
        others = self._other_data(n, src, exempt)
        if others:
            return Step(n, Role.STOP, text=text,
                        reason=f"{text} mixes in another tensor ({others[0].name})")
        return Step(n, role, src, text)

    # -- modules ----------------------------------------------------------------------
    def _classify_module(self, n: fx.Node) -> Step:
        target = str(n.target)
        mod = self.ng.module(target)
        text = describe_target(n, self.ng)
        rule = self.patterns.module_rule(mod, target)
        if rule.role == Role.META:
            return Step(n, Role.STOP, text=text,
                        reason=f"it is the output of another meta-layer ({text})")
        if rule.role == Role.PRODUCER:
            src = n.args[0] if n.args else None
            if not self.ng.is_data(src):
                return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
            return Step(n, Role.PRODUCER, None, text,
                        producer=self._module_producer(n, mod))
        if rule.role == Role.STOP and (target in self.leaf_modules):
            how = ("made a leaf automatically because it cannot be traced"
                   if target in self.auto_leaves else "a leaf by AnalysisConfig.leaf_modules")
            return Step(n, Role.STOP, text=text,
                        reason=f"{text} is an opaque leaf ({how}); its contents are not analysed")
        if rule.role == Role.STOP:
            return Step(n, Role.STOP, text=text, reason=f"{text}: {rule.reason}")
        src = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        return self._transparent(n, rule.role, src, text)

    def _module_producer(self, n: fx.Node, mod: nn.Module) -> ProducerInfo:
        target = str(n.target)
        w = mod.weight
        shape = tuple(int(s) for s in w.shape)
        groups = int(getattr(mod, "groups", 1))
        cls = user_class(mod)  # not the generated Parametrized* subclass
        return ProducerInfo(
            name=target, type=cls.__name__, param=f"{target}.weight",
            weight_shape=shape, flat_shape=(shape[0], math.prod(shape[1:])),
            node=n.name, form="module", op=cls.__name__, groups=groups,
        )

    # -- functions --------------------------------------------------------------------
    def _classify_function(self, n: fx.Node) -> Step:
        t = n.target
        text = describe_target(n, self.ng)
        pats = self.patterns
        cls = function_of(t) or n.meta.get(FUNCTION_KEY)
        if cls is not None:
            if cls in pats.config.meta_autograd_functions:
                return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} is a custom autograd.Function kept as a leaf; the walk does not cross it "
                f"(register it in AnalysisConfig.transparent_functions if it acts per channel)"))
        if pats.meta_for_function(t) is not None:
            return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
        if t in pats.transparent_functions:
            return self._transparent(n, pats.transparent_functions[t], first_arg(n), text)
        if t in P.FUNCTIONAL_PRODUCERS:
            return self._functional_producer(n, text)
        if t in P.MATMUL_FUNCTIONS:
            return self._matmul(n, n.args[0], n.args[1], text)
        if t in P.EINSUM_FUNCTIONS:
            return self._einsum(n, text)
        if t in P.TORCH_COV_FUNCTIONS:
            return self._cov_function(n, "torch.cov", text, centered=True, scaled=True)
        if t in pats.covariance_functions:
            name = pats.covariance_functions[t]
            eps = n.kwargs.get("eps")
            return self._cov_function(n, name, text, centered=name.startswith("orthofx"),
                                      scaled=name.startswith("orthofx"),
                                      eps=float(eps) if isinstance(eps, (int, float)) and eps else None)
        if t in P.ARITHMETIC_FUNCTIONS:
            return self._arith(n, P.ARITHMETIC_FUNCTIONS[t], arg_of(n, 0, "input"),
                               arg_of(n, 1, "other"), text)
        if t is operator.getitem:
            return self._getitem(n, text)
        if t is builtins.getattr:
            attr = n.args[1]
            if attr in P.TRANSPOSE_ATTRIBUTES:
                return self._transparent(n, Role.RESHAPE, n.args[0], text)
            if attr in P.IDENTITY_ATTRIBUTES:
                return self._transparent(n, Role.CAST, n.args[0], text)
            return Step(n, Role.STOP, text=text, reason=f"attribute {attr!r} is not a tensor op the walk knows")
        if t in P.STOP_FUNCTIONS:
            return self._known_stop(n, P.STOP_FUNCTIONS[t], text)
        if t in P.MEAN_FUNCTIONS:
            return Step(n, Role.STOP, text=text, reason=f"{text} reduces over a dimension (may average channels)")
        return Step(n, Role.STOP, text=text, reason=(
            f"unknown function {text}; if it acts per channel or only reshapes, add it to "
            f"AnalysisConfig.transparent_functions"))

    def _known_stop(self, n: fx.Node, reason: str, text: str) -> Step:
        others = [a.name for a in n.all_input_nodes if self.ng.is_data(a)]
        shown = ", ".join(others[:3]) + (f", ... {len(others) - 3} more" if len(others) > 3 else "")
        extra = f" ({shown})" if len(others) > 1 else ""
        return Step(n, Role.STOP, text=text, reason=f"{text}: {reason}{extra}")

    def _getitem(self, n: fx.Node, text: str) -> Step:
        src, idx = n.args[0], n.args[1]
        if isinstance(src, fx.Node) and (src.op == "call_function" and (
                self.patterns.meta_for_function(src.target) is not None or function_of(src.target))
                or src.op == "call_method" and src.target in self.patterns.meta_methods):
            return Step(n, Role.STOP, text=text, reason=f"it is an output of another meta-layer ({src.name})")
        if is_batch_index(idx):
            return self._transparent(n, Role.BATCH_SELECT, src, f"{text}[{fmt_index(idx)}]")
        return Step(n, Role.STOP, text=text, reason=(
            f"indexing [{fmt_index(idx)}] may select a subset of channels; orthofx only crosses "
            f"indexing of the leading (batch) dimension"))

    def _functional_producer(self, n: fx.Node, text: str) -> Step:
        name, widx = P.FUNCTIONAL_PRODUCERS[n.target]
        src = arg_of(n, 0, "input")
        w = arg_of(n, widx, "weight")
        if not self.ng.is_data(src):
            return Step(n, Role.STOP, text=text, reason=f"{text} is applied to a constant")
        if self.ng.is_data(w):
            return Step(n, Role.STOP, text=text, reason=f"{text} has a data-dependent weight ({getattr(w, 'name', w)})")
        found = self.ng.param_of(w, allow_transpose=False)
        if found is None or found[0] != "param":
            what = "a buffer" if found is not None else "computed, not an nn.Parameter"
            return Step(n, Role.STOP, text=text, reason=(
                f"the weight of {text} is {what}; the walk stops at the nearest weighted layer"))
        _, qual, _ = found
        param = self.ng.weight(qual)
        shape = tuple(int(s) for s in param.shape)
        groups = arg_of(n, 6, "groups") if name.startswith("conv") else 1
        owner = qual.rsplit(".", 1)[0] if "." in qual else ""
        info = ProducerInfo(
            name=owner, type=self.ng.module_type(owner), param=qual, weight_shape=shape,
            flat_shape=(shape[0], math.prod(shape[1:])), node=n.name, form="functional",
            op=f"F.{name}", groups=int(groups) if isinstance(groups, int) else 1,
        )
        return Step(n, Role.PRODUCER, None, text, producer=info)

    def _matmul(self, n: fx.Node, a: Any, b: Any, text: str) -> Step:
        cov = covariance_of_product(self.ng, n, a, b)
        if cov is not None:
            src, op = cov
            return Step(n, Role.COVARIANCE, src, f"{text} ({op.expression})", cov=op)
        da, db = self.ng.is_data(a), self.ng.is_data(b)
        if da and db:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies two different tensors ({a.name}, {b.name}); not a covariance "
                f"of one feature map"))
        if not da and not db:
            return Step(n, Role.STOP, text=text, reason=f"{text} of constants")
        data, weight = (a, b) if da else (b, a)
        found = self.ng.param_of(weight)
        if found is None:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by a computed constant matrix, not an nn.Parameter"))
        kind, qual, parity = found
        if kind != "param":
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by the buffer {qual!r}, a fixed (non-trainable) linear map"))
        param = self.ng.weight(qual)
        if param.dim() != 2:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} multiplies by the {param.dim()}-d parameter {qual!r}; only 2-d weights "
                f"are supported Pre-SVD layers"))
        shape = (int(param.shape[0]), int(param.shape[1]))
        # data on the left: X @ E, E (in, out) = W if parity 0 (stored transposed) else Wᵀ
        transposed = (parity == 0) if da else (parity == 1)
        flat = (shape[1], shape[0]) if transposed else shape
        owner = qual.rsplit(".", 1)[0] if "." in qual else ""
        info = ProducerInfo(
            name=owner, type=self.ng.module_type(owner), param=qual, weight_shape=shape,
            flat_shape=flat, node=n.name, form="functional", op="matmul", transposed=transposed,
        )
        return Step(n, Role.PRODUCER, None, text, producer=info)

    def _einsum(self, n: fx.Node, text: str) -> Step:
        eq = n.args[0] if n.args else None
        ops = list(n.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        gram = einsum_gram(self.ng, eq, ops)
        if gram is not None:
            src, op = gram
            return Step(n, Role.COVARIANCE, src, f"{text} ({eq})", cov=op)
        data_ops = [o for o in ops if self.ng.is_data(o)]
        if len(data_ops) == 1 and len(ops) == 2:
            return Step(n, Role.STOP, text=text, reason=(
                f"{text} with a weight operand is not a recognised Pre-SVD layer (use F.linear, "
                f"matmul or a module)"))
        return Step(n, Role.STOP, text=text, reason=(
            f"{text} ({eq!r}) is not recognised as X Xᵀ of one feature map"))

    def _cov_function(self, n: fx.Node, form: str, text: str, *, centered: bool,
                      scaled: bool, eps: float | None = None) -> Step:
        src = first_arg(n)
        step = self._transparent(n, Role.COVARIANCE, src, text)
        if step.role == Role.COVARIANCE:
            step = dataclasses.replace(step, cov=CovarianceOp(
                form=form, expression=f"{form}(X)", centered=centered, scaled=scaled, eps=eps))
        return step

    # -- arithmetic ------------------------------------------------------------------
    def _arith(self, n: fx.Node, op: str, a: Any, b: Any, text: str) -> Step:
        if op in ("neg", "pos"):
            return self._transparent(n, Role.SCALE, a, text)
        if op == "rsub":
            a, b, op = b, a, "sub"
        da, db = self.ng.is_data(a), self.ng.is_data(b)
        if da and not db:
            role = {"add": Role.SHIFT, "sub": Role.SHIFT, "mul": Role.SCALE, "div": Role.SCALE,
                    "pow": Role.POINTWISE}[op]
            step = self._transparent(n, role, a, text)
            if role == Role.SHIFT and step.role == Role.SHIFT:
                step = dataclasses.replace(step, eps=eps_value(b, negate=(op == "sub"), gm=self.ng.gm))
            return step
        if db and not da:
            role = {"add": Role.SHIFT, "sub": Role.SHIFT, "mul": Role.SCALE,
                    "div": Role.POINTWISE, "pow": Role.POINTWISE}[op]
            step = self._transparent(n, role, b, text)
            if role == Role.SHIFT and step.role == Role.SHIFT and op == "add":
                step = dataclasses.replace(step, eps=eps_value(a, gm=self.ng.gm))
            return step
        if not da and not db:
            return Step(n, Role.STOP, text=text, reason=f"{text} of constants")
        # both operands carry data
        if a is b:
            role = {"add": Role.SCALE, "mul": Role.POINTWISE, "div": Role.POINTWISE,
                    "pow": Role.POINTWISE, "sub": Role.STOP}[op]
            if role == Role.STOP:
                return Step(n, Role.STOP, text=text, reason=f"{text}: x - x is zero")
            return Step(n, role, a, text)
        if op == "sub":
            if is_mean_of(b, a):
                return Step(n, Role.CENTER, a, f"{text} (x - mean(x))")
        if op == "add":
            x = symmetrized_source(self.ng, a, b)
            if x is not None:
                return Step(n, Role.SYMMETRIZE, x, f"{text} (A + Aᵀ)")
        verb = {"add": "adds", "sub": "subtracts", "mul": "multiplies by", "div": "divides by",
                "pow": "raises to"}[op]
        other = b if op != "div" or da else a
        return Step(n, Role.STOP, text=text, reason=(
            f"{text} {verb} another tensor ({getattr(other, 'name', other)}; "
            f"{a.name} and {b.name} are both data)"))

    # -- methods ----------------------------------------------------------------------
    def _classify_method(self, n: fx.Node) -> Step:
        t = str(n.target)
        text = describe_target(n, self.ng)
        pats = self.patterns
        self_arg = n.args[0] if n.args else None
        if t in pats.meta_methods:
            return Step(n, Role.STOP, text=text, reason=f"it is the output of another meta-layer ({text})")
        if t in pats.transparent_methods:
            exempt = n.args[1:2] if t in _SHAPE_ONLY_SECOND_ARG else ()
            return self._transparent(n, pats.transparent_methods[t], self_arg, text, exempt=exempt)
        if t in P.MATMUL_METHODS:
            return self._matmul(n, self_arg, arg_of(n, 1, "other"), text)
        if t in P.ARITHMETIC_METHODS:
            return self._arith(n, P.ARITHMETIC_METHODS[t], self_arg, arg_of(n, 1, "other"), text)
        if t in P.STOP_METHODS:
            return Step(n, Role.STOP, text=text, reason=f"{text}: {P.STOP_METHODS[t]}")
        if t in P.MEAN_METHODS:
            return Step(n, Role.STOP, text=text, reason=f"{text} reduces over a dimension (may average channels)")
        return Step(n, Role.STOP, text=text, reason=(
            f"unknown method {text}; if it acts per channel or only reshapes, add {t!r} to "
            f"AnalysisConfig.transparent_methods"))
