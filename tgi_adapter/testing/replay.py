"""Serving a cassette: which recorded exchange answers a request, and when each byte goes out.

No sockets here. :class:`Replay` matches a request to a recorded exchange
(method, path, JSON-equal body; headers ignored), in recorded order, and
builds the 404 for a request nothing matches. :func:`plan` turns an exchange
into a :class:`Plan` of timed writes that ``FakeTgiServer`` carries out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import Counter
from typing import Any, Union

from ..cassette import FRAMING_HEADERS, Cassette, Exchange, JsonKey, json_key, read_cassette

__all__ = ["Miss", "Plan", "Replay", "plan"]

# GET routes a cassette need not hold: the fake answers them itself when it does not.
_DEFAULT_ROUTES = frozenset({"/info", "/health"})
_NOT_JSON: JsonKey = ("not json",)


@dataclasses.dataclass(frozen=True)
class Miss:
    """No recorded exchange answers the request: a 404 with this TGI-shaped JSON body."""

    body: bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to write for one exchange, in seconds from the request's arrival.

    ``status`` 0: no headers are sent. ``length`` is a Content-Length to send,
    or None to frame the body in chunks. ``end`` is the cassette's end kind.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    headers_at: float
    length: int | None
    chunks: tuple[tuple[float, bytes], ...]
    end: str
    end_at: float


def plan(exchange: Exchange, speed: float) -> Plan:
    """The timed writes that reproduce ``exchange`` at ``speed`` (0: no waits)."""
    response = exchange.response

    def at(ms: float | None) -> float:
        return 0.0 if speed == 0 or ms is None else ms / 1000.0 / speed

    # An empty chunk would end a chunked body early; it carries nothing anyway.
    chunks = tuple((at(chunk.t_ms), chunk.data) for chunk in response.chunks if chunk.data)
    chunked = response.end != "complete" or "chunked" in (response.header("transfer-encoding") or "").lower()
    last = max([at(response.headers_ms)] + [t for t, _ in chunks])
    return Plan(
        status=response.status,
        headers=tuple((n, v) for n, v in response.headers if n.lower() not in FRAMING_HEADERS),
        headers_at=at(response.headers_ms),
        length=None if chunked else sum(len(data) for _, data in chunks),
        chunks=chunks,
        end=response.end,
        end_at=max(last, at(response.end_ms)),
    )


def _body_key(body: bytes) -> JsonKey:
    if not body:
        return json_key(None)
    try:
        return json_key(json.loads(body))
    except (ValueError, RecursionError, TypeError):
        return _NOT_JSON


def _route(target: str) -> str:
    """The request target as a cassette writes a path: absolute form taken off, query kept."""
    if "://" in target:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return target or "/"


def _differences(recorded: Any, given: Any, where: str = "body") -> list[str]:
    """Where two JSON values differ (at most a few places), each as ``path: recorded …, got …``."""
    if json_key(recorded) == json_key(given):
        return []
    if isinstance(recorded, dict) and isinstance(given, dict):
        out: list[str] = []
        for key in sorted(set(recorded) | set(given)):
            if key not in given:
                out.append(f"{where}.{key}: recorded, missing here")
            elif key not in recorded:
                out.append(f"{where}.{key}: not recorded")
            else:
                out.extend(_differences(recorded[key], given[key], f"{where}.{key}"))
            if len(out) >= 3:
                break
        return out
    if isinstance(recorded, list) and isinstance(given, list) and len(recorded) == len(given):
        out = []
        for n, (a, b) in enumerate(zip(recorded, given)):
            out.extend(_differences(a, b, f"{where}[{n}]"))
            if len(out) >= 3:
                break
        return out
    return [f"{where}: recorded {_short(recorded)}, got {_short(given)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:59] + "…"


class Replay:
    """A cassette's exchanges, handed out per request in recorded order; thread-safe.

    A POST's recorded matches are used once each, then it gets the 404; a
    GET repeats its last match.

    :param cassette: a :class:`~tgi_adapter.cassette.Cassette`, or the path of one.
    :param speed: recorded times are divided by this; 0 sends everything at once.
    :raises ValueError: a bad speed, or a malformed cassette
        (:class:`~tgi_adapter.cassette.CassetteError`, naming the file and line).
    """

    def __init__(self, cassette: Union[Cassette, str, os.PathLike[str]], speed: float = 1.0) -> None:
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed < float("inf"):
            raise ValueError(f"speed must be a number >= 0 (0: no waits), got {speed!r}")
        self.cassette = cassette if isinstance(cassette, Cassette) else read_cassette(cassette)
        self.speed = float(speed)
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str, JsonKey], list[Exchange]] = {}
        self._served: dict[tuple[str, str, JsonKey], int] = {}
        for exchange in self.cassette.exchanges:
            request = exchange.request
            key = (request.method, request.path, json_key(request.body))
            self._queues.setdefault(key, []).append(exchange)

    def __repr__(self) -> str:
        return f"Replay({self.cassette.source!r}, {len(self.cassette.exchanges)} exchanges, speed={self.speed:g})"

    def answer(self, method: str, target: str, body: bytes) -> Exchange | Miss | None:
        """The exchange that answers this request, a :class:`Miss`, or None (``/info``, ``/health`` not recorded)."""
        path = _route(target)
        key = (method, path, _body_key(body))
        with self._lock:
            queue = self._queues.get(key)
            served = self._served.get(key, 0)
            if queue is not None and (served < len(queue) or method == "GET"):
                self._served[key] = served + 1
                return queue[min(served, len(queue) - 1)]
        if method == "GET" and path in _DEFAULT_ROUTES and not any(k[:2] == ("GET", path) for k in self._queues):
            return None
        return Miss(self._miss_body(method, path, key[2], body, served if queue is not None else 0))

    def _miss_body(self, method: str, path: str, body_key: JsonKey, body: bytes, used: int) -> bytes:
        what = f"{method} {path}"
        if used:
            first = self._queues[(method, path, body_key)][0].line
            why = f"its {used} recorded answer{'s' if used > 1 else ''} (from line {first} on) were all served"
        else:
            why = self._closest(method, path, body_key, body)
        message = f"no recorded exchange matched {what} in {self.cassette.source}: {why}"
        return json.dumps({"error": message, "error_type": "replay"}).encode("utf-8")

    def _closest(self, method: str, path: str, body_key: JsonKey, body: bytes) -> str:
        same_route = [e for e in self.cassette.exchanges if (e.request.method, e.request.path) == (method, path)]
        if same_route:
            if body_key == _NOT_JSON:
                return "the request's body is not JSON"
            given = json.loads(body) if body else None
            best = min(same_route, key=lambda e: len(_differences(e.request.body, given)))
            diffs = "; ".join(_differences(best.request.body, given))
            return f"closest is line {best.line}, whose body differs: {diffs}"
        other = sorted({e.request.method for e in self.cassette.exchanges if e.request.path == path})
        if other:
            return f"{path} was recorded only for {', '.join(other)}"
        routes = Counter(f"{e.request.method} {e.request.path}" for e in self.cassette.exchanges)
        listed = ", ".join(f"{route} ×{n}" for route, n in sorted(routes.items())[:8])
        return f"nothing was recorded for {path}; the cassette holds {listed or 'no exchange'}"
