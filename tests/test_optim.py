"""orthofx.optim.OrthoSGD: the optimizer form of NOG/OLR equals attach on torch.optim.SGD.
float64 models, compared bitwise (the same chain and the same SGD kernels run)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.errors import AttachError, ConfigError
from orthofx.optim import OrthoSGD
from orthofx.treatments import attach, guard, named_chain, nog


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def _batch(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64).to(device),
            torch.randint(0, 3, (8,), generator=g).to(device))


def _run(model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        x, y = _batch(device, s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _same(a: nn.Module, b: nn.Module) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


OPTIONS = [
    dict(nog=True, olr=False, momentum=0.9),
    dict(nog=False, olr=True, momentum=0.9, weight_decay=5e-4),
    dict(nog=True, olr=True, momentum=0.9, nesterov=True),
    dict(nog=True, olr=True, momentum=0.0),
]


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_orthosgd_equals_attach_on_sgd(device: torch.device, kw: dict) -> None:
    torch.manual_seed(0)
    a = Net().double().to(device)
    b = copy.deepcopy(a)
    treat = {k: kw[k] for k in ("nog", "olr")}
    sgd_kw = {k: v for k, v in kw.items() if k not in treat}
    ref = torch.optim.SGD(a.parameters(), lr=0.05, **sgd_kw)
    h = attach(ref, [(a.conv1, "weight")], nog_method="eigh", **treat)
    opt = OrthoSGD(b.parameters(), lr=0.05, producers=[(b.conv1, "weight")], nog_method="eigh", **treat, **sgd_kw)
    _run(a, ref, device, 5)
    _run(b, opt, device, 5)
    _same(a, b)
    assert opt.handle.stats()["steps"] == h.stats()["steps"] == 5
    if kw["olr"]:
        torch.testing.assert_close(opt.handle.olr_history()["lr"], h.olr_history()["lr"], rtol=0, atol=0)


def test_transformed_model_uses_its_plan_and_ow_weight_target() -> None:
    from test_transform import RawGCP, _batch as gcp_batch

    torch.manual_seed(0)
    cfg = orthofx.OrthoConfig.from_preset("nog+ow+olr", ow_target="weight")
    gm, report = orthofx.transform(RawGCP(), gcp_batch()[:1], config=cfg)
    gm = gm.double()
    gm2 = copy.deepcopy(gm)
    ref = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    h = orthofx.attach(ref, gm, nog=True, olr=True)
    opt = OrthoSGD(gm2, lr=0.05, momentum=0.9, nog=True, olr=True)
    assert opt.handle.names == h.names and opt.handle.ow_target == h.ow_target == "weight"
    for s in range(3):
        for m, o in ((gm, ref), (gm2, opt)):
            x, y = gcp_batch(seed=s)
            o.zero_grad()
            F.cross_entropy(m(x.double()), y).backward()
            o.step()
    _same(gm, gm2)
    # both re-based the OW map after every step (ow_target="weight"): the generator is 0
    for m in (gm, gm2):
        gens = [p for n, p in m.named_parameters() if n.endswith("parametrizations.weight.original")]
        assert gens and all(float(p.detach().abs().max()) == 0.0 for p in gens)


def test_state_dict_round_trip(device: torch.device) -> None:
    torch.manual_seed(0)
    a = Net().double().to(device)
    opt_a = OrthoSGD(a.parameters(), lr=0.05, producers=[(a.conv1, "weight")], nog=True, olr=True)
    _run(a, opt_a, device, 3)
    sd = copy.deepcopy(opt_a.state_dict())
    b = copy.deepcopy(a)
    opt_b = OrthoSGD(b.parameters(), lr=0.05, producers=[(b.conv1, "weight")], nog=True, olr=True)
    opt_b.load_state_dict(sd)
    assert len(opt_b.param_groups) == len(opt_a.param_groups) == 2
    torch.testing.assert_close(opt_b.state[b.conv1.weight]["momentum_buffer"],
                               opt_a.state[a.conv1.weight]["momentum_buffer"], rtol=0, atol=0)
    _run(a, opt_a, device, 2, start=3)
    _run(b, opt_b, device, 2, start=3)
    _same(a, b)


def test_param_groups_and_scheduler() -> None:
    """A producer in a group with its own lr keeps that group's schedule; OLR caps at it."""
    torch.manual_seed(0)
    a = Net().double()
    b = copy.deepcopy(a)

    def groups(m: nn.Module) -> list[dict]:
        rest = [p for n, p in m.named_parameters() if not n.startswith("conv1")]
        return [{"params": [m.conv1.weight], "lr": 0.02}, {"params": rest}]

    ref = torch.optim.SGD(groups(a), lr=0.1, momentum=0.9)
    attach(ref, [(a.conv1, "weight")], nog=True, olr=True)
    opt = OrthoSGD(groups(b), lr=0.1, momentum=0.9, producers=[(b.conv1, "weight")], nog=True, olr=True)
    sched_a = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for s in range(4):
        _run(a, ref, torch.device("cpu"), 1, start=s)
        _run(b, opt, torch.device("cpu"), 1, start=s)
        sched_a.step()
        sched_b.step()
    _same(a, b)
    base = opt.handle.olr_history()["base"][:, 0].tolist()
    assert base == [0.02, 0.02, 0.01, 0.01]
    assert (opt.handle.olr_history()["lr"][:, 0] <= torch.tensor(base, dtype=torch.float64)).all()


