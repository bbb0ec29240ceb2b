"""Cassettes: an adapter's engine exchanges as JSON Lines, for replaying an incident forever.

The format (one UTF-8 JSON object per line):

* a header line starts every recording session:
  ``{"cassette": 1, "tgi_adapter": version, "recorded_at": ISO-8601, "base_url": URL}``;
* every other line is one exchange:
  ``{"request": {"method", "path", "headers", "body"}, "response": {"status", "headers",
  "headers_ms", "chunks": [{"t_ms", "b64"}, …], "end", "end_ms"}}``.

``path`` is the route without the base URL's prefix; ``body`` the request's
JSON (null when none). ``chunks`` are the decoded body bytes (no transfer
framing) as each read returned them, ``t_ms`` counted from the moment the
request was sent, like ``headers_ms`` (when the headers arrived) and
``end_ms`` (when the end was seen). ``end`` says how the body ended (see
:data:`END_KINDS`). A ``status`` of 0 means no response headers arrived.

The writer is :class:`Recorder`; the call sites see only a :class:`Tape` per
exchange (``headers``, ``chunk``, ``end``), which costs one list append per
read and writes its line once, whole, when the exchange ends. The reader is
:func:`read_cassette`: it validates every line and returns immutable values.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import json
import logging
import math
import os
import threading
import time
import types
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from .__about__ import __version__
from .redact import SENSITIVE_HEADERS, short_hash

__all__ = [
    "CASSETTE_VERSION",
    "END_KINDS",
    "FRAMING_HEADERS",
    "NEVER_WRITTEN",
    "Cassette",
    "CassetteError",
    "Chunk",
    "Exchange",
    "ExchangeRequest",
    "ExchangeResponse",
    "Recorder",
    "Session",
    "Tape",
    "json_key",
    "parse_cassette",
    "read_cassette",
]

log = logging.getLogger(__name__)

#: The format version this module writes and reads.
CASSETTE_VERSION = 1

#: How a response body can end:
#: ``complete`` (the body ended as its framing said, the stream's final frame included),
#: ``eof`` (the connection closed before the final frame or the body's end),
#: ``reset`` (the connection was reset),
#: ``cancelled`` (the adapter stopped reading: a cancel, or nothing more it wanted),
#: ``timeout`` (a timer of the adapter's ran out while the engine was silent).
END_KINDS = ("complete", "eof", "reset", "cancelled", "timeout")

#: Header names never written to a cassette, in a request or a response.
NEVER_WRITTEN = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization", "set-cookie"}) | (
    SENSITIVE_HEADERS
)

#: Response headers a replay does not send as recorded: the body is framed anew.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "date"})

# Secrets shorter than this are not searched for (every "a" of a body would go), as in redact_text.
_MIN_SECRET = 4

JsonKey = Tuple[Any, ...]


class CassetteError(ValueError):
    """A cassette that cannot be used; the message names the file and the line."""


# -- values ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Session:
    """A header line: one recording session (one adapter) begins here."""

    line: int
    tgi_adapter: str
    recorded_at: str
    base_url: str


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Body bytes as one read returned them, ``t_ms`` after the request was sent."""

    t_ms: float
    data: bytes


