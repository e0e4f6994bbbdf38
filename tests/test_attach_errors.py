"""attach hardening (issue 12): optimizer state dicts across attach, no empty param group left
behind by OLR, and the small validation fixes of the demo and the training loop's resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import AttachError, ConfigError
from orthofx.treatments import attach


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, sched=None) -> None:
    x, y = _data()
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _sgd(m: Net) -> torch.optim.SGD:
    return torch.optim.SGD(
        [{"params": [m.conv1.weight, m.conv2.weight], "weight_decay": 1e-3},
         {"params": [m.conv2.bias, *m.fc.parameters()], "lr": 0.01}],
        lr=0.05, momentum=0.9,
    )


# ------------------------------------------------------------------ (a) optimizer state dicts
def test_state_saved_before_attach_loads_into_an_attached_optimizer() -> None:
    torch.manual_seed(0)
    m = Net()
    opt = _sgd(m)
    _steps(m, opt, 2)
    saved = copy.deepcopy(opt.state_dict())  # 2 groups, no OLR
    m2 = copy.deepcopy(m)
    opt2 = _sgd(m2)
    attach(opt2, [(m2.conv2, "weight")], olr=True)
    assert len(opt2.param_groups) == 3
    opt2.load_state_dict(saved)  # torch alone: "different number of parameter groups"
    assert [len(g["params"]) for g in opt2.param_groups] == [1, 3, 1]
    assert opt2.param_groups[2]["params"][0] is m2.conv2.weight
    assert opt2.param_groups[2]["weight_decay"] == 1e-3 and opt2.param_groups[2]["momentum"] == 0.9
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    _steps(m2, opt2, 1)  # and it trains


def test_state_with_another_group_count_raises_an_attach_error() -> None:
    m = Net()
    opt = _sgd(m)
    attach(opt, [(m.conv2, "weight")], olr=True)
    other = torch.optim.SGD([{"params": [p]} for p in Net().parameters()], lr=0.1)  # 5 groups
    with pytest.raises(AttachError, match=r"5 param group.*has 3 since orthofx\.attach.*before opt\.load_state_dict"):
        opt.load_state_dict(other.state_dict())


def test_state_saved_after_attach_resumes_when_attach_comes_first() -> None:
    """The documented order: build the optimizer, attach, then load: training continues as if
    never interrupted (momentum buffers and OLR groups restored)."""
    torch.manual_seed(1)
    m = Net()
    opt = _sgd(m)
    attach(opt, [(m.conv1, "weight"), (m.conv2, "weight")], nog=True, olr=True)
    _steps(m, opt, 2)
    saved = copy.deepcopy(opt.state_dict())
    m2 = copy.deepcopy(m)
    opt2 = _sgd(m2)
    attach(opt2, [(m2.conv1, "weight"), (m2.conv2, "weight")], nog=True, olr=True)
    opt2.load_state_dict(saved)
    _steps(m, opt, 2)
    _steps(m2, opt2, 2)
    for (k, v), w in zip(m.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(w, v, atol=0, rtol=0, msg=k)


# ------------------------------------------------------------------ (b) no empty param group
@pytest.mark.parametrize("lr_mode", ["float", "tensor", "fold"])
def test_olr_leaves_no_empty_group_and_schedulers_keep_working(lr_mode: str) -> None:
    """conv1 alone in group 0: OLR keeps that group for it (no empty group, no shifted group
    index). The run equals one where group 0 also holds a frozen dummy, so conv1 moves into a
    new group as before; StepLR, momentum, weight decay and OLR act identically."""
    torch.manual_seed(2)
    a = Net()
    b = copy.deepcopy(a)
    dummy = nn.Parameter(torch.zeros(3), requires_grad=False)

    def build(m: Net, extra: list) -> tuple[torch.optim.SGD, object]:
        opt = torch.optim.SGD(
            [{"params": [m.conv1.weight, *extra], "lr": 0.02, "weight_decay": 5e-3},
             {"params": [p for n, p in m.named_parameters() if n != "conv1.weight"]}],
            lr=0.05, momentum=0.9,
        )
        h = attach(opt, [(m.conv1, "weight")], nog=True, olr=True, lr_mode=lr_mode)
        return opt, h

    opt_a, h_a = build(a, [])
    opt_b, _ = build(b, [dummy])
    assert all(g["params"] for g in opt_a.param_groups), "an empty param group was left behind"
    assert len(opt_a.param_groups) == 2 and opt_a.param_groups[0]["params"] == [a.conv1.weight]
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=1, gamma=0.5)
    for _ in range(3):
        _steps(a, opt_a, 1, sched_a)
        _steps(b, opt_b, 1, sched_b)
    for (k, v), w in zip(b.state_dict().items(), a.state_dict().values()):
        torch.testing.assert_close(w, v, atol=1e-7, rtol=1e-6, msg=k)
    # between steps the kept group holds its scheduled hyperparameters, not OLR's
    g0 = opt_a.param_groups[0]
    assert g0["lr"] == pytest.approx(0.02 * 0.5**3) and g0["weight_decay"] == 5e-3
    base = h_a.olr_history()["base"][:, 0]
    torch.testing.assert_close(base, torch.tensor([0.02, 0.01, 0.005], dtype=base.dtype))
    h_a.remove()
    assert [len(g["params"]) for g in opt_a.param_groups] == [1, 4]


def test_kept_group_round_trips_through_state_dict_and_remove() -> None:
    m = Net()
    opt = torch.optim.SGD([{"params": [m.conv1.weight, m.conv2.weight]},
                           {"params": [m.conv2.bias, *m.fc.parameters()]}], lr=0.1)
    h = attach(opt, [(m.conv2, "weight"), (m.conv1, "weight")], olr=True)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3, 1]  # conv1 kept group 0
    _steps(m, opt, 1)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(m, opt, 1)
    h.remove()
    assert opt.param_groups[0]["params"] == [m.conv1.weight, m.conv2.weight] and len(opt.param_groups) == 2


# ------------------------------------------------------------------ small ones (item 3)
@pytest.mark.parametrize("seeds", [0, -1, 1.5, "2"])
def test_demo_refuses_bad_seeds(tmp_path: Path, seeds) -> None:
    from orthofx.experiment.demo import demo

    with pytest.raises(ConfigError, match="seeds"):
        demo(tmp_path / "demo", seeds=seeds, log=lambda s: None)
    assert not (tmp_path / "demo").exists()


def _tiny(tmp_path: Path, **kw):
    from orthofx.experiment.train import ExperimentConfig

    base = dict(dataset="synthetic", train_limit=16, test_limit=16, batch_size=16, epochs=1,
                out=str(tmp_path / "run"), progress=False, monitor_every=1, treatment="nog")
    base.update(kw)
    return ExperimentConfig(**base)


class _NotPlainData:
    pass


def test_resume_loads_weights_only_and_refuses_other_checkpoints(tmp_path: Path) -> None:
    from orthofx.experiment.train import run

    cfg = _tiny(tmp_path)
    ck = Path(cfg.out) / "checkpoint.pt"
    ck.parent.mkdir(parents=True)
    # a checkpoint holding pickled code is not unpickled (weights_only=True)
    torch.save({"config": cfg.to_dict(), "payload": _NotPlainData()}, ck)
    with pytest.raises(ConfigError, match="weights_only=True"):
        run(cfg, log=lambda s: None)
    # another run's checkpoint: a ConfigError, not a bare ValueError
    torch.save({"config": {"treatment": "svd", "model": cfg.model}}, ck)
    with pytest.raises(ConfigError, match="different run"):
        run(cfg, log=lambda s: None)


def test_attach_takes_a_gradient_spec_and_renamed_names_warn() -> None:
    """Issue 24: attach's third argument is a GradientSpec (``spec``); its old name ``config=``
    and the second OW_TARGETS / the second ow_target default in treatments.ow_target still
    resolve, with a DeprecationWarning naming the one definition."""
    import orthofx.treatments.ow_target as ow_target
    from orthofx import vocab
    from orthofx.config import OrthoConfig
    from orthofx.specs import GradientSpec

    m = Net()
    h = attach(torch.optim.SGD(m.parameters(), lr=0.1), [(m.conv1, "weight")], GradientSpec(nog=True, olr=True))
    assert (h.nog, h.olr, h.spec) == (True, True, GradientSpec(nog=True, olr=True))
    with pytest.warns(DeprecationWarning, match=r"attach\(config=\.\.\.\) is deprecated and will be removed in orthofx 0.3.0; use attach\(spec=\.\.\.\)"):
        h2 = attach(torch.optim.SGD(m.parameters(), lr=0.1), [(m.conv1, "weight")], config=OrthoConfig(nog=True))
    assert h2.nog and not h2.olr
    with pytest.warns(DeprecationWarning, match=r"ow_target\.OW_TARGETS is deprecated and will be removed in orthofx 0.3.0; use orthofx\.vocab\.OW_TARGETS"):
        assert ow_target.OW_TARGETS is vocab.OW_TARGETS
    with pytest.warns(DeprecationWarning, match=r"DEFAULT_TARGET is deprecated and will be removed in orthofx 0.3.0; use orthofx\.specs\.GradientSpec"):
        assert ow_target.DEFAULT_TARGET == GradientSpec().ow_target == "generator"
    with pytest.raises(ConfigError, match="unknown GradientSpec field 'nogg'"):
        attach(torch.optim.SGD(m.parameters(), lr=0.1), [(m.conv1, "weight")], nogg=True)
