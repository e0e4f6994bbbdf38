"""The demo's experiments (issue 14): the GCP and paper-shaped DBN models, the raw-eigh
baseline head, the guarded training step, weight/κ bookkeeping, interleaved timing, collect()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import orthofx
from orthofx.experiment import demo as demo_mod
from orthofx.models import RawEighCovPool, SmallResNetDBN, SmallResNetGCP, build_model
from orthofx.experiment.session import (
    Session,
    WeightTracker,
    build_session,
    kappa_conventions,
    train_step,
)
from orthofx.experiment.train import ExperimentConfig, _Dist, _load_data, run
from orthofx.nn import CovariancePooling


def _centered_cov_rank(x: torch.Tensor) -> int:
    """float64 numerical rank of the per-image channel covariance of (C, M) features."""
    x = x.double()
    x = x - x.mean(-1, keepdim=True)
    return int(torch.linalg.matrix_rank(x @ x.T / x.shape[-1]))


def test_gcp_model_is_rank_deficient_and_found_by_transform():
    torch.manual_seed(0)
    m = SmallResNetGCP()
    x = torch.randn(4, 1, 28, 28)
    feats = {}
    m.gcp.relu.register_forward_hook(lambda mod, a, out: feats.setdefault("x", out.detach()))
    assert m(x).shape == (4, 10)
    f = feats["x"]
    assert f.shape[1:] == (64, 7, 7)  # 64 channels against 49 positions
    assert _centered_cov_rank(f[0].reshape(64, -1)) <= 48
    gm, report = orthofx.transform(m, (x,), config="nog+ow+olr")
    assert report.producers == ["gcp.reduce"]


def test_paper_shaped_dbn_stem_rank_and_producer():
    torch.manual_seed(0)
    m = build_model("small-resnet-dbn", 10, 1, stem_kernel=5, stem_channels=64, stem_stride=2)
    assert m.conv1.weight.shape == (64, 1, 5, 5)  # 25-dimensional patches into 64 channels
    x = torch.randn(8, 1, 28, 28)
    f = m.conv1(x).transpose(0, 1).reshape(64, -1)
    assert _centered_cov_rank(f) <= 25
    report = orthofx.analyze(m, (x,))
    assert report.producers == ["conv1"]


def test_raw_eigh_head_equals_covariance_pooling_in_float64(device):
    """The user-style head computes exactly CovariancePooling's Σ^{1/2} (float64 reference)."""
    torch.manual_seed(0)
    raw = RawEighCovPool(16, 12, eps=1e-3).double().to(device).eval()
    ref = CovariancePooling(16, reduced=12, eps=1e-3, backend="eigh").double().to(device).eval()
    ref.load_state_dict(raw.state_dict())
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64, device=device)  # 25 positions > 12: full rank
    torch.testing.assert_close(raw(x), ref(x), rtol=1e-9, atol=1e-10)


def test_raw_eigh_head_is_not_a_meta_layer_and_transform_leaves_it_raw_only_if_asked():
    """The baseline row trains the model as written: no orthofx module inside it."""
    m = SmallResNetGCP(head="raw-eigh")
    assert not any(orthofx.nn.is_meta_layer(mod) for mod in m.modules())
    with pytest.raises(orthofx.errors.ConfigError):
        SmallResNetGCP(head="nope")


def _tiny_cfg(tmp_path: Path, **kw) -> ExperimentConfig:
    base = dict(dataset="synthetic", model="small-resnet-gcp", model_kwargs={"widths": (4, 8, 8), "reduced": 12},
                train_limit=32, test_limit=16, batch_size=8, epochs=1, out=str(tmp_path / "r"), progress=False,
                monitor_every=1, guard_nonfinite=True, resume=False)
    base.update(kw)
    return ExperimentConfig(**base)


def _session(tmp_path: Path, device: torch.device, **kw) -> tuple[Session, torch.Tensor, torch.Tensor]:
    cfg = _tiny_cfg(tmp_path, device=device.type, **kw)
    torch.manual_seed(0)
    data = _load_data(cfg, _Dist())
    s = build_session(cfg, data, device)
    x, y = next(iter(data.train))
    return s, x.to(device), y.to(device)


def test_guarded_step_neutralises_nonfinite_gradients(tmp_path, device):
    s, x, y = _session(tmp_path, device)
    w = s.model.fc.weight
    w.register_hook(lambda g: torch.full_like(g, float("nan")))  # a NaN gradient, as torch's eigh gives
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    loss = train_step(s, x, y)
    assert loss is not None and float(loss) == 0.0
    assert int(s.nonfinite_steps) == 1
    for n, p in s.model.named_parameters():  # nothing became NaN; first step: zero grads, no momentum
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 5e-4), rtol=0, atol=1e-7)


