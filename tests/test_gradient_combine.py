"""Gradient chains (issue 13): pure transforms, named chains, custom chains installed by attach,
and the Muon-style chain of examples/muon_chain.py against a hand-written PyTorch loop."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from orthofx.errors import ConfigError, TreatmentError
from orthofx.treatments import (
    ChainState,
    GradientTransformation,
    Updates,
    attach,
    chain,
    default_chain,
    guard,
    named_chain,
    nog,
    olr,
)

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "muon_chain.py"


def _example():
    """examples/muon_chain.py as a module (registered: its dataclass needs sys.modules)."""
    name = "orthofx_example_muon_chain"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _EXAMPLE)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = mod
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return sys.modules[name]


class Two(nn.Module):
    """Two Pre-SVD-like producers: a tall (24, 8) Linear ``up`` and a wide (6, 6·3·3) ``conv2``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 24)
        self.mix = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up(x))  # (n, 24)
        h = h.reshape(-1, 4, 2, 3)
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.conv2(h))
        return self.head(h.mean((-2, -1)))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _uvt(m: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the flattened (rows, cols) matrix, in float64."""
    M = m.double().reshape(m.shape[0], -1)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U @ Vh).reshape(m.shape)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_muon_chain_equals_a_hand_written_loop(scale: bool, method: str) -> None:
    ex = _example()
    torch.manual_seed(0)
    a = Two()
    b = copy.deepcopy(a)
    x, y = _data()
    lr, beta, steps = 0.05, 0.9, 4

    producers_a = [(a.up, "weight"), (a.conv2, "weight")]
    opt = torch.optim.SGD(a.parameters(), lr=lr)
    h = attach(opt, producers_a, chain=ex.muon_chain(beta=beta, scale=scale, method=method))
    assert h.chain_names == ("guard", "muon") and not h.olr
    for _ in range(steps):
        opt.zero_grad()
        _loss(a, x, y).backward()
        opt.step()

    # the same thing by hand: plain SGD, with m ← βm + g and U Vᵀ(m)·√max(1, rows/cols) for the producers
    prod = {id(b.up.weight), id(b.conv2.weight)}
    mom = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in b.parameters() if id(p) in prod}
    for _ in range(steps):
        for p in b.parameters():
            p.grad = None
        _loss(b, x, y).backward()
        with torch.no_grad():
            for p in b.parameters():
                if id(p) in prod:
                    m = mom[id(p)] = beta * mom[id(p)] + p.grad.double()
                    rows, cols = p.shape[0], p[0].numel()
                    d = _uvt(m) * (math.sqrt(max(1.0, rows / cols)) if scale else 1.0)
                    p.sub_((lr * d).float())
                else:
                    p.sub_(lr * p.grad)

    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")  # float32 vs float64
    # the chain's state is read by name and equals the hand-written momentum
    ms = h.state["muon"].momentum
    torch.testing.assert_close(ms[0].double(), mom[id(b.up.weight)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ms[1].double(), mom[id(b.conv2.weight)], rtol=1e-5, atol=1e-6)
    assert h.stats()["steps"] == steps and h.stats()["nonfinite_grads"] == 0


def test_muon_update_is_pure() -> None:
    ex = _example()
    t = ex.muon(beta=0.5, method="svd")
    w = torch.randn(5, 3)
    s0 = t.init([w])
    g = torch.randn(5, 3)
    out, s1 = t.update([g], s0, [w], {})
    assert isinstance(out, Updates) and out.lr is None
    assert torch.equal(s0.momentum[0], torch.zeros(5, 3))  # the old state is untouched
    torch.testing.assert_close(s1.momentum[0], g)
    torch.testing.assert_close(out.grads[0].double(), _uvt(g) * math.sqrt(5 / 3), rtol=0, atol=1e-6)


def test_the_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    _example().main()
    out = capsys.readouterr().out
    assert "step 4" in out and "('guard', 'muon')" in out


# --------------------------------------------------------------------------- pure transforms
def test_olr_returns_its_lr_and_a_new_state() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 4)
    g = w.clone()  # η* = 1/3
    t = olr()
    s0 = t.init([w])
    out, s1 = t.update([g], s0, [w], {"lrs": [1.0]})
    assert out.grads[0] is g and out.lr is not None and out.lr.shape == (1,)
    assert out.lr[0].item() == pytest.approx(1 / 3)
    assert s0.lr is None and s0.steps == 0  # not mutated
    assert s1 is not s0 and s1.steps == 1 and torch.equal(s1.lr, out.lr)
    out2, s2 = t.update(out, s1, [w], {"lrs": [0.2]})
    assert out2.lr[0].item() == pytest.approx(0.2) and s2.steps == 2
    assert s2.read_history()["lr"].shape == (2, 1)


def test_named_chain_state_by_name_and_lr_passes_through() -> None:
    torch.manual_seed(2)
    w, g = torch.randn(8, 5), torch.randn(8, 5)
    t = named_chain(("nog", nog("svd")), ("olr", olr()), ("after", guard()))
    assert t.sets_lr
    s = t.init([w])
    assert isinstance(s, ChainState) and s.names == ("nog", "olr", "after")
    out, s1 = t.update([g], s, [w], {"lrs": [10.0]})
    assert out.lr is not None  # OLR's lr survives the guard after it
    assert s1["olr"].lr is not None and s["olr"].lr is None
    assert s1[1] is s1["olr"] and "nog" in s1 and "x" not in s1
    assert s1["nog"].steps == 1 and s1["after"].steps == 1
    with pytest.raises(KeyError, match="no transform named"):
        s1["x"]

    def double(updates, state, params=None, ctx=None):  # sets no lr: returns Updates without one
        return Updates([None if g is None else 2 * g for g in updates.grads]), state

    t2 = named_chain(("olr", olr()), ("double", GradientTransformation(lambda p: None, double)))
    out2, _ = t2.update([g], t2.init([w]), [w], {"lrs": [10.0]})
    torch.testing.assert_close(out2.grads[0], 2 * g)
    assert out2.lr is not None  # OLR's lr is kept
    with pytest.raises(ConfigError, match="twice"):
        named_chain(("a", guard()), ("a", guard()))
    assert chain(guard(), olr()).init([w]).names == ("0", "1")
    assert default_chain(nog=True, olr=True).init([w]).names == ("nog", "olr")
    assert default_chain().init([w]).names == ("guard",)


def test_chain_member_that_sets_lr_must_say_so() -> None:
    def init(params):
        return None

    def update(updates, state, params=None, ctx=None):
        return Updates(list(updates.grads), torch.ones(len(updates.grads))), state

    w = torch.randn(3, 3)
    bad = named_chain(("lr", GradientTransformation(init, update)))
    with pytest.raises(TreatmentError, match="sets_lr"):
        bad.update([w], bad.init([w]), [w], {})


def test_legacy_update_form_still_mutates_the_state_and_warns() -> None:
    """The mutating call form of orthofx 0.1 works until 0.3.0, with a DeprecationWarning
    naming the form to write instead."""
    from orthofx.treatments.gradient.legacy import NEW_FORM

    w, g = torch.randn(6, 4), torch.randn(6, 4)
    t = chain(nog("svd"), olr())
    s = t.init([w])
    with pytest.warns(DeprecationWarning, match="removed in orthofx 0.3.0") as rec:
        out = t.update([g], [w], s, lrs=[1.0])
    assert isinstance(out, list) and s[0].steps == 1 and s[1].lr is not None
    assert len(rec) == 1 and NEW_FORM in str(rec[0].message) and rec[0].filename == __file__


class _Halve:
    """A user's transform that halves every gradient and counts its steps, written twice: in the
    mutating form of orthofx 0.1 (state mutated in place, gradients returned) and in the pure one."""

    @staticmethod
    def init(params):
        return {"steps": 0}

    @staticmethod
    def old_update(grads, params, state, **ctx):
        state["steps"] += 1
        return [None if g is None else g / 2 for g in grads]

    @staticmethod
    def new_update(updates, state, params=None, ctx=None):
        return Updates([None if g is None else g / 2 for g in updates.grads]), {"steps": state["steps"] + 1}


def test_a_transform_written_in_the_mutating_form_is_adapted_with_a_warning() -> None:
    """named_chain/chain and attach(chain=) take a transform written as update(grads, params,
    state, **ctx) -> grads: DeprecationWarning (naming the new form, pointing at the caller),
    then the same gradients and steps as the transform written in the pure form."""
    from orthofx.treatments.gradient.legacy import NEW_FORM

    old = GradientTransformation(_Halve.init, _Halve.old_update)
    new = GradientTransformation(_Halve.init, _Halve.new_update)
    w, g = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="removed in orthofx 0.3.0") as rec:
        t_old = named_chain(("guard", guard()), ("halve", old))
    assert NEW_FORM in str(rec[0].message) and "'halve'" in str(rec[0].message) and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pure form is taken as it is
        t_new = named_chain(("guard", guard()), ("halve", new))
    s_old, s_new = t_old.init([w]), t_new.init([w])
    for _ in range(2):
        (u_old, s_old), (u_new, s_new) = t_old.update([g], s_old, [w], {}), t_new.update([g], s_new, [w], {})
        assert torch.equal(u_old.grads[0], g / 2) and torch.equal(u_new.grads[0], g / 2)
    assert s_old["halve"] == s_new["halve"] == {"steps": 2}

    with pytest.warns(DeprecationWarning, match="chain member '0'"):
        chain(old)

    # attach(chain=) with the old form: the same training as with the new form
    torch.manual_seed(1)
    a = Two()
    b = copy.deepcopy(a)
    x, y = _data()
    for m, tr in ((a, old), (b, new)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        if tr is old:
            with pytest.warns(DeprecationWarning, match=r"attach\(chain=\)"):
                attach(opt, [(m.up, "weight")], chain=tr)
        else:
            attach(opt, [(m.up, "weight")], chain=tr)
        for _ in range(3):
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------- attach(chain=...)
def _half_lr() -> GradientTransformation:
    """A transform of one's own that sets the lr: half the scheduled one."""

    def init(params):
        return ()

    def update(updates, state, params=None, ctx=None):
        lr = torch.tensor([float(v) / 2 for v in ctx["lrs"]], dtype=torch.float64)
        return Updates(list(updates.grads), lr), state

    return GradientTransformation(init, update, sets_lr=True)


@pytest.mark.parametrize("lr_mode", ["float", "tensor", "fold"])
def test_custom_chain_that_sets_lr_gets_its_own_groups(lr_mode: str) -> None:
    torch.manual_seed(3)
    a = Two()
    b = copy.deepcopy(a)
    x, y = _data()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_a = torch.optim.SGD(a.parameters(), **kw)
    h = attach(opt_a, [(a.up, "weight")], chain=named_chain(("guard", guard()), ("half", _half_lr())), lr_mode=lr_mode)
    assert h.olr and h.lr_mode == lr_mode and len(opt_a.param_groups) == 2
    opt_b = torch.optim.SGD([{"params": [p for p in b.parameters() if p is not b.up.weight]},
                             {"params": [b.up.weight], "lr": 0.05}], **kw)
    for opt, m in ((opt_a, a), (opt_b, b)):
        for _ in range(3):
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    assert h.olr_history()["lr"].numel() == 0  # no OLR member: no OLR history
    h.remove()
    assert len(opt_a.param_groups) == 1


def test_default_chain_passed_explicitly_equals_the_options() -> None:
    torch.manual_seed(4)
    a = Two()
    b = copy.deepcopy(a)
    x, y = _data()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    ha = attach(opt_a, [(a.up, "weight"), (a.conv2, "weight")], nog=True, olr=True, nog_method="svd")
    hb = attach(opt_b, [(b.up, "weight"), (b.conv2, "weight")],
                chain=default_chain(nog=True, olr=True, nog_method="svd"))
    for opt, m in ((opt_a, a), (opt_b, b)):
        for _ in range(3):
            opt.zero_grad()
            _loss(m, x, y).backward()
            opt.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    torch.testing.assert_close(ha.olr_history()["lr"], hb.olr_history()["lr"])
    sa, sb = ha.stats(), hb.stats()
    assert sb["chain"] == ("nog", "olr") and sa["last_lr"] == sb["last_lr"]
    assert ha.state["olr"].steps == 3 and ha.guard_state is ha.state["nog"]


def test_attach_chain_option_errors() -> None:
    m = Two()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="either chain="):
        attach(opt, [(m.up, "weight")], chain=chain(guard()), nog=True)
    with pytest.raises(ConfigError, match="GradientTransformation"):
        attach(opt, [(m.up, "weight")], chain="nog")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="preset name"):
        attach(opt, [(m.up, "weight")], "nog+olr")
    c = chain(guard())
    h = attach(opt, [(m.up, "weight")], chain=c)
    assert attach(opt, [(m.up, "weight")], chain=c) is h  # the same chain again: same handle
    with pytest.raises(Exception, match="already has orthofx"):
        attach(opt, [(m.up, "weight")], chain=chain(guard()))


def test_muon_chain_in_the_optimizer_form_equals_attach() -> None:
    """orthofx.optim.OrthoSGD(momentum=0, chain=muon_chain()) takes the attach steps bitwise."""
    import torch.nn.functional as F

    from orthofx.optim import OrthoSGD

    ex = _example()
    torch.manual_seed(0)
    a = ex.Net().double()
    b = copy.deepcopy(a)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    ref = torch.optim.SGD(a.parameters(), lr=0.02)
    attach(ref, [(a.reduce, "weight")], chain=ex.muon_chain(beta=0.9, method="eigh"))
    opt = OrthoSGD(b.parameters(), lr=0.02, momentum=0.0, producers=[(b.reduce, "weight")],
                   chain=ex.muon_chain(beta=0.9, method="eigh"))
    for m, o in ((a, ref), (b, opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
