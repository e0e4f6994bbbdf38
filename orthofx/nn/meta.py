"""The marker that makes a module an orthofx meta-layer.

The graph tracer treats every module whose class carries ``orthofx_meta`` (a
:class:`orthofx.vocab.MetaSpec`; :func:`orthofx.vocab.is_meta_layer` is the one test) as a leaf
and reports it as a meta-layer. Modules that keep ``orthofx_record = True`` store the detached
eigenvalues of the matrix they decomposed in ``orthofx_last_eigenvalues``, which the
conditioning monitor reads instead of decomposing the matrix a second time.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.fx
from torch import nn

from orthofx.vocab import MetaSpec, is_meta_layer

__all__ = ["MetaLayer", "is_meta_layer"]


class MetaLayer(nn.Module):
    """Base class of orthofx meta-layer modules (the marker plus eigenvalue recording)."""

    orthofx_meta: ClassVar[MetaSpec]

    def __init__(self) -> None:
        super().__init__()
        #: when True, forward stores the eigenvalues it computed (detached) for the monitor
        self.orthofx_record: bool = False
        self.orthofx_last_eigenvalues: torch.Tensor | None = None

    def __prepare_scriptable__(self) -> "MetaLayer":
        """``torch.jit.script`` calls this on every submodule first. Meta-layers with a TorchScript
        path (DecorrelatedBatchNorm, CovariancePooling) return themselves;
        the others refuse with the reason and the alternatives, instead of TorchScript's
        "Can't redefine method: forward"."""
        from orthofx.errors import ScriptingError

        raise ScriptingError(
            f"{type(self).__module__}.{type(self).__qualname__} cannot be compiled by torch.jit.script: its forward "
            "calls orthofx's custom autograd.Functions and chooses its solver in Python, which TorchScript cannot "
            "express, and it has no TorchScript path; orthofx.strip(model) (without keep_stable) replaces it by "
            "plain torch ops, which script; or use torch.jit.trace(model, example_inputs) or "
            "torch.export.export(model, example_inputs)")

    def orthofx_internal_producer(self) -> str | None:
        """Relative name of a Pre-SVD layer that lives inside this module, or None."""
        return None

    def _traced_as_leaf(self, *args: Any, **kwargs: Any) -> Any:
        """Under any ``torch.fx`` tracer (including plain ``symbolic_trace``), record this
        module as ONE ``call_module`` node instead of tracing its forward.

        Tracing the forward would bake ``self.training`` and shape checks into the graph;
        as a leaf, the GraphModule calls the real module, so train/eval modes keep working.
        Returns None when no argument is an ``fx.Proxy`` (ordinary eager call).
        """
        proxy = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
        if proxy is None:
            return None
        tracer = proxy.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, kwargs)

    def _spectral(self, fn: Callable[..., Any], matrix: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Call an ``orthofx.linalg`` matrix function (validate=False: no host sync), keeping
        its eigenvalues in ``orthofx_last_eigenvalues`` when recording is on."""
        if not self.orthofx_record:
            return fn(matrix, validate=False, **kwargs)
        y, lam = fn(matrix, validate=False, return_eigenvalues=True, **kwargs)
        self._remember(lam)
        return y

    def _remember(self, eigenvalues: torch.Tensor) -> None:
        """Keep the eigenvalues of the decomposed matrix for the monitor, when recording — not
        while ``torch.export`` or ``torch.jit.trace`` captures the forward: a tensor attribute
        assigned there is refused with a warning and would not be updated by the exported program."""
        if self.orthofx_record and not (torch.compiler.is_exporting() or torch.jit.is_tracing()):
            self.orthofx_last_eigenvalues = eigenvalues.detach()
