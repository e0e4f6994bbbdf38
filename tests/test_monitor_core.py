"""Monitor ergonomics (issue 15): attach_to(optimizer), state_dict across a resume, a short repr,
plot() returning a Figure without touching the global backend, distinct line styles, and the
ImportErrors that name the extra."""

from __future__ import annotations

import sys

import matplotlib
import pytest
import torch
from torch import nn

from orthofx._optional import MissingExtraError
from orthofx.errors import InputError
from orthofx.monitor import ConditioningMonitor, plot
from orthofx.nn import DecorrelatedBatchNorm


def _stem(device=torch.device("cpu"), seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), DecorrelatedBatchNorm(8, eps=1e-2)).to(device)


def _train(model, opt, n, device=torch.device("cpu")):
    for _ in range(n):
        model(torch.randn(4, 1, 6, 6, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_attach_to_steps_after_each_optimizer_step(device):
    model = _stem(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ConditioningMonitor(model, every=2)
    handle = mon.attach_to(opt)
    _train(model, opt, 5, device)
    assert mon.step_count == 5
    assert [r["step"] for r in mon.flush()] == [0, 2, 4]
    handle.remove()
    _train(model, opt, 2, device)
    assert mon.step_count == 5
    mon.attach_to(opt)
    mon.close()  # removes the optimizer hook as well
    _train(model, opt, 1, device)
    assert mon.step_count == 5


def test_state_dict_resume_continues_step_numbers(tmp_path):
    model = _stem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = ConditioningMonitor(model, every=3, run="r")
    mon.attach_to(opt)
    _train(model, opt, 4)  # records 0 and 3
    torch.save({"model": model.state_dict(), "monitor": mon.state_dict()}, tmp_path / "ck.pt")
    mon.close()

    ck = torch.load(tmp_path / "ck.pt", weights_only=True)  # plain values only
    model2 = _stem(seed=1)
    model2.load_state_dict(ck["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    mon2 = ConditioningMonitor(model2, every=1, run="other")
    mon2.load_state_dict(ck["monitor"])
    assert (mon2.every, mon2.run, mon2.step_count) == (3, "r", 4)
    mon2.attach_to(opt2)
    _train(model2, opt2, 4)  # steps 4..7: records 6
    mon2.flush()
    assert [r["step"] for r in mon2.records] == [0, 3, 6]
    with pytest.raises(InputError, match="not a ConditioningMonitor state"):
        mon2.load_state_dict({"step": 3})


def test_repr_is_short():
    mon = ConditioningMonitor(_stem(), every=10)
    text = repr(mon)
    assert text == "ConditioningMonitor(run='run', layers=1, producers=0, every=10, step=0, pending=0, records=0)"


def _records(run: str, offset: float) -> list[dict]:
    return [{"run": run, "step": s, "kind": "meta", "layer": "1", "kappa": 10.0 ** (2 + offset)} for s in range(20)]


def test_plot_returns_a_figure_and_leaves_the_backend_alone(tmp_path):
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # a non-default, non-interactive backend that plot must not switch
    try:
        fig = plot({"a": _records("a", 0), "b": _records("b", 0)}, tmp_path / "k.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    assert (tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    assert isinstance(plot({"a": _records("a", 0)}), Figure)  # no path: nothing written


def test_overlapping_rows_get_distinct_styles():
    runs = {f"r{i}": _records(f"r{i}", 0.0) for i in range(12)}  # 12 identical curves
    lines = plot(runs).axes[0].lines
    styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len(lines) == 12 and len(styles) == 12
    assert len({ln.get_linestyle() for ln in lines}) > 1 and len({ln.get_marker() for ln in lines}) > 1


def test_plot_other_fields_and_kinds():
    recs = _records("a", 0) + [{"run": "a", "step": s, "kind": "producer", "layer": "0.weight",
                                "weight_norm": 3.0 + s} for s in range(5)]
    assert len(plot(recs, field="weight_norm").axes[0].lines[0].get_xdata()) == 5
    assert len(plot(recs).axes[0].lines[0].get_xdata()) == 20


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'orthofx\[plot\]'") as e:
        plot({"a": _records("a", 0)})
    assert isinstance(e.value, ImportError)


def test_missing_tensorboard_is_an_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"orthofx\[tensorboard\]"):
        ConditioningMonitor(_stem(), tensorboard_dir=tmp_path / "tb")


def test_summary_leads_with_the_kappa_to_read_and_its_convention() -> None:
    """13+ keys per layer: the first two say which κ to read and of which matrix."""
    import torch
    from torch import nn

    import orthofx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(16, 3, 6, 6)
    gm, _ = orthofx.transform(model, (x,), config="svd")
    mon = orthofx.ConditioningMonitor(gm, every=1)
    gm(x)
    mon.step()
    (layer,) = mon.summary().values()
    assert list(layer)[:2] == ["kappa_median", "kappa_of"] and layer["kappa_of"] == "Σ + εI"
    assert len(layer) > 10 and "kappa_median" in orthofx.ConditioningMonitor.summary.__doc__.split("All keys")[0]
