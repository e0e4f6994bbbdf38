"""OrthofxTrainerCallback with a real Hugging Face Trainer on the CPU: in-place transform at
init, attach in create_optimizer (OrthofxTrainer) or at train begin (plain Trainer, no OLR),
metrics in the log history, the plan next to checkpoints, and a resume that continues exactly."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from orthofx.errors import ConfigError  # noqa: E402
from orthofx.integrations.huggingface import PLAN_FILE, OrthofxTrainer, OrthofxTrainerCallback  # noqa: E402
from orthofx.nn import CovariancePooling  # noqa: E402
from orthofx.pipeline import plan_of  # noqa: E402


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3), CovariancePooling(6, reduced=4), nn.Linear(10, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(24, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 3, (24,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def make(tmp: Any, model: nn.Module, steps: int, save: bool = False, config: str = "nog+ow+olr",
         cls: Any = OrthofxTrainer) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=8, learning_rate=0.05,
        optim="sgd", lr_scheduler_type="linear", use_cpu=True, report_to=[], logging_steps=1,
        save_strategy="steps" if save else "no", save_steps=3,
        dataloader_drop_last=True, seed=0, disable_tqdm=True)
    cb = OrthofxTrainerCallback(config, example_inputs=torch.randn(4, 1, 8, 8), every=1)
    return cls(model=model, args=args, train_dataset=Data(), callbacks=[cb]), cb


@pytest.fixture(autouse=True)
def _quiet() -> None:
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def test_trainer_transforms_attaches_logs_and_saves_plan(tmp_path: Any) -> None:
    model = Net()
    trainer, cb = make(tmp_path, model, 3, save=True)
    plan = plan_of(model)  # transformed in place at Trainer.__init__
    assert plan is not None and [p.param for p in plan.producers] == ["body.1.reduce.weight"]
    assert trainer.model is model
    trainer.train()
    w = model.body[1].reduce.weight.flatten(1).double()
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    rows = [r for r in trainer.state.log_history if "orthofx/kappa/body.1" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["orthofx/solver_failures/body.1"] == 0 for r in rows)
    assert all(0 < r["orthofx/olr/lr/body.1.reduce.weight"] <= 0.05 for r in rows)
    saved = json.loads((tmp_path / "checkpoint-3" / PLAN_FILE).read_text())
    assert saved["plan"]["config"]["preset"] == "nog+ow+olr"
    # attached in create_optimizer: the saved state has the Trainer's decay/no-decay groups and
    # OLR's group of the producer
    opt_state = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert len(opt_state["param_groups"]) == 3


def test_plain_trainer_nog_and_olr_refusal(tmp_path: Any) -> None:
    model = Net()
    trainer, cb = make(tmp_path / "a", model, 2, config="nog+ow", cls=transformers.Trainer)
    trainer.train()  # no OLR: attaching in on_train_begin is fine
    assert [r["orthofx/nog/zero_grads"] for r in trainer.state.log_history if "orthofx/nog/zero_grads" in r] == [0, 0]
    trainer, cb = make(tmp_path / "b", Net(), 2, cls=transformers.Trainer)
    with pytest.raises(ConfigError, match="OrthofxTrainer"):
        trainer.train()


@pytest.mark.slow  # three Trainer runs
def test_trainer_resume_matches_uninterrupted(tmp_path: Any) -> None:
    full = Net()
    t_full, _ = make(tmp_path / "a", full, 6)
    t_full.train()
    first = Net()
    t1, _ = make(tmp_path / "b", first, 6, save=True)
    t1.train()  # writes checkpoint-3 and checkpoint-6
    resumed = Net(seed=7)
    t2, _ = make(tmp_path / "c", resumed, 6)
    t2.train(resume_from_checkpoint=os.fspath(tmp_path / "b" / "checkpoint-3"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_with_another_plan_is_refused_before_loading(tmp_path: Any) -> None:
    """A checkpoint saved under one plan (OW: the weight lives in a generator) resumed into a
    model transformed with another: the Trainer would load non-strictly and only log the
    missing keys; OrthofxTrainer refuses before touching the weights."""
    t1, _ = make(tmp_path / "b", Net(), 3, save=True)
    t1.train()
    other = Net(seed=7)
    t2, _ = make(tmp_path / "c", other, 6, config="nog+olr")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match=r"'nog\+ow\+olr'.*'nog\+olr'"):
        t2.train(resume_from_checkpoint=os.fspath(tmp_path / "b" / "checkpoint-3"))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


class HFStyleNet(Net):
    """As a ``PreTrainedModel``: the Trainer then loads a mismatched checkpoint non-strictly and
    only logs the missing keys (for a bare nn.Module its warning code fails first)."""

    _keys_to_ignore_on_save = None


@pytest.mark.slow  # two Trainer runs
def test_plain_trainer_resume_with_another_plan_stops_training(tmp_path: Any) -> None:
    t1, _ = make(tmp_path / "b", HFStyleNet(), 3, save=True, config="nog+ow", cls=transformers.Trainer)
    t1.train()
    t2, _ = make(tmp_path / "b", HFStyleNet(seed=7), 6, config="nog", cls=transformers.Trainer)
    with pytest.raises(ConfigError, match="plan"):
        t2.train(resume_from_checkpoint=True)  # the last checkpoint of output_dir
    assert t2.state.global_step == 3  # stopped at train begin, no step taken


def test_metrics_reach_every_report_to_backend(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """κ and the treatment statistics went only to state.log_history; they are now in the
    ``logs`` of on_log, which the report_to backends (here TensorBoard's callback and a user
    callback listed before orthofx's) receive."""
    from transformers.integrations import TensorBoardCallback

    seen: dict[str, list[dict[str, Any]]] = {"tb": [], "user": []}
    monkeypatch.setattr(TensorBoardCallback, "on_log",
                        lambda self, args, state, control, logs=None, **kw: seen["tb"].append(dict(logs or {})))

    class Recorder(transformers.TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            seen["user"].append(dict(logs or {}))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, learning_rate=0.05, optim="sgd",
        use_cpu=True, report_to=["tensorboard"], logging_steps=1, save_strategy="no", dataloader_drop_last=True,
        seed=0, disable_tqdm=True)
    cb = OrthofxTrainerCallback("nog+olr", example_inputs=torch.randn(4, 1, 8, 8), every=1)
    trainer = OrthofxTrainer(model=Net(), args=args, train_dataset=Data(), callbacks=[Recorder(), cb])
    trainer.train()
    for name, logs in seen.items():
        rows = [r for r in logs if "orthofx/kappa/body.1" in r]
        assert len(rows) == 2 and all("loss" in r and "orthofx/olr/lr/body.1.reduce.weight" in r for r in rows), name
    hist = [r for r in trainer.state.log_history if "orthofx/kappa/body.1" in r]
    assert [r["step"] for r in hist] == [1, 2] and all("loss" in r for r in hist)
