"""The experiments of ``orthofx demo`` and ``orthofx study`` and their rows: :class:`DemoRow` (a
preset, a backend, OrthoConfig overrides), :class:`Experiment` (a model of :mod:`orthofx.models`
with its rows and settings), :data:`EXPERIMENTS` and the κ conventions reported
(:data:`KAPPA_FIELDS`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["KAPPA_FIELDS", "DemoRow", "Experiment", "EXPERIMENTS", "EXPERIMENT_CHOICES"]

#: κ conventions read from the monitor records, with their meaning (see docs/results.md)
KAPPA_FIELDS: dict[str, str] = {
    "kappa": "κ(Σ+εI): the matrix the solver decomposes",
    "kappa_range": "λ_max/λ_r of Σ on its numerical range (rank r; steps at the run's smallest r)",
    "kappa_paper": "the paper's convention (inferred)",
}


@dataclass(frozen=True)
class DemoRow:
    """One row of a table: a label, an orthofx preset, a meta-layer backend, OrthoConfig
    overrides (``ortho``), model options, and whether orthofx transforms the model at all."""

    label: str
    treatment: str
    backend: str = "auto"
    ortho: tuple[tuple[str, Any], ...] = ()
    model_kwargs: tuple[tuple[str, Any], ...] = ()
    transform: bool = True
    cost: float = 1.0  # wall time relative to the experiment's SVD row (measured), to schedule jobs
    extended: bool = False  # run only with ``demo(extended=True)`` (``--extended``) or when named in ``rows``


@dataclass(frozen=True)
class Experiment:
    """One experiment: a model of :mod:`orthofx.models`, its rows and settings."""

    key: str
    title: str
    model: str
    model_kwargs: tuple[tuple[str, Any], ...]
    rows: tuple[DemoRow, ...]
    full: Mapping[str, Any] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0  # wall time of its SVD row relative to the DBN SVD row (measured), to schedule jobs


_W, _A = (("ow_target", "weight"),), (("ow_target", "generator"),)

_DBN_ROWS = (
    DemoRow("SVD", "svd"),
    DemoRow("NOG", "nog"),
    DemoRow("OLR", "olr"),
    DemoRow("OW", "ow"),
    DemoRow("NOG+OW (W)", "nog+ow", ortho=_W, cost=2.1),
    DemoRow("NOG+OW (A)", "nog+ow", ortho=_A),
    DemoRow("NOG+OW+OLR (W)", "nog+ow+olr", ortho=_W, cost=2.1),
    DemoRow("NOG+OW+OLR (A)", "nog+ow+olr", ortho=_A),
    DemoRow("Newton-Schulz", "svd", "ns"),
    # the rest of the paper's Tables 1–3 (outside the 12-minute budget: ``--extended``)
    DemoRow("SN", "sn", extended=True),
    DemoRow("OL", "ol", extended=True),
    DemoRow("NOG+SN", "nog+sn", extended=True),
    DemoRow("NOG+OL", "nog+ol", extended=True),
    DemoRow("NOG+OLR", "nog+olr", extended=True),
    DemoRow("OW+OLR", "ow+olr", extended=True, cost=2.0),
)

_GCP_ROWS = (
    DemoRow("SVD", "svd"),
    DemoRow("SN", "sn"),
    DemoRow("OL", "ol"),
    DemoRow("OW", "ow"),
    DemoRow("NOG", "nog"),
    DemoRow("OLR", "olr"),
    DemoRow("NOG+OW", "nog+ow", cost=1.65),
    DemoRow("NOG+OW+OLR", "nog+ow+olr", cost=1.65),
    DemoRow("Newton-Schulz", "svd", "ns"),
    DemoRow("raw torch eigh", "svd", "auto", model_kwargs=(("head", "raw-eigh"),), transform=False, cost=0.8),
)

#: full length: both experiments, one seed, ≤ 12 min on 2 idle CPU cores (see docs/results.md)
_FULL = dict(epochs=3, train_limit=8192, test_limit=5000, batch_size=128, milestones=(2,), monitor_every=8,
             recalibrate_batches=12, eval_every=3)
#: ``--quick``: a smoke run of every row (a few steps each; ≤ 50 s for both experiments)
_QUICK = dict(epochs=1, train_limit=64, test_limit=128, batch_size=32, milestones=(), monitor_every=1,
              recalibrate_batches=1)

EXPERIMENTS: dict[str, Experiment] = {
    "dbn": Experiment(
        "dbn", "Decorrelated BN: 5×5 stem 1→64 (rank ≤ 25 of 64) + ZCA whitening, ε = 1e-2",
        "small-resnet-dbn", (("stem_kernel", 5), ("stem_channels", 64), ("stem_stride", 2)), _DBN_ROWS,
        _FULL, _QUICK,
    ),
    "gcp": Experiment(
        "gcp", "GCP: 1×1 reduce 64→64 → BN → ReLU → Σ^{1/2} of 7×7 = 49 positions (rank ≤ 48 of 64), ε = 1e-5",
        "small-resnet-gcp", (("reduced", 64),), _GCP_ROWS, _FULL, _QUICK, cost=1.6,
    ),
    "dbn-small": Experiment(
        "dbn-small", "Decorrelated BN (earlier variant): 3×3 stem 1→16 (rank ≤ 9 of 16), ε = 1e-2",
        "small-resnet-dbn", (), _DBN_ROWS, _FULL, _QUICK,
    ),
}
#: ``orthofx demo --experiment`` choices; "both" = dbn + gcp
EXPERIMENT_CHOICES = ("both", "dbn", "gcp", "dbn-small")
