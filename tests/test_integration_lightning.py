"""OrthofxCallback with real Lightning on the CPU (and CUDA when available): transform at setup,
attach before the optimizer state is restored, log through pl_module.log, store the plan in
the checkpoint and replay it; a resumed fit is bit-identical to an uninterrupted one."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

import orthofx  # noqa: E402
from orthofx.errors import ConfigError  # noqa: E402
from orthofx.integrations.lightning import OrthofxCallback  # noqa: E402
from orthofx.nn import CovariancePooling  # noqa: E402
from orthofx.pipeline import plan_of  # noqa: E402

BATCHES_PER_EPOCH = 3


def network() -> nn.Module:
    # conv (the Pre-SVD layer, via the pooling's own 1x1 reduction) → covariance → sqrtm → linear
    return nn.Sequential(nn.Conv2d(1, 6, 3), CovariancePooling(6, reduced=4), nn.Linear(10, 3))


class Net(L.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = network()
        self.example_input_array = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss + orthofx.orthogonality_loss(self.model)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(device: torch.device) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8 * BATCHES_PER_EPOCH, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (8 * BATCHES_PER_EPOCH,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


def trainer(device: torch.device, callback: OrthofxCallback, tmp_path: Any, *, ckpt_dir: Any = None, **kw: Any) -> Any:
    callbacks: list[Any] = [callback]
    if ckpt_dir is not None:  # a checkpoint at the end of every epoch, as a long run writes them
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1,
                                                             every_n_epochs=1))
    return L.Trainer(
        accelerator=device.type, devices=1, callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=ckpt_dir is not None,
        num_sanity_val_steps=0, deterministic=True, **kw)


def optimizer_state(t: Any) -> dict[str, Any]:
    return t.optimizers[0].state_dict()


def assert_same_state(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of nested states (tensors bit-identical)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|deterministic).*")
        yield


def test_fit_transforms_attaches_and_logs(device: torch.device, tmp_path: Any) -> None:
    cb = OrthofxCallback("nog+ow+olr", every=1)
    net = Net()
    t = trainer(device, cb, tmp_path, max_steps=4)
    t.fit(net, loader(device))
    plan = plan_of(net.model)
    assert plan is not None and [p.param for p in plan.producers] == ["1.reduce.weight"]
    assert cb.report is not None and cb.report.modified
    # OW: the producer weight is orthogonal after training (W Wᵀ = I, float32 rounding)
    w = net.model[1].reduce.weight.flatten(1).double()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64, device=w.device), atol=1e-5, rtol=0)
    # teardown removed the hooks and put the producer back into its param group
    assert cb.handles == [] and len(t.optimizers[0].param_groups) == 1
    # logged metrics: κ of the meta-layer, the producer weight, NOG counters, OLR's lr
    logged = t.logged_metrics
    for key in ("orthofx/kappa/1", "orthofx/weight_norm/1.reduce.weight", "orthofx/solver_failures/1",
                "orthofx/nog/zero_grads", "orthofx/olr/lr/1.reduce.weight"):
        assert key in logged, (key, sorted(logged))
    assert logged["orthofx/kappa/1"] >= 1 and logged["orthofx/solver_failures/1"] == 0
    # the scheduled lr at the last step was 0.05 * 0.5 (StepLR after 2 steps); OLR's lr ≤ it
    assert 0 < logged["orthofx/olr/lr/1.reduce.weight"] <= 0.025 + 1e-12
    assert cb.monitor is not None and cb.monitor.step_count == 4
    csv = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "orthofx/kappa/1" in csv.splitlines()[0]


@pytest.mark.slow  # three Lightning fits
def test_resume_is_bit_identical(device: torch.device, tmp_path: Any) -> None:
    """Two epochs uninterrupted == one epoch, then a resume from the epoch-end checkpoint into a
    fresh module (other initial weights) and trainer: parameters, buffers, optimizer state."""
    full = Net()
    t_full = trainer(device, OrthofxCallback("nog+ow+olr", every=1), tmp_path / "a", ckpt_dir=tmp_path / "ck",
                     max_epochs=2)
    t_full.fit(full, loader(device))
    ckpt = tmp_path / "ck" / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain data only
    assert saved["orthofx"]["plan"]["config"]["preset"] == "nog+ow+olr"
    assert [p["param"] for p in saved["orthofx"]["plan"]["producers"]] == ["1.reduce.weight"]
    # written while attached: OLR's split layout, which only an attached optimizer can load
    assert len(saved["optimizer_states"][0]["param_groups"]) == 2
    assert saved["callbacks"]["OrthofxCallback"]["monitor"]["step"] == BATCHES_PER_EPOCH

    resumed = Net(seed=123)  # other initial weights: everything must come from the checkpoint
    cb = OrthofxCallback("nog+ow+olr", every=1)
    t2 = trainer(device, cb, tmp_path / "b", max_epochs=2)
    t2.fit(resumed, loader(device), ckpt_path=ckpt)
    assert not cb.replayed  # the plan built at setup is the saved one

    assert_same_state(full.state_dict(), resumed.state_dict(), "model")
    assert_same_state(optimizer_state(t_full), optimizer_state(t2), "optimizer")
    assert_same_state(t_full.lr_scheduler_configs[0].scheduler.state_dict(),
                      t2.lr_scheduler_configs[0].scheduler.state_dict(), "scheduler")
    # the monitor's numbering continued: records of steps 0..5, as in the uninterrupted run
    assert cb.monitor is not None and cb.monitor.step_count == 2 * BATCHES_PER_EPOCH
    steps = sorted({r["step"] for r in cb.monitor.records if r["kind"] == "meta"})
    assert steps == list(range(2 * BATCHES_PER_EPOCH))
    assert t2.logged_metrics["orthofx/kappa/1"] == t_full.logged_metrics["orthofx/kappa/1"]


def test_resume_replays_the_checkpoint_plan(device: torch.device, tmp_path: Any) -> None:
    """A resume whose callback would build another plan gets the checkpoint's plan back."""
    first = Net()
    t1 = trainer(device, OrthofxCallback("nog+ow+olr", every=1), tmp_path / "a", ckpt_dir=tmp_path / "ck",
                 max_epochs=1)
    t1.fit(first, loader(device))

    resumed = Net()
    cb = OrthofxCallback("nog+sn", every=1)  # another weight treatment: another state-dict layout
    t2 = trainer(device, cb, tmp_path / "b", max_steps=BATCHES_PER_EPOCH + 1)
    with pytest.warns(UserWarning, match="replaying the checkpoint's plan"):
        t2.fit(resumed, loader(device), ckpt_path=tmp_path / "ck" / "epoch=0.ckpt")
    assert cb.replayed
    plan = plan_of(resumed.model)
    assert plan is not None and plan.config.preset == "nog+ow+olr"
    assert "orthofx/olr/lr/1.reduce.weight" in t2.logged_metrics  # OLR of the saved plan, attached


