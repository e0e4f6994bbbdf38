"""κ of meta-layers that are not orthofx modules: the covariance is captured where it is formed.

The analysis (:func:`orthofx.graph.recorded.record.record` + :func:`orthofx.graph.recorded.discover.find`) runs
the model once and names every meta-layer by the module path where it runs
(:func:`orthofx.report.meta_layer_name`). For each one it knows the recorded op that forms
its covariance ``P = c·Σ`` (``X Xᵀ``, ``X J Xᵀ``, ``q kᵀ``; ``c > 0`` the scale the layer
applies afterwards, e.g. ``1/M``) as the ``k``-th call of that ATen op in the forward. On a
recorded step, :class:`CovarianceCapture` — a ``TorchDispatchMode`` entered by a forward
pre-hook of the model and left by its forward hook — counts those ops and keeps a detached
device copy of the ``k``-th output (no host sync). At the flush the copies are symmetrised,
cast to float64 and decomposed (``eigvalsh``), and summarised in every κ convention of
:mod:`orthofx.monitor.spectrum` with ``ε = None``: the shift a user layer adds (``+ εI``,
a clamp) is not known, so ``kappa`` is κ(Σ), not κ(Σ + εI), and the record's ``eps`` is None.
κ, ``kappa_range``, ``kappa_paper`` and ``rank`` are scale-free, so ``c`` does not matter;
``lambda_max``/``lambda_min`` are those of ``P``. ``u`` is that of ``P``'s dtype (the dtype Σ
was formed in; the decomposition is float64).

This works whatever computes the matrix function (raw ``torch.linalg``, a Newton–Schulz loop,
a custom ``autograd.Function`` with a hand-written backward): only the covariance is read, and
the model is not changed. It assumes that the training-mode forward runs the same sequence of
ATen ops as the analysed one (data-dependent control flow that changes how often the op
runs before the covariance breaks it; a copy of another size is dropped and counted).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CaptureSite", "Discovery", "CovarianceCapture", "find_capture_sites", "discovery_from_plan",
           "covariance_eigenvalues"]

#: at most this many covariance copies are kept per meta-layer and recorded step
MAX_CAPTURES = 64


@dataclass
class CaptureSite:
    """A meta-layer whose covariance is captured.

    Attributes:
        name: its one name (the module path where it runs, :func:`orthofx.report.meta_layer_name`).
        op: the ATen op (overload packet name) that forms the covariance (``"bmm"``).
        calls: which calls of ``op`` in the forward (0-based, over the whole forward) form it.
        size: n of its n×n matrices.
        node: the recorded covariance node (``"bmm_25"``), detail.
        meta_node: the recorded node of the matrix function (``"_linalg_eigh_20"``), detail.
        kind: the matrix function found (``"eigh"``, ``"ns_sqrt"``, ...).
    """

    name: str
    op: str
    calls: tuple[int, ...]
    size: int
    node: str
    meta_node: str
    kind: str


@dataclass
class Discovery:
    """What the analysis of one forward found: the capture sites, the meta-layers owned by
    orthofx modules (monitored through their eigenvalues), those that cannot be monitored
    (name → reason) and a one-line summary of the analysis."""

    sites: list[CaptureSite] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)  # name → owning orthofx module path
    skipped: dict[str, str] = field(default_factory=dict)
    found: str = ""


def find_capture_sites(model: nn.Module, example_inputs: Any, config: Any = None, *,
                       kwargs: dict[str, Any] | None = None) -> Discovery:
    """Analyse one forward of ``model`` on ``example_inputs`` (and keyword inputs ``kwargs``;
    the model is left as it was) and return where each meta-layer's covariance can be captured."""
    from orthofx.graph.config import resolve_analysis_config
    from orthofx.graph.recorded.ops import CovForm, NodeKind
    from orthofx.graph.recorded.discover import discover_recording, find, meta_owner, site_index
    from orthofx.graph.recorded.record import record
    from orthofx.graph.state import TRACE_LOCK

    cfg = resolve_analysis_config(config)
    with TRACE_LOCK:
        rec = record(model, example_inputs, kwargs=kwargs)
    metas, plain = find(rec, cfg)
    report = discover_recording(rec, cfg, found=(metas, plain))
    by_node = {e.node: e.name for e in [*report.entries, *report.skipped]}
    out = Discovery()
    ordinal: dict[int, int] = {}  # node index → its call number among the ops of its name
    wanted_ops = {rec.nodes[i].op for m in metas for i in m.covs}
    counts: dict[str, int] = {}
    for n in rec.nodes:
        if n.op in wanted_ops and n.kind is NodeKind.OP:
            ordinal[n.index] = counts.get(n.op, 0)
            counts[n.op] = ordinal[n.index] + 1
    for m in metas:
        site = rec.nodes[site_index(m)]
        name = by_node.get(f"{site.op}_{site.index}", site.module)
        owner = meta_owner(rec, site.module)
        if owner != site.module or _is_meta_path(rec, site.module):
            out.modules[name] = owner
            continue
        cov = rec.nodes[m.cov.node]
        shape = cov.shape or ()
        if m.cov.form is CovForm.CROSS:
            out.skipped[name] = (f"its matrix {m.cov.expression} ({cov.op}_{cov.index}) is a cross-covariance, "
                                 f"not symmetric: κ of a covariance (eigenvalues of Σ) does not apply")
            continue
        if len(shape) < 2 or shape[-1] != shape[-2]:
            # a batched product folded into one mm: the matrix is a view of its output
            out.skipped[name] = (f"its covariance ({cov.op}_{cov.index}, shape {tuple(shape)}) is not a "
                                 f"batch of square matrices as formed")
            continue
        calls = tuple(ordinal[i] for i in m.covs)
        out.sites.append(CaptureSite(name, cov.op, calls, int(shape[-1]), f"{cov.op}_{cov.index}",
                                     f"{site.op}_{site.index}", str(m.region.kind)))
    if metas:
        out.found = (f"the analysis of one training forward found {len(metas)} meta-layer(s): "
                     + ", ".join(dict.fromkeys(by_node.values())))
    else:
        why = next((x for x in report.notes if x.startswith("no meta-layer found: ")), "")
        out.found = "the analysis of one training forward found no meta-layer" + (
            f" ({why[len('no meta-layer found: '):]})" if why else "")
    return out


