"""What transform did, as data and as text; and the analysis records, re-exported.

:class:`TransformReport` (returned by ``orthofx.transform``) holds the analysis, the applied
plan and the typed :class:`~orthofx.plan.Action` records, and renders them as text.

The analysis records (:class:`AnalysisReport`, :class:`MetaLayerEntry`, :class:`SkippedEntry`,
:class:`ProducerInfo`, :class:`CovarianceInfo`, :class:`ChainStep`, :func:`meta_layer_name`)
are defined in :mod:`orthofx.graph.result`, the analysis' own floor, and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orthofx.graph.result import (
    ROOT_NAME,
    AnalysisReport,
    ChainStep,
    CovarianceInfo,
    MetaLayerEntry,
    ProducerInfo,
    SkippedEntry,
    meta_layer_name,
)

if TYPE_CHECKING:
    from orthofx.plan import Action, Plan

__all__ = [
    "TransformReport",
    "ProducerInfo",
    "CovarianceInfo",
    "ChainStep",
    "MetaLayerEntry",
    "SkippedEntry",
    "AnalysisReport",
    "meta_layer_name",
    "ROOT_NAME",
]


@dataclass
class TransformReport:
    """What :func:`orthofx.transform` found and did.

    Attributes:
        analysis: the pure :class:`AnalysisReport` (entries, skipped, chains).
        plan: the applied :class:`~orthofx.plan.Plan` (config, producers, swaps).
        modified: False when the call changed nothing (no meta-layer, or an already
            transformed model with the same config).
        actions: the changes made, as typed :class:`~orthofx.plan.Action` records
            (``str(action)`` is its one-line text).
        notes: anything the user should know (no meta-layer found, partial trace, ...).
    """

    analysis: AnalysisReport
    plan: "Plan"
    modified: bool
    actions: "list[Action]" = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # analysis views ---------------------------------------------------------------------
    @property
    def entries(self) -> list[Any]:
        return self.analysis.entries

    @property
    def skipped(self) -> list[Any]:
        return self.analysis.skipped

    @property
    def producers(self) -> list[str]:
        return self.analysis.producers

    @property
    def swapped(self) -> list[Any]:
        return self.plan.swaps

    def to_dot(self) -> str:
        return self.analysis.to_dot()

    def to_png(self, path: str, **kwargs: Any) -> str:
        return self.analysis.to_png(path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "config": self.plan.config.name,
            "plan": self.plan.to_dict(),
            "actions": [a.to_dict() for a in self.actions],
            "notes": list(self.notes),
            "analysis": self.analysis.to_dict(),
        }

    def __str__(self) -> str:
        lines = [str(self.analysis), ""]
        cfg = self.plan.config
        lines.append(f"orthofx transform: config {cfg.name!r}, modified={self.modified}")
        if cfg.nog:  # NOG's method and its two choices (orthofx.treatments.gradient.nog)
            lines.append(f"  nog: method={cfg.nog_method}, scale={cfg.nog_scale}, deficient={cfg.nog_deficient}")
        for p in self.plan.producers:
            treat = "+".join(p.treatments) or "none"
            lines.append(f"  producer {p.param} {tuple(p.weight_shape)} -> flat {tuple(p.flat_shape)}: {treat}")
        for s in self.plan.swaps:
            lines.append(f"  swapped {s.original} at {s.node} -> {s.module} (stable {s.kind} backward)")
        for a in self.actions:
            if not a.is_swap:  # swaps are listed above, from the plan
                lines.append(f"  {a}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)
