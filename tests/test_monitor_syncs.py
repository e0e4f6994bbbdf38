"""The monitor adds no host synchronisation per step: step() (κ summaries in every convention,
computed on the device) and the forwards dispatch no synchronising op of the monitor's; the
producer weights are copied on recorded steps and their svdvals runs at the flush."""

from __future__ import annotations

import torch
from torch import nn

from orthofx.monitor import ConditioningMonitor
from orthofx.nn import DecorrelatedBatchNorm
from orthofx.syncs import sync_audit


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 2, bias=False), DecorrelatedBatchNorm(8, eps=1e-2, backend="eigh"))


def test_step_and_unrecorded_forwards_are_sync_free():
    model = _model()
    x = torch.randn(4, 1, 6, 6)
    with sync_audit() as bare:
        model(x)
    mon = ConditioningMonitor(model, every=2, producers=["0.weight"], max_pending=100)
    model(x)  # step 0: recorded (eigenvalues kept, weight svdvals in the producer's pre-hook)
    with sync_audit() as recorded_step:
        mon.step()
    with sync_audit() as unrecorded:
        model(x)  # step 1: not recorded
    with sync_audit() as unrecorded_step:
        mon.step()
    assert not recorded_step.syncs and not unrecorded_step.syncs, (recorded_step.syncs, unrecorded_step.syncs)
    assert unrecorded.syncs == bare.syncs  # the layer's own decomposition only
    with sync_audit() as recorded:
        model(x)  # step 2: recorded: the producer weight is only copied on the device
    assert recorded.syncs == bare.syncs
    assert len(mon._pending) == 3 and len(mon.records) == 0  # nothing read back until flush
    with sync_audit() as flushed:
        mon.flush()  # the read: svdvals of the two weight copies happen here
    assert flushed.syncs.get("aten._linalg_svd", 0) == 2 and len(mon.records) == 3
