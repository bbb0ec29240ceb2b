"""A fast loopback imitation of TGI's streaming route, for benchmarks only.

Every response is rendered once, up front, to the exact bytes TGI 3.x sends
(one chunk per SSE frame), so an unpaced stream costs one ``sendall`` and
never shares the client's interpreter lock: run it as its own process.

    python bench/tgi_imitation.py --port 0 --tokens 20000

It prints ``READY <port>`` on stdout once listening. Standard library only.

Routes:

* ``POST /generate_stream`` (and ``POST /`` with ``"stream": true``, which is
  what ``text_generation.Client`` and ``huggingface_hub`` send) answers with
  ``--tokens`` frames, or ``max_new_tokens`` when that is smaller. Token ``i`` is
  ``" tok<i>"``; the last frame carries ``generated_text`` and ``details``.
* ``GET /info``, ``GET /health``.
* ``GET /_bench/stats``: counters as JSON (connections accepted and open,
  streams, disconnects, how late paced frames went out).
* ``GET /_bench/stream?id=<id>``: what became of the stream whose request
  carried ``X-Correlation-Id: <id>`` (``state``: ``active``, ``done``,
  ``gone`` or ``unknown``; ``disconnect_ns``: when the client went away, in
  ``time.monotonic_ns()``, the system-wide ``CLOCK_MONOTONIC`` on Linux).
* ``POST /_bench/reset``: zero the pacing counters.
* ``POST /_bench/open-gate``: send the bodies of every stream held by ``GATE``.

Per request, the prompt (``inputs``) may carry directives: ``STALL`` sends the
headers and then nothing; ``GATE`` sends the headers and holds the body until
``POST /_bench/open-gate`` (to have many connections open at once);
``PACE_MS=<ms>`` spaces the frames out (overriding ``--pace-ms``). Paced,
stalled and held streams are served by one scheduler thread that also
watches their sockets, so a client going away is seen at once and hundreds
of paced streams cost one thread, not hundreds. Pacing needs plain
HTTP; with ``--tls CERT KEY`` only unpaced streams are served.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

VERSION = "3.3.6"
INFO = {
    "model_id": "bench/imitation",
    "model_sha": None,
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 4096,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 1_000_000,
    "max_total_tokens": 2_000_000,
    "validation_workers": 2,
    "max_client_batch_size": 4,
    "router": "text-generation-router",
    "version": VERSION,
    "sha": "0123456789abcdef0123456789abcdef01234567",
    "docker_label": None,
}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
)
_PACE = re.compile(r"PACE_MS=([0-9.]+)")
_KEEP_RECORDS = 20000


def token_text(i: int) -> str:
    return f" tok{i}"


def expected_text(tokens: int) -> str:
    """What a correct client joins from a stream of ``tokens`` frames."""
    return "".join(token_text(i) for i in range(tokens))


def render_stream(tokens: int) -> List[bytes]:
    """The chunks of a /generate_stream body of ``tokens`` frames (last one final)."""
    chunks: List[bytes] = []
    text: List[str] = []
    for i in range(tokens):
        t = token_text(i)
        text.append(t)
        last = i == tokens - 1
        frame = {
            "index": i + 1,
            "token": {"id": 1000 + i, "text": t, "logprob": -0.5, "special": False},
            "generated_text": "".join(text) if last else None,
            "details": {"finish_reason": "length", "generated_tokens": tokens, "seed": None, "input_length": 3}
            if last
            else None,
        }
        data = b"data: " + json.dumps(frame, separators=(",", ":")).encode() + b"\n\n"
        chunks.append(b"%x\r\n%s\r\n" % (len(data), data))
    chunks.append(b"0\r\n\r\n")
    return chunks


def response_size(tokens: int) -> int:
    """Bytes on the wire (status line and headers included) for a stream of ``tokens``."""
    return len(STREAM_HEAD) + sum(map(len, render_stream(tokens)))


def simple_response(status: str, obj: Optional[object] = None) -> bytes:
    body = b"" if obj is None else json.dumps(obj).encode()
    kind = b"content-type: application/json\r\n" if obj is not None else b""
    return b"HTTP/1.1 %s\r\n%scontent-length: %d\r\n\r\n%s" % (status.encode(), kind, len(body), body)


class Job:
    """One paced or stalled stream, owned by the scheduler thread until it ends."""

    __slots__ = ("conn", "sid", "chunks", "pace", "gated", "start", "sent", "pending", "watch", "done", "gone")

    def __init__(self, conn: socket.socket, sid: str, chunks: List[bytes], pace: float, gated: bool = False) -> None:
        self.conn = conn
        self.sid = sid
        self.chunks = chunks
        self.pace = pace  # 0: stalled (or gated)
        self.gated = gated
        self.start = 0.0
        self.sent = 0
        self.pending = b""
        self.watch = True  # the socket is registered for "readable" (client gone)
        self.done = threading.Event()
        self.gone = False


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.streams = 0
        self.disconnects = 0
        self.records: OrderedDict[str, Dict[str, Any]] = OrderedDict()
        self.reset()

    def reset(self) -> None:
        self.frames_paced = 0
        self.sends = 0
        self.late_sum = 0.0
        self.late_max = 0.0
        self.late_over_1ms = 0
        self.late_over_5ms = 0
        self.peak_active = 0

    def record(self, sid: str, **values: Any) -> None:
        if not sid:
            return
        with self.lock:
            rec = self.records.get(sid)
            if rec is None:
                rec = self.records[sid] = {"state": "active", "disconnect_ns": None}
                if len(self.records) > _KEEP_RECORDS:
                    self.records.popitem(last=False)
            rec.update(values)

    def snapshot(self, active: int, gated: int) -> Dict[str, Any]:
        with self.lock:
            return {
                "accepted": self.accepted,
                "open": self.open,
                "streams": self.streams,
                "active_scheduled": active,
                "gated": gated,
                "peak_active_scheduled": self.peak_active,
                "disconnects": self.disconnects,
                "frames_paced": self.frames_paced,
                "writes_paced": self.sends,
                "late_mean_ms": 1000 * self.late_sum / self.sends if self.sends else 0.0,
                "late_max_ms": 1000 * self.late_max,
                "late_over_1ms": self.late_over_1ms,
                "late_over_5ms": self.late_over_5ms,
            }


class Scheduler:
    """One thread: sends the frames of every paced stream on time, watches paced and stalled sockets.

    Frames are kept on a timing wheel of ``TICK_S`` slots (a list of streams
    per slot), so a due frame costs a list walk and one ``send``: this thread
    must keep up with hundreds of streams on a small machine. The schedule is
    absolute (frame ``k`` is due ``(k + 1) * pace`` after the stream began), so
    a late write never delays the ones after it; a stream whose frames are
    overdue gets all of them in one write.
    """

    TICK_S = 0.0005

    def __init__(self, stats: Stats, say: Any) -> None:
        self.stats = stats
        self.say = say
        self.sel = selectors.DefaultSelector()
        self.wheel: Dict[int, List[Job]] = {}
        self.last_tick = int(time.monotonic() / self.TICK_S)
        self.inbox: List[Job] = []
        self.inbox_lock = threading.Lock()
        self.gated: List[Job] = []
        self.gate_requested = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.active = 0
        threading.Thread(target=self.run, name="scheduler", daemon=True).start()

    def submit(self, job: Job) -> bool:
        """Hand ``job`` over and wait for it to end; False if the client went away."""
        with self.inbox_lock:
            self.inbox.append(job)
        self.wake_w.send(b"x")
        job.done.wait()
        return not job.gone

    def open_gate(self) -> None:
        """Release every stream held by ``GATE`` (from any thread)."""
        with self.inbox_lock:
            self.gate_requested = True
        self.wake_w.send(b"x")

    def run(self) -> None:
        tick_s = self.TICK_S
        while True:
            # Sleep to the next slot while streams are paced; else until something happens.
            timeout = None
            if self.wheel:
                timeout = max(0.0, (self.last_tick + 1) * tick_s - time.monotonic())
            for key, _ in self.sel.select(timeout):
                now_ns = time.monotonic_ns()
                job = key.data
                if job is None:
                    self._take_inbox()
                else:
                    self._readable(job, now_ns)
            now = time.monotonic()
            current = int(now / tick_s)
            if current > self.last_tick and self.wheel:
                due: List[Job] = []
                pop = self.wheel.pop
                for slot in range(self.last_tick + 1, current + 1):
                    jobs = pop(slot, None)
                    if jobs:
                        due += jobs
                for job in due:
                    if not job.done.is_set():
                        self._send_due(job, now)
            self.last_tick = current

    def _schedule(self, job: Job, due: float) -> None:
        slot = int(due / self.TICK_S) + 1  # the first slot that begins at or after ``due``
        jobs = self.wheel.get(slot)
        if jobs is None:
            self.wheel[slot] = [job]
        else:
            jobs.append(job)

    def _take_inbox(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self.inbox_lock:
            jobs, self.inbox = self.inbox, []
            gate, self.gate_requested = self.gate_requested, False
        for job in jobs:
            job.conn.setblocking(False)
            self.sel.register(job.conn, selectors.EVENT_READ, job)
            self.active += 1
            self.stats.peak_active = max(self.stats.peak_active, self.active)
            if job.gated:
                self.gated.append(job)
            elif job.pace > 0:
                job.start = time.monotonic()
                self._schedule(job, job.start + job.pace)
        if gate:
            now = time.monotonic()
            for job in self.gated:
                if not job.done.is_set():
                    job.pending = b"".join(job.chunks)
                    job.sent = len(job.chunks)
                    self._schedule(job, now)
            self.gated = []

    def _readable(self, job: Job, now_ns: int) -> None:
        try:
            data = job.conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            # The client sent something (its next request): stop watching; a send will tell.
            self.sel.unregister(job.conn)
            job.watch = False
            return
        self._end(job, gone_ns=now_ns)

    def _send_due(self, job: Job, now: float) -> None:
        chunks = job.chunks
        sent = job.sent
        total = len(chunks)
        upto = sent
        if sent < total:
            # Frames due by now: frame k is due at start + (k + 1) * pace.
            upto = min(total, int((now - job.start) / job.pace + 1e-9))
            if upto <= sent:
                upto = sent + 1  # the slot rounding never sends early by more than a tick
        if upto > sent:
            late = now - (job.start + (sent + 1) * job.pace)
            stats = self.stats  # written by this thread only
            stats.frames_paced += upto - sent
            stats.sends += 1
            stats.late_sum += late
            if late > stats.late_max:
                stats.late_max = late
            if late > 0.001:
                stats.late_over_1ms += 1
                if late > 0.005:
                    stats.late_over_5ms += 1
            data = chunks[sent] if upto == sent + 1 else b"".join(chunks[sent:upto])
            if job.pending:
                data = job.pending + data
            job.sent = sent = upto
        else:
            data = job.pending
        try:
            written = job.conn.send(data) if data else 0
        except BlockingIOError:
            written = 0
        except OSError:
            self._end(job, gone_ns=time.monotonic_ns())
            return
        job.pending = data[written:] if written < len(data) else b""
        if sent < total:
            self._schedule(job, job.start + (sent + 1) * job.pace)
        elif job.pending:
            self._schedule(job, now + 0.001)  # the client reads slowly: try again soon
        else:
            self._end(job, gone_ns=None)

    def _end(self, job: Job, gone_ns: Optional[int]) -> None:
        if job.done.is_set():
            return
        if job.watch:
            self.sel.unregister(job.conn)
        self.active -= 1
        if gone_ns is not None:
            job.gone = True
            with self.stats.lock:
                self.stats.disconnects += 1
            self.stats.record(job.sid, state="gone", disconnect_ns=gone_ns, sent=job.sent)
            self.say(f"DISCONNECT {gone_ns}", verbose=True)
        else:
            job.conn.setblocking(True)
            self.stats.record(job.sid, state="done", sent=job.sent)
        job.done.set()


class Server:
    def __init__(
        self, port: int, tokens: int, pace_s: float, tls: Optional[ssl.SSLContext], verbose: bool
    ) -> None:
        self.tokens = tokens
        self.pace_s = pace_s
        self.tls = tls
        self.verbose = verbose
        self.cache: Dict[int, Tuple[bytes, List[bytes]]] = {}
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.stats = Stats()
        self.scheduler = Scheduler(self.stats, self.say)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(2048)
        self.rendered(tokens)

    def rendered(self, n: int) -> Tuple[bytes, List[bytes]]:
        """``(head + whole body, body chunks)`` for a stream of ``n`` frames."""
        with self.lock:
            if n not in self.cache:
                chunks = render_stream(n)
                self.cache[n] = (STREAM_HEAD + b"".join(chunks), chunks)
            return self.cache[n]

    def say(self, line: str, verbose: bool = False) -> None:
        if verbose and not self.verbose:
            return
        with self.out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def serve(self) -> None:
        self.say(f"READY {self.sock.getsockname()[1]}")
        while True:
            conn, _ = self.sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.stats.lock:
                self.stats.accepted += 1
                self.stats.open += 1
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.converse(conn)
        except (OSError, ValueError):
            pass
        finally:
            with self.stats.lock:
                self.stats.open -= 1
            try:
                conn.close()
            except OSError:
                pass

    def converse(self, conn: socket.socket) -> None:
        """Answer requests on one connection until the client closes it."""
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            length = 0
            sid = ""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"x-correlation-id":
                    sid = value.strip().decode("latin-1")
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            body, buf = buf[:length], buf[length:]
            if not self.answer(conn, method, target.decode("latin-1"), body, sid):
                return

    def answer(self, conn: socket.socket, method: bytes, target: str, body: bytes, sid: str) -> bool:
        """Send one response; False when the connection must end."""
        url = urlsplit(target)
        path = url.path.rstrip("/")
        if method == b"POST" and (path.endswith("/generate_stream") or path == ""):
            request = json.loads(body or b"{}")
            if path.endswith("/generate_stream") or request.get("stream"):
                return self.stream(conn, request, sid)
            conn.sendall(simple_response("404 Not Found", {"error": "only streams are imitated"}))
        elif path.endswith("/info"):
            conn.sendall(simple_response("200 OK", INFO))
        elif path.endswith("/health"):
            conn.sendall(simple_response("200 OK"))
        elif path == "/_bench/stats":
            snapshot = self.stats.snapshot(self.scheduler.active, len(self.scheduler.gated))
            conn.sendall(simple_response("200 OK", snapshot))
        elif path == "/_bench/stream":
            wanted = parse_qs(url.query).get("id", [""])[0]
            with self.stats.lock:
                rec = dict(self.stats.records.get(wanted) or {"state": "unknown", "disconnect_ns": None})
            conn.sendall(simple_response("200 OK", rec))
        elif path == "/_bench/open-gate" and method == b"POST":
            self.scheduler.open_gate()
            conn.sendall(simple_response("200 OK", {}))
        elif path == "/_bench/reset" and method == b"POST":
            with self.stats.lock:
                self.stats.reset()
            conn.sendall(simple_response("200 OK", {}))
        else:
            conn.sendall(simple_response("404 Not Found", {"error": "not imitated"}))
        return True

    def stream(self, conn: socket.socket, request: Dict[str, Any], sid: str) -> bool:
        n = self.tokens
        wanted = (request.get("parameters") or {}).get("max_new_tokens")
        if isinstance(wanted, int) and 0 < wanted < n:
            n = wanted
        prompt = str(request.get("inputs", ""))
        stalled = "STALL" in prompt
        gated = "GATE" in prompt
        match = _PACE.search(prompt)
        pace = float(match.group(1)) / 1000.0 if match else self.pace_s
        with self.stats.lock:
            self.stats.streams += 1
        if (stalled or gated or pace > 0) and self.tls is not None:
            conn.sendall(simple_response("501 Not Implemented", {"error": "pacing and stalls need plain HTTP"}))
            return True
        self.stats.record(sid, state="active", disconnect_ns=None, sent=0)
        whole, chunks = self.rendered(n)
        if not (stalled or gated) and pace <= 0:
            conn.sendall(whole)
            self.stats.record(sid, state="done", sent=n)
            return True
        conn.sendall(STREAM_HEAD)
        if gated:
            return self.scheduler.submit(Job(conn, sid, chunks, 0.0, gated=True))
        # The body's last chunk leaves with the final frame, as TGI sends it.
        frames = [] if stalled else chunks[:-2] + [chunks[-2] + chunks[-1]]
        return self.scheduler.submit(Job(conn, sid, frames, pace))


def watch_parent() -> None:
    """Exit when standard input closes: the benchmark that started us has gone."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=20000, help="frames per stream unless max_new_tokens is less")
    parser.add_argument("--pace-ms", type=float, default=0.0, help="default spacing of frames (0: all at once)")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS with this certificate chain")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    parser.add_argument("--parent-watch", action="store_true", help="exit when standard input closes")
    parser.add_argument("--verbose", action="store_true", help="print DISCONNECT <monotonic ns> lines")
    args = parser.parse_args()
    tls = None
    if args.tls:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls[0], args.tls[1])
    if args.parent_watch:
        threading.Thread(target=watch_parent, daemon=True).start()
    timer = threading.Timer(args.lifetime, lambda: os._exit(0))
    timer.daemon = True
    timer.start()
    Server(args.port, args.tokens, args.pace_ms / 1000.0, tls, args.verbose).serve()


if __name__ == "__main__":
    main()
