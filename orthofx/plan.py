"""Planning, a pure step: ``make_plan(analysis, config) -> Plan``, and the typed records of
what applying a plan did (:class:`Action`).

A :class:`Plan` says which Pre-SVD weights get which treatments and which raw decompositions
were swapped for stable meta-layers. It is JSON-serialisable (:meth:`Plan.to_dict`) and travels
with the transformed model, so :func:`orthofx.attach`, ``orthogonality_loss``, ``strip`` and
checkpoints read it. :func:`orthofx.rewrite.apply_plan` carries a plan out.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Mapping, NamedTuple

from orthofx.config import OrthoConfig
from orthofx.errors import ConfigError
from orthofx.specs import GRADIENT_KEYS, GradientSpec

__all__ = ["Plan", "ProducerPlan", "SwapRecord", "Action", "ActionKind", "make_plan", "layer_choice", "gradient_plan",
           "GradientChoice", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass
class ProducerPlan:
    """One Pre-SVD weight and what is done to it.

    Attributes:
        name: qualified name of the module owning the weight (``"head.reduce"``).
        attr: attribute name of the weight on that module (``"weight"``).
        param: qualified parameter name in the *original* model (``"head.reduce.weight"``).
        weight_shape / flat_shape: the weight's shape and its flattened (out, in·k·k) shape.
        treatments: the paper tokens that act on it (``["nog", "ow", "olr"]``): its layer
            config's, none when ignored. This and ``config`` are what ``apply_plan``,
            ``attach`` and ``orthogonality_loss`` read.
        meta_layers: node names of the meta-layers it feeds.
        config: this layer's config (``OrthoConfig.layer_configs`` entry, or the plan's config);
            filled with the plan's config by :class:`Plan` when None (older plans).
        ignored: matched by ``OrthoConfig.ignored_scope`` (no treatment).
    """

    name: str
    attr: str
    param: str
    weight_shape: tuple[int, ...]
    flat_shape: tuple[int, int]
    treatments: list[str] = field(default_factory=list)
    meta_layers: list[str] = field(default_factory=list)
    config: OrthoConfig | None = None
    ignored: bool = False

    @property
    def gradients(self) -> GradientSpec:
        """The gradient treatments of this producer: its config's spec (none when ignored)."""
        if self.ignored or self.config is None:
            return GradientSpec()
        return self.config.gradients

    def to_dict(self, default: OrthoConfig | None = None) -> dict[str, Any]:
        """Plain data; ``config`` is omitted when it has ``default``'s treatments and
        ``ignored`` when false (the older format)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("config", "ignored")}
        d["weight_shape"] = list(self.weight_shape)
        d["flat_shape"] = list(self.flat_shape)
        if self.config is not None and not _same_treatments(self.config, default):
            d["config"] = self.config.to_dict()
        if self.ignored:
            d["ignored"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProducerPlan":
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        d["flat_shape"] = tuple(d["flat_shape"])
        if d.get("config") is not None:
            d["config"] = OrthoConfig.from_dict(d["config"])
        return cls(**d)


def _same_treatments(a: OrthoConfig, b: OrthoConfig | None) -> bool:
    return b is not None and (a.weights, a.gradients) == (b.weights, b.gradients)


@dataclass
class SwapRecord:
    """A raw decomposition node replaced by a stable leaf module.

    Attributes:
        node: the replaced decomposition node (``"linalg_eigh"``).
        original: what it called (``"torch.linalg.eigh"``).
        kind: the stable kind (``"eigh"``), or the usage of a fused reconstruction
            (``"sqrtm"``/``"invsqrtm"``).
        module: the submodule that replaces it.
        output: for a fused eigh + ``U f(Λ) Uᵀ`` (an ``ExactSpectral``), the node that held the
            reconstruction (what :func:`orthofx.pipeline.replay` fuses again); None for a plain
            swap.
        scope: the qualified name of the submodule whose ``forward`` calls the decomposition
            (``""``: the root). Only that submodule is rewritten; ``node`` and ``module`` are
            relative to it.
        via: ``"graph"`` (that submodule became a GraphModule of its symbolic trace, ``node``
            is a node name) or ``"call"`` (the submodule is kept and its ``forward`` runs with
            its ``index``-th raw decomposition call answered by ``module``,
            :class:`orthofx.rewrite.StableCalls`; ``node`` is ``"call<index>"``).

    ``output``, ``scope`` and ``via`` are omitted from :meth:`to_dict` at their defaults, so
    older plans (without them) still load and mean the root's graph.
    """

    node: str
    original: str
    kind: str
    module: str
    output: str | None = None
    scope: str = ""
    via: str = "graph"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, default in (("output", None), ("scope", ""), ("via", "graph")):
            if d[k] == default:
                del d[k]
        return d


@dataclass
class Plan:
    """Config, producers and swaps (JSON-serialisable via :meth:`to_dict`)."""

    config: OrthoConfig
    producers: list[ProducerPlan] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.producers:
            if p.config is None:
                p.config = self.config

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "config": self.config.to_dict(),
            "producers": [p.to_dict(self.config) for p in self.producers],
            "swaps": [s.to_dict() for s in self.swaps],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        return cls(
            config=OrthoConfig.from_dict(d["config"]),
            producers=[ProducerPlan.from_dict(p) for p in d.get("producers", [])],
            swaps=[SwapRecord(**s) for s in d.get("swaps", [])],
        )


def _matches(pattern: str, module: str, param: str) -> bool:
    """A name, a parameter name, a module prefix or an ``fnmatch`` glob of either."""
    return (pattern in (module, param) or module.startswith(pattern + ".")
            or fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(param, pattern))


def layer_choice(config: OrthoConfig, module: str, param: str) -> tuple[OrthoConfig, bool, list[str]]:
    """(the layer's config, ignored?, the entries that matched) for one Pre-SVD layer.

    Raises :class:`ConfigError` for a layer both ignored and configured, or matched by two
    ``layer_configs`` patterns and by no exact name."""
    ignored = [p for p in config.ignored_scope if _matches(p, module, param)]
    hits = [k for k in config.layer_configs if _matches(k, module, param)]
    if ignored and hits:
        raise ConfigError(f"Pre-SVD layer {module!r} is in ignored_scope ({ignored[0]!r}) and in layer_configs "
                          f"({hits[0]!r}); choose one")
    exact = [k for k in hits if k in (module, param)]
    if len(hits) > 1 and len(exact) != 1:
        raise ConfigError(f"Pre-SVD layer {module!r} is matched by layer_configs entries {hits[0]!r} and "
                          f"{hits[1]!r}; name it exactly or make the patterns disjoint")
    if hits:
        key = exact[0] if exact else hits[0]
        layer = config.layer_configs[key]
        return (config.replace(weights=layer.weights, gradients=layer.gradients, ignored_scope=(),
                               layer_configs={}), False, ignored + hits)
    if ignored:
        return config.replace(weight=None, nog=False, olr=False, ignored_scope=(), layer_configs={}), True, ignored
    return config, False, ignored


def make_plan(analysis: Any, config: OrthoConfig, *, swaps: list[SwapRecord] | None = None) -> Plan:
    """The plan of ``config`` for an analysis (pure: nothing is mutated).

    One :class:`ProducerPlan` per distinct producer parameter of ``analysis.entries``, in graph
    order, with its layer's config and treatment tokens (:func:`layer_choice`:
    ``ignored_scope`` → none, a ``layer_configs`` entry → its treatments, else the config's);
    ``swaps`` are stable swaps already decided (and verified) by the caller.

    Raises :class:`ConfigError` naming an ``ignored_scope``/``layer_configs`` entry that matches
    no producer the analysis found (the layers that run), or a layer matched ambiguously.
    """
    plans: dict[str, ProducerPlan] = {}
    used: set[str] = set()
    for e in analysis.entries:
        p = e.producer
        if p.param in plans:
            plans[p.param].meta_layers.append(e.node)
            continue
        mod, _, attr = p.param.rpartition(".")
        layer, ignored, hit = layer_choice(config, mod, p.param)
        used.update(hit)
        plans[p.param] = ProducerPlan(
            name=mod, attr=attr, param=p.param, weight_shape=tuple(p.weight_shape),
            flat_shape=tuple(p.flat_shape), treatments=[] if ignored else list(layer.treatments),
            meta_layers=[e.node], config=layer, ignored=ignored,
        )
    for what, entries in (("ignored_scope", config.ignored_scope), ("layer_configs", tuple(config.layer_configs))):
        unused = [k for k in entries if k not in used]
        if unused:
            found = ", ".join(p.name or "<root>" for p in plans.values()) or "none"
            raise ConfigError(f"{what} entry {unused[0]!r} matches no Pre-SVD layer that runs (found: {found})")
    return Plan(config, list(plans.values()), list(swaps or []))


class GradientChoice(NamedTuple):
    """What :func:`gradient_plan` decided: the producers one chain acts on, the spec it runs,
    the non-ignored producers and whether the caller forced a chain on them."""

    producers: list[ProducerPlan]
    spec: GradientSpec
    live: list[ProducerPlan]
    forced: bool


def gradient_plan(plan: Plan, given: Mapping[str, Any] | None = None, *, forced: bool = False) -> GradientChoice:
    """What one gradient chain acts on, decided per producer.

    The producers are the non-ignored ones whose plan entry asks for NOG or OLR (their layer
    config's :class:`~orthofx.specs.GradientSpec`, so ``layer_configs`` decide), and the spec
    is the one spec they share with ``given`` (GradientSpec fields; ``None`` = not given)
    applied — checked by the spec. When no entry asks for a treatment the producers are every
    non-ignored one if the call is forced (``forced``: a chain or a skip; or ``given`` switched
    a treatment on, e.g. ``nog=True``) with the plan config's spec, else none. Raises
    :class:`ConfigError` when the chosen entries' specs differ (one optimizer hook runs one
    chain)."""
    changes = {k: v for k, v in (given or {}).items() if v is not None}
    live = [p for p in plan.producers if not p.ignored]
    chosen = [p for p in live if p.gradients.active]
    base = chosen[0].gradients if chosen else plan.config.gradients
    for p in chosen[1:]:
        if p.gradients != base:
            diff = next(k for k in GRADIENT_KEYS if getattr(p.gradients, k) != getattr(base, k))
            raise ConfigError(f"attach: Pre-SVD layers {chosen[0].name!r} and {p.name!r} ask for different gradient "
                              f"treatments ({diff}: {getattr(base, diff)!r} vs {getattr(p.gradients, diff)!r}); one "
                              f"optimizer hook runs one chain: give the layers with NOG/OLR the same gradient options, "
                              f"or attach your own chain= per layer")
    spec = base.replace(**changes)
    forced = forced or spec.switched_on(changes)
    return GradientChoice(chosen or (live if forced else []), spec, live, forced)


# ------------------------------------------------------------------------------ actions
class ActionKind(str, Enum):
    """What applying a plan changed."""

    OW = "ow"              # an orthogonal-weight parametrization was registered
    SN = "sn"              # a spectral-norm parametrization was registered
    STABLE_SWAP = "stable"  # a raw decomposition node became a StableDecomposition module
    FUSE = "fuse"          # a raw eigh + U f(Λ) Uᵀ became an ExactSpectral module

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Action:
    """One change made by :func:`orthofx.rewrite.apply_plan` (or the verified stable rewrite).

    Attributes:
        kind: what was done.
        target: the qualified parameter (OW/SN) or the replaced graph node (swaps).
        method: the OW/SN method, or the stable kind of a swap (``"eigh"``, ``"sqrtm"``).
        original: for swaps, the replaced callable (``"torch.linalg.eigh"``).
        module: for swaps, the submodule that replaces it.
    """

    kind: ActionKind
    target: str
    method: str = ""
    original: str = ""
    module: str = ""

    @property
    def is_swap(self) -> bool:
        return self.kind in (ActionKind.STABLE_SWAP, ActionKind.FUSE)

    def __str__(self) -> str:
        if self.is_swap:
            return f"stable {self.method} replaces {self.original} at {self.target}"
        return f"{self.kind.value}({self.method}) {self.target}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "target": self.target, "method": self.method,
                "original": self.original, "module": self.module, "text": str(self)}

    @classmethod
    def of_swap(cls, s: SwapRecord, kind: ActionKind = ActionKind.STABLE_SWAP) -> "Action":
        """The action of a swap record (``kind`` FUSE for a fused reconstruction)."""
        return cls(kind, s.node, method=s.kind, original=s.original, module=s.module)