def test_closure_step_equals_backward_then_step() -> None:
    torch.manual_seed(0)
    a = Net().double()
    b = copy.deepcopy(a)
    opt_a = OrthoSGD(a.parameters(), lr=0.05, producers=[(a.conv1, "weight")], olr=True)
    opt_b = OrthoSGD(b.parameters(), lr=0.05, producers=[(b.conv1, "weight")], olr=True)
    _run(a, opt_a, torch.device("cpu"), 2)
    for s in range(2):
        x, y = _batch(torch.device("cpu"), s)

        def closure() -> torch.Tensor:
            opt_b.zero_grad()
            loss = F.cross_entropy(b(x), y)
            loss.backward()
            return loss

        assert torch.isfinite(opt_b.step(closure))
    _same(a, b)
    assert opt_b.handle.stats()["steps"] == 2  # the chain ran once per step (not twice)


def test_custom_chain_matches_attach() -> None:
    torch.manual_seed(0)
    a = Net().double()
    b = copy.deepcopy(a)
    chain = named_chain(("guard", guard()), ("nog", nog("eigh")))
    ref = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.0)
    attach(ref, [(a.conv1, "weight")], chain=chain)
    opt = OrthoSGD(b.parameters(), lr=0.05, momentum=0.0, producers=[(b.conv1, "weight")], chain=chain)
    _run(a, ref, torch.device("cpu"), 3)
    _run(b, opt, torch.device("cpu"), 3)
    _same(a, b)
    with pytest.raises(ConfigError, match="chain"):
        OrthoSGD(b.parameters(), lr=0.05, producers=[(b.conv1, "weight")], chain=chain, olr=True)


def test_repr_and_model_without_producers() -> None:
    m = Net().double()
    opt = OrthoSGD(m.parameters(), lr=0.05, producers=[(m.conv1, "weight")])
    assert repr(opt).startswith("OrthoSGD (AttachHandle(attached, producers=['Conv2d.weight']")
    gm, _ = orthofx.transform(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3), config="nog")
    with pytest.warns(UserWarning, match="no Pre-SVD layer"):
        plain = OrthoSGD(gm, lr=0.1)
    assert plain.handle is None


def test_errors_without_plan_or_producers() -> None:
    with pytest.raises(AttachError, match="no orthofx plan"):
        OrthoSGD(Net(), lr=0.1)
    with pytest.raises(ConfigError, match="producers="):
        OrthoSGD(Net().parameters(), lr=0.1)


