"""Planning, a pure step: ``make_plan(analysis, config) -> Plan``, and the typed records of
what applying a plan did (:class:`Action`).

A :class:`Plan` says which Pre-SVD weights get which treatments and which raw decompositions
were swapped for stable meta-layers. It is JSON-serialisable (:meth:`Plan.to_dict`) and travels
with the transformed model, so :func:`orthofx.attach`, ``orthogonality_loss``, ``strip`` and
checkpoints read it. :func:`orthofx.rewrite.apply_plan` carries a plan out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Mapping

from orthofx.config import OrthoConfig

__all__ = ["Plan", "ProducerPlan", "SwapRecord", "Action", "ActionKind", "make_plan", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass
class ProducerPlan:
    """One Pre-SVD weight and what is done to it.

    Attributes:
        name: qualified name of the module owning the weight (``"head.reduce"``).
        attr: attribute name of the weight on that module (``"weight"``).
        param: qualified parameter name in the *original* model (``"head.reduce.weight"``).
        weight_shape / flat_shape: the weight's shape and its flattened (out, in·k·k) shape.
        treatments: the paper tokens that act on it (``["nog", "ow", "olr"]``).
        meta_layers: node names of the meta-layers it feeds.
    """

    name: str
    attr: str
    param: str
    weight_shape: tuple[int, ...]
    flat_shape: tuple[int, int]
    treatments: list[str] = field(default_factory=list)
    meta_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["flat_shape"] = list(self.flat_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProducerPlan":
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        d["flat_shape"] = tuple(d["flat_shape"])
        return cls(**d)


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
            swap. Omitted from :meth:`to_dict` when None, so plans without fusions keep the
            older format, and older plans (no ``output`` key) still load.
    """

    node: str
    original: str
    kind: str
    module: str
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.output is None:
            del d["output"]
        return d


@dataclass
class Plan:
    """Config, producers and swaps (JSON-serialisable via :meth:`to_dict`)."""

    config: OrthoConfig
    producers: list[ProducerPlan] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "config": self.config.to_dict(),
            "producers": [p.to_dict() for p in self.producers],
            "swaps": [s.to_dict() for s in self.swaps],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        return cls(
            config=OrthoConfig.from_dict(d["config"]),
            producers=[ProducerPlan.from_dict(p) for p in d.get("producers", [])],
            swaps=[SwapRecord(**s) for s in d.get("swaps", [])],
        )


def make_plan(analysis: Any, config: OrthoConfig, *, swaps: list[SwapRecord] | None = None) -> Plan:
    """The plan of ``config`` for an analysis (pure: nothing is mutated).

    One :class:`ProducerPlan` per distinct producer parameter of ``analysis.entries``, in graph
    order, with the config's treatment tokens; ``swaps`` are stable swaps already made (and
    verified) by the caller.
    """
    plans: dict[str, ProducerPlan] = {}
    tokens = list(config.treatments)
    for e in analysis.entries:
        p = e.producer
        if p.param in plans:
            plans[p.param].meta_layers.append(e.node)
            continue
        mod, _, attr = p.param.rpartition(".")
        plans[p.param] = ProducerPlan(
            name=mod, attr=attr, param=p.param, weight_shape=tuple(p.weight_shape),
            flat_shape=tuple(p.flat_shape), treatments=list(tokens), meta_layers=[e.node],
        )
    return Plan(config, list(plans.values()), list(swaps or []))


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
