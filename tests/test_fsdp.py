"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``): NOG and OLR act on the whole
Pre-SVD weight gradient. 2 gloo ranks on the CPU, each with half of the batch, against one
process with the whole batch."""

from __future__ import annotations

import copy
import pickle
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.slow]  # two gloo processes

STEPS = 3
LR_MODES = ("float", "fold")


class CovNet(nn.Module):
    """conv1 → relu → reduce (the producer: 5 × 8·3·3, so its 5 rows shard 3 + 2 over 2 ranks)
    → per-image covariance → raw eigh square root → fc. No BatchNorm: a per-rank batch
    statistic would differ from the full batch's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(25, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(torch.relu(self.conv1(x)))
        n, c, h, w = x.shape
        f = x.reshape(n, c, h * w)
        f = f - f.mean(dim=-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / (h * w) + 1e-3 * torch.eye(c, device=x.device)
        lam, u = torch.linalg.eigh(cov)
        root = u @ torch.diag_embed(lam.clamp_min(1e-12).sqrt()) @ u.transpose(1, 2)
        return self.fc(root.flatten(1))


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 4, (n,), generator=g)


def _train(model: nn.Module, lr_mode: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    handle = orthofx.attach(opt, model, lr_mode=lr_mode)
    assert handle is not None and handle.nog and handle.olr and handle.lr_mode == lr_mode
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # mean over this rank's half; FSDP averages ranks
        opt.step()
    return handle.olr_history()


def _worker(rank: int, world: int, port: int, blob: bytes, x: torch.Tensor, y: torch.Tensor, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for lr_mode in LR_MODES:
            # (a GraphModule unpickled by spawn loses its orthofx plan on deepcopy: unpickle anew)
            model = pickle.loads(blob)
            fully_shard(model)
            w = model.reduce.weight
            assert isinstance(w, DTensor) and w.to_local().shape[0] == (3, 2)[rank]  # really sharded
            hist = _train(model, lr_mode, x.chunk(world)[rank], y.chunk(world)[rank])
            full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                    for k, v in model.state_dict().items()}
            results[lr_mode] = {"state": full, "eta": hist["eta"], "lr": hist["lr"]}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_fsdp2_nog_olr_match_one_process(tmp_path) -> None:
    """After 3 SGD steps with nog+olr, every weight of the 2-rank FSDP2 run equals the
    one-process run (atol/rtol 1e-5), and so do OLR's η* and lr per step: the polar factor and
    the dots wᵀw, lᵀw, lᵀl were taken on the whole (5, 72) producer matrix, not per shard."""
    import torch.multiprocessing as mp

    torch.manual_seed(3)
    x, y = _data()
    gm, report = orthofx.transform(CovNet(), (x[:2],), config="nog+olr")
    assert report.producers == ["reduce"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, pickle.dumps(gm), x, y, out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for lr_mode in LR_MODES:
        ref = copy.deepcopy(gm)
        hist = _train(ref, lr_mode, x, y)
        res = got[lr_mode]
        moved = (ref.reduce.weight - gm.reduce.weight).abs().max()
        assert moved > 1e-3  # the producer did train
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(res["state"][k], v, atol=1e-5, rtol=1e-5, msg=f"{lr_mode}: {k}")
        torch.testing.assert_close(res["eta"], hist["eta"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res["lr"], hist["lr"], atol=1e-6, rtol=1e-5)