@dataclasses.dataclass(frozen=True)
class ExchangeRequest:
    """What the adapter sent. ``body_json`` is the body as compact JSON text (None: no body)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body_json: Optional[str]

    @property
    def body(self) -> Any:
        """The request body as a fresh JSON value (None when there was none)."""
        return None if self.body_json is None else json.loads(self.body_json)


@dataclasses.dataclass(frozen=True)
class ExchangeResponse:
    """What the engine answered, with its timing. ``status`` 0: no headers arrived."""

    status: int
    headers: Tuple[Tuple[str, str], ...]
    headers_ms: Optional[float]
    chunks: Tuple[Chunk, ...]
    end: str
    end_ms: Optional[float]

    @property
    def body(self) -> bytes:
        """Every chunk's bytes, joined."""
        return b"".join(chunk.data for chunk in self.chunks)

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), None)


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One line of a cassette: a request, its response, where it was read from."""

    line: int
    session: int
    request: ExchangeRequest
    response: ExchangeResponse


@dataclasses.dataclass(frozen=True)
class Cassette:
    """A parsed cassette: its sessions and every exchange in recorded order."""

    source: str
    sessions: Tuple[Session, ...]
    exchanges: Tuple[Exchange, ...]


def json_key(value: Any) -> JsonKey:
    """A hashable key equal for JSON-equal values (``1 == 1.0``, object key order ignored, ``true != 1``)."""
    if value is None:
        return ("null",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list):
        return ("list", tuple(json_key(item) for item in value))
    if isinstance(value, dict):
        return ("obj", frozenset((key, json_key(item)) for key, item in value.items()))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


# -- writing ----------------------------------------------------------------------------

_file_locks: Dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.Lock:
    """One lock per file for the whole process, so two adapters recording to one file never interleave."""
    key = os.path.realpath(path)
    with _file_locks_guard:
        lock = _file_locks.get(key)
        if lock is None:
            lock = _file_locks[key] = threading.Lock()
        return lock


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _dumps(record: Mapping[str, Any]) -> bytes:
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate in a body: escaped JSON is still exact
        return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


class Recorder:
    """Appends exchanges to a cassette file; one per adapter (one recording session).

    Building it writes the session's header line, so a path that cannot be
    written fails here, not in a stream. Each exchange's line is written
    once, whole, under a lock shared by every recorder of that file in the
    process (the file is opened for appending, written, and closed, so no
    descriptor outlives a write). A failed write is logged, never raised.

    :param path: the cassette file (created if missing, appended to if not).
    :param base_url: the engine's URL; written without credentials, and its
        path is taken off the requests' paths.
    :param secrets: the token and other credential values; wherever one
        appears (a header value, a path, a body) it is replaced by its fingerprint.
    :raises ValueError: the file cannot be opened for appending.
    """

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        *,
        base_url: str,
        secrets: Iterable[Optional[str]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.fspath(path)
        self._base_path = urlsplit(base_url).path.rstrip("/")
        self._clock = clock
        self._lock = _lock_for(self.path)
        replacements: List[Tuple[str, str]] = []
        for secret in secrets:
            if secret and len(secret) >= _MIN_SECRET:
                mark = f"[{short_hash(secret)}]"
                replacements.append((secret, mark))
                # The token's base64 (as in an echoed Basic credential) goes too.
                replacements.append((base64.b64encode(secret.encode("utf-8")).decode("ascii").rstrip("="), mark))
        self._text_secrets = tuple(replacements)
        self._byte_secrets = tuple((s.encode("utf-8"), m.encode("utf-8")) for s, m in replacements)
        header = {
            "cassette": CASSETTE_VERSION,
            "tgi_adapter": __version__,
            "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "base_url": self.redact(_without_credentials(base_url)),
        }
        try:
            self._append(_dumps(header))
        except OSError as exc:
            raise ValueError(f"cannot record to {self.path!r}: {exc.strerror or exc}") from None

    def __repr__(self) -> str:
        return f"Recorder({self.path!r})"

    def begin(self, method: str, url: str, headers: Mapping[str, str], body: Optional[bytes]) -> Tape:
        """Start an exchange now (call it just before the request is sent).

        ``url`` is the request's URL or route path; ``body`` its bytes.
        """
        return Tape(self, self._clock, method, url, headers, body)

    # -- used by Tape --

    def redact(self, text: str) -> str:
        """``text`` with every known secret replaced by its fingerprint."""
        for secret, mark in self._text_secrets:
            if secret in text:
                text = text.replace(secret, mark)
        return text

    def redact_chunks(self, chunks: List[Tuple[float, bytes]]) -> List[Tuple[float, bytes]]:
        """Chunks with the secrets replaced, also where one spans two reads (those merge)."""
        if not self._byte_secrets or not chunks:
            return chunks
        whole = b"".join(data for _, data in chunks)
        if not any(secret in whole for secret, _ in self._byte_secrets):
            return chunks
        ends: List[int] = []
        pos = 0
        for _, data in chunks:
            pos += len(data)
            ends.append(pos)
        # Chunks an occurrence spans are merged into the last of them (the bytes were whole only then).
        merge_into = list(range(len(chunks)))
        for secret, _ in self._byte_secrets:
            start = whole.find(secret)
            while start >= 0:
                stop = start + len(secret)
                first = next(i for i, end in enumerate(ends) if end > start)
                last = next(i for i, end in enumerate(ends) if end >= stop)
                for i in range(first, last):
                    merge_into[i] = last
                start = whole.find(secret, stop)
        merged: List[Tuple[float, bytes]] = []
        pending = b""
        for i, (t, data) in enumerate(chunks):
            pending += data
            if merge_into[i] == i:
                for secret, mark in self._byte_secrets:
                    pending = pending.replace(secret, mark)
                merged.append((t, pending))
                pending = b""
        return merged

    def route(self, url: str) -> str:
        """The route path of ``url`` (a full URL or a path), without the base URL's prefix."""
        parts = urlsplit(url)
        path = parts.path or "/"
        if self._base_path and (path == self._base_path or path.startswith(self._base_path + "/")):
            path = path[len(self._base_path) :] or "/"
        return self.redact(path + ("?" + parts.query if parts.query else ""))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one exchange line; a failure is logged, never raised."""
        line = _dumps(record)
        try:
            self._append(line)
        except OSError as exc:
            log.warning("could not append an exchange to the cassette %s: %s", self.path, exc.strerror or exc)

    def _append(self, line: bytes) -> None:
        with self._lock:
            with open(self.path, "ab", buffering=0) as f:
                view = memoryview(line)
                while view:
                    written = f.write(view)
                    view = view[written or 0 :]


def _redact_json(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_json(item, redact) for item in value]
    if isinstance(value, dict):
        return {redact(key): _redact_json(item, redact) for key, item in value.items()}
    return value


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Tape:
    """One exchange being recorded. Not thread-safe: one reader owns it.

    ``headers()`` when the status line and headers arrived, ``chunk()`` once
    per read with the decoded body bytes, ``end()`` once (later calls are
    ignored) with one of :data:`END_KINDS`; the line is written then. A tape
    never ended writes nothing (a request that never reached the engine).
    """

    __slots__ = ("_recorder", "_clock", "_t0", "_request", "_status", "_headers", "_headers_at", "_chunks", "_ended")

    def __init__(
        self,
        recorder: Recorder,
        clock: Callable[[], float],
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Optional[bytes],
    ) -> None:
        self._recorder = recorder
        self._clock = clock
        self._request = (method, url, headers, body)
        self._status = 0
        self._headers: List[Tuple[str, str]] = []
        self._headers_at: Optional[float] = None
        self._chunks: List[Tuple[float, bytes]] = []
        self._ended = False
        self._t0 = clock()

    def headers(self, status: int, headers: Any) -> None:
        """The response's status and headers (a mapping, or pairs; repeated names kept)."""
        self._headers_at = self._clock()
        self._status = int(status)
        items = headers.items() if hasattr(headers, "items") else headers
        self._headers = [(str(name), str(value)) for name, value in items]

    def chunk(self, data: bytes) -> None:
        """Body bytes as one read returned them."""
        self._chunks.append((self._clock(), data))

    def end(self, how: str) -> None:
        """The exchange is over; write its line (the first call only)."""
        if self._ended:
            return
        if how not in END_KINDS:
            raise ValueError(f"end must be one of {', '.join(END_KINDS)}, got {how!r}")
        self._ended = True
        t_end = self._clock()
        recorder = self._recorder
        redact = recorder.redact
        t0 = self._t0
        method, url, headers, body = self._request
        try:
            body_value = None if not body else json.loads(body)
        except (ValueError, RecursionError):
            log.debug("a request body that is not JSON is recorded as null")
            body_value = None
        chunks = recorder.redact_chunks([(t, data) for t, data in self._chunks if data])
        record = {
            "request": {
                "method": method.upper(),
                "path": recorder.route(url),
                "headers": {
                    name.lower(): redact(str(value))
                    for name, value in headers.items()
                    if name.lower() not in NEVER_WRITTEN
                },
                "body": _redact_json(body_value, redact),
            },
            "response": {
                "status": self._status,
                "headers": [
                    [name, redact(value)] for name, value in self._headers if name.lower() not in NEVER_WRITTEN
                ],
                "headers_ms": None if self._headers_at is None else _ms(self._headers_at - t0),
                "chunks": [
                    {"t_ms": _ms(t - t0), "b64": base64.b64encode(data).decode("ascii")} for t, data in chunks
                ],
                "end": how,
                "end_ms": _ms(t_end - t0),
            },
        }
        recorder.write(record)


