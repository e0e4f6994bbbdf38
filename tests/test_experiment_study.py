"""``orthofx study``: resumable runner, atomic writes, pairing, paired-t statistics, verdicts,
option checks, and a tiny end-to-end smoke run on synthetic data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

import orthofx.experiment.study as st
from orthofx.cli import main
from orthofx.errors import OptionError

# ---------------------------------------------------------------------------- statistics
# two-sided 95 % (p = 0.975) and 80 %-power (p = 0.80) Student t quantiles from printed tables
T_TABLE = {
    (0.975, 1): 12.7062, (0.975, 2): 4.3027, (0.975, 3): 3.1824, (0.975, 5): 2.5706, (0.975, 9): 2.2622,
    (0.975, 30): 2.0423, (0.80, 1): 1.3764, (0.80, 2): 1.0607, (0.80, 3): 0.9785, (0.80, 5): 0.9195,
    (0.80, 9): 0.8834, (0.80, 30): 0.8538,
}


@pytest.mark.parametrize("p,df", sorted(T_TABLE))
def test_t_quantile_matches_tables(p, df):
    assert st.t_quantile(p, df) == pytest.approx(T_TABLE[(p, df)], abs=1e-4)
    assert st.t_quantile(1 - p, df) == pytest.approx(-T_TABLE[(p, df)], abs=1e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 41):
        for p in (0.6, 0.8, 0.9, 0.975, 0.995):
            assert st.t_quantile(p, df) == pytest.approx(float(stats.t.ppf(p, df)), rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError):
        st.t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        st.t_quantile(0.9, 2.5)


def test_paired_comparison_hand_computed():
    # d = [1, 2, 1, 2]: mean 1.5, sd = sqrt(1/3), se = sd/2; seed 4 only in the row, 5 only in
    # the baseline, 6 NaN in the row: those are not pairs
    row = {0: 10.0, 1: 11.0, 2: 12.0, 3: 13.0, 4: 99.0, 6: math.nan}
    base = {0: 9.0, 1: 9.0, 2: 11.0, 3: 11.0, 5: 0.0, 6: 10.0}
    c = st.paired_comparison(row, base)
    se = math.sqrt(1 / 3) / 2
    assert c["n"] == 4 and c["seeds"] == [0, 1, 2, 3] and c["diffs"] == [1.0, 2.0, 1.0, 2.0]
    assert c["mean"] == pytest.approx(1.5)
    assert c["sd"] == pytest.approx(math.sqrt(1 / 3))
    assert c["ci_low"] == pytest.approx(1.5 - 3.182446 * se, abs=1e-5)  # 0.58130
    assert c["ci_high"] == pytest.approx(1.5 + 3.182446 * se, abs=1e-5)  # 2.41870
    assert c["mde"] == pytest.approx((3.182446 + 0.978472) * se, abs=1e-5)  # 1.20116
    assert c["verdict"] == "worse than SVD"
    flipped = st.paired_comparison(base, row)
    assert flipped["mean"] == pytest.approx(-1.5) and flipped["verdict"] == "better than SVD"


def test_verdict_wording():
    assert st.verdict(2, -1.0, -0.5, 0.3) == "too few seeds (2 pairs < 3)"
    assert st.verdict(1, math.nan, math.nan, math.nan) == "too few seeds (1 pair < 3)"
    assert st.verdict(6, -0.9, -0.1, 0.5) == "better than SVD"
    assert st.verdict(6, 0.1, 0.9, 0.5) == "worse than SVD"
    assert st.verdict(6, -0.5, 0.3, 0.8) == "no difference detected (effects below ±0.80 cannot be excluded)"
    assert st.verdict(6, -2.0, -1.0, 0.4, better="better conditioned than SVD") == "better conditioned than SVD"


def _rec(label, seed, err, kr=1e3, status="ok", exp="dbn", digest="d0"):
    r = {"experiment": exp, "label": label, "seed": seed, "status": status, "init_digest": f"{digest}-{seed}"}
    if status == "ok":
        r.update(final_test_error=err, final_kappa={"kappa_range": kr}, nonfinite_steps=1, solver_exceptions=0, steps=100)
    else:
        r["error"] = "TreatmentError: not finished yet\ntraceback..."
    return r


def test_analyze_pairs_only_finished_seeds_and_reports_failures():
    runs = [_rec("SVD", k, 10.0 + k, 1e4) for k in range(4)]
    runs += [_rec("NOG", k, 9.0 + k + 0.1 * (k % 2), 1e3) for k in range(3)]  # seed 3 failed
    runs += [_rec("NOG", 3, None, status="failed")]
    runs += [_rec("OL", k, 10.0 + k, 1e4, digest="other") for k in range(2)]
    a = st.analyze(runs)["dbn"]
    by = {r["label"]: r for r in a["rows"]}
    assert [r["label"] for r in a["rows"]] == ["SVD", "NOG", "OL"]  # STUDY_ROWS order
    svd, nog, ol = by["SVD"], by["NOG"], by["OL"]
    assert svd["test_error_mean"] == pytest.approx(11.5) and "vs_baseline" not in svd
    assert nog["seeds_ok"] == [0, 1, 2] and nog["seeds_failed"] == [3]
    assert nog["errors"] == ["TreatmentError: not finished yet"]
    vs = nog["vs_baseline"]
    assert vs["n"] == 3 and vs["diffs"] == pytest.approx([-1.0, -0.9, -1.0])
    assert vs["verdict"] == "better than SVD"
    kv = nog["kappa_vs_baseline"]  # log10 1e3 − log10 1e4 = −1 on every seed: sd 0, CI [−1, −1]
    assert kv["mean"] == pytest.approx(-1.0) and kv["verdict"] == "better conditioned than SVD"
    assert nog["same_init_pairs"] == 3 and ol["same_init_pairs"] == 0
    assert ol["vs_baseline"]["verdict"].startswith("too few seeds")
    md = st.format_results_md({"dbn": a}, {"steps": 100, "seeds": [0, 1, 2, 3]})
    assert "| NOG | 3 (1) |" in md and "better than SVD" in md and "not finished yet" in md
    assert "different initial weights" in md and "SMOKE" not in md
    assert st.format_results_md({"dbn": a}, {"smoke": True}).startswith("# SMOKE RUN")


def test_final_kappa_tail_median_and_smallest_rank():
    klog = {"bn1": {"step": list(range(0, 101, 10)), "kappa": [float(i) for i in range(11)],
                    "kappa_range": [1.0] * 9 + [5.0, 1e13], "kappa_paper": [2.0] * 11,
                    "rank": [25.0] * 10 + [26.0]}}
    f = st.final_kappa(klog)  # tail: steps ≥ 90 → indices 9, 10
    assert f["kappa"] == pytest.approx(9.5)
    assert f["kappa_range"] == pytest.approx(5.0)  # the rank-26 record is dropped
    assert f["kappa_paper"] == 2.0


# ---------------------------------------------------------------------------- plan, resume, atomic
def test_rows_slugs_unique_and_plan_is_seed_major_longest_first(tmp_path):
    slugs = [st.row_slug(r.label) for r in st.STUDY_ROWS]
    assert len(set(slugs)) == len(st.STUDY_ROWS) == 17 and st.row_slug("NOG+OW(expm, A)") == "nog-ow-expm-a"
    specs = st.plan_study(tmp_path, seeds=3)
    assert len(specs) == len(st.STUDY_ROWS) * 2 * 3
    assert [s.seed for s in specs] == sorted(s.seed for s in specs)
    for k in range(3):
        costs = [s.est_seconds for s in specs if s.seed == k]
        assert costs == sorted(costs, reverse=True)
    dbn = [s for s in specs if s.experiment == "dbn" and s.seed == 0]
    assert all(s.config.epochs == 7 and s.config.milestones == (2, 4, 6) for s in dbn)
    assert all(s.config.epochs * s.config.train_limit // s.config.batch_size >= 2000 for s in specs)
    gcp = [s for s in specs if s.experiment == "gcp"]
    assert all(s.config.milestones == (2, 3) and s.config.model_kwargs["reduced"] == 64 for s in gcp)
    assert {s.hash for s in specs} and len({s.hash for s in specs}) == len(specs)
    assert Path(dbn[0].path).parent.parent == tmp_path / "dbn"
    # a row by label or slug; same config → same hash; another step count → another hash
    a = st.plan_study(tmp_path, rows=["nog-ow-expm-a"], seeds=1, experiments=["dbn"])
    b = st.plan_study(tmp_path, rows=["NOG+OW(expm, A)"], seeds=1, experiments=["dbn"])
    c = st.plan_study(tmp_path, rows=["NOG+OW(expm, A)"], seeds=1, experiments=["dbn"], steps=3000)
    assert a[0].hash == b[0].hash != c[0].hash


def test_needs_run_skip_changed_failed(tmp_path):
    (spec,) = st.plan_study(tmp_path, rows=["SVD"], seeds=1, experiments=["gcp"], profile="quick")
    assert st.needs_run(spec) == "new"
    st.write_json_atomic(spec.path, {"hash": spec.hash, "status": "ok"})
    assert st.needs_run(spec) is None
    st.write_json_atomic(spec.path, {"hash": spec.hash, "status": "failed", "error": "x"})
    assert st.needs_run(spec) == "failed"
    st.write_json_atomic(spec.path, {"hash": "0" * 16, "status": "ok"})
    assert st.needs_run(spec) == "changed"
    Path(spec.path).write_text("{trunc")
    assert st.needs_run(spec) == "unreadable"


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "a" / "seed0.json"
    st.write_json_atomic(p, {"x": 1, "y": math.inf})
    assert json.loads(p.read_text()) == {"x": 1, "y": "inf"}

    def boom(obj, f, **kw):
        f.write('{"x": 2, "partial')
        raise OSError("disk full")

    monkeypatch.setattr(st.json, "dump", boom)
    with pytest.raises(OSError):
        st.write_json_atomic(p, {"x": 2})
    assert json.loads(p.read_text())["x"] == 1  # the old file, whole
    assert sorted(os.listdir(p.parent)) == ["seed0.json"]  # no temp file left


def test_study_skips_finished_reruns_changed_and_failed(tmp_path, monkeypatch):
    calls = []

    def fake(spec):
        calls.append((spec.experiment, spec.row.label, spec.seed))
        rec = {"hash": spec.hash, "experiment": spec.experiment, "label": spec.row.label, "seed": spec.seed,
               "status": "ok", "final_test_error": 10.0, "final_kappa": {"kappa_range": 10.0},
               "nonfinite_steps": 0, "solver_exceptions": 0, "steps": 1}
        st.write_json_atomic(spec.path, rec)
        return rec

    monkeypatch.setattr(st, "execute_run", fake)
    kw = dict(quick=True, rows=["SVD", "NOG"], seeds=2, jobs=1, progress=False, log=lambda s: None)
    st.study(tmp_path, **kw)
    assert len(calls) == 8 and [c[2] for c in calls] == [0, 0, 0, 0, 1, 1, 1, 1]  # seed-major
    calls.clear()
    st.study(tmp_path, **kw)
    assert calls == []  # all four files hold the same hash and status ok
    failed = tmp_path / "gcp" / "nog" / "seed1.json"
    rec = json.loads(failed.read_text())
    rec.update(status="failed", error="boom")
    failed.write_text(json.dumps(rec))
    res = st.study(tmp_path, **kw)
    assert calls == [("gcp", "NOG", 1)]
    assert res["analysis"]["gcp"]["rows"][1]["vs_baseline"]["n"] == 2
    calls.clear()
    st.study(tmp_path, **{**kw, "steps": 7})  # a changed config reruns everything
    assert len(calls) == 8


def test_report_only_runs_nothing_and_states_completeness(tmp_path, monkeypatch):
    """--report renders a study in progress: no run starts, the files say how many are done."""
    calls = []

    def fake(spec):
        calls.append(spec.seed)
        rec = {"hash": spec.hash, "experiment": spec.experiment, "label": spec.row.label, "seed": spec.seed,
               "status": "ok", "final_test_error": 10.0 + spec.seed, "final_kappa": {"kappa_range": 10.0},
               "nonfinite_steps": 0, "solver_exceptions": 0, "steps": 1}
        st.write_json_atomic(spec.path, rec)
        return rec

    monkeypatch.setattr(st, "execute_run", fake)
    kw = dict(quick=True, rows=["SVD", "NOG"], jobs=1, progress=False, log=lambda s: None, experiment="dbn")
    st.study(tmp_path, seeds=1, **kw)
    calls.clear()
    res = st.study(tmp_path, seeds=3, report_only=True, **kw)
    assert calls == []
    assert res["settings"]["finished"] == "2 of 6 planned runs (study in progress)"
    assert "- finished: 2 of 6 planned runs (study in progress)" in (tmp_path / "results.md").read_text()


def test_execute_run_records_failure_and_goes_on(tmp_path, monkeypatch):
    import orthofx.experiment.train as train

    def broken(cfg, **kw):
        raise RuntimeError("treatment not finished")

    monkeypatch.setattr(train, "run", broken)
    (spec,) = st.plan_study(tmp_path, rows=["OW(soc)"], seeds=1, experiments=["dbn"], profile="quick",
                            dataset="synthetic")
    rec = st.execute_run(spec)
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: treatment not finished"
    saved = json.loads(Path(spec.path).read_text())
    assert saved["status"] == "failed" and saved["hash"] == spec.hash and "traceback" in saved
    assert st.needs_run(spec) == "failed"


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize("kw,option", [
    ({"seeds": 0}, "seeds"), ({"seeds": "2"}, "seeds"), ({"seeds": 2.5}, "seeds"), ({"jobs": 0}, "jobs"),
    ({"steps": 0}, "steps"), ({"steps": True}, "steps"), ({"profile": "tpu"}, "profile"),
    ({"experiment": "all"}, "experiment"), ({"rows": ["bogus"]}, "rows"), ({"rows": "SVD"}, "rows"),
    ({"rows": []}, "rows"),
])
def test_study_options_checked_before_any_work(tmp_path, kw, option):
    out = tmp_path / "never"
    with pytest.raises(OptionError) as e:
        st.study(out, progress=False, log=lambda s: None, **kw)
    assert e.value.option == option
    assert not out.exists()


@pytest.mark.parametrize("argv,flag", [
    (["--seeds", "0"], "--seeds"), (["--steps", "-1"], "--steps"), (["--jobs", "-2"], "--jobs"),
    (["--rows", "bogus"], "--rows"), (["--seeds", "two"], "--seeds"), (["--profile", "tpu"], "--profile"),
    (["--experiment", "x"], "--experiment"), (["--steps", "2.5"], "--steps"),
])
def test_cli_study_options(tmp_path, capsys, argv, flag):
    out = tmp_path / "never"
    try:
        rc = main(["study", "--out", str(out), *argv])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert f"orthofx: {flag}:" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- end to end
def test_study_quick_end_to_end(tmp_path):
    out = tmp_path / "q"
    res = st.study(out, quick=True, experiment="dbn", rows=["SVD", "OW(expm)"], dataset="synthetic", jobs=1,
                   progress=False, log=lambda s: None)
    assert res["settings"]["smoke"] and res["settings"]["seeds"] == [0, 1]
    md = (out / "results.md").read_text()
    assert md.startswith("# SMOKE RUN")
    assert json.loads((out / "results.json").read_text())["settings"]["smoke"] is True
    runs = {(r["label"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {("SVD", 0), ("SVD", 1), ("OW(expm)", 0), ("OW(expm)", 1)}
    assert all(r["status"] == "ok" and r["smoke"] for r in runs.values())
    # pairing: same seed → same initial weights and data; another seed → other weights
    assert runs[("SVD", 0)]["init_digest"] == runs[("OW(expm)", 0)]["init_digest"] != runs[("SVD", 1)]["init_digest"]
    ow = runs[("OW(expm)", 0)]
    prod = ow["log"]["producers"]["conv1"]
    assert prod["kind"] == "flat-ow" and prod["step"][:2] == [0, 5]
    assert {"w_norm", "dw_rel", "gen_norm", "s_norm2"} <= set(prod)
    assert prod["w_norm"][0] == pytest.approx(5.0, rel=1e-3)  # orthonormal 64×25 weight: ‖W‖_F = √25
    assert "gen_norm" not in runs[("SVD", 0)]["log"]["producers"]["conv1"]
    klog = next(iter(ow["log"]["kappa"].values()))
    assert set(klog) >= {"step", "kappa", "kappa_range", "kappa_paper", "rank"} and len(klog["step"]) >= 3
    assert set(ow["final_kappa"]) == {"kappa", "kappa_range", "kappa_paper"}
    assert not (Path(ow["config"]["out"])).exists()  # the scratch directory is removed
    mtime = os.path.getmtime(out / "dbn" / "svd" / "seed0.json")
    again = st.study(out, quick=True, experiment="dbn", rows=["SVD", "OW(expm)"], dataset="synthetic", jobs=1,
                     progress=False, log=lambda s: None)
    assert os.path.getmtime(out / "dbn" / "svd" / "seed0.json") == mtime and len(again["runs"]) == 4


def test_committed_runs_still_match_the_plan_after_the_default_map_changed():
    """The OW(expm) rows pin ``ow_method="expm"`` (the default until the Cayley map became it);
    the hash leaves that pin out, so the runs on disk, hashed when expm was implicit, still match
    and ``orthofx study`` does not rerun them."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "study"
    specs = st.plan_study(root)
    on_disk = [s for s in specs if Path(s.path).exists()]
    assert {s.row.label for s in on_disk} >= {"OW(expm)", "NOG+OW(expm, A)", "NOG+OW(expm, W)", "OW(cayley)"}
    assert [s.path for s in on_disk if st.needs_run(s) is not None] == []
    rec = json.loads(Path(next(s.path for s in on_disk if s.row.label == "OW(expm)")).read_text())
    assert rec["hash"] == next(s.hash for s in on_disk if s.row.label == "OW(expm)")


