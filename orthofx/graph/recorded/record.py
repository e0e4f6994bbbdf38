"""Record one concrete forward at the ATen op level: what really runs on the example inputs.

:func:`record` runs ``model(*example_inputs)`` once, in training mode, under a
``TorchDispatchMode`` that logs every ATen op with the recorded nodes of its tensor inputs. So
it sees inside custom ``autograd.Function`` forwards (however ``apply`` is reached), through
Python loops and branches, through ``.item()`` and through any number of layers. Module
forward hooks keep a module stack, and the forwards of user ``autograd.Function`` classes are
wrapped for the run, so each op knows the module and the Function it ran in.

The run changes nothing of the user's: parameters and buffers that an op writes are saved
before the write and put back (values, and buffer/attribute objects a forward reassigns), the
training flags, the global RNG states (torch, CUDA, ``random``, NumPy) are restored, and the
user's own module hooks are switched off for the run (torch's own hooks, e.g. ``weight_norm``,
stay on).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from orthofx.errors import TraceFailure
from orthofx.graph.recorded.ops import NodeKind, PRODUCTS
from orthofx.graph.state import kept_state, quiet_user_hooks

__all__: list[str] = []  # internal module: import what you need by name

# a square matrix output is kept (for numeric checks) when it has at most this many elements
_KEEP_NUMEL = 1 << 22
_KEEP_MAX_SIDE = 1024
_KEEP_BUDGET = 1 << 25
# op overload -> positional argument slots its schema declares written (in-place / out=)
_WRITE_SLOTS: dict[Any, tuple[int, ...]] = {}


@dataclass(frozen=True)
class Ref:
    """Output ``out`` of recorded node ``node``."""

    node: int
    out: int = 0


@dataclass
class Node:
    """One recorded op (or a leaf tensor: parameter, buffer, input, constant).

    Attributes:
        index: position in execution order.
        kind: :class:`~orthofx.graph.recorded.ops.NodeKind`.
        op: overload-packet name (``"bmm"``) for ops; the qualified name for parameters and
            buffers; ``"input[i]"`` for inputs.
        args: the op's positional arguments with tensors replaced by :class:`Ref`.
        kwargs: its keyword arguments, likewise.
        inputs: the :class:`Ref` of every tensor argument, in order.
        shapes: output shapes.
        module: qualified name of the innermost module whose forward ran the op.
        function: qualified class name of the innermost user ``autograd.Function`` running.
        data: derived from the example inputs.
        param: derived from a parameter (and possibly data).
        symmetric: for a product with square output: whether it is symmetric (numerically;
            computed on demand by the covariance recognition, from ``value``).
        value: the output, kept for small square matrices (numeric checks of the analysis).
        grad: gradient recording was enabled when the op ran (False under ``torch.no_grad()``
            and inside an autograd.Function's forward).
    """

    index: int
    kind: NodeKind
    op: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[Ref, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    module: str = ""
    function: str | None = None
    data: bool = False
    param: bool = False
    symmetric: bool | None = None
    value: Tensor | None = field(default=None, repr=False)
    users: list[int] = field(default_factory=list, repr=False)
    grad: bool = True

    @property
    def shape(self) -> tuple[int, ...] | None:
        return self.shapes[0] if self.shapes else None

    def arg(self, i: int) -> Any:
        return self.args[i] if i < len(self.args) else None


@dataclass
class Recording:
    """The recorded run: nodes in execution order, plus what the analysis needs to name them.

    Attributes:
        nodes: every node; ``nodes[i].index == i``.
        params: node index → qualified parameter name (the first name of a shared parameter).
        param_tensors: qualified parameter name → the parameter.
        module_types: qualified module name → class name.
        training: whether the run was in training mode.
        notes: anything that happened (eval-mode fallback, ...).
        outputs: the nodes of the tensors the forward returned.
        grad: gradient recording was enabled for the forward as a whole.
    """

    nodes: list[Node]
    params: dict[int, str]
    param_tensors: dict[str, Tensor]
    module_types: dict[str, str]
    training: bool = True
    notes: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)
    modules_run: set[str] = field(default_factory=set)
    module_classes: dict[str, type] = field(default_factory=dict, repr=False)
    outputs: list[int] = field(default_factory=list)
    grad: bool = True

    def node(self, ref: Ref | int) -> Node:
        return self.nodes[ref.node if isinstance(ref, Ref) else ref]


# --------------------------------------------------------------------------- the recorder
class _Recorder(TorchDispatchMode):
    def __init__(self, model: nn.Module, inputs: Sequence[Any]) -> None:
        super().__init__()
        self.nodes: list[Node] = []
        self.ids: dict[int, tuple[Any, Ref]] = {}
        self.storages: dict[int, Ref] = {}
        self.module_stack: list[str] = [""]
        self.function_stack: list[str] = []
        self.functions_seen: dict[str, None] = {}
        self.modules_run: set[str] = set()
        self.leaf_params: dict[int, tuple[str, Tensor]] = {}
        self.leaf_buffers: dict[int, tuple[str, Tensor]] = {}
        self.protected: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.param_nodes: dict[int, str] = {}
        self.outputs: list[int] = []
        self.kept = 0
        for name, p in model.named_parameters(remove_duplicate=False):
            self.leaf_params.setdefault(id(p), (name, p))
        for name, b in model.named_buffers(remove_duplicate=False):
            if b is not None:
                self.leaf_buffers.setdefault(id(b), (name, b))
        # buffers are saved up front (some ops, e.g. native_batch_norm, write running
        # statistics without declaring it in their schema); parameters on their first write
        for _, t in self.leaf_buffers.values():
            self.protected.setdefault(_storage_key(t), (t, t.detach().clone()))
        for _, t in self.leaf_params.values():
            self.protected.setdefault(_storage_key(t), (t, None))
        flat, _ = tree_flatten(list(inputs))
        for i, t in enumerate(x for x in flat if isinstance(x, Tensor)):
            self._leaf(t, NodeKind.INPUT, f"input[{i}]", data=True)

    # ---- leaves
    def _leaf(self, t: Tensor, kind: NodeKind, name: str, *, data: bool = False,
              param: bool = False) -> Ref:
        n = Node(len(self.nodes), kind, name, shapes=(tuple(t.shape),), data=data, param=param,
                 module=self.module_stack[-1])
        self.nodes.append(n)
        ref = Ref(n.index)
        self._set(t, ref)
        return ref

    def _get(self, t: Tensor) -> Ref | None:
        hit = self.ids.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return None

    def _set(self, t: Tensor, ref: Ref) -> None:
        self.ids[id(t)] = (weakref.ref(t), ref)

    def ref(self, t: Tensor) -> Ref:
        r = self._get(t)
        if r is not None:
            return r
        hit = self.leaf_params.get(id(t))
        if hit is not None and hit[1] is t:
            r = self._leaf(t, NodeKind.PARAM, hit[0], param=True)
            self.param_nodes[r.node] = hit[0]
            return r
        hit = self.leaf_buffers.get(id(t))
        if hit is not None and hit[1] is t:
            return self._leaf(t, NodeKind.BUFFER, hit[0])
        # an alias made outside the dispatcher (``x.data``): the last writer of its storage
        alias = self.storages.get(_storage_key(t))
        if alias is not None:
            self._set(t, alias)
            return alias
        return self._leaf(t, NodeKind.CONST, "const")

    # ---- ops
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        slots = _WRITE_SLOTS.get(func)
        if slots is None:
            slots = _WRITE_SLOTS[func] = tuple(
                i for i, a in enumerate(func._schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only)
        writes = [args[i] for i in slots if i < len(args) and isinstance(args[i], Tensor)]
        out_kw = kwargs.get("out")
        if isinstance(out_kw, Tensor):
            writes.append(out_kw)
        for t in writes:
            self._protect(t)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        refs: list[Ref] = []
        in_args = tuple(self._map(a, refs) for a in args)
        in_kwargs = {k: self._map(v, refs) for k, v in kwargs.items()} if kwargs else {}
        nodes = self.nodes
        data = param = False
        for r in refs:
            src = nodes[r.node]
            data = data or src.data
            param = param or src.param
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [o for o in outs if isinstance(o, Tensor)]
        n = Node(
            len(nodes), NodeKind.OP, name, args=in_args, kwargs=in_kwargs, inputs=tuple(refs),
            shapes=tuple(tuple(o.shape) for o in tensors), module=self.module_stack[-1],
            function=self.function_stack[-1] if self.function_stack else None,
            data=data, param=param, grad=torch.is_grad_enabled(),
        )
        nodes.append(n)
        for r in refs:
            users = nodes[r.node].users
            if not users or users[-1] != n.index:
                users.append(n.index)
        for k, o in enumerate(tensors):
            ref = Ref(n.index, k)
            self._set(o, ref)
            self.storages[_storage_key(o)] = ref
        for t in writes:  # a write into a view also writes its base
            ref = Ref(n.index)
            self._set(t, ref)
            base = t._base
            if base is not None:
                self._set(base, ref)
        if len(tensors) == 1 and name in PRODUCTS and data:
            self._keep(n, tensors[0])
        return out

    def _map(self, value: Any, refs: list[Ref]) -> Any:
        if isinstance(value, Tensor):
            r = self.ref(value)
            refs.append(r)
            return r
        if isinstance(value, (list, tuple)) and any(isinstance(v, (Tensor, list, tuple)) for v in value):
            mapped = [self._map(v, refs) for v in value]
            return mapped if isinstance(value, list) else tuple(mapped)
        return value

    def _keep(self, n: Node, t: Tensor) -> None:
        """A data product with a square output keeps its value (within a budget of
        ``_KEEP_BUDGET`` elements in all): the covariance and Newton–Schulz checks read it."""
        if t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] > _KEEP_MAX_SIDE:
            return
        if t.numel() > _KEEP_NUMEL or not t.is_floating_point() or self.kept + t.numel() > _KEEP_BUDGET:
            return
        n.value = t
        self.kept += t.numel()

    def _protect(self, t: Tensor) -> None:
        key = _storage_key(t)
        hit = self.protected.get(key)
        if hit is not None and hit[1] is None:
            owner = hit[0]
            self.protected[key] = (owner, owner.detach().clone())

    def restore_values(self) -> None:
        with torch.no_grad():
            for owner, saved in self.protected.values():
                if saved is not None and owner.shape == saved.shape:
                    owner.copy_(saved)


def _storage_key(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr()) or -id(t)
    except Exception:  # noqa: BLE001 - tensors without storage (sparse, ...)
        return -id(t)


def function_name(cls: type) -> str:
    """How a Function is named in recordings and reports (``__qualname__`` without ``<locals>``)."""
    q = cls.__qualname__
    return cls.__name__ if "<locals>" in q else q


def _user_functions() -> list[type]:
    seen: list[type] = []
    stack = list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        mod = getattr(cls, "__module__", "") or ""
        if mod.startswith("torch.") or "forward" not in cls.__dict__ or cls in seen:
            continue
        seen.append(cls)
    return seen


@contextlib.contextmanager
def _named_functions(rec: _Recorder) -> Iterator[None]:
    """Wrap each user autograd.Function's forward so ops know the Function they ran in."""
    patched: list[tuple[type, Any]] = []
    for cls in _user_functions():
        original = cls.__dict__["forward"]
        fn = original.__func__ if isinstance(original, staticmethod) else original
        if not callable(fn):
            continue
        name = function_name(cls)

        def forward(*args: Any, __fn: Any = fn, __name: str = name, **kwargs: Any) -> Any:
            rec.function_stack.append(__name)
            rec.functions_seen.setdefault(__name, None)
            try:
                return __fn(*args, **kwargs)
            finally:
                rec.function_stack.pop()

        try:
            setattr(cls, "forward", staticmethod(forward))
        except (TypeError, AttributeError):
            continue
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            setattr(cls, "forward", original)


@contextlib.contextmanager
def _module_stack(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)

    def pre(m: nn.Module, args: Any) -> None:
        name = names.get(id(m), rec.module_stack[-1])
        rec.module_stack.append(name)
        rec.modules_run.add(name)

    def post(m: nn.Module, args: Any, out: Any) -> None:
        if len(rec.module_stack) > 1:
            rec.module_stack.pop()

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post, always_call=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


# --------------------------------------------------------------------------- record()
def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _run(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], training: bool) -> _Recorder:
    rec = _Recorder(model, list(inputs) + list(kwargs.values()))
    model.train(training)
    try:
        with _named_functions(rec), _module_stack(model, rec), rec:
            out = model(*inputs, **kwargs)
        flat, _ = tree_flatten(out)
        rec.outputs = [r.node for r in (rec._get(t) for t in flat if isinstance(t, Tensor)) if r is not None]
    finally:
        rec.restore_values()
    return rec


