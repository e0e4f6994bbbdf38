"""Leave orthofx behind: bake a transformed model into a plain one, and checkpoint/replay.

* :func:`strip` — a hook-free, parametrization-free copy whose state-dict keys are the
  original model's (``conv1.weight``, not ``conv1.parametrizations.weight.original``) and
  whose stable meta-layers are swapped back to the original ``torch.linalg`` calls (same
  forward). It loads into the original class and exports with ``torch.export``.
* :func:`save_checkpoint` / :func:`load_checkpoint` — ``{plan, state_dict, checksum}``;
  loading replays the plan on a fresh *unmodified* model (parametrized modules are never
  pickled). The plan is plain data and files are read with ``torch.load(weights_only=True)``,
  so a checkpoint from elsewhere cannot run code; a sha256 of the state detects corruption.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import os
import pickle
import pickletools
import re
import stat
import tempfile
import warnings
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from orthofx.errors import ConfigError
from orthofx.fuse import ExactSpectral, emit_plain
from orthofx.graph.symbolic.trace import TRACE_META_KEY
from orthofx.nn.stable import StableDecomposition
from orthofx.rewrite import META_KEY, STABLE_PREFIX, Plan, unswap_calls
from orthofx.pipeline import plan_of, replay, safe_deepcopy, unwrap
from orthofx.treatments.baking import bake_all

__all__ = ["strip", "save_checkpoint", "load_checkpoint", "checkpoint"]


def _unswap(gm: fx.GraphModule) -> int:
    """Put plain torch back in place of orthofx's swapped meta-layers: the original decomposition
    call for a StableDecomposition, the ops of :func:`orthofx.fuse.emit_plain` (the same forward)
    for an ExactSpectral. Returns how many modules were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith(STABLE_PREFIX):
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, ExactSpectral) and len(node.args) == 1 and not node.kwargs:
            with gm.graph.inserting_before(node):
                new = emit_plain(gm.graph, node.args[0], mod.usage)
        elif isinstance(mod, StableDecomposition) and mod.original is not None:
            with gm.graph.inserting_before(node):
                if isinstance(mod.original, str):
                    new = gm.graph.call_method(mod.original, node.args, node.kwargs)
                else:
                    new = gm.graph.call_function(mod.original, node.args, node.kwargs)
        else:
            continue
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


_PLAIN_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _plain_calls(gm: fx.GraphModule) -> bool:
    """Whether every function the graph calls is torch's, ``operator``'s, a builtin or ``math``'s
    (then fx's own Tracer re-traces its code as orthofx's tracer did)."""
    for n in gm.graph.nodes:
        if n.op == "call_function":
            mod = getattr(n.target, "__module__", None) or ""
            if mod.partition(".")[0] not in _PLAIN_MODULES:
                return False
    return True


def strip(model: nn.Module, *, keep_stable: bool = False) -> nn.Module:
    """A plain copy of a transformed model: parametrizations baked (OW/SN weights hold their
    current value under the original key), stable meta-layers swapped back to the original
    torch calls and fused ``ExactSpectral`` meta-layers replaced by plain torch ops with the
    same forward (``U f(max(Λ, floor)) Uᵀ`` of a float64 eigh, :func:`orthofx.fuse.emit_plain`;
    its backward is autograd's through ``eigh``) — both unless ``keep_stable`` — and the orthofx
    plan removed. ``model`` is untouched.

    A model with ``ow_method="soc"`` cannot be stripped (the exponential of a convolution is
    not one kernel of the layer's shape): :class:`~orthofx.errors.TreatmentError`.

    Without ``keep_stable`` nothing in the result refers to orthofx (its code, modules and
    ``meta``): it pickles and unpickles where orthofx is not installed.

    The result is hook-free: its ``state_dict()`` loads into the original model class
    (``strict=True`` whenever the original model uses all its submodules in ``forward``), and
    it exports with ``torch.export.export`` and ``torch.jit.trace``.
    """
    src = unwrap(model)
    if plan_of(src) is None:
        raise ConfigError("strip() expects a model returned by orthofx.transform")
    out = safe_deepcopy(src)
    bake_all(out)
    if not keep_stable:  # swaps made at submodules: their GraphModules, and kept modules' calls
        unswap_calls(out)
        for sub in list(out.modules()):
            if sub is not out and isinstance(sub, fx.GraphModule):
                _unswap(sub)
    if isinstance(out, fx.GraphModule):
        if not keep_stable:
            _unswap(out)
        out.meta.pop(META_KEY, None)
        out.meta.pop(TRACE_META_KEY, None)  # a TraceInfo: unpickling it would import orthofx
        if not keep_stable and _plain_calls(out):  # unpickling re-traces the code with this class
            out._tracer_cls = out.graph._tracer_cls = None
        out.meta.get("_user_preserved_attributes", {}).pop("_orthofx_meta", None)
    for m in out.modules():
        m.__dict__.pop("_orthofx_meta", None)
        m.__dict__.pop("_orthofx_plan_cache", None)
    return out