def test_a_row_using_ow_must_name_its_map(tmp_path, monkeypatch):
    import orthofx.experiment.study_plan as sp
    from orthofx.errors import ConfigError
    from orthofx.experiment.catalog import DemoRow

    monkeypatch.setattr(sp, "STUDY_ROWS", sp.STUDY_ROWS + (DemoRow("OW(default)", "nog+ow"),))
    with pytest.raises(ConfigError, match="OW\\(default\\).*ow_method"):
        sp.plan_study(tmp_path, seeds=1, experiments=["dbn"])
    pinned = DemoRow("X", "ow", ortho=(("ow_method", "expm"),))
    implicit = DemoRow("X", "ow")  # how the OW(expm) runs on disk were hashed
    cfg = sp.plan_study(tmp_path, rows=["OW(expm)"], seeds=1, experiments=["dbn"])[0].config
    assert sp.config_hash("dbn", pinned, cfg, 10, False) == sp.config_hash("dbn", implicit, cfg, 10, False)
    cay = DemoRow("X", "ow", ortho=(("ow_method", "cayley"),))
    assert sp.config_hash("dbn", cay, cfg, 10, False) != sp.config_hash("dbn", pinned, cfg, 10, False)


def test_planned_contrasts_pair_rows_with_their_reference():
    """Each planned contrast is the paired difference row − reference over the seeds both
    finished; a contrast whose rows have not run is left out; identical values (κ logged to 5
    digits, the same in every pair) read "equal in every pair", not "no difference detected"."""
    import orthofx.experiment.study_plan as sp

    assert all(r in {x.label for x in sp.STUDY_ROWS} and ref in {x.label for x in sp.STUDY_ROWS}
               for r, ref, _ in sp.CONTRASTS)
    runs = [_rec("SVD", k, 12.0, 1e4) for k in range(4)]
    runs += [_rec("OW(expm)", k, 13.0 + 0.1 * k, 1e3) for k in range(4)]
    runs += [_rec("OW(cayley)", k, 12.5 + 0.1 * k + 0.01 * (k % 2), 1e3) for k in range(3)]
    a = st.analyze(runs)["dbn"]
    (c,) = a["contrasts"]  # OW(cayley) − OW(expm); the other contrasts have no runs
    assert (c["row"], c["reference"]) == ("OW(cayley)", "OW(expm)")
    assert c["error"]["n"] == 3 and c["error"]["diffs"] == pytest.approx([-0.5, -0.49, -0.5])
    assert c["error"]["verdict"] == "better than OW(expm)"
    assert c["kappa"]["verdict"] == "equal in every pair (to the precision logged)"
    md = st.format_results_md({"dbn": a}, {})
    assert "| OW(cayley) − OW(expm) | the flat map alone" in md and "better than OW(expm)" in md
    assert st.verdict(4, 0.0, 0.0, 0.0) == "equal in every pair (to the precision logged)"


