"""Saved OW state across the default-map change (orthofx.treatments.ow_state): the map is saved
with the state; state of the other map is refused with a ConfigError that names both and leaves
the module as it was; state saved before the record loads, with a warning where the module's
map is not the exponential of that time."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ConfigError
from orthofx.treatments import register_orthogonal
from orthofx.treatments.ow_state import STATE_VERSION

F64 = torch.float64


class WhiteningHead(nn.Module):
    """A projection head as self-supervised code writes it: Linear, centring, covariance, eigh,
    ZCA whitening with an ε chosen by the author."""

    def __init__(self, d_in: int = 12, d: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d, bias=False)
        self.eps = 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = h - h.mean(0, keepdim=True)
        cov = h.T @ h / (h.shape[0] - 1) + self.eps * torch.eye(h.shape[1], dtype=h.dtype)
        e, v = torch.linalg.eigh(cov)
        return h @ (v * e.rsqrt()) @ v.T


def _trained(method: str, shape: tuple[int, int], seed: int = 0) -> nn.Linear:
    """A float64 Linear with OW(``method``) whose generator has grown (‖S‖₂ ≈ 1)."""
    torch.manual_seed(seed)
    m = nn.Linear(shape[1], shape[0], bias=False).double()
    register_orthogonal(m, method=method)
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(0.4 * torch.randn(shape, dtype=F64))
    return m


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_the_map_is_saved_and_the_same_map_round_trips(shape) -> None:
    src = _trained("cayley", shape)
    sd = src.state_dict()
    assert int(sd["parametrizations.weight.0.map_id"]) == 2
    assert sd._metadata["parametrizations.weight"]["version"] == STATE_VERSION  # type: ignore[attr-defined]
    dst = _trained("cayley", shape, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst.load_state_dict(sd)
    torch.testing.assert_close(dst.weight, src.weight, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
@pytest.mark.parametrize("saved, target", [("expm", "cayley"), ("cayley", "expm")])
def test_state_of_the_other_map_is_refused_and_nothing_changes(shape, saved, target) -> None:
    sd = _trained(saved, shape).state_dict()
    dst = _trained(target, shape, seed=1)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ConfigError, match=rf"saved with ow_method='{saved}'.*uses ow_method='{target}'"):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a dict rebuilt without torch's metadata (as some checkpoint formats do) is refused too
    with pytest.raises(ConfigError, match="ow_method"):
        dst.load_state_dict({k: v for k, v in sd.items()})


def _as_saved_before_the_record(sd: dict) -> dict:
    """The state dict orthofx wrote between the square layout and the map record (version 2,
    no ``map_id``), when OW's default map was the exponential."""
    old = type(sd)((k, v) for k, v in sd.items() if not k.endswith("map_id"))
    old._metadata = copy.deepcopy(sd._metadata)  # type: ignore[attr-defined]
    for meta in old._metadata.values():  # type: ignore[attr-defined]
        if meta.get("version") == STATE_VERSION:
            meta["version"] = 2
    return old


def test_state_saved_before_the_record_loads_with_a_warning_under_cayley() -> None:
    src = _trained("expm", (6, 6))
    old = _as_saved_before_the_record(src.state_dict())
    into_expm = _trained("expm", (6, 6), seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        into_expm.load_state_dict(old)  # strict: the missing record is filled in
    torch.testing.assert_close(into_expm.weight, src.weight, atol=0, rtol=0)
    into_cayley = _trained("cayley", (6, 6), seed=1)
    with pytest.warns(UserWarning, match="before orthofx recorded OW's map.*ow_method='expm'"):
        into_cayley.load_state_dict(old)
    # loaded as Cayley: the same generator, another weight (the warning's reason)
    assert (into_cayley.weight - src.weight).abs().max() > 1e-3


def test_a_model_trained_with_the_exponential_is_not_loaded_into_the_new_default() -> None:
    """The whole-model flow: a head trained with ow_method='expm', saved with torch.save, and a
    fresh orthofx.transform(..., config='ow') (now Cayley) to load it into."""
    torch.manual_seed(3)
    x = torch.randn(64, 12)
    cfg = orthofx.OrthoConfig.from_preset("ow", ow_method="expm")
    gm, _ = orthofx.transform(WhiteningHead(), (x,), config=cfg)
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    fresh, report = orthofx.transform(WhiteningHead(), (x,), config="ow")
    assert any("ow(cayley)" in str(a) for a in report.actions)
    with pytest.raises(ConfigError, match="ow_method='expm'"):
        fresh.load_state_dict(sd)
    same, _ = orthofx.transform(WhiteningHead(), (x,), config=cfg)
    same.load_state_dict(sd)
    torch.testing.assert_close(same(x), gm(x), atol=1e-6, rtol=0)


def test_a_module_pickled_with_the_hook_under_its_first_name_still_loads_version1_state() -> None:
    """``torch.save(model)`` pickles load-state hooks by name; a square OW module saved while the
    version-1 hook lived in ``flat_ow`` must unpickle and still convert version-1 state."""
    from torch.nn.utils import parametrize

    from orthofx.treatments import flat_ow

    m = _trained("expm", (6, 6))
    plist = m.parametrizations.weight
    plist._load_state_dict_pre_hooks.clear()
    plist._version = 2
    plist.register_load_state_dict_pre_hook(flat_ow._migrate_square_state)  # as pickled then
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert parametrize.is_parametrized(back, "weight")
    p = back.parametrizations.weight[0]
    a = 0.1 * torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    state = back.state_dict()
    state["parametrizations.weight.original"] = a
    state._metadata["parametrizations.weight"]["version"] = 1  # type: ignore[attr-defined]
    Y0 = p.base
    W_old = torch.linalg.matrix_exp(a @ Y0.T - Y0 @ a.T) @ Y0
    with pytest.warns(UserWarning, match="square layout"):
        back.load_state_dict(state)
    torch.testing.assert_close(back.weight, W_old, atol=1e-10, rtol=0)