def test_user_step_hooks_run_once() -> None:
    m = Net().double()
    opt = OrthoSGD(m.parameters(), lr=0.05, producers=[(m.conv1, "weight")])
    torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)  # an SGD exists: SGD.step is hook-wrapped
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    _run(m, opt, torch.device("cpu"), 1)
    assert calls == ["pre", "post"]


def _two_pre_svd_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), orthofx.nn.DecorrelatedBatchNorm(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()


def _uvt(g: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the flattened (out, in·k·k) gradient, float64 thin SVD."""
    u, _, vh = torch.linalg.svd(g.reshape(g.shape[0], -1).double(), full_matrices=False)
    return (u @ vh).reshape(g.shape)


def test_orthosgd_follows_layer_configs() -> None:
    """Issue 21 leftover: the plan decides per Pre-SVD layer. With layer_configs={"0": "nog"} only
    layer 0 gets the nearest-orthogonal gradient; layer 3 (the config's "svd") takes plain SGD.
    float64 model, one step, momentum 0, against the float64 hand computation."""
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    gm, report = orthofx.transform(_two_pre_svd_layers(), (x,), config=orthofx.OrthoConfig(layer_configs={"0": "nog"}))
    assert [(p.name, p.treatments) for p in report.plan.producers] == [("0", ["nog"]), ("3", [])]
    ref = copy.deepcopy(gm)
    lr = 0.05
    opt = OrthoSGD(gm, lr=lr, momentum=0.0)
    F.cross_entropy(gm(x), y).backward()
    w0, w3 = gm[0].weight.detach().clone(), gm[3].weight.detach().clone()
    g0, g3 = gm[0].weight.grad.clone(), gm[3].weight.grad.clone()
    assert torch.linalg.matrix_rank(g0.reshape(8, -1)) == 8  # full rank: U Vᵀ is unique
    opt.step()
    # float64; 1e-12 covers the CPU polar ("auto" = float64 Gram eigh) against the SVD, 1e-15
    # the rounding of SGD's in-place w.add_(g, alpha=-lr) against w - lr·g
    torch.testing.assert_close(gm[0].weight.detach(), w0 - lr * _uvt(g0), rtol=0, atol=1e-12)
    torch.testing.assert_close(gm[3].weight.detach(), w3 - lr * g3, rtol=0, atol=1e-15)
    assert opt.handle.names == ("0.weight",) and opt.handle.nog
    # orthofx.attach on torch.optim.SGD takes the same step (the same road)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr, momentum=0.0)
    h = orthofx.attach(sgd, ref)
    assert h.names == ("0.weight",)
    F.cross_entropy(ref(x), y).backward()
    sgd.step()
    _same(ref, gm)


def test_orthosgd_without_gradient_treatments_in_the_plan_is_plain_sgd() -> None:
    """A plan with no NOG/OLR gives none (it used to put NOG on every Pre-SVD layer); an explicit
    nog=True treats them all, as orthofx.attach(opt, gm, nog=True) does."""
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gm, _ = orthofx.transform(_two_pre_svd_layers(), (x,), config="svd")
    with pytest.warns(UserWarning, match=r"none of the model's 2 Pre-SVD layer\(s\) NOG or OLR"):
        assert OrthoSGD(gm, lr=0.1).handle is None
    opt = OrthoSGD(gm, lr=0.1, nog=True)
    assert opt.handle.names == ("0.weight", "3.weight") and opt.handle.nog
    gm2, _ = orthofx.transform(_two_pre_svd_layers(), (x,),
                               config=orthofx.OrthoConfig(layer_configs={"0": "nog", "3": "olr"}))
    with pytest.raises(ConfigError, match="different gradient treatments"):
        OrthoSGD(gm2, lr=0.1)