def record(model: nn.Module, example_inputs: Any, *, kwargs: dict[str, Any] | None = None,
           training: bool = True) -> Recording:
    """Run ``model`` once on ``example_inputs`` and return the op-level :class:`Recording`.

    Args:
        model: any ``nn.Module``; left exactly as it was (see the module doc).
        example_inputs: a tensor or a tuple of positional inputs.
        kwargs: keyword inputs.
        training: record in training mode (the default, whatever mode the model is in: in
            eval, whitening layers use running buffers, so nothing connects the producer to the
            matrix function). When the training-mode run fails (e.g. BatchNorm on a batch of
            one), the run is repeated in eval mode and a note says so.

    Raises:
        TraceFailure: the forward itself fails on the example inputs (the message names the
            innermost module that was running).
    """
    inputs = _as_tuple(example_inputs)
    kwargs = dict(kwargs or {})
    notes: list[str] = []
    grad = torch.is_grad_enabled()
    with kept_state(model), quiet_user_hooks(model):
        try:
            rec = _run(model, inputs, kwargs, training)
            used = training
        except Exception as exc:  # noqa: BLE001 - retried in eval, then reported
            try:
                if not training:
                    raise
                rec = _run(model, inputs, kwargs, False)
            except Exception:  # noqa: BLE001
                raise _failure(model, inputs, kwargs, exc) from exc
            used = False
            notes.append(f"the training-mode forward failed ({type(exc).__name__}: {_first_line(exc)}); "
                         f"recorded in eval mode, where whitening layers may use running statistics")
    params = dict(rec.param_nodes)
    param_tensors = {name: p for name, p in rec.leaf_params.values()}
    classes = {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}
    types = {name: cls.__name__ for name, cls in classes.items()}
    return Recording(rec.nodes, params, param_tensors, types, training=used, notes=notes,
                     functions=list(rec.functions_seen), modules_run=set(rec.modules_run),
                     module_classes=classes, outputs=rec.outputs, grad=grad)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class RecordingFailure(TraceFailure):
    """The model runs on the example inputs, but not under the op recorder (e.g. an op the
    dispatch mode cannot handle); the analysis falls back to symbolic tracing."""


def _failure(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any],
             exc: BaseException) -> TraceFailure:
    """A forward that fails on its own is the user's inputs' fault; one that fails only under
    the recorder is a :class:`RecordingFailure`."""
    try:
        with torch.no_grad():
            model(*inputs, **kwargs)
    except Exception:  # noqa: BLE001 - the forward itself fails: bad example inputs
        return _forward_failure(model, exc)
    return RecordingFailure(
        f"{type(model).__name__} runs on the example inputs but could not be recorded op by op "
        f"({type(exc).__name__}: {_first_line(exc)})", module="")


def _forward_failure(model: nn.Module, exc: BaseException) -> TraceFailure:
    return TraceFailure(
        f"the forward of {type(model).__name__} failed on the example inputs "
        f"({type(exc).__name__}: {_first_line(exc)})",
        module="",
        hint="check that example_inputs are what the model's forward takes (a tensor, or a tuple of "
             "positional inputs)",
    )
