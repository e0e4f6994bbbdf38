"""Issue 22, "nothing lost under faults and bad input": atomic checkpoints, extras checked
before writing, non-finite input refused (or skipped and counted) before any state changes,
whole-step skipping in the optimizer hook, concurrent transforms, pickling of treated models
and one-line errors for unreadable checkpoints."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orthofx
from orthofx.config import PRESETS, OrthoConfig
from orthofx.errors import ConfigError, InputError
from orthofx.pipeline import plan_of

from corpora import gcp, unsafe


class _Scale(torch.autograd.Function):
    """A custom autograd.Function, as real models have."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x * s

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


class DBNNet(nn.Module):
    """Conv → orthofx DBN → custom Function → head, with a running buffer of its own updated
    in place under no_grad in training."""

    def __init__(self, nonfinite: str = "raise") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        extra = {} if nonfinite == "raise" else {"nonfinite": nonfinite}
        self.dbn = orthofx.nn.DecorrelatedBatchNorm(8, **extra)
        self.fc = nn.Linear(8, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.seen.add_(x.shape[0])
        h = F.relu(_Scale.apply(self.dbn(self.conv(x)), 1.5))
        return self.fc(h.mean(dim=(2, 3)))


class EighNet(gcp.EighNet):
    """Conv → 1×1 reduction → covariance → raw eigh square root → linear on its upper triangle
    (swapped to a GraphModule)."""

    def __init__(self) -> None:
        super().__init__(triu=True)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n))


def _nan_batch() -> torch.Tensor:
    x = _x()
    x[0, 0, 0, 0] = float("nan")
    return x


def _treated(config="nog+ow", build=DBNNet):
    torch.manual_seed(0)
    gm, _ = orthofx.transform(build(), (_x(),), config=config)
    return gm


