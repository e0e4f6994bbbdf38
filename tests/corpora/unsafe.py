"""A pickle payload whose unpickling runs code: a checkpoint that carries :class:`Payload`
must be refused by a safe load (``weights_only``) with nothing run, which :data:`RAN` shows."""

from __future__ import annotations

__all__ = ["RAN", "Payload", "record"]

#: the messages :func:`record` was called with (clear it before the load under test)
RAN: list[str] = []


def record(msg: str) -> str:
    """The code the payload runs when unpickled: appends ``msg`` to :data:`RAN`."""
    RAN.append(msg)
    return msg


class Payload:
    """Unpickles as the call ``record("code ran while loading")``."""

    def __reduce__(self):
        return (record, ("code ran while loading",))
