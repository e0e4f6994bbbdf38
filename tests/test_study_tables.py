"""docs/study_tables.py: the multiplicity adjustment and the page it writes.

* ``study_stats.paired_p_value`` (which the script uses) equals scipy's ``ttest_rel`` on the paired values (float64).
* ``holm`` equals the textbook definition: adjusted p_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)),
  checked on random p-value families (Hypothesis); and it never lowers a p-value.
* The tables in docs/results.md are the ones the script renders from the committed results.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from orthofx.experiment.study_stats import paired_p_value

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study_tables", ROOT / "docs" / "study_tables.py")
assert _spec is not None and _spec.loader is not None
study_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_tables)


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=8), st.floats(-1, 1))
def test_paired_p_equals_scipy(a: list[float], shift: float) -> None:
    b = [x + shift + 0.1 * i * (-1) ** i for i, x in enumerate(a)]
    diffs = [y - x for x, y in zip(a, b)]
    if len({round(d, 12) for d in diffs}) == 1:
        return  # zero variance: scipy returns nan, the script a documented 0/1
    ref = stats.ttest_rel(b, a).pvalue
    assert math.isclose(paired_p_value(diffs), ref, rel_tol=1e-9, abs_tol=1e-12)


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=30))
def test_holm_matches_the_definition(ps: list[float]) -> None:
    keys = [("e", str(i)) for i in range(len(ps))]
    got = study_tables.holm(dict(zip(keys, ps)))
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    m = len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        assert math.isclose(got[keys[i]], running, rel_tol=1e-12, abs_tol=1e-15)
        assert got[keys[i]] >= ps[i] - 1e-15


def test_page_tables_match_results_json() -> None:
    results = json.loads((ROOT / "docs" / "results" / "study" / "results.json").read_text())
    page = (ROOT / "docs" / "results.md").read_text()
    rendered = study_tables.render(results)
    body = page.split(study_tables.BEGIN, 1)[1].split(study_tables.END, 1)[0]
    assert body.strip() == rendered.strip()
