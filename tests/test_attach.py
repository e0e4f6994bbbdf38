"""attach(): NOG/OLR as an optimizer step pre-hook, checked against float64 re-implementations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.errors import AttachError, ConfigError, TreatmentError
from orthofx.treatments import attach, register_orthogonal


def _uvt64(g: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(g.reshape(g.shape[0], -1).double().cpu(), full_matrices=False)
    return (U @ Vh).reshape(g.shape)


class Net(nn.Module):
    """conv1 (8×27) is the producer; conv2 and fc are ordinary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data(device: torch.device, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, 6, 6, generator=g).to(device)
    y = torch.randint(0, 3, (n,), generator=g).to(device)
    return x, y


def test_one_nog_step_is_minus_lr_polar(device: torch.device) -> None:
    torch.manual_seed(0)
    a = Net().to(device)
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    attach(opt_a, [(a.conv1, "weight")], nog=True, nog_method="svd")
    x, y = _data(device)
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    G = a.conv1.weight.grad.clone()
    torch.testing.assert_close(G, b.conv1.weight.grad)
    w0 = a.conv1.weight.detach().clone()
    opt_a.step()
    opt_b.step()
    delta = (a.conv1.weight.detach() - w0).double().cpu()
    torch.testing.assert_close(delta, -0.05 * _uvt64(G), atol=1e-6, rtol=0)
    # the optimizer saw (and left in .grad) the polar factor
    torch.testing.assert_close(a.conv1.weight.grad.double().cpu(), _uvt64(G), atol=2e-6, rtol=0)
    # every other layer: same gradient, same update as without attach
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        if na != "conv1.weight":
            assert torch.equal(pa.grad, pb.grad), na
            assert torch.equal(pa, pb), na


class Toy(nn.Module):
    """loss = Σ_i <w_i, t_i> + <v, s>: the gradient of w_i is exactly t_i (a chosen constant)."""

    def __init__(self, ws: list[torch.Tensor], ts: list[torch.Tensor], v: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(w.clone()) for w in ws])
        self.v = nn.Parameter(v.clone())
        self.ts, self.s = ts, s

    def forward(self) -> torch.Tensor:
        return sum((w * t).sum() for w, t in zip(self.ws, self.ts)) + (self.v * self.s).sum()


def _toy_setup(device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(6, 2, 3, 3, generator=g), torch.randn(5, 7, generator=g), torch.randn(6, 2, 3, 3, generator=g)]
    ws.append(torch.randn(3, 4, 2, 2, generator=g))
    r = torch.randn(6, 2, 3, 3, generator=g)
    r = r - (r * ws[2]).sum() / (ws[2] * ws[2]).sum() * ws[2]
    # η* = 1/3 at first, then shrinking; η* < 0; 0 < η* < lr; η* ≈ 33 ≥ lr
    ts = [ws[0].clone(), -ws[1], 0.5 * ws[2] + r, 0.01 * ws[3]]
    v, s = torch.randn(4, generator=g), torch.randn(4, generator=g)
    return [w.to(device) for w in ws], [t.to(device) for t in ts], v.to(device), s.to(device)


def _sgd_olr_reference(
    ws, ts, v, s, *, steps, lrs, mu, wd, nesterov, use_nog
) -> tuple[list[torch.Tensor], torch.Tensor, list[list[float]], list[list[float]]]:
    """Manual float64 SGD: OLR lr for each producer, the scheduled lr for v."""
    ws = [w.double().cpu() for w in ws]
    ls = [(_uvt64(t) if use_nog else t.double().cpu()) for t in ts]
    v, s = v.double().cpu(), s.double().cpu()
    bufs: list[torch.Tensor | None] = [None] * (len(ws) + 1)
    etas, chosen = [], []

    def sgd(p, d, i, lr):
        d = d + wd * p
        bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
        upd = d + mu * bufs[i] if nesterov else bufs[i]
        return p - lr * upd

    for k in range(steps):
        lr = lrs[k]
        row_e, row_c = [], []
        for i, (w, l) in enumerate(zip(ws, ls)):
            wf, lf = w.flatten(), l.flatten()
            eta = ((wf @ wf) * (lf @ wf) / ((wf @ wf) * (lf @ lf) + 2 * (lf @ wf) ** 2)).item()
            c = eta if 0 < eta < lr else lr
            row_e.append(eta)
            row_c.append(c)
            ws[i] = sgd(w, l, i, c)
        v = sgd(v, s, len(ws), lr)
        etas.append(row_e)
        chosen.append(row_c)
    return ws, v, etas, chosen


