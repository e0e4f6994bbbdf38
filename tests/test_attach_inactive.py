"""orthofx.attach always returns a handle: with no gradient treatment (svd, ow, sn, ol) an
inactive one, so generic code can call ``handle.stats()`` / ``remove()`` for every preset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.config import PRESETS
from orthofx.treatments.attach import AttachHandle


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), orthofx.nn.DecorrelatedBatchNorm(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_every_preset_gets_a_handle_with_stats() -> None:
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    for preset in PRESETS:
        gm, _ = orthofx.transform(_model(), (x,), config=preset)
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        n_groups, n_pre, n_post = len(opt.param_groups), len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
        h = orthofx.attach(opt, gm)
        assert isinstance(h, AttachHandle), preset
        cfg = orthofx.OrthoConfig.from_preset(preset)
        opt.zero_grad(); F.cross_entropy(gm(x), y).backward(); opt.step()
        stats = h.stats()
        assert stats["producers"] == ["0.weight"], preset
        if cfg.nog or cfg.olr:
            assert h.active and stats["steps"] == 1
            continue
        # nothing installed: no hook, no param group change, no NOG/OLR entries
        assert not h.active and stats["steps"] == 0 and not stats["nog"] and not stats["olr"]
        assert not {"zero_grads", "nonfinite_grads", "last_eta", "last_lr", "nog_scale"} & stats.keys()
        assert (len(opt.param_groups), len(opt._optimizer_step_pre_hooks),
                len(opt._optimizer_step_post_hooks)) == (n_groups, n_pre, n_post)
        assert {k: v.numel() for k, v in h.olr_history().items()} == {"eta": 0, "lr": 0, "base": 0}
        assert repr(h).startswith("AttachHandle(inactive")
        h.remove()
        assert h.removed
        # an inactive handle does not block a later attach on the same optimizer
        from orthofx.treatments import named_chain, nog

        assert orthofx.attach(opt, gm, chain=named_chain(("nog", nog()))).active