#: keys :func:`save_checkpoint` writes itself (``extra`` may not use them)
_CHECKSUM_KEY = "orthofx_checksum"
_RESERVED = ("orthofx_plan", "state_dict", _CHECKSUM_KEY)


def _plain(x: Any, where: str = "orthofx_plan") -> Any:
    """``x`` as plain data (dict with str keys / list / str / int / float / bool / None);
    tuples become lists. Anything else raises :class:`ConfigError` naming where it is."""
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where}: key {k!r} is not a string; a checkpoint plan holds plain data only")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise ConfigError(f"{where} holds a {type(x).__name__}; a checkpoint plan holds plain data only")


def _state_checksum(state_dict: Mapping[str, Any]) -> str:
    """sha256 (hex) over a state dict: for each key in sorted order its name, dtype, shape and
    the raw bytes of a contiguous CPU copy of the tensor (non-tensor entries: their ``repr``)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        v = state_dict[key]
        h.update(key.encode() + b"\0")
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode() + b"\0")
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode() + b"\0")
    return h.hexdigest()


def checkpoint(model: nn.Module) -> dict[str, Any]:
    """``{"orthofx_plan": plan as plain data, "state_dict": ...}`` of a transformed model
    (the state dict's tensors share memory with ``model``)."""
    plan = plan_of(model)
    if plan is None:
        raise ConfigError("checkpoint() expects a model returned by orthofx.transform")
    return {"orthofx_plan": _plain(plan.to_dict()), "state_dict": unwrap(model).state_dict()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike | io.IOBase, **extra: Any) -> None:
    """``torch.save`` of :func:`checkpoint`, its state's sha256 (``"orthofx_checksum"``) and
    ``extra`` entries (optimizer state, epoch, ...).

    ``extra`` must hold what ``torch.load(weights_only=True)`` (so :func:`load_checkpoint`)
    reads: tensors, dict/list/tuple/set, str, bytes, numbers, bool, None, ``torch.dtype``,
    ``torch.device``, ``torch.Size`` and types allowed with
    ``torch.serialization.add_safe_globals``. Anything else (a lambda, an
    ``argparse.Namespace``: pass ``vars(args)``) raises :class:`ConfigError` naming the entry,
    before anything is written.

    A path is written atomically: to a temporary file in the same directory, flushed and
    fsync'ed, then moved over ``path`` with ``os.replace``; a save that fails (disk full, an
    interrupt) leaves an existing file at ``path`` byte-identical. A missing directory or a
    directory as ``path`` is a :class:`ConfigError`.
    """
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ConfigError(f"save_checkpoint: extra entries {clash} would overwrite orthofx's own keys")
    for key, value in extra.items():
        _check_loadable(value, repr(key))
    ck = checkpoint(model)
    ck[_CHECKSUM_KEY] = _state_checksum(ck["state_dict"])
    ck.update(extra)
    if isinstance(path, (str, os.PathLike)):
        _atomic_save(ck, os.fspath(path))
    else:
        torch.save(ck, path)


_LEAVES = (str, bytes, bool, int, float, complex, type(None), torch.dtype, torch.device, torch.Size,
           torch.memory_format, torch.layout)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, frozenset)


