"""orthofx.syncs: the audit sees synchronising ops, and the treatments add none to a training
step when device choices resolve as on CUDA (``cuda_policy``), checked on the CPU."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import orthofx
from orthofx.config import resolve_config
from orthofx.models import SmallResNetDBN
from orthofx.models.resnet import resnet18_gcp
from orthofx.linalg.polar import resolve_method
from orthofx.syncs import cuda_policy, sync_audit, sync_free_preferred
from orthofx.treatments.attach import attach as attach_producers
from orthofx.treatments.guidance import AdaptiveOptimizerWarning


def test_audit_counts_synchronising_ops() -> None:
    a = torch.randn(4, 4)
    b = torch.randn(4, 2)
    with sync_audit() as audit:
        a.sum().item()
        bool(a.sum() > 0)
        torch.linalg.solve(a, b)
        torch.linalg.svd(a)
        torch.nonzero(a > 0)
    assert audit.syncs == {
        "aten._local_scalar_dense": 2,
        "aten._linalg_check_errors": 1,
        "aten._linalg_svd": 1,
        "aten.nonzero": 1,
    }
    assert audit.count == 5
    with sync_audit() as audit:
        torch.linalg.solve_ex(a, b, check_errors=False)
        (a @ a).relu_().sum()
        torch.where(a > 0, a, 0.0)
    assert audit.syncs == {} and audit.ops["aten.mm"] == 1


def test_cuda_policy_switches_device_choices() -> None:
    assert not sync_free_preferred("cpu") and sync_free_preferred("cuda")
    assert resolve_method("auto", "cpu") == "eigh"
    with cuda_policy():
        assert sync_free_preferred("cpu")
        assert resolve_method("auto", "cpu") == "polar_express"
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        h = attach_producers(opt, [(model, "weight")], olr=True)
        assert h.lr_mode == "fold"
        h.remove()
    assert not sync_free_preferred("cpu")


def _step(build, config, shape: tuple[int, ...]):
    torch.manual_seed(0)
    gm, _ = orthofx.transform(build(), config=config)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    orthofx.attach(opt, gm)
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))

    def step() -> None:
        loss = F.cross_entropy(gm(x), y) + orthofx.orthogonality_loss(gm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _syncs_of(build, config, shape) -> dict[str, int]:
    step = _step(build, config, shape)
    step()
    step()  # state (momentum buffers, OLR groups) exists from here on
    with sync_audit() as audit:
        step()
    return audit.syncs


WORKLOADS = {
    "dbn": (lambda: SmallResNetDBN(1, 10), (8, 1, 28, 28)),
    "gcp": (lambda: resnet18_gcp(10, reduced=16, backend="gram"), (2, 3, 64, 64)),
}


# the ResNet-18 GCP workload takes ~10 s of CPU a config: slow; the DBN one covers every config fast
@pytest.mark.parametrize(
    "workload", [pytest.param(w, marks=pytest.mark.slow) if w == "gcp" else w for w in sorted(WORKLOADS)])
@pytest.mark.parametrize(
    "config",
    ["nog", "olr", "nog+olr", "ow", "nog+ow+olr", "ol", "nog+ol", "sn-power", "ow-cayley", "ow+olr"],
)
def test_treated_step_adds_no_synchronising_op(workload: str, config: str) -> None:
    """The whole step — forward with the OW parametrization, backward, the NOG/OLR pre-hook,
    SGD and the fold post-hook — dispatches the same synchronising ops as the untreated step
    (those of the meta-layer's own exact decomposition)."""
    build, shape = WORKLOADS[workload]
    if config == "sn-power":
        cfg = dataclasses.replace(resolve_config("sn"), sn_method="power")
    elif config == "ow-cayley":
        cfg = dataclasses.replace(resolve_config("ow"), ow_method="cayley")
    else:
        cfg = resolve_config(config)
    with cuda_policy():
        plain = _syncs_of(build, "svd", shape)
        treated = _syncs_of(build, cfg, shape)
    assert treated == plain, (plain, treated)


@pytest.mark.parametrize("config,extra", [("sn", "aten._linalg_svd"), ("nog", "aten._linalg_svd")])
def test_exact_svd_variants_do_synchronise(config: str, extra: str) -> None:
    """The documented exceptions: exact SN (σ_max from svdvals) and NOG with method "svd"."""
    build, shape = WORKLOADS["dbn"]
    cfg = resolve_config(config)
    if config == "nog":
        cfg = dataclasses.replace(cfg, nog_method="svd")
    with cuda_policy():
        plain = _syncs_of(build, "svd", shape)
        treated = _syncs_of(build, cfg, shape)
    assert treated.get(extra, 0) == plain.get(extra, 0) + 1


def test_monitor_step_adds_no_synchronising_op() -> None:
    """κ is recorded into device buffers; only reading it (summary/plots/logs) synchronises."""
    build, shape = WORKLOADS["dbn"]
    torch.manual_seed(0)
    gm, _ = orthofx.transform(build(), config="nog+ow+olr")
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    orthofx.attach(opt, gm)
    monitor = orthofx.ConditioningMonitor(gm, every=2)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    counts = []
    with cuda_policy():
        for _ in range(5):
            with sync_audit() as audit:
                loss = F.cross_entropy(gm(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                monitor.step()
            counts.append(audit.syncs)
    assert all(c == {"aten._linalg_eigh": 1} for c in counts), counts
    rows = monitor.flush()  # the read: host values of the recorded steps
    assert len(rows) >= 2 and all(r["kappa"] > 1 for r in rows if r["kind"] == "meta"), rows


def _allow_adaptive_advice() -> None:
    """OLR under Adam also gets the AdaptiveOptimizerWarning at attach (OLR's η* is derived
    for SGD); that is advice about the optimizer, not a host sync, so only it is let through."""
    warnings.filterwarnings("ignore", category=AdaptiveOptimizerWarning)


def test_olr_warns_when_auto_lr_mode_would_synchronise_on_cuda() -> None:
    model = torch.nn.Linear(4, 4)
    with cuda_policy():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        with pytest.warns(UserWarning, match="one host sync per step"), pytest.warns(AdaptiveOptimizerWarning):
            h = attach_producers(opt, [(model, "weight")], olr=True)
        assert h.lr_mode == "float"
        h.remove()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _allow_adaptive_advice()
            h = attach_producers(opt, [(model, "weight")], olr=True)
        assert h.lr_mode == "tensor"
        h.remove()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # free on the CPU: no sync warning
        _allow_adaptive_advice()
        attach_producers(opt, [(model, "weight")], olr=True).remove()