# -- reading ------------------------------------------------------------------------------


class _Line:
    """Field access for one line, with errors that name the file, the line and the field."""

    def __init__(self, source: str, number: int) -> None:
        self.source = source
        self.number = number

    def error(self, message: str) -> CassetteError:
        return CassetteError(f"{self.source}, line {self.number}: {message}")

    def obj(self, parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        value = self.field(parent, key, where)
        if not isinstance(value, dict):
            raise self.error(f"{where}{key} must be an object")
        return value

    def field(self, parent: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in parent:
            raise self.error(f"missing field {where}{key}")
        return parent[key]

    def string(self, parent: Mapping[str, Any], key: str, where: str) -> str:
        value = self.field(parent, key, where)
        if not isinstance(value, str):
            raise self.error(f"{where}{key} must be a string, got {json.dumps(value)[:40]}")
        return value

    def ms(self, value: Any, what: str, *, nullable: bool = False) -> Optional[float]:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise self.error(f"{what} must be a number of milliseconds >= 0, got {json.dumps(value)[:40]}")
        return float(value)


def _session(line: _Line, data: Mapping[str, Any]) -> Session:
    version = data["cassette"]
    if version != CASSETTE_VERSION or isinstance(version, bool):
        raise line.error(
            f"unknown cassette version {json.dumps(version)[:20]} (this tgi_adapter {__version__} "
            f"reads version {CASSETTE_VERSION})"
        )
    return Session(
        line=line.number,
        tgi_adapter=line.string(data, "tgi_adapter", ""),
        recorded_at=line.string(data, "recorded_at", ""),
        base_url=line.string(data, "base_url", ""),
    )


def _exchange(line: _Line, data: Mapping[str, Any], session: int) -> Exchange:
    req = line.obj(data, "request", "")
    method = line.string(req, "method", "request.")
    if not method or not method.isalpha():
        raise line.error(f"request.method must be an HTTP method, got {method!r}")
    path = line.string(req, "path", "request.")
    if not path.startswith("/"):
        raise line.error(f"request.path must start with '/', got {path[:40]!r}")
    headers = line.obj(req, "headers", "request.")
    if not all(isinstance(value, str) for value in headers.values()):
        raise line.error("request.headers must map names to string values")
    body = line.field(req, "body", "request.")
    request = ExchangeRequest(
        method=method.upper(),
        path=path,
        headers=types.MappingProxyType({name.lower(): value for name, value in headers.items()}),
        body_json=None if body is None else json.dumps(body, separators=(",", ":")),
    )
    res = line.obj(data, "response", "")
    status = line.field(res, "status", "response.")
    if isinstance(status, bool) or not isinstance(status, int) or not (status == 0 or 100 <= status <= 599):
        raise line.error(f"response.status must be an HTTP status (or 0: no headers), got {json.dumps(status)[:20]}")
    pairs = line.field(res, "headers", "response.")
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in pairs
    ):
        raise line.error("response.headers must be a list of [name, value] string pairs")
    headers_ms = line.ms(line.field(res, "headers_ms", "response."), "response.headers_ms", nullable=status == 0)
    raw_chunks = line.field(res, "chunks", "response.")
    if not isinstance(raw_chunks, list):
        raise line.error("response.chunks must be a list")
    chunks: List[Chunk] = []
    for n, raw in enumerate(raw_chunks):
        where = f"response.chunks[{n}]."
        if not isinstance(raw, dict):
            raise line.error(f"response.chunks[{n}] must be an object with t_ms and b64")
        t_ms = line.ms(line.field(raw, "t_ms", where), where + "t_ms")
        assert t_ms is not None
        if chunks and t_ms < chunks[-1].t_ms:
            raise line.error(f"{where}t_ms goes back in time ({t_ms:g} after {chunks[-1].t_ms:g})")
        text = line.string(raw, "b64", where)
        try:
            chunk = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise line.error(f"{where}b64 is not base64: {text[:40]!r}") from None
        chunks.append(Chunk(t_ms, chunk))
    end = line.field(res, "end", "response.")
    if end not in END_KINDS:
        raise line.error(f"response.end must be one of {', '.join(END_KINDS)}, got {json.dumps(end)[:40]}")
    if status == 0 and (pairs or chunks or end == "complete"):
        raise line.error("a response with status 0 (no headers arrived) has no headers, no chunks and no complete end")
    end_ms = line.ms(res.get("end_ms"), "response.end_ms", nullable=True)
    response = ExchangeResponse(
        status=status,
        headers=tuple((name, value) for name, value in pairs),
        headers_ms=headers_ms,
        chunks=tuple(chunks),
        end=end,
        end_ms=end_ms,
    )
    return Exchange(line=line.number, session=session, request=request, response=response)


def parse_cassette(lines: Iterable[Union[str, bytes]], source: str = "<cassette>") -> Cassette:
    """Parse and check every line; raises :class:`CassetteError` naming ``source`` and the line."""
    sessions: List[Session] = []
    exchanges: List[Exchange] = []
    for number, raw in enumerate(lines, 1):
        line = _Line(source, number)
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise line.error("not UTF-8") from None
        if not raw.strip():
            continue  # blank lines carry nothing
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise line.error(f"not a JSON line ({exc})") from None
        if not isinstance(data, dict):
            raise line.error("a line must be a JSON object")
        if "cassette" in data:
            sessions.append(_session(line, data))
        elif not sessions:
            raise line.error('a cassette starts with a header line {"cassette": 1, …}')
        elif "request" in data or "response" in data:
            exchanges.append(_exchange(line, data, len(sessions) - 1))
        else:
            raise line.error("neither a header line (cassette) nor an exchange (request, response)")
    if not sessions:
        raise CassetteError(f"{source}: empty; a cassette starts with a header line")
    return Cassette(source=source, sessions=tuple(sessions), exchanges=tuple(exchanges))


def read_cassette(path: Union[str, os.PathLike[str]]) -> Cassette:
    """Read and check the cassette at ``path``; raises :class:`CassetteError` naming the file and line."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return parse_cassette(f.read().split(b"\n"), name)
    except OSError as exc:
        raise CassetteError(f"{name}: cannot read the cassette: {exc.strerror or exc}") from None

