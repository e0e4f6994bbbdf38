"""The public surface (issue 13): about 15 names at the top level, everything else in its
submodule; older top-level names still resolve lazily without being advertised."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import orthofx

TOP_LEVEL = [
    "transform", "attach", "orthogonality_loss", "strip", "save_checkpoint", "load_checkpoint", "analyze",
    "OrthoConfig", "AnalysisConfig", "TransformReport", "AnalysisReport", "ConditioningMonitor",
    "OrthofxError", "ConfigError", "InputError",
]


def test_top_level_all_is_pinned() -> None:
    assert orthofx.__all__ == TOP_LEVEL
    for name in TOP_LEVEL:
        assert getattr(orthofx, name) is not None


def test_dir_lists_the_public_names_and_submodules_only() -> None:
    listed = set(dir(orthofx))
    assert set(TOP_LEVEL) <= listed
    assert {"linalg", "nn", "treatments", "graph", "optim", "integrations"} <= listed
    for hidden in ("experiment", "data", "rewrite", "PRESETS", "trace", "sync_audit", "TraceFailure"):
        assert hidden not in listed


def test_older_names_and_hidden_submodules_still_resolve() -> None:
    from orthofx.config import PRESETS
    from orthofx.errors import TraceFailure
    from orthofx.syncs import sync_audit

    with pytest.warns(DeprecationWarning, match=r"orthofx.PRESETS is deprecated and will be removed in orthofx 0\.3\.0; use orthofx.config.PRESETS"):
        assert orthofx.PRESETS is PRESETS
    with pytest.warns(DeprecationWarning, match=r"use orthofx.errors.TraceFailure"):
        assert orthofx.TraceFailure is TraceFailure
    with pytest.warns(DeprecationWarning, match=r"use orthofx.syncs.sync_audit"):
        assert orthofx.sync_audit is sync_audit
    for name in ("experiment", "data", "rewrite", "optim", "integrations", "vocab", "plan"):
        assert getattr(orthofx, name) is importlib.import_module(f"orthofx.{name}")


def test_import_orthofx_imports_no_torch() -> None:
    code = "import sys, orthofx; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_older_name_warns_with_its_new_place_and_current_names_do_not() -> None:
    import warnings

    from orthofx import _COMPAT

    for name, mod in _COMPAT.items():
        with pytest.warns(DeprecationWarning, match=rf"orthofx\.{name} is deprecated and will be removed in orthofx 0.3.0; use {mod}\.{name}$"):
            obj = getattr(orthofx, name)
        assert obj is getattr(importlib.import_module(mod), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in TOP_LEVEL:
            getattr(orthofx, name)
        from orthofx import nn, transform  # noqa: F401


def test_config_signature_shows_what_an_unset_default_means() -> None:
    """help(OrthoConfig) / IDE tooltips showed ``<object object at 0x…>`` for the flat keywords."""
    import inspect
    import pickle

    from orthofx.config import _UNSET

    sig = str(inspect.signature(orthofx.OrthoConfig))
    assert "object at 0x" not in sig
    assert "ow_method: 'str' = unset (the preset's value)" in sig
    assert pickle.loads(pickle.dumps(_UNSET)) is _UNSET and type(_UNSET)() is _UNSET
    # behaviour unchanged: an unset keyword takes the preset's value, a given one overrides it
    assert orthofx.OrthoConfig.from_preset("ow").ow_method == orthofx.OrthoConfig("ow").ow_method
    assert orthofx.OrthoConfig("ow", ow_method="cayley").ow_method == "cayley"
