"""save_checkpoint / load_checkpoint: weights_only loading, plain-data plan, structure checks
with ConfigError, and a checksum that detects corrupted tensor bytes."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import orthofx
from orthofx.errors import ConfigError

from corpora import unsafe
from corpora.gcp import EighNet


def _saved(config: str = "nog+ow") -> tuple[nn.Module, bytes]:
    torch.manual_seed(0)
    gm, _ = orthofx.transform(EighNet(), config=config)
    buf = io.BytesIO()
    orthofx.save_checkpoint(gm, buf, epoch=3)
    return gm, buf.getvalue()


def _resave(d: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    return buf


def _is_plain(x) -> bool:
    if x is None or isinstance(x, (str, bool, int, float)):
        return True
    if isinstance(x, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_is_plain(v) for v in x)
    return False


def test_round_trip_loads_with_weights_only_and_a_plain_plan():
    gm, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    assert _is_plain(d["orthofx_plan"]) and d["epoch"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checksummed checkpoint loads without a warning
        back = orthofx.load_checkpoint(EighNet(), io.BytesIO(raw))
    x = torch.randn(2, 3, 4, 4)
    gm.eval(), back.eval()
    torch.testing.assert_close(back(x), gm(x))


def test_arbitrary_code_in_a_checkpoint_does_not_run():
    _, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    d["payload"] = unsafe.Payload()
    unsafe.RAN.clear()
    with pytest.raises(ConfigError, match="weights_only"):
        orthofx.load_checkpoint(EighNet(), _resave(d))
    assert unsafe.RAN == []


def test_missing_state_dict_is_named():
    _, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    del d["state_dict"]
    with pytest.raises(ConfigError, match="'state_dict'"):
        orthofx.load_checkpoint(EighNet(), _resave(d))


def test_shape_mismatch_names_the_key_and_shapes():
    # same producers, different head: torch's RuntimeError used to leak
    _, raw = _saved()
    with pytest.raises(ConfigError, match=r"fc\.weight: shape \(4, 36\) in the checkpoint, \(5, 36\) in this model"):
        orthofx.load_checkpoint(EighNet(classes=5), io.BytesIO(raw))


def test_missing_and_unexpected_keys_are_named():
    _, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    d["state_dict"].pop("fc.bias")
    d["state_dict"]["head.weight"] = torch.zeros(1)
    d.pop("orthofx_checksum")
    with pytest.warns(UserWarning, match="no checksum"):
        with pytest.raises(ConfigError, match=r"missing keys \['fc\.bias'\].*unexpected keys \['head\.weight'\]"):
            orthofx.load_checkpoint(EighNet(), _resave(d))


def test_flipped_bytes_inside_a_tensor_are_detected():
    _, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    weight = d["state_dict"]["fc.weight"]
    needle = weight.numpy().tobytes()[:32]
    at = raw.find(needle)
    assert at > 0
    bad = bytearray(raw)
    bad[at + 9] ^= 0x40  # one bit of one float inside the stored tensor
    with pytest.raises(ConfigError, match="checkpoint is corrupted"):
        orthofx.load_checkpoint(EighNet(), io.BytesIO(bytes(bad)))


def test_old_checkpoint_without_checksum_loads_with_a_warning():
    gm, raw = _saved()
    d = torch.load(io.BytesIO(raw), weights_only=True)
    d.pop("orthofx_checksum")
    with pytest.warns(UserWarning, match="no checksum"):
        back = orthofx.load_checkpoint(EighNet(), _resave(d))
    torch.testing.assert_close(back.state_dict()["fc.weight"], gm.state_dict()["fc.weight"])


def test_unreadable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        orthofx.load_checkpoint(EighNet(), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="corrupted or not a torch checkpoint"):
        orthofx.load_checkpoint(EighNet(), tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="not an orthofx checkpoint"):
        orthofx.load_checkpoint(EighNet(), tmp_path / "list.pt")


def test_extra_entries_cannot_overwrite_orthofx_keys():
    gm, _ = orthofx.transform(EighNet(), config="ow")
    with pytest.raises(ConfigError, match="state_dict"):
        orthofx.save_checkpoint(gm, io.BytesIO(), state_dict={})
