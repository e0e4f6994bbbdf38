"""OrthofxCallback under Lightning's DDP strategy: two CPU processes (gloo), NOG+OW+OLR with the
default ow_target="weight" (whose solves run on the all-reduced gradient): the replicas end
bit-identical, OW keeps the producer orthogonal, κ is logged on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytestmark = pytest.mark.slow  # two Lightning processes under DDP

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import logging, os, sys
    import torch
    from torch import nn
    import lightning as L
    from orthofx.integrations.lightning import OrthofxCallback
    from orthofx.nn import CovariancePooling

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Conv2d(1, 6, 3), CovariancePooling(6, reduced=4), nn.Linear(10, 3))
            self.example_input_array = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    if __name__ == "__main__":
        logging.getLogger("lightning").setLevel(logging.ERROR)
        out, config = sys.argv[1], sys.argv[2]
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        cb = OrthofxCallback(config, every=1)
        net = Net()
        t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb], max_steps=4, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        t.fit(net, dl)
        w = net.model[1].reduce.weight.detach().flatten(1).double()
        torch.save({"flat": torch.cat([p.detach().reshape(-1) for p in net.model.parameters()]),
                    "steps": t.global_step, "gram": w @ w.T,
                    "kappa": float(t.logged_metrics["orthofx/kappa/1"])},
                   os.path.join(out, f"rank{t.global_rank}.pt"))
''')


@pytest.mark.skipif(sys.platform != "linux", reason="Lightning DDP on gloo is tested on Linux")
def test_lightning_ddp_replicas_stay_identical(tmp_path: Path) -> None:
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "nog+ow+olr"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [4, 4]
    assert torch.equal(ranks[0]["flat"], ranks[1]["flat"])  # DDP: bit-identical replicas
    torch.testing.assert_close(ranks[0]["gram"], torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)  # OW
    assert all(1.0 <= r["kappa"] < float("inf") for r in ranks)