def test_docs_study_tables_render_the_contrasts_with_their_own_holm_family():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "study_tables.py"
    spec = importlib.util.spec_from_file_location("study_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    text = mod.render(json.loads((path.parent / "results" / "study" / "results.json").read_text()))
    assert "### Planned contrasts between rows" in text and "Holm over the 18 contrasts" in text
    assert "| NOG+OW(cayley, A) − NOG+OW(expm, A) | the flat map under NOG | 6 | -1.30 [-1.63, -0.97]" in text
    page = (path.parent / "results.md").read_text()
    assert text.strip() in page  # the page holds what the script renders now


def test_where_the_data_lives_does_not_change_a_runs_hash(tmp_path):
    """``--data DIR`` names a folder, not a dataset: a study resumed with another data folder
    (or the default one) skips the runs it has."""
    a = st.plan_study(tmp_path, rows=["SVD"], seeds=1, experiments=["gcp"])
    b = st.plan_study(tmp_path, rows=["SVD"], seeds=1, experiments=["gcp"], data_dir="/usr/share/datasets/fashion-mnist")
    assert a[0].config.data_dir is None and b[0].config.data_dir is not None
    assert a[0].hash == b[0].hash
    c = st.plan_study(tmp_path, rows=["SVD"], seeds=1, experiments=["gcp"], dataset="synthetic")
    assert c[0].hash != a[0].hash
    # an image folder *is* its data: there the folder stays in the hash
    import dataclasses

    spec = a[0]
    f1 = dataclasses.replace(spec.config, dataset="imagefolder", data_dir="/data/one")
    f2 = dataclasses.replace(spec.config, dataset="imagefolder", data_dir="/data/two")
    assert st.config_hash("gcp", spec.row, f1, 10, False) != st.config_hash("gcp", spec.row, f2, 10, False)
