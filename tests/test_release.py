"""Release hygiene: CHANGELOG.md's newest entry is the package version, which pyproject.toml
and orthofx.__version__ agree on; the project metadata has URLs and classifiers."""

import re
import sys
from pathlib import Path

import pytest

import orthofx

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    if sys.version_info < (3, 11):
        tomllib = pytest.importorskip("tomli")
    else:
        import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_changelog_newest_entry_is_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]? - (\d{4}-\d{2}-\d{2})\s*$", text, re.M)
    assert versions, "CHANGELOG.md has no '## X.Y.Z - YYYY-MM-DD' entry"
    assert versions[0][0] == orthofx.__version__ == _pyproject()["project"]["version"]
    numbers = [tuple(map(int, v.split("."))) for v, _ in versions]
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) == len(numbers)


def test_project_metadata_has_urls_and_classifiers() -> None:
    project = _pyproject()["project"]
    assert project["urls"] and all(u.startswith("https://") for u in project["urls"].values())
    classifiers = project["classifiers"]
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert "Typing :: Typed" in classifiers and not any(c.startswith("License ::") for c in classifiers)