def test_model_attr_missing_is_a_config_error(tmp_path: Any) -> None:
    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = network()

    cb = OrthofxCallback("nog", example_inputs=torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="self.model = <network>"):
        cb.setup(None, Bare(), "fit")
    # the module itself, in place (model_attr=None)
    bare = Bare()
    bare.forward = bare.net.forward  # type: ignore[method-assign]
    cb = OrthofxCallback("nog+ow", example_inputs=torch.randn(2, 1, 8, 8), model_attr=None)
    cb.setup(None, bare, "fit")
    assert plan_of(bare) is not None and [p.param for p in plan_of(bare).producers] == ["net.1.reduce.weight"]
    cb.teardown(None, bare, "validate")
    assert "on_load_checkpoint" not in bare.__dict__


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_summary_goes_through_rank_zero_info_and_strip_on_fit_end(tmp_path: Any) -> None:
    """The transform's summary reaches Lightning's own log (rank_zero_info), not only orthofx's
    silent logger; strip_on_fit_end leaves pl_module.model as orthofx.strip's plain model."""
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lines, level = _Lines(), rz.level
    rz.addHandler(lines)
    rz.setLevel(logging.INFO)
    try:
        net = Net()
        t = trainer(torch.device("cpu"), OrthofxCallback("nog+ow", every=1, strip_on_fit_end=True), tmp_path,
                    max_steps=2)
        t.fit(net, loader(torch.device("cpu")))
    finally:
        rz.removeHandler(lines)
        rz.setLevel(level)
    assert "orthofx: transformed model with 'nog+ow': 1.reduce.weight" in lines.lines
    assert any("replaced by orthofx.strip" in s for s in lines.lines)
    plain = net.model
    assert plan_of(plain) is None and not any("parametrizations" in k for k in plain.state_dict())
    fresh = network()
    fresh.load_state_dict(plain.state_dict())  # the original class's keys
    w = plain[1].reduce.weight.flatten(1).double()  # OW baked: still orthogonal
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), plain.eval()(x))


def test_strip_on_fit_end_refusals() -> None:
    with pytest.raises(ConfigError, match="needs model_attr"):
        OrthofxCallback("ow", model_attr=None, strip_on_fit_end=True)