# ----------------------------------------------------------------------------- 1, 2, 10: saving
def test_a_failed_save_leaves_the_previous_checkpoint_byte_identical(tmp_path):
    gm = _treated()
    path = tmp_path / "ckpt.pt"
    orthofx.save_checkpoint(gm, path, epoch=1)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"extra entry 'hook' holds a function"):
        orthofx.save_checkpoint(gm, path, epoch=2, hook=lambda: None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    orthofx.load_checkpoint(DBNNet(), path)


def test_a_save_interrupted_while_writing_leaves_the_previous_file(tmp_path, monkeypatch):
    gm = _treated()
    path = tmp_path / "ckpt.pt"
    orthofx.save_checkpoint(gm, path)
    before = path.read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ConfigError, match="No space left on device.*unchanged"):
        orthofx.save_checkpoint(gm, path, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_extras_that_a_safe_load_refuses_are_refused_before_writing(tmp_path):
    gm = _treated()
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(lr=0.1)
    with pytest.raises(ConfigError, match=r"extra entry 'args' holds a argparse.Namespace.*vars") as e:
        orthofx.save_checkpoint(gm, path, args=args)
    assert "\n" not in str(e.value) and not path.exists()
    with pytest.raises(ConfigError, match=r"extra entry 'cfg'\['inner'\]\[1\] holds a argparse.Namespace"):
        orthofx.save_checkpoint(gm, path, cfg={"inner": [1, args]})
    opt = torch.optim.Adam(gm.parameters())
    gm(_x()).sum().backward()
    opt.step()
    orthofx.save_checkpoint(gm, path, args=vars(args), optimizer=opt.state_dict(), dtype=torch.float32,
                            shape=torch.Size([2]), blob=b"x", pair=(1, 2.0))
    back = torch.load(path, weights_only=True)
    assert back["args"] == {"lr": 0.1} and back["pair"] == (1, 2.0)


def test_saving_into_a_missing_directory_or_onto_a_directory_is_a_one_line_config_error(tmp_path):
    gm = _treated()
    with pytest.raises(ConfigError, match="directory .*missing.* does not exist; create it") as e:
        orthofx.save_checkpoint(gm, tmp_path / "missing" / "ckpt.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is a directory; pass a file path"):
        orthofx.save_checkpoint(gm, tmp_path)


# ----------------------------------------------------------------------------- 8, 9: reading
def test_a_malicious_checkpoint_names_the_blocked_global_and_does_not_run(tmp_path):
    gm = _treated()
    buf = io.BytesIO()
    orthofx.save_checkpoint(gm, buf)
    d = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    d["payload"] = unsafe.Payload()
    for name, raw in (("zip.pt", None), ("raw.pt", pickle.dumps(d, protocol=4))):
        path = tmp_path / name
        if raw is None:
            torch.save(d, path)
        else:
            path.write_bytes(raw)
        unsafe.RAN.clear()
        with pytest.raises(ConfigError) as e:
            orthofx.load_checkpoint(DBNNet(), path)
        msg = str(e.value)
        assert unsafe.RAN == []
        assert "corrupted" not in msg and "\n" not in msg
        assert "safe load" in msg and "corpora.unsafe.record" in msg


def test_a_text_file_as_a_checkpoint_is_a_config_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ConfigError, match="not a torch checkpoint.*text file") as e:
        orthofx.load_checkpoint(DBNNet(), path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- 3, 4: non-finite input
def test_covariance_pooling_refuses_nan_before_its_batchnorm_updates():
    torch.manual_seed(0)
    head = orthofx.nn.CovariancePooling(3, reduced=4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(InputError, match="NaN or Inf"):
        head(_nan_batch())
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_covariance_pooling_skip_keeps_the_statistics_and_counts():
    torch.manual_seed(0)
    head = orthofx.nn.CovariancePooling(3, reduced=4, nonfinite="skip")
    head(_x())
    before = {k: v.clone() for k, v in head.state_dict().items()}
    out = head(_nan_batch())
    assert not torch.isfinite(out).all()
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(head.nonfinite_batches) == 1
    assert "nonfinite_batches" not in head.state_dict()


@pytest.mark.parametrize("config", PRESETS)
def test_dbn_refuses_a_nan_batch_and_nothing_changes(config):
    gm = _treated(config)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    orthofx.attach(opt, gm)
    gm(_x()).sum().backward()
    opt.step()
    opt.zero_grad()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(InputError, match=r"DecorrelatedBatchNorm\(8\).*NaN or Inf.*nonfinite='skip'"):
        gm(_nan_batch())
    for k, v in gm.state_dict().items():
        if k != "seen":  # the user's own buffer ran before the DBN
            assert torch.equal(v, state[k]), k


def test_dbn_skip_gates_the_update_and_counts_without_a_host_read(monkeypatch):
    # inside cuda_policy the module must not read the device: the gate is a torch.where
    torch.manual_seed(0)
    dbn = orthofx.nn.DecorrelatedBatchNorm(8, momentum=None)
    x = torch.randn(16, 8)
    dbn(x)
    before = {k: v.clone() for k, v in dbn.state_dict().items()}
    bad = x.clone()
    bad[3, 2] = float("inf")
    with orthofx.syncs.cuda_policy():
        dbn(bad)
    for k, v in dbn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(dbn.nonfinite_batches) == 1
    skip = orthofx.nn.DecorrelatedBatchNorm(8, nonfinite="skip")
    skip(bad)
    assert int(skip.nonfinite_batches) == 1 and int(skip.num_batches_tracked) == 0
    dbn(x)
    assert int(dbn.num_batches_tracked) == 2
    with pytest.raises(ConfigError, match="nonfinite"):
        orthofx.nn.DecorrelatedBatchNorm(8, nonfinite="ignore")


@pytest.mark.parametrize("config", PRESETS)
def test_skip_nonfinite_model_keeps_every_weight_and_optimizer_state(config):
    gm = _treated(config, build=lambda: DBNNet(nonfinite="skip"))
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    handle = orthofx.attach(opt, gm, skip_nonfinite="model")
    assert handle is not None
    gm(_x()).sum().backward()
    opt.step()
    opt.zero_grad()
    params = {k: v.clone() for k, v in gm.named_parameters()}
    bufs = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in gm.parameters()}
    gm(_nan_batch()).sum().backward()  # NaN gradients everywhere
    opt.step()
    for k, v in gm.named_parameters():
        assert torch.equal(v, params[k]), k
    for p in gm.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, bufs[id(p)][k])
    assert handle.stats()["skipped_steps"] == 1
    opt.zero_grad()
    gm(_x()).sum().backward()
    opt.step()
    assert handle.stats()["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in gm.parameters())


# ----------------------------------------------------------------------------- 5: example inputs
@pytest.mark.parametrize("entry", ["transform", "analyze"])
def test_nan_example_inputs_are_named(entry):
    bad = _nan_batch()
    with pytest.raises(InputError, match=r"example_inputs\[0\] holds NaN or Inf"):
        if entry == "transform":
            orthofx.transform(DBNNet(), (bad,), config="nog+ow")
        else:
            orthofx.analyze(DBNNet(), (bad,))


# ----------------------------------------------------------------------------- 6: threads
class SlowNet(EighNet):
    """Swapped to a GraphModule, so transform traces it symbolically (fx patches module calls)."""

    def forward(self, x):
        time.sleep(0.02)  # widen the window in which another thread traces
        return super().forward(x)


def test_two_threads_transform_the_same_model_at_once():
    model, x = SlowNet(), _x()
    barrier = threading.Barrier(2)
    results, errors = [], []

    def run():
        barrier.wait()
        try:
            for _ in range(3):
                gm, report = orthofx.transform(model, (x,), config="nog")
                results.append(tuple(report.producers))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 6 and len(set(results)) == 1 and results[0]


# ----------------------------------------------------------------------------- 7: pickling
def _step_outputs(m: nn.Module, x: torch.Tensor):
    m.train()
    for p in m.parameters():
        p.grad = None
    torch.manual_seed(1)
    y = m(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in m.parameters()]


_CONFIGS = [*PRESETS, OrthoConfig.from_preset("ow", ow_method="soc")]


@pytest.mark.parametrize("build", [DBNNet, EighNet])
@pytest.mark.parametrize("config", _CONFIGS, ids=lambda c: c if isinstance(c, str) else "ow-soc")
def test_pickle_and_torch_save_of_every_preset_round_trip(build, config):
    gm = _treated(config, build=build)
    x = _x()
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(gm)), torch.load(buf, weights_only=False)]
    want = _step_outputs(gm, x)
    for back in copies:
        assert isinstance(back, torch.fx.GraphModule) == isinstance(gm, torch.fx.GraphModule)
        assert plan_of(back) is not None and plan_of(back).to_dict() == plan_of(gm).to_dict()
        assert sorted(back.state_dict()) == sorted(gm.state_dict())
        y, grads = _step_outputs(back, x)
        torch.testing.assert_close(y, want[0], rtol=0, atol=0)
        for a, b in zip(grads, want[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert orthofx.transform(back, (x,), config=config)[1].modified is False


def _child(q, payload):
    gm = pickle.loads(payload)
    q.put(pickle.dumps(gm(_x()).detach()))


@pytest.mark.slow  # spawns a Python process
def test_a_treated_model_travels_to_a_spawned_process():
    gm = _treated("nog+ow")
    gm.eval()
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(q, pickle.dumps(gm)))
    proc.start()
    out = pickle.loads(q.get(timeout=120))
    proc.join(60)
    assert proc.exitcode == 0
    torch.testing.assert_close(out, gm(_x()).detach(), rtol=0, atol=0)


def test_unpickled_ow_module_has_its_parametrization(tmp_path):
    gm = _treated("ow")
    back = pickle.loads(pickle.dumps(gm))
    conv = back.conv
    assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
    assert type(conv).__name__ == "ParametrizedConv2d" and isinstance(conv, nn.Conv2d)
    assert pickle.loads(pickle.dumps(back)) is not None  # twice
    os.fspath(tmp_path)