def _check_loadable(x: Any, where: str) -> None:
    """ConfigError unless ``torch.load(weights_only=True)`` reads ``x`` back (see save_checkpoint)."""
    stack = [(where, x)]
    while stack:
        name, v = stack.pop()
        t = type(v)
        if t in _LEAVES or t in (torch.Tensor, nn.Parameter):
            continue
        if t in _CONTAINERS:
            if isinstance(v, dict):
                stack += [(f"{name}[{k!r}]", k) for k in v if type(k) not in _LEAVES]
                stack += [(f"{name}[{k!r}]", e) for k, e in v.items()]
            else:
                stack += [(f"{name}[{i}]", e) for i, e in enumerate(v)]
            continue
        if t in _safe_globals():
            continue
        kind = f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__
        hint = " (pass vars(...) of it)" if hasattr(v, "__dict__") and not callable(v) else ""
        raise ConfigError(
            f"save_checkpoint: extra entry {name} holds a {kind}, which torch.load(weights_only=True) and "
            f"load_checkpoint refuse; store plain data and tensors only{hint}; nothing was written"
        )


def _safe_globals() -> set[Any]:
    """Types the user allowed with ``torch.serialization.add_safe_globals``."""
    out = set()
    for g in torch.serialization.get_safe_globals():
        out.add(g[0] if isinstance(g, tuple) else g)
    return out


