"""Pickling of modules that carry OW/SN parametrizations.

``torch.nn.utils.parametrize`` gives each parametrized module its own class
(``ParametrizedConv2d``, made at run time) whose ``__getstate__`` refuses pickling. orthofx
gives that class a ``__reduce_ex__`` instead: the module is pickled as its original class,
the names of its parametrized tensors, the extra attributes orthofx put on the class (the SOC
``forward``) and its ``__dict__`` (the parametrization modules, ``original`` tensors and
buffers as they are). Unpickling rebuilds the class with parametrize's own helpers and restores
the ``__dict__``, so the parametrizations, their state and the orthofx plan stored on the root
come back exactly; ``pickle``, ``torch.save``/``torch.load(weights_only=False)``, ``spawn``
and ``copy.deepcopy`` all work. Checkpoints (:func:`orthofx.save_checkpoint`) stay the
portable choice: they are read without running code.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["make_picklable"]

#: attributes parametrize itself puts on the class it makes, or Python does
_OWN = frozenset({"__getstate__", "__deepcopy__", "__reduce_ex__", "__module__", "__doc__", "__dict__",
                  "__weakref__", "__qualname__", "__orig_bases__", "__static_attributes__",
                  "__firstlineno__"})


def make_picklable(module: nn.Module) -> None:
    """Let a module that carries parametrizations be pickled (module doc). Idempotent; a
    module without parametrizations is left alone."""
    if parametrize.is_parametrized(module):
        type(module).__reduce_ex__ = _reduce_parametrized  # type: ignore[method-assign]


def _reduce_parametrized(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    cls = type(self)
    names = tuple(self.parametrizations.keys())  # type: ignore[union-attr]
    extra = {k: v for k, v in vars(cls).items() if k not in _OWN and k not in names}
    return (_rebuild, (cls.__bases__[0], names, extra), self.__dict__)


def _rebuild(base: type, names: tuple[str, ...], extra: dict[str, Any]) -> nn.Module:
    """An empty instance of a freshly parametrized subclass of ``base``; pickle then restores
    its ``__dict__`` through ``nn.Module.__setstate__``."""
    obj = base.__new__(base)
    parametrize._inject_new_class(obj)
    for name in names:
        parametrize._inject_property(obj, name)
    for k, v in extra.items():
        setattr(type(obj), k, v)
    type(obj).__reduce_ex__ = _reduce_parametrized  # type: ignore[method-assign]
    return obj