def test_unguarded_step_lets_nan_reach_the_weights(tmp_path, device):
    s, x, y = _session(tmp_path, device, guard_nonfinite=False)
    s.model.fc.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    train_step(s, x, y)
    assert torch.isnan(s.model.fc.weight).all()


def test_guarded_step_counts_solver_exceptions(tmp_path, device):
    s, x, y = _session(tmp_path, device)

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    s.net.forward = fail  # type: ignore[method-assign]
    assert train_step(s, x, y) is None
    assert s.solver_exceptions == 1 and int(s.nonfinite_steps) == 0
    s.guard = False
    with pytest.raises(torch.linalg.LinAlgError):
        train_step(s, x, y)


def test_weight_tracker_matches_float64_singular_values(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=False).to(device)
    model = nn.Sequential(conv)
    t = WeightTracker(model, ["0"], every=2, run="r")
    for _ in range(3):
        t.step()
    recs = t.records()
    assert [r["step"] for r in recs] == [0, 2]
    sv = torch.linalg.svdvals(conv.weight.detach().double().reshape(8, -1)).cpu()
    assert recs[0]["weight_norm"] == pytest.approx(float(sv.square().sum().sqrt()), rel=1e-12)
    assert recs[0]["weight_cond"] == pytest.approx(float(sv[0] / sv[-1]), rel=1e-12)


def test_kappa_conventions_on_a_known_spectrum():
    """Σ = diag(0, 0, 1, 4) (rank 2) + εI, ε = 1e-2, float64: κ(Σ+εI) = 4.01/0.01,
    κ on the range = 4/1, paper's convention saturates at 1/u."""
    eps, u = 1e-2, torch.finfo(torch.float64).eps
    lam = torch.tensor([[0.0, 0.0, 1.0, 4.0]], dtype=torch.float64) + eps
    k = kappa_conventions(lam, eps, u)
    assert k["kappa"] == pytest.approx(4.01 / 0.01, rel=1e-12)
    assert k["kappa_range"] == pytest.approx(4.0, rel=1e-12)
    assert k["rank"] == 2
    assert k["kappa_paper"] == pytest.approx(1 / u, rel=1e-6)
    assert k["eps"] == eps and k["kind"] == "meta"


def test_raw_row_records_kappa_and_counts(tmp_path):
    res = run(_tiny_cfg(tmp_path, model_kwargs={"widths": (4, 8, 8), "reduced": 12, "head": "raw-eigh"},
                        transform=False), log=lambda s: None)
    assert res["steps"] == 4 and res["nonfinite_steps"] >= 0 and res["solver_exceptions"] == 0
    recs = res["kappa_records"]
    assert len(recs) == 4 and all(r["rank"] <= 12 for r in recs)
    assert res["kappa"]["gcp"]["records"] == 4
    assert [r["producer"] for r in res["weight_records"]][:1] == ["gcp.reduce"]


def test_transform_false_needs_svd_treatment(tmp_path):
    with pytest.raises(orthofx.errors.OptionError, match="transform"):
        _tiny_cfg(tmp_path, transform=False, treatment="nog")


@pytest.mark.slow  # timed training rounds
def test_interleaved_timing_ratios_are_per_round(tmp_path):
    cfgs = [_tiny_cfg(tmp_path, treatment=t) for t in ("svd", "nog", "ow")]
    times = demo_mod.interleaved_step_times(cfgs, ["SVD", "NOG", "OW"], rounds=2, steps=1)
    assert set(times) == {"SVD", "NOG", "OW"}
    assert times["SVD"]["ratios"] == [1.0, 1.0]
    for t in times.values():
        assert len(t["seconds"]) == 2 and all(s > 0 for s in t["seconds"])
        assert t["ratio_median"] == pytest.approx(sorted(t["ratios"])[0] / 2 + sorted(t["ratios"])[1] / 2)


def test_ow_target_rows_differ(tmp_path):
    """NOG under OW on W's gradient and on the generator's gradient are different updates."""
    out = []
    for target in ("weight", "generator"):
        s, x, y = _session(tmp_path, torch.device("cpu"), treatment="nog+ow", ortho={"ow_target": target})
        train_step(s, x, y)
        train_step(s, x, y)
        out.append(s.model.gcp.reduce.weight.detach().clone())
    assert not torch.allclose(out[0], out[1])