#: namespaces of the callables a transformed model's graph may call and stay transparent to the
#: symbolic analysis (their ops are graph nodes that analysis saw)
_TRANSPARENT_NAMESPACES = ("torch", "_operator", "operator", "builtins", "math")


def _transparent_function(target: Any) -> bool:
    """A graph's call_function target whose ops the symbolic analysis sees: a torch, operator
    or builtins callable; not an ``autograd.Function``'s ``apply`` (kept as one opaque node),
    a non-ATen custom op or a user function wrapped as a leaf."""
    owner = getattr(target, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return False
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return getattr(target, "namespace", None) == "aten"
    mod = getattr(target, "__module__", None) or ""
    return mod.split(".")[0] in _TRANSPARENT_NAMESPACES


def _transparent_module(m: nn.Module) -> bool:
    """A leaf the graph calls whose forward holds no meta-layer the monitor would miss: an
    orthofx meta-layer module (monitored through its eigenvalues), or a module whose whole
    subtree is torch.nn classes and orthofx's own library modules (not user model code)."""
    from orthofx.nn.meta import is_meta_layer

    if is_meta_layer(m):
        return True
    if isinstance(m, torch.fx.GraphModule):
        return _transparent_graph(m)
    for sub in m.modules():
        mod = type(sub).__module__
        if is_meta_layer(sub):
            continue
        if not (mod.startswith("torch.nn.") or (mod.startswith("orthofx.")
                                                 and not mod.startswith(("orthofx.experiment", "orthofx.models")))):
            return False
    return True


def _transparent_graph(gm: torch.fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op == "call_function" and not _transparent_function(n.target):
            return False
        if n.op == "call_module":
            try:
                sub = gm.get_submodule(str(n.target))
            except AttributeError:
                return False
            if not _transparent_module(sub):
                return False
    return True


def discovery_from_plan(model: nn.Module, monitored: set[str]) -> Discovery | None:
    """What the analysis of a training forward would find, read from the analysis that
    :func:`orthofx.transform` stored with ``model`` instead of running the model — only when
    that analysis provably saw every meta-layer and each one is an orthofx module the monitor
    already watches (``monitored``: their names), i.e. there is nothing to capture. Else None
    (the monitor then runs the analysis).

    "Provably saw": the model is the GraphModule ``transform`` returned (its forward is its
    graph), the stored analysis is not partial and made no automatic leaves, and every node
    of the graph is transparent — torch/operator callables and tensor methods, and leaves
    that are orthofx meta-layers or torch.nn/orthofx library modules (no ``autograd.Function``,
    no user leaf or wrapped function, whose inside the symbolic analysis cannot see)."""
    from orthofx.pipeline import META_KEY, _stored_meta, unwrap

    root = unwrap(model)
    if not isinstance(root, torch.fx.GraphModule):
        return None
    meta = _stored_meta(root)
    if meta is None:
        return None
    report = meta[META_KEY].get("report") or {}
    analysis = report.get("analysis") or {}
    if analysis.get("partial", True) or analysis.get("auto_leaves") or analysis.get("skipped"):
        return None
    names = [e.get("name") for e in analysis.get("entries", [])]
    if not names or any(n not in monitored for n in names) or not _transparent_graph(root):
        return None
    names = list(dict.fromkeys(names))
    return Discovery(modules={n: n for n in names},
                     found=(f"the analysis stored by orthofx.transform found {len(names)} meta-layer(s), all "
                            f"orthofx modules (nothing to capture): " + ", ".join(names)))


def _is_meta_path(rec: Any, path: str) -> bool:
    marker = getattr(rec.module_classes.get(path), "orthofx_meta", None)
    return isinstance(getattr(marker, "kind", None), str)


class CovarianceCapture(TorchDispatchMode):
    """Counts the ops that form the sites' covariances and keeps a detached copy of the
    wanted calls' outputs (``captured[name]``: device tensors, no host sync)."""

    def __init__(self, sites: list[CaptureSite]) -> None:
        super().__init__()
        self.wanted: dict[str, dict[int, CaptureSite]] = {}
        for s in sites:
            for k in s.calls:
                self.wanted.setdefault(s.op, {})[k] = s
        self.counts: dict[str, int] = {}
        self.captured: dict[str, list[Tensor]] = {}
        self.mismatched: dict[str, int] = {}
        self.active = False
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are neither counted nor kept: the monitor's own reads during a
        forward (a parametrized producer weight, whose parametrization runs its own products)
        must not shift the call numbers of the analysed forward."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset(self) -> None:
        """Forget the copies (after a step took them)."""
        self.captured = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        wanted = self.wanted.get(name)
        if wanted is not None and not self._paused:
            k = self.counts.get(name, 0)
            self.counts[name] = k + 1
            site = wanted.get(k)
            if site is not None:
                ok = isinstance(out, Tensor) and out.dim() >= 2 and out.shape[-1] == out.shape[-2] == site.size \
                    and out.is_floating_point()
                got = self.captured.setdefault(site.name, [])
                if not ok:
                    self.mismatched[site.name] = self.mismatched.get(site.name, 0) + 1
                elif len(got) < MAX_CAPTURES:
                    got.append(out.detach().clone())
        return out

    def enter(self) -> None:
        """Start counting (a forward of the model begins)."""
        if not self.active:
            self.counts = {}
            self.__enter__()
            self.active = True

    def leave(self) -> None:
        """Stop counting (the forward ended, or failed)."""
        if self.active:
            self.active = False
            self.__exit__(None, None, None)


def covariance_eigenvalues(p: Tensor) -> Tensor:
    """Ascending float64 eigenvalues (..., n) of the symmetrised copies ``p`` (..., n, n);
    a matrix holding NaN or Inf gets NaN eigenvalues (the others are decomposed as usual)."""
    with torch.no_grad():
        a = p.detach().to(torch.float64)
        a = (a + a.mT) * 0.5
        finite = torch.isfinite(a).flatten(-2).all(dim=-1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        lam = torch.linalg.eigvalsh(torch.where(finite[..., None, None], a, eye))
        return torch.where(finite[..., None], lam, torch.nan)
