"""orthofx in a few lines: a hand-written model with a GCP-style eigh head.

    python examples/quickstart.py          # preset "svd" (the default: stable gradients, report, no weight changed)
    python examples/quickstart.py ow       # or any preset, e.g. "ow", "nog+olr", "nog+ow+olr"
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import orthofx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.reduce = nn.Conv2d(32, 16, 1, bias=False)   # the Pre-SVD layer orthofx will find
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.reduce(torch.relu(self.conv(x)))))
        n, c, h, w = x.shape
        f = x.reshape(n, c, h * w)
        f = f - f.mean(-1, keepdim=True)
        cov = f @ f.transpose(1, 2) / (h * w) + 1e-5 * torch.eye(c)
        lam, u = torch.linalg.eigh(cov)
        root = u @ torch.diag_embed(lam.clamp_min(0).sqrt()) @ u.transpose(1, 2)
        return self.fc(root.flatten(1))


model = Net()
x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
config = sys.argv[1] if len(sys.argv) > 1 else orthofx.config.DEFAULT_PRESET
gm, report = orthofx.transform(model, (x,), config=config)
print(report)

opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
orthofx.attach(opt, gm)
for step in range(5):
    loss = F.cross_entropy(gm(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")

if "ow" in config.split("+"):
    w = gm.reduce.weight.detach().reshape(16, -1)
    print("OW keeps the Pre-SVD weight orthogonal: |W Wᵀ - I| =", (w @ w.T - torch.eye(16)).abs().max().item())
plain = orthofx.strip(gm)
print("stripped state-dict keys match the original model:", plain.state_dict().keys() == model.state_dict().keys())
