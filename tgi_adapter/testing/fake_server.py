"""A real-socket imitation of a Hugging Face TGI server, standard library only.

Each accepted connection gets a daemon thread that serves HTTP/1.1 requests
(keep-alive, chunked streams with one chunk per SSE event, lower-case header
names). What to answer comes from :class:`~tgi_adapter.testing.fake_render.TgiRoutes`;
this module decides when bytes go out: pacing, keep-alive comments, noticing a
client that went away, and the faults that act on the connection itself.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http
import json
import logging
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from .fake_engine import Fault, Limits, Profile, Reply
from .fake_render import Frame, Job, MetricsState, Stream, TgiRoutes, render_metrics, status_reply
from .replay import Miss, Replay, plan

__all__ = ["Disconnect", "FakeTgiServer", "RecordedRequest"]

log = logging.getLogger(__name__)

_MAX_HEAD = 65536
_MAX_BODY = 64 * 1024 * 1024
_KEEPALIVE_FRAME = b":\n\n"
# What a client sends while we stream (a pipelined request) is kept for later, up to this much.
_MAX_PENDING = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request as the fake server received it.

    :ivar path: the request target as sent, query string included.
    :ivar headers: header names lower-cased; repeated headers joined with ``", "``.
    :ivar json: the body parsed as JSON, or None when it is not JSON.
    :ivar t: ``time.monotonic()`` when the request was complete.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    t: float


@dataclasses.dataclass(frozen=True)
class Disconnect:
    """A client that went away before its response was complete.

    :ivar t: ``time.monotonic()`` when the server noticed.
    :ivar tokens_sent: token frames written before that (for a replayed
        exchange: recorded chunks written).
    """

    path: str
    t: float
    tokens_sent: int


class _Gone(Exception):
    """The client closed or reset the connection."""


class _Stopped(Exception):
    """The server is stopping."""


class _Cut(Exception):
    """A fault ended the connection on purpose."""


class _Truncated(Exception):
    """A fault ended the response early but cleanly; the connection stays usable."""


class _Conn:
    """One client connection: the socket, unread bytes, and the byte budget of a cut."""

    def __init__(self, sock: socket.socket, split: int | None) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.split = split
        self.sent = 0
        self.cut: tuple[str, int] | None = None
        self.last_event = time.monotonic()
        self.keep_alive = True
        self.permit = False
        self.tally: tuple[str, float] | None = None

    def send(self, data: bytes) -> None:
        if self.cut is not None and self.sent + len(data) >= self.cut[1]:
            data = data[: self.cut[1] - self.sent]
            self._write(data)
            self.abort(self.cut[0])
            raise _Cut
        self._write(data)

    def _write(self, data: bytes) -> None:
        step = self.split or len(data) or 1
        try:
            for start in range(0, len(data), step):
                self.sock.sendall(data[start : start + step])
        except OSError as exc:  # BrokenPipe, ConnectionReset, or ssl errors of a closed peer
            raise _Gone from exc
        self.sent += len(data)

    def abort(self, how: str) -> None:
        """End the connection now: ``"reset"`` sends RST, anything else a FIN."""
        self.keep_alive = False
        try:
            if how == "reset":
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass

    def poll(self) -> None:
        """Read what the client sent without blocking; raise :class:`_Gone` at EOF."""
        try:
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(65536)
            finally:
                self.sock.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError as exc:
            raise _Gone from exc
        if not data:
            raise _Gone
        if len(self.rbuf) < _MAX_PENDING:
            self.rbuf += data


@dataclasses.dataclass
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool

    @property
    def path(self) -> str:
        target = self.target
        if "://" in target:
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        return target.split("?", 1)[0] or "/"


class FakeTgiServer:
    """A TGI server of a given version, on a real local socket.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with FakeTgiServer(version="2.0.4", pace_s=0.01) as server:
            requests.post(server.url + "/generate_stream", json={"inputs": "Hi"}, stream=True)

    Routes: ``GET /health``, ``/ping``, ``/`` (health), ``/info``, ``/metrics``,
    ``/v1/models``; ``POST /generate``, ``/generate_stream``, ``/`` (compat),
    ``/tokenize``, ``/v1/completions``, ``/v1/chat/completions``, each only from
    the TGI release that introduced it. Not imitated (404): ``/invocations``,
    ``/vertex``, ``/chat_tokenize``, ``/docs``; chat tools are accepted but the
    answer is plain text. Faults are described on :class:`Fault`.

    :param version: TGI version whose wire format, routes and defaults are imitated.
    :param model_id: reported in ``/info`` and OpenAI answers.
    :param pace_s: delay between token frames.
    :param prefill_s: delay before the first token frame.
    :param keepalive_s: silence after which ``:\\n\\n`` is sent on a stream.
    :param ssl_context: a server-side context: serve HTTPS.
    :param faults: faults to :meth:`inject` at once.
    :param api_key: require ``Authorization: Bearer <key>`` on generation routes (TGI ≥ 2.3).
    :param metrics: False makes ``/metrics`` answer 404.
    :param split_writes: send every write in pieces of this many bytes.
    :param eos_after: end generations with the EOS token after this many tokens.
    :param utf8_split: emit multi-byte characters split over byte tokens (text ``""``).
    :param batch_sensitive: make the text of a request depend on how many other
        generation requests are in flight when it arrives, as an engine whose
        numerics change with batch composition does: with ``n`` others in
        flight, the text parts from the idle one at token ``n``, the same way
        for the same request and ``n``.
    :param replay: a cassette file (recorded with ``AdapterConfig(record=...)``) to
        serve: each request gets the recorded answer that matches it (see
        "Record and replay" in the README); ``/info`` and ``/health`` not in it
        are the fake's own.
    :param speed: the recorded pace is divided by this; 0 sends at once.
    :raises ValueError: on an unknown version, inconsistent limits, or a
        malformed cassette (the message names the file and line).
    """

    def __init__(
        self,
        version: str = "3.3.6",
        model_id: str = "fake-org/fake-model",
        *,
        pace_s: float = 0.0,
        prefill_s: float = 0.0,
        keepalive_s: float = 15.0,
        port: int = 0,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        faults: Iterable[Fault] | None = None,
        max_concurrent_requests: int = 128,
        max_total_tokens: int = 4096,
        max_input_tokens: int = 4095,
        max_stop_sequences: int = 4,
        max_best_of: int = 2,
        max_client_batch_size: int = 4,
        api_key: str | None = None,
        sha: str | None = "8e5a2b7f0c1d3e4f5a6b7c8d9e0f1a2b3c4d5e6f",
        docker_label: str | None = "sha-8e5a2b7",
        model_sha: str | None = "0e9e39f249a16976918f6564b8830bc894c89659",
        metrics: bool = True,
        split_writes: int | None = None,
        eos_after: int | None = None,
        utf8_split: bool = False,
        batch_sensitive: bool = False,
        replay: str | os.PathLike[str] | None = None,
        speed: float = 1.0,
    ) -> None:
        self._profile = Profile(version)
        self._replay = Replay(replay, speed) if replay is not None else None
        if api_key is not None and not self._profile.ge(2, 3):
            raise ValueError("api_key needs TGI >= 2.3.0 (--api-key did not exist before)")
        if min(pace_s, prefill_s) < 0 or keepalive_s <= 0:
            raise ValueError("pace_s and prefill_s must be >= 0 and keepalive_s > 0")
        if split_writes is not None and split_writes < 1:
            raise ValueError("split_writes must be >= 1")
        if eos_after is not None and eos_after < 0:
            raise ValueError("eos_after must be >= 0")
        self._limits = Limits(
            max_concurrent_requests=max_concurrent_requests,
            max_total_tokens=max_total_tokens,
            max_input_tokens=max_input_tokens,
            max_stop_sequences=max_stop_sequences,
            max_best_of=max_best_of,
            max_client_batch_size=max_client_batch_size,
        )
        self._routes = TgiRoutes(
            self._profile,
            self._limits,
            model_id=model_id,
            model_sha=model_sha,
            sha=sha,
            docker_label=docker_label,
            api_key=api_key,
            eos_after=eos_after,
            utf8_split=utf8_split,
            prefill_s=prefill_s,
            pace_s=pace_s,
            rng=random.Random(),
            clock=time.time,
            batch_sensitive=batch_sensitive,
        )
        self.version = version
        self.model_id = model_id
        self.pace_s = pace_s
        self.prefill_s = prefill_s
        self.keepalive_s = keepalive_s
        self.batch_sensitive = batch_sensitive
        self._bind = (host, port)
        self._ssl_context = ssl_context
        self._metrics_enabled = metrics
        self._split = split_writes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._faults: list[list[Any]] = []  # [fault, uses left]
        self._requests: list[RecordedRequest] = []
        self._disconnects: list[Disconnect] = []
        self._metrics = MetricsState()
        self._accepted = 0
        self._in_flight = 0
        self._healthy = True
        self._conns: set[_Conn] = set()
        self._raw_socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._acceptor: threading.Thread | None = None
        self.host, self.port = host, port
        for fault in faults or ():
            self.inject(fault)

    # --- public API ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, ``http://host:port`` (``https://`` with an ssl_context)."""
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def healthy(self) -> bool:
        """When False, ``/health`` answers 503 ``{"error":"unhealthy","error_type":"healthcheck"}``."""
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        self._healthy = bool(value)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def disconnects(self) -> list[Disconnect]:
        """A copy of the disconnects noticed so far, in order."""
        with self._lock:
            return list(self._disconnects)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def in_flight(self) -> int:
        """Generation requests holding a concurrency permit right now."""
        with self._lock:
            return self._in_flight

    def inject(self, fault: Fault) -> None:
        """Queue ``fault`` for the next ``fault.times`` matching requests (first in, first out)."""
        if not isinstance(fault, Fault):
            raise TypeError("inject() takes a Fault")
        with self._lock:
            self._faults.append([fault, fault.times])

    def clear_faults(self) -> None:
        """Forget every fault not yet used."""
        with self._lock:
            self._faults.clear()

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        """Block until ``count`` requests were received; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def wait_for_disconnect(self, timeout: float, count: int = 1) -> bool:
        """Block until ``count`` disconnects were noticed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._disconnects) >= count, timeout)

    def start(self) -> FakeTgiServer:
        """Bind and start accepting connections.

        :raises RuntimeError: when already started.
        """
        if self._listener is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(self._bind)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.host, self.port = listener.getsockname()[:2]
        self._wake = socket.socketpair()
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"fake-tgi-accept-{self.port}", daemon=True)
        self._acceptor.start()
        log.debug("fake TGI %s listening on %s", self.version, self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection, stop every thread and wait for them; idempotent.

        :param timeout: how long to wait for each thread.
        """
        if self._listener is None:
            return
        self._stopping.set()
        assert self._wake is not None
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass
        with self._lock:
            # shutdown() wakes a thread blocked in recv/send on that socket; the
            # thread itself closes it, under this lock, so the fd is never reused.
            for sock in [c.sock for c in self._conns] + list(self._raw_socks):
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            self._cond.notify_all()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        self._listener.close()
        for sock in self._wake:
            sock.close()
        self._listener = self._wake = self._acceptor = None
        log.debug("fake TGI on port %s stopped", self.port)

    def __enter__(self) -> FakeTgiServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- connections --------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake is not None
        listener, wake = self._listener, self._wake[0]
        while not self._stopping.is_set():
            readable, _, _ = select.select([listener, wake], [], [])
            if wake in readable or self._stopping.is_set():
                return
            try:
                sock, _ = listener.accept()
            except OSError:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._accepted += 1
                self._raw_socks.add(sock)
                thread = threading.Thread(target=self._serve_connection, args=(sock,), daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve_connection(self, raw: socket.socket) -> None:
        sock: socket.socket = raw
        conn: _Conn | None = None
        try:
            if self._ssl_context is not None:
                # The handshake runs here, not in the accept loop, so a silent
                # client cannot hold up other connections.
                sock = self._ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                if not self._register(raw, sock):
                    return
                sock.settimeout(10.0)
                sock.do_handshake()
                sock.settimeout(None)
            conn = _Conn(sock, self._split)
            if not self._register(sock, conn):
                return
            while conn.keep_alive and not self._stopping.is_set():
                request = self._read_request(conn)
                if request is None:
                    break
                self._handle(conn, request)
        except (_Gone, _Stopped, _Cut, OSError, ValueError) as exc:  # the connection is over either way
            log.debug("connection ended: %r", exc)
        finally:
            with self._lock:
                self._raw_socks.discard(raw)
                self._raw_socks.discard(sock)
                if conn is not None:
                    self._conns.discard(conn)
                sock.close()
                raw.close()

    def _register(self, old: socket.socket, new: socket.socket | _Conn) -> bool:
        """Swap what stop() must shut down, atomically with checking that it has not begun."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._raw_socks.discard(old)
            if isinstance(new, _Conn):
                self._conns.add(new)
            else:
                self._raw_socks.add(new)
            return True

    def _recv(self, conn: _Conn) -> bool:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            return False
        conn.rbuf += data
        return bool(data)

    def _read_request(self, conn: _Conn) -> _Request | None:
        while b"\r\n\r\n" not in conn.rbuf:
            if len(conn.rbuf) > _MAX_HEAD:
                self._send_simple(conn, 431)
                return None
            if not self._recv(conn):
                return None
        head, _, rest = bytes(conn.rbuf).partition(b"\r\n\r\n")
        conn.rbuf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._send_simple(conn, 400)
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._send_simple(conn, 400)
                return None
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        keep_alive = "close" not in tokens if parts[2] == "HTTP/1.1" else "keep-alive" in tokens
        if headers.get("expect", "").lower() == "100-continue":
            conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._read_body(conn, headers)
        if body is None:
            return None
        return _Request(parts[0], parts[1], headers, body, keep_alive)

    def _read_body(self, conn: _Conn, headers: Mapping[str, str]) -> bytes | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                while b"\r\n" not in conn.rbuf:
                    if not self._recv(conn):
                        return None
                size_line, _, rest = bytes(conn.rbuf).partition(b"\r\n")
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    self._send_simple(conn, 400)
                    return None
                conn.rbuf = bytearray(rest)
                while len(conn.rbuf) < size + 2:
                    if not self._recv(conn):
                        return None
                if size == 0:
                    # Skip trailers up to the blank line that ends the body.
                    while not conn.rbuf.startswith(b"\r\n") and b"\r\n\r\n" not in conn.rbuf:
                        if not self._recv(conn):
                            return None
                    end = 2 if conn.rbuf.startswith(b"\r\n") else conn.rbuf.index(b"\r\n\r\n") + 4
                    del conn.rbuf[:end]
                    return bytes(body)
                body += conn.rbuf[:size]
                del conn.rbuf[: size + 2]
                if len(body) > _MAX_BODY:
                    self._send_simple(conn, 413)
                    return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._send_simple(conn, 400 if length < 0 else 413)
            return None
        while len(conn.rbuf) < length:
            if not self._recv(conn):
                return None
        data = bytes(conn.rbuf[:length])
        del conn.rbuf[:length]
        return data

    def _send_simple(self, conn: _Conn, status: int) -> None:
        conn.keep_alive = False
        try:
            conn.send(self._head(status, (), 0, keep_alive=False))
        except (_Gone, _Cut):
            pass

    # --- one request --------------------------------------------------------------

    def _handle(self, conn: _Conn, request: _Request) -> None:
        try:
            parsed = json.loads(request.body) if request.body else None
        except ValueError:
            parsed = None
        record = RecordedRequest(request.method, request.target, dict(request.headers), request.body, parsed, 0.0)
        with self._cond:
            self._requests.append(dataclasses.replace(record, t=time.monotonic()))
            self._cond.notify_all()
        conn.keep_alive = request.keep_alive
        path = request.path
        if self._replay is not None and self._serve_replayed(conn, request):
            return
        fault = self._take_fault(path)
        log.debug("%s %s (fault %s)", request.method, request.target, fault and fault.kind)
        conn.sent, conn.cut = 0, None
        if fault is not None and fault.at_byte is not None:
            conn.cut = (fault.kind, fault.at_byte)
        if fault is not None and fault.kind == "disconnect_before_headers":
            conn.abort("close")
            return
        if fault is not None and fault.kind == "slow_headers":
            self._pause_or_record(conn, path, fault.delay_s)
        extra = self._cors(request.headers)
        if fault is not None and fault.kind == "status":
            self._serve(conn, path, status_reply(self._profile, fault), fault, extra)
            return
        if request.method == "GET" and path == "/metrics" and self._profile.has_route(path):
            self._serve(conn, path, self._metrics_reply(), fault, extra)
            return
        answer = self._routes.accept(request.method, path, request.headers, request.body, self._healthy)
        if not isinstance(answer, Job):
            self._serve(conn, path, answer, fault, extra)
            return
        with self._lock:
            others = self._in_flight
            overloaded = others >= self._limits.max_concurrent_requests
            if not overloaded:
                self._in_flight += 1
                self._metrics.queued = True
                self._metrics.batch_size = self._in_flight
        conn.permit = not overloaded
        try:
            answer = self._routes.run(answer, overloaded=overloaded, fault=fault, in_flight=others)
        except BaseException:
            self._complete(conn, 0)
            raise
        self._serve(conn, path, answer, fault, extra)

    def _serve_replayed(self, conn: _Conn, request: _Request) -> bool:
        """Answer from the cassette; False when the fake's own answer is wanted."""
        assert self._replay is not None
        found = self._replay.answer(request.method, request.target, request.body)
        if found is None:
            return False
        conn.sent, conn.cut = 0, None
        if isinstance(found, Miss):
            self._serve(conn, request.path, Reply(404, (("content-type", "application/json"),), found.body), None, ())
            return True
        steps, t0, sent = plan(found, self._replay.speed), time.monotonic(), 0
        try:
            if steps.status:
                self._pause(conn, t0 + steps.headers_at - time.monotonic(), keepalive=False)
                conn.send(self._head(steps.status, steps.headers, steps.length, conn.keep_alive))
            for at, data in steps.chunks if steps.status else ():
                self._pause(conn, t0 + at - time.monotonic(), keepalive=False)
                conn.send(data if steps.length is not None else b"%X\r\n%s\r\n" % (len(data), data))
                sent += 1
            self._pause(conn, t0 + steps.end_at - time.monotonic(), keepalive=False)
            if steps.end == "complete":
                if steps.length is None:
                    conn.send(b"0\r\n\r\n")
            elif steps.end in ("reset", "eof"):
                conn.abort("reset" if steps.end == "reset" else "close")
                raise _Cut
            else:  # "timeout" or "cancelled": nothing more was recorded, so nothing more comes
                self._hold(conn, None)
        except _Gone:
            self._record_disconnect(request.path, sent)
            raise
        return True

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for entry in self._faults:
                fault: Fault = entry[0]
                if fault.matches(path):
                    entry[1] -= 1
                    if entry[1] == 0:
                        self._faults.remove(entry)
                    return fault
        return None

    def _cors(self, headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        if "origin" not in headers:
            return ()
        vary = "origin, access-control-request-method, access-control-request-headers"
        return (("access-control-allow-origin", "*"), ("vary", vary))

    def _metrics_reply(self) -> Reply:
        if not self._metrics_enabled:
            return Reply(404)
        with self._lock:
            text = render_metrics(self._profile, self._limits, self._metrics)
        return Reply(200, (("content-type", "text/plain; charset=utf-8"),), text.encode("utf-8"))

    def _head(self, status: int, headers: Iterable[tuple[str, str]], length: int | None, keep_alive: bool) -> bytes:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
        lines.append("transfer-encoding: chunked" if length is None else f"content-length: {length}")
        if not keep_alive:
            lines.append("connection: close")
        lines.append(f"date: {email.utils.formatdate(usegmt=True)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _complete(self, conn: _Conn, tokens: int, outcome: str | None = None) -> None:
        """Give the permit back and count the outcome, once per request.

        Called just before the last byte of an answer (TGI, too, counts success
        before the final frame is flushed), so a client holding its whole answer
        never sees it in ``in_flight``; and before a Disconnect is published.
        """
        with self._lock:
            if conn.permit:
                conn.permit = False
                self._in_flight -= 1
                self._metrics.batch_size = self._in_flight
            tally, conn.tally = conn.tally, None
            if tally is None:
                return
            outcome = outcome or tally[0]
            if outcome == "success":
                self._metrics.success += 1
                self._metrics.durations.append(time.monotonic() - tally[1])
                self._metrics.generated.append(tokens)
            else:
                self._metrics.failures[outcome] = self._metrics.failures.get(outcome, 0) + 1

    def _serve(
        self,
        conn: _Conn,
        path: str,
        answer: Reply | Stream,
        fault: Fault | None,
        extra: tuple[tuple[str, str], ...],
    ) -> None:
        # Axum rejections and static routes never reach TGI's counters.
        if isinstance(answer, Stream) or answer.outcome:
            conn.tally = (answer.outcome or "success", time.monotonic())
            with self._lock:
                self._metrics.requests += answer.counted
        tokens = [0]
        final: str | None = None
        gone = False
        try:
            if isinstance(answer, Stream):
                self._serve_stream(conn, path, answer, fault, extra, tokens)
            else:
                self._serve_reply(conn, path, answer, fault, extra)
        except _Truncated:
            final = "incomplete"
        except _Gone:
            final = "dropped"
            if self._stopping.is_set():
                raise _Stopped from None
            gone = True
            raise
        except (_Cut, _Stopped):
            final = "incomplete" if fault is not None and fault.kind == "truncate" else "dropped"
            raise
        finally:
            self._complete(conn, tokens[0], final)
            if gone:
                self._record_disconnect(path, tokens[0])

    def _record_disconnect(self, path: str, tokens_sent: int) -> None:
        with self._cond:
            self._disconnects.append(Disconnect(path, time.monotonic(), tokens_sent))
            self._cond.notify_all()
        log.debug("client went away from %s after %d token frames", path, tokens_sent)

    def _pause_or_record(self, conn: _Conn, path: str, seconds: float) -> None:
        try:
            self._pause(conn, seconds, keepalive=False)
        except _Gone:
            self._record_disconnect(path, 0)
            raise

    def _serve_reply(
        self, conn: _Conn, path: str, reply: Reply, fault: Fault | None, extra: tuple[tuple[str, str], ...]
    ) -> None:
        if reply.tokens:
            self._pause(conn, self.prefill_s + self.pace_s * max(0, reply.tokens - 1), keepalive=False)
        kind = fault.kind if fault is not None else ""
        if kind in ("stall", "keepalive_only"):
            # A JSON answer has nothing to keep alive: the client just waits.
            self._hold(conn, None)
        if kind in ("reset", "truncate") and fault is not None and fault.at_byte is None:
            if kind == "truncate":
                conn.send(self._head(reply.status, (*reply.headers, *extra), len(reply.body), conn.keep_alive))
            conn.abort(kind)
            raise _Cut
        head = self._head(reply.status, (*reply.headers, *extra), len(reply.body), conn.keep_alive)
        self._complete(conn, reply.tokens)
        conn.send(head + reply.body)

    def _serve_stream(
        self,
        conn: _Conn,
        path: str,
        stream: Stream,
        fault: Fault | None,
        extra: tuple[tuple[str, str], ...],
        sent: list[int],
    ) -> None:
        conn.send(self._head(200, (*stream.headers, *extra), None, conn.keep_alive))
        conn.last_event = time.monotonic()
        acting = fault if fault is not None and fault.at_byte is None else None
        if acting is not None and acting.kind not in ("stall", "keepalive_only", "reset", "truncate"):
            acting = None
        first = True
        for frame in stream.frames:
            if frame.token and acting is not None and sent[0] == acting.at_token:
                self._act(conn, acting)
                return
            if frame.token:
                self._pause(conn, self.prefill_s if first else self.pace_s, keepalive=True)
                first = False
            else:
                self._pause(conn, 0.0, keepalive=True)
            self._send_frame(conn, frame)
            sent[0] += frame.token
        self._complete(conn, sent[0])
        conn.send(b"0\r\n\r\n")

    def _send_frame(self, conn: _Conn, frame: Frame) -> None:
        conn.send(b"%X\r\n%s\r\n" % (len(frame.data), frame.data))
        conn.last_event = time.monotonic()

    def _act(self, conn: _Conn, fault: Fault) -> None:
        if fault.kind == "truncate":
            conn.send(b"0\r\n\r\n")
            raise _Truncated
        if fault.kind == "reset":
            conn.abort("reset")
            raise _Cut
        self._hold(conn, (fault.delay_s or self.keepalive_s) if fault.kind == "keepalive_only" else None)

    def _hold(self, conn: _Conn, keepalive_every: float | None) -> None:
        """Send nothing (or only keep-alive comments) until the client leaves or the server stops."""
        while True:
            self._pause(conn, keepalive_every if keepalive_every is not None else 3600.0, keepalive=False)
            if keepalive_every is not None:
                self._send_frame(conn, Frame(_KEEPALIVE_FRAME))

    def _pause(self, conn: _Conn, seconds: float, *, keepalive: bool) -> None:
        """Wait, watching the client socket for EOF and writing SSE keep-alives when due.

        :raises _Gone: the client went away.
        :raises _Stopped: the server is stopping.
        """
        assert self._wake is not None
        deadline = time.monotonic() + seconds
        while True:
            if self._stopping.is_set():
                raise _Stopped
            now = time.monotonic()
            if keepalive and now - conn.last_event >= self.keepalive_s:
                self._send_frame(conn, Frame(_KEEPALIVE_FRAME))
                now = conn.last_event
            timeout = max(0.0, deadline - now)
            if keepalive:
                timeout = min(timeout, conn.last_event + self.keepalive_s - now)
            pending = isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() > 0
            readable, _, _ = select.select([conn.sock, self._wake[0]], [], [], 0.0 if pending else timeout)
            if pending or conn.sock in readable:
                conn.poll()
            if self._wake[0] in readable:
                raise _Stopped
            if time.monotonic() >= deadline:
                return