def _atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory, flushed,
    fsync'ed and moved over ``path`` (``os.replace``)."""
    if os.path.isdir(path):
        raise ConfigError(f"save_checkpoint: {path} is a directory; pass a file path such as "
                          f"{os.path.join(path, 'checkpoint.pt')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"save_checkpoint: the directory {folder} does not exist; create it first "
                          f"(os.makedirs(..., exist_ok=True))")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            raise ConfigError(f"save_checkpoint: could not write {path} ({type(exc).__name__}: "
                              f"{_first_line(exc)}); an earlier file there is unchanged") from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _file_mode(path: str) -> int:
    """The mode a plain ``open(path, "wb")`` would give: the existing file's, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")[:200]


_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _read(source: Any, map_location: Any) -> Any:
    """``torch.load(source, weights_only=True)`` with every failure as a one-line :class:`ConfigError`."""
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {name} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"checkpoint {name} is a directory, not a file") from None
    except pickle.UnpicklingError as e:
        blocked = _GLOBAL.search(str(e))
        found = blocked.group(1) if blocked else _pickled_global(source)
        if found:
            raise ConfigError(
                f"checkpoint {name} holds objects that a safe load (torch.load(weights_only=True)) refuses: "
                f"it names the global {found}, which was blocked and not run. orthofx checkpoints "
                f"hold tensors and plain data only; load it with weights_only=False only if you trust its "
                f"source, or write it again with orthofx.save_checkpoint"
            ) from None
        raise ConfigError(_unreadable(name, e)) from None
    except Exception as e:  # noqa: BLE001  (torch's reader fails with many types on a non-checkpoint)
        raise ConfigError(_unreadable(name, e)) from None


def _unreadable(name: Any, exc: BaseException) -> str:
    text = str(exc).split("WeightsUnpickler error:")[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "weights_only" not in ln and not ln.startswith("Check the doc")), "")
    what = f"{type(exc).__name__}: {detail[:120]}" if detail else type(exc).__name__
    kind = " (it looks like a text file)" if _looks_like_text(name) else ""
    return (f"cannot read checkpoint {name}: it is corrupted or not a torch checkpoint{kind} ({what}); "
            f"pass a file written by orthofx.save_checkpoint or torch.save")


def _looks_like_text(name: Any) -> bool:
    if not isinstance(name, (str, os.PathLike)):
        return False
    try:
        with open(name, "rb") as f:
            head = f.read(512)
        head.decode("utf-8")
        return bool(head) and all(c >= 32 or c in (9, 10, 13) for c in head)
    except (OSError, UnicodeDecodeError):
        return False


def _pickled_global(name: Any) -> str | None:
    """The first global a raw pickle file names (read with ``pickletools``: nothing runs), or None."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    try:  # what a safe load allows (private torch API; without it, torch's and collections' globals)
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        allowed = set()
    strings: list[str] = []
    try:
        with open(name, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                found = None
                if op.name in ("GLOBAL", "INST"):
                    found = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found = f"{strings[-2]}.{strings[-1]}"
                elif isinstance(arg, str):
                    strings.append(arg)
                if found and found not in allowed and not found.startswith(("torch.", "collections.")):
                    return found
    except Exception:  # noqa: BLE001  (not a pickle, or a truncated one)
        return None
    return None


def _check_state(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """ConfigError naming the missing/unexpected keys and mismatching shapes."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, v in expected.items():
        w = got.get(k)
        if isinstance(v, torch.Tensor) and w is not None:
            if not isinstance(w, torch.Tensor):
                problems.append(f"{k}: a {type(w).__name__}, expected a tensor of shape {tuple(v.shape)}")
            elif w.shape != v.shape:
                problems.append(f"{k}: shape {tuple(w.shape)} in the checkpoint, {tuple(v.shape)} in this model")
    if problems:
        raise ConfigError(
            "checkpoint state_dict does not fit this model (a different architecture?): " + "; ".join(problems)
        )


def load_checkpoint(
    model: nn.Module, ckpt: str | os.PathLike | io.IOBase | Mapping[str, Any], *, map_location: Any = None
) -> nn.Module:
    """Replay a checkpoint's plan on a fresh, *unmodified* ``model`` and load its state.

    ``ckpt``: a path or file object (read with ``torch.load(weights_only=True)``: no code
    runs) or a dict from :func:`checkpoint`. Returns the transformed module (as
    :func:`orthofx.transform` would), with the saved weights, OW bases and buffers.

    Raises :class:`ConfigError` when the file cannot be read, an entry is missing or
    malformed, the stored checksum does not match the state ("checkpoint is corrupted"), or
    the producers, state-dict keys or shapes do not match ``model`` (a different
    architecture). A file without a checksum (older orthofx) loads with a warning.
    """
    from_file = not isinstance(ckpt, Mapping)
    if from_file:
        ckpt = _read(ckpt, map_location)
        if not isinstance(ckpt, Mapping):
            raise ConfigError(f"not an orthofx checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in ("orthofx_plan", "state_dict") if k not in ckpt]
    if missing:
        raise ConfigError(f"not an orthofx checkpoint (no {' and no '.join(map(repr, missing))} entry)")
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"checkpoint 'state_dict' must map parameter names to tensors, got {type(state).__name__}")
    stored = ckpt.get(_CHECKSUM_KEY)
    if stored is not None:
        actual = _state_checksum(state)
        if stored != actual:
            raise ConfigError(
                f"checkpoint is corrupted: the sha256 of its state_dict is {actual[:16]}..., "
                f"the checkpoint records {str(stored)[:16]}..."
            )
    elif from_file:
        warnings.warn(
            "checkpoint has no checksum (written by an older orthofx); loading it without an integrity check",
            UserWarning,
            stacklevel=2,
        )
    plan_dict = ckpt["orthofx_plan"]
    if not isinstance(plan_dict, Mapping):
        raise ConfigError(f"checkpoint 'orthofx_plan' must be a dict, got {type(plan_dict).__name__}")
    try:
        saved = Plan.from_dict(dict(plan_dict))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"checkpoint 'orthofx_plan' is malformed: {type(e).__name__}: {e}") from None
    gm = replay(model, saved)
    target = unwrap(gm)
    _check_state(target.state_dict(), state)
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint state_dict does not load into this model: {e}") from None
    return gm
