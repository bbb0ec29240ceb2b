"""The events of a token stream: the value every stream hands out.

The lowest layer of the contract: errors turn themselves into ``error``
events, streams and frame mappers build the others. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

__all__ = ["TokenEvent", "make_event", "cancelled_end", "EVENT_KINDS", "FINISH_REASONS"]

#: The event kinds a stream can carry, in the order they may appear.
EVENT_KINDS = ("started", "token", "metrics", "end", "error")
#: The values of ``end.finish_reason``.
FINISH_REASONS = ("length", "eos_token", "stop_sequence", "cancelled")

@dataclass(frozen=True)
class TokenEvent:
    """One event of a token stream: ``kind`` is one of :data:`EVENT_KINDS`.

    ``data`` holds the keys of the contract's event table (``t`` and ``i`` for
    tokens, ``code``/``message``/``retriable``/``retry_after_ms``/``engine`` for
    errors, and so on).
    """

    __slots__ = ("kind", "data")
    kind: str
    data: Dict[str, Any]

    def __reduce__(self) -> Tuple[Any, ...]:
        # Frozen slotted dataclasses cannot be unpickled by setattr before 3.11.
        return (TokenEvent, (self.kind, self.data))

    def to_dict(self) -> Dict[str, Any]:
        """``{"kind": ..., "data": ...}``, ready for ``json.dumps``."""
        return {"kind": self.kind, "data": self.data}


# The per-token path builds one event per token; going through the frozen
# dataclass __init__ (object.__setattr__ per field) costs twice as much as
# setting the two slots directly.
_new_object = object.__new__
_set_kind = vars(TokenEvent)["kind"].__set__
_set_data = vars(TokenEvent)["data"].__set__


def make_event(kind: str, data: Dict[str, Any]) -> TokenEvent:
    """Build a :class:`TokenEvent` without the frozen-dataclass overhead."""
    event: TokenEvent = _new_object(TokenEvent)
    _set_kind(event, kind)
    _set_data(event, data)
    return event


def cancelled_end(engine_version: Any) -> Dict[str, Any]:
    """The ``data`` of the ``end`` event of a task cancelled before the engine's own end was handed out."""
    return {
        "tokens_out": 0,
        "decode_ms": 0,
        "finish_reason": "cancelled",
        "tokens_in": None,
        "seed": None,
        "engine_version": engine_version,
    }