@pytest.mark.parametrize("sched_first", [False, True], ids=["sched_after", "sched_before"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["heavyball", "nesterov"])
@pytest.mark.parametrize("lr_mode", ["float", "tensor", "fold"])
def test_olr_with_momentum_wd_and_steplr_matches_float64_sgd(
    device: torch.device, lr_mode: str, nesterov: bool, sched_first: bool
) -> None:
    ws, ts, v, s = _toy_setup(device)
    model = Toy(ws, ts, v, s)
    mu, wd, steps = 0.9, 5e-4, 6
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=mu, weight_decay=wd, nesterov=nesterov)
    if sched_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    h = attach(opt, {f"w{i}": p for i, p in enumerate(model.ws)}, olr=True, lr_mode=lr_mode)
    if not sched_first:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)  # also steps the producer groups
    assert h.lr_mode == lr_mode and len(opt.param_groups) == 5
    scheduled = []
    for _ in range(steps):
        scheduled.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model().backward()
        opt.step()
        sched.step()
    assert scheduled == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    ref_ws, ref_v, ref_eta, ref_lr = _sgd_olr_reference(
        ws, ts, v, s, steps=steps, lrs=scheduled, mu=mu, wd=wd, nesterov=nesterov, use_nog=False
    )
    hist = h.olr_history()
    assert hist["lr"].shape == (steps, 4)
    torch.testing.assert_close(hist["eta"].cpu(), torch.tensor(ref_eta, dtype=torch.float64), rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(hist["lr"].cpu(), torch.tensor(ref_lr, dtype=torch.float64), rtol=2e-5, atol=1e-9)
    torch.testing.assert_close(hist["base"][:, 0].cpu(), torch.tensor(scheduled, dtype=torch.float64))
    lr_used, eta = torch.tensor(ref_lr, dtype=torch.float64), torch.tensor(ref_eta, dtype=torch.float64)
    sched_t = torch.tensor(scheduled, dtype=torch.float64)
    assert lr_used[0, 0] == pytest.approx(1 / 3)  # η* = 1/3 < lr = 1 is used
    assert torch.all(eta[:, 1] < 0) and torch.all(lr_used[:, 1] == sched_t)  # η* ≤ 0 → lr
    assert 0 < lr_used[0, 2] < sched_t[0]  # another 0 < η* < lr
    assert torch.all(eta[:, 3] > sched_t) and torch.all(lr_used[:, 3] == sched_t)  # η* ≥ lr → lr
    for p, r in zip(model.ws, ref_ws):
        torch.testing.assert_close(p.detach().double().cpu(), r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.v.detach().double().cpu(), ref_v, rtol=1e-5, atol=1e-6)
    for pg in opt.param_groups:
        lr = pg["lr"]
        assert not (isinstance(lr, torch.Tensor) and lr.requires_grad)


def test_nog_then_olr_matches_float64(device: torch.device) -> None:
    ws, ts, v, s = _toy_setup(device)
    model = Toy(ws, ts, v, s)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    h = attach(opt, list(model.ws), nog=True, olr=True)
    for _ in range(4):
        opt.zero_grad()
        model().backward()
        opt.step()
    ref_ws, ref_v, _, ref_lr = _sgd_olr_reference(
        ws, ts, v, s, steps=4, lrs=[0.5] * 4, mu=0.9, wd=1e-3, nesterov=False, use_nog=True
    )
    torch.testing.assert_close(h.olr_history()["lr"].cpu(), torch.tensor(ref_lr, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    for p, r in zip(model.ws, ref_ws):  # float32 trajectory vs float64: entries of size ~1
        torch.testing.assert_close(p.detach().double().cpu(), r, rtol=1e-5, atol=5e-6)
    stats = h.stats()
    assert stats["steps"] == 4 and stats["nonfinite_grads"] == 0
    assert set(stats["last_lr"]) == {f"producer[{i}]" for i in range(4)}


def _train(model, opt, x, y, steps, *, scaler=None, micro=1):
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.cross_entropy(model(xb), yb) / micro
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_gradscaler_sees_unscaled_gradients(device: torch.device, fused: bool) -> None:
    torch.manual_seed(1)
    a = Net().to(device)
    b = copy.deepcopy(a)
    x, y = _data(device)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, fused=fused)
    opt_a = torch.optim.SGD(a.parameters(), **kw)
    opt_b = torch.optim.SGD(b.parameters(), **kw)
    attach(opt_a, [(a.conv1, "weight")], nog=True, olr=True)
    attach(opt_b, [(b.conv1, "weight")], nog=True, olr=True)
    _train(a, opt_a, x, y, 3)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    _train(b, opt_b, x, y, 3, scaler=scaler)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-6, rtol=1e-5, msg=n)


def test_gradscaler_skipped_step_never_reaches_the_hook(device: torch.device) -> None:
    torch.manual_seed(2)
    m = Net().to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    h = attach(opt, [(m.conv1, "weight")], nog=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    w0 = m.conv1.weight.detach().clone()
    x, y = _data(device)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(m(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert h.stats()["steps"] == 0
    assert torch.equal(m.conv1.weight.detach(), w0)


def test_accumulation_over_micro_batches_equals_full_batch(device: torch.device) -> None:
    torch.manual_seed(3)
    a = Net().to(device)
    b = copy.deepcopy(a)
    x, y = _data(device, n=16)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    attach(opt_a, [(a.conv1, "weight")], nog=True, olr=True)
    attach(opt_b, [(b.conv1, "weight")], nog=True, olr=True)
    _train(a, opt_a, x, y, 3, micro=1)
    _train(b, opt_b, x, y, 3, micro=4)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5, msg=n)


def test_zero_and_nan_gradients_are_counted_and_weights_stay_finite(device: torch.device) -> None:
    torch.manual_seed(4)
    m = Net().to(device)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    h = attach(opt, [(m.conv1, "weight"), (m.conv2, "weight")], nog=True, olr=True)
    x, y = _data(device)
    for kind in ("nan", "zero", "inf"):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        with torch.no_grad():
            if kind == "nan":
                m.conv1.weight.grad.fill_(float("nan"))
            elif kind == "zero":
                m.conv1.weight.grad.zero_()
            else:
                m.conv2.weight.grad[0, 0, 0, 0] = float("inf")
        opt.step()
        for p in m.parameters():
            assert torch.isfinite(p).all()
    st = h.stats()
    assert st["steps"] == 3 and st["nonfinite_grads"] == 2 and st["zero_grads"] == 1
    # OLR falls back to the scheduled lr where the gradient was unusable
    assert h.olr_history()["lr"][0, 0].item() == 0.1


def test_attach_errors() -> None:
    m, other = Net(), Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(AttachError, match="does not hold"):
        attach(opt, {"other.conv1.weight": other.conv1.weight}, nog=True)
    with pytest.raises(AttachError, match="other.conv1.weight"):
        attach(opt, {"other.conv1.weight": other.conv1.weight}, nog=True)
    ints = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(TreatmentError, match="int32"):
        attach(opt, {"q": ints}, nog=True)
    with pytest.raises(TreatmentError, match="2 dims"):
        attach(opt, [m.conv2.bias], nog=True)
    with pytest.raises(AttachError, match="no producer"):
        attach(opt, [], nog=True)
    with pytest.raises(AttachError, match="Optimizer"):
        attach(m, [m.conv1.weight], nog=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        attach(opt, [m.conv1.weight], nog=True, nog_method="qr")
    with pytest.raises(ConfigError):
        attach(opt, [m.conv1.weight], olr=True, lr_mode="magic")  # type: ignore[arg-type]
    adam = torch.optim.Adam(m.parameters())
    with pytest.raises(ConfigError, match="SGD"):
        attach(adam, [m.conv1.weight], olr=True, lr_mode="fold")
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    with pytest.raises(AttachError, match="require grad"):
        attach(torch.optim.SGD(frozen.parameters(), lr=0.1), [frozen.weight], nog=True)
    h = attach(opt, [m.conv1.weight], nog=True)
    with pytest.raises(AttachError, match="closure"):
        opt.step(lambda: torch.zeros(()))
    h.remove()


def test_attach_is_idempotent_and_remove_restores_groups() -> None:
    torch.manual_seed(5)
    m = Net()
    opt = torch.optim.SGD(
        [
            {"params": [m.conv1.weight, m.conv2.weight], "weight_decay": 1e-3},
            {"params": list(m.fc.parameters()) + [m.conv2.bias], "lr": 0.01},
        ],
        lr=0.1,
        momentum=0.9,
    )
    before = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    h = attach(opt, [(m.conv2, "weight"), (m.conv1, "weight")], olr=True)
    assert attach(opt, [(m.conv2, "weight"), (m.conv1, "weight")], olr=True) is h
    assert len(opt.param_groups) == 3  # OLR leaves no empty group behind (issue 12)
    assert opt.param_groups[2]["weight_decay"] == 1e-3 and opt.param_groups[2]["momentum"] == 0.9
    with pytest.raises(AttachError, match="already"):
        attach(opt, [(m.conv1, "weight")], nog=True)
    x, y = _data(torch.device("cpu"))
    _train(m, opt, x, y, 2)
    buf = opt.state[m.conv1.weight]["momentum_buffer"]
    # a state-dict round trip keeps working while attached
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(m, opt, x, y, 1)
    h.remove()
    h.remove()
    after = [([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    assert after == before
    assert opt.state[m.conv1.weight]["momentum_buffer"].shape == buf.shape
    # detached: the next step is plain SGD
    m2 = copy.deepcopy(m)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    g = m.conv1.weight.grad.clone()
    opt.step()
    assert torch.equal(m.conv1.weight.grad, g)
    h2 = attach(opt, [(m.conv1, "weight")], nog=True)
    assert h2 is not h and not h2.removed
    del m2


def test_param_names_groups_round_trip() -> None:
    m = Net()
    opt = torch.optim.SGD(m.named_parameters(), lr=0.1)
    names = list(opt.param_groups[0]["param_names"])
    h = attach(opt, {"conv2.weight": m.conv2.weight}, olr=True)
    assert opt.param_groups[1]["param_names"] == ["conv2.weight"]
    x, y = _data(torch.device("cpu"))
    _train(m, opt, x, y, 1)
    h.remove()
    assert opt.param_groups[0]["param_names"] == names


def test_groups_edited_after_attach_raise() -> None:
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    attach(opt, [m.conv1.weight], olr=True)
    opt.param_groups.pop()
    x, y = _data(torch.device("cpu"))
    with pytest.raises(AttachError, match="changed after"):
        _train(m, opt, x, y, 1)


def test_adam_with_olr_float_lrs_and_config_object() -> None:
    from orthofx.config import OrthoConfig

    torch.manual_seed(6)
    m = Net()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.8, 0.99))
    h = attach(opt, [(m.conv1, "weight")], OrthoConfig.from_preset("nog+olr"))
    assert h.nog and h.olr and h.lr_mode == "float"
    x, y = _data(torch.device("cpu"))
    _train(m, opt, x, y, 3)
    own = opt.param_groups[-1]
    assert own["params"][0] is m.conv1.weight and own["betas"] == (0.8, 0.99)
    assert isinstance(own["lr"], float)
    assert own["lr"] == h.olr_history()["lr"][-1, 0].item()
    assert len(opt.state[m.conv1.weight]) > 0


def test_ow_parameter_is_the_producer() -> None:
    """With OW the optimizer updates ``parametrizations.weight.original``; (module, name)
    resolves to it, and an optimizer built before registration still holds it."""
    torch.manual_seed(7)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    register_orthogonal(m.conv1)
    h = attach(opt, [(m.conv1, "weight")], nog=True, olr=True)
    x, y = _data(torch.device("cpu"))
    _train(m, opt, x, y, 3)
    W = m.conv1.weight.detach().reshape(8, -1).double()
    torch.testing.assert_close(W @ W.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert h.stats()["steps"] == 3
    assert math.isfinite(h.stats()["last_lr"][h.names[0]])


def test_lr_mode_auto_resolution() -> None:
    m = Net()
    h = attach(torch.optim.SGD(m.parameters(), lr=0.1), [m.conv1.weight], olr=True)
    assert h.lr_mode == ("fold" if m.conv1.weight.is_cuda else "float")
    m2 = Net()
    h2 = attach(torch.optim.SGD(m2.parameters(), lr=0.1, fused=True), [m2.conv1.weight], olr=True)
    assert h2.lr_mode == "tensor"


def _ddp_worker(rank: int, world: int, port: int, init_state: dict, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Net()
        model.load_state_dict(init_state)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        attach(opt, [(model.conv1, "weight")], nog=True, olr=True)
        _train(ddp, opt, x.chunk(world)[rank], y.chunk(world)[rank], 2)
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two DDP processes
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_hook_sees_the_all_reduced_gradient(tmp_path) -> None:
    """2 gloo ranks with half a batch each == one process with the whole batch: NOG/OLR act
    on the averaged gradient, after DDP's all-reduce."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(8)
    ref = Net()
    init = copy.deepcopy(ref.state_dict())
    x, y = _data(torch.device("cpu"), n=16)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, port, init, x, y, out), nprocs=2, join=True)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    attach(opt, [(ref.conv1, "weight")], nog=True, olr=True)
    _train(ref, opt, x, y, 2)
    got = torch.load(out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_mapping_config_and_custom_chain_through_the_same_installer() -> None:
    """attach reads plain values from a mapping config; chain= installs any chain instead of
    the config's (a NOG chain here, equal to nog=True), with its state read by name."""
    from orthofx.treatments import default_chain, guard, named_chain, nog

    torch.manual_seed(9)
    a = Net()
    b = copy.deepcopy(a)
    x, y = _data(torch.device("cpu"))
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    ha = attach(opt_a, [(a.conv1, "weight")], {"nog": True, "nog_method": "svd"})
    hb = attach(opt_b, [(b.conv1, "weight")], {"olr": True},  # the config is not used with chain=
                chain=named_chain(("guard", guard()), ("nog", nog("svd"))))
    assert (ha.nog, ha.olr, ha.nog_method) == (True, False, "svd")
    assert hb.options["chain"] == ("guard", "nog") and not hb.olr and len(opt_b.param_groups) == 1
    _train(a, opt_a, x, y, 3)
    _train(b, opt_b, x, y, 3)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    assert hb.state["nog"].steps == 3 and hb.stats()["steps"] == 3
    assert ha.state["nog"].steps == 3 and ha.chain_names == ("nog",)
    assert default_chain(nog=True).init([a.conv1.weight]).names == ha.chain_names