def _fake_run(root: Path, key: str, label: str, seed: int, err: float) -> None:
    d = root / "runs" / key / f"{label.lower()}-seed{seed}"
    d.mkdir(parents=True)
    rec = {"kind": "meta", "step": 0, "layer": "gcp", "kappa": 1e4, "kappa_range": 10.0, "kappa_paper": 1e15,
           "rank": 48}
    w = {"kind": "producer", "step": 0, "layer": "gcp.reduce.weight", "weight_norm": 2.0, "weight_cond": 3.0}
    d.joinpath("results.json").write_text(json.dumps({
        "run": label, "config": {"seed": seed}, "final_test_error": err, "kappa": {"gcp": {"solver_failures": 0}},
        "kappa_records": [rec, w], "weight_records": [], "nonfinite_steps": 1, "solver_exceptions": 0, "steps": 10,
    }))


def test_collect_aggregates_seeds_from_run_files(tmp_path):
    for seed, err in ((0, 10.0), (1, 12.0)):
        _fake_run(tmp_path, "gcp", "SVD", seed, err)
    _fake_run(tmp_path, "gcp", "NOG", 0, 11.0)
    (tmp_path / "timing_gcp_seed0.json").write_text(json.dumps(
        {"SVD": {"ratios": [1.0, 1.0]}, "NOG": {"ratios": [1.1, 1.3]}}))
    res = demo_mod.collect(tmp_path, ["gcp"])
    rows = {r["label"]: r for r in res["experiments"]["gcp"]["rows"]}
    assert list(rows) == ["SVD", "NOG"]  # the experiment's row order
    assert rows["SVD"]["seeds"] == 2 and rows["SVD"]["test_error_mean"] == pytest.approx(11.0)
    assert rows["SVD"]["test_error_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["NOG"]["time_ratio_median"] == pytest.approx(1.2)
    assert rows["SVD"]["kappa_geomean"]["kappa_paper"] == pytest.approx(1e15)
    assert rows["SVD"]["weight_cond_mean"] == 3.0 and rows["SVD"]["nonfinite_steps"] == "2/20"
    assert (tmp_path / "gcp_kappa.png").read_bytes()[:4] == b"\x89PNG"
    assert "| SVD | 11.00 ± 1.41 |" in (tmp_path / "results.md").read_text()


def test_demo_rejects_unknown_rows_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_mod, "run", lambda *a, **k: pytest.fail("trained before checking rows"))
    with pytest.raises(orthofx.errors.ConfigError, match="unknown demo rows"):
        demo_mod.demo(tmp_path, quick=True, experiment="gcp", rows=["SVD", "NOPE"], log=lambda s: None)


def test_kappa_range_uses_the_smallest_rank():
    """A step whose rounding-level null eigenvalue crosses the rank tolerance (rank 26 of a
    rank-25 Σ) must not set the row's κ on the range."""
    recs = [{"kind": "meta", "rank": 25, "kappa_range": 1e3}, {"kind": "meta", "rank": 25, "kappa_range": 2e3},
            {"kind": "meta", "rank": 26, "kappa_range": 6e13}, {"kind": "meta", "rank": 26, "kappa_range": 7e13},
            {"kind": "meta", "rank": 27, "kappa_range": 8e13}, {"kind": "meta", "rank": 26, "kappa_range": 9e13},
            {"kind": "meta", "rank": 25, "kappa_range": 3e3}]
    res = {"kappa_records": recs}
    assert demo_mod._run_kappa(res, "kappa_range") == 2e3
    assert demo_mod._run_kappa(res, "rank") == 26  # the rank column shows the median, crossings included


def test_demo_plots_keep_rows_apart_beyond_ten_rows(tmp_path):
    """The extended DBN table has 15 rows: two rows drawn in the same colour must differ in
    marker and line style (measured: NOG and NOG+SN were both orange circles)."""
    from matplotlib.figure import Figure

    runs = [{"label": f"row{i}", "kappa_records": [{"kind": "meta", "step": s, "kappa": 10.0 + i + s}
                                                   for s in range(0, 40, 8)]} for i in range(15)]
    captured = {}
    real = demo_mod._save

    def keep(fig, path):
        captured["fig"] = fig
        return real(fig, path)

    import unittest.mock

    with unittest.mock.patch.object(demo_mod, "_save", keep):
        demo_mod.plot_kappa(runs, tmp_path / "k.png", "t")
    fig = captured["fig"]
    assert isinstance(fig, Figure)
    lines = fig.axes[0].lines
    assert len(lines) == 15
    for a in lines:
        for b in lines:
            if a is not b and a.get_color() == b.get_color():
                assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
