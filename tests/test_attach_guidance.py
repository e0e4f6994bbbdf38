"""AdaptiveOptimizerWarning: attach says once per optimizer what NOG/OLR do under Adam & co."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthofx.treatments import AdaptiveOptimizerWarning, attach, named_chain, nog
from orthofx.treatments.guidance import is_adaptive


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))


def _steps(m: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()


def _adaptive(caught: list) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, AdaptiveOptimizerWarning)]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop])
def test_nog_with_adaptive_optimizer_warns_once_at_attach(cls) -> None:
    m = _model()
    opt = cls(m.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = attach(opt, [m[0].weight], nog=True)
        _steps(m, opt, 3)
        h.remove()
        attach(opt, [m[0].weight], nog=True)  # again on the same optimizer: no second warning
        _steps(m, opt, 1)
    msgs = _adaptive(caught)
    assert len(msgs) == 1
    assert cls.__name__ in msgs[0] and "U Vᵀ" in msgs[0] and "element-wise" in msgs[0]
    assert "no longer orthogonal" in msgs[0] and "OLR" not in msgs[0].split("For the paper")[0]


def test_olr_with_adam_warns_once_at_attach() -> None:
    """The README says attach warns; it once waited for the first step() with OLR."""
    m = _model()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = attach(opt, [m[0].weight], nog=True, olr=True)
        msgs = _adaptive(caught)
        assert len(msgs) == 1  # before any step
        _steps(m, opt, 4)
    assert _adaptive(caught) == msgs and h.olr
    assert msgs[0].startswith("orthofx.attach: NOG/OLR are derived for SGD")
    assert "OLR's η*" in msgs[0] and "Adam" in msgs[0] and "U Vᵀ" in msgs[0]


def test_pipeline_attach_warns_for_olr_with_adam() -> None:
    import orthofx

    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    gm, _ = orthofx.transform(model, (torch.randn(8, 3, 6, 6),), config="olr")
    with pytest.warns(AdaptiveOptimizerWarning, match="OLR is derived for SGD"):
        orthofx.attach(torch.optim.Adam(gm.parameters()), gm)


def test_adaptive_detected_by_state_keys() -> None:
    class MyAdaptive(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    st.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(0.9).addcmul_(p.grad, p.grad, value=0.1)
                    p.add_(p.grad / (st["exp_avg_sq"].sqrt() + 1e-8), alpha=-group["lr"])

    m = _model()
    opt = MyAdaptive(m.parameters())
    assert not is_adaptive(opt)
    _steps(m, opt, 1)
    assert is_adaptive(opt, [m[0].weight])
    with pytest.warns(AdaptiveOptimizerWarning, match="MyAdaptive"):
        attach(opt, [m[0].weight], nog=True)


def test_no_warning_for_sgd_or_custom_chain_or_guard_only() -> None:
    m = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptiveOptimizerWarning)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        attach(opt, [m[0].weight], nog=True, olr=True)
        _steps(m, opt, 2)
        adam = torch.optim.Adam(m.parameters())
        h = attach(adam, [m[0].weight], chain=named_chain(("nog", nog())))  # the user's own chain
        h.remove()
        attach(torch.optim.Adam(m.parameters()), [m[0].weight])  # guard only
