"""Many paced streams at once, each read by its own thread: tgi_adapter (one adapter), the minimal parse
(one ``requests.Session``), and a raw reader that shows what the imitation and the machine can deliver."""

from __future__ import annotations

import gc
import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import requests
import requests.adapters
from clients import PROMPT, make_task, stream_body
from procstat import cpu_times, fds_now, hwm_kib, rss_kib, settle, threads_now
from report import Section, fmt, median
from server_proc import ImitationServer
from tgi_imitation import expected_text

from tgi_adapter import AdapterConfig, TgiHttpAdapter

MIN_EFFICIENCY = 0.95
SETTLE_S = 10.0

# A client for this benchmark: run_stream(tokens, prompt) -> joined text, callable from any thread.
StreamRunner = Callable[[int, str], str]


class _Sampler(threading.Thread):
    """Peak threads, fds and RSS while a run is in progress."""

    def __init__(self, every_s: float = 0.02) -> None:
        super().__init__(daemon=True, name="sampler")
        self.every_s = every_s
        self.stop_event = threading.Event()
        self.peak = {"threads": 0, "fds": 0, "rss": 0}

    def run(self) -> None:
        while not self.stop_event.is_set():
            for key, probe in (("threads", threads_now), ("fds", fds_now), ("rss", rss_kib)):
                self.peak[key] = max(self.peak[key], probe())
            self.stop_event.wait(self.every_s)

    def stop(self) -> Dict[str, int]:
        self.stop_event.set()
        self.join()
        return self.peak


@dataclass
class Run:
    client: str
    streams: int
    wall_s: float = float("nan")
    durations: List[float] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    cpu_user_s: float = 0.0
    cpu_sys_s: float = 0.0
    server: Dict[str, float] = field(default_factory=dict)
    base: Dict[str, int] = field(default_factory=dict)
    peak: Dict[str, int] = field(default_factory=dict)
    threads_after: Optional[int] = None
    threads_wait_s: float = 0.0
    fds_with_pool: Optional[int] = None
    fds_after: Optional[int] = None
    fds_wait_s: float = 0.0
    leaks: List[str] = field(default_factory=list)
    warm_s: float = 0.0


def _fill_pool(server: ImitationServer, run_stream: StreamRunner, n: int) -> float:
    """Open ``n`` connections at once (streams the imitation holds until all are in), then pool them."""
    threads = [threading.Thread(target=run_stream, args=(1, f"GATE {PROMPT}"), daemon=True) for _ in range(n)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while server.stats()["gated"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    server.open_gate()
    for thread in threads:
        thread.join(60)
    return time.perf_counter() - t0


def _burst(server: ImitationServer, run: Run, run_stream: StreamRunner, tokens: int, pace_ms: float) -> None:
    """``run.streams`` threads released together, each reading one paced stream; fills ``run``."""
    n = run.streams
    expected = expected_text(tokens)
    prompt = f"PACE_MS={pace_ms} {PROMPT}"
    barrier = threading.Barrier(n + 1)
    spans: List[Optional[Tuple[float, float]]] = [None] * n

    def consume(i: int) -> None:
        try:
            barrier.wait()
            t0 = time.perf_counter()
            text = run_stream(tokens, prompt)
            spans[i] = (t0, time.perf_counter())
            if text != expected:
                run.problems.append(f"stream {i}: text mismatch ({len(text)} chars, expected {len(expected)})")
        except Exception as exc:
            run.problems.append(f"stream {i}: {type(exc).__name__}: {str(exc)[:200]}")

    consumers = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(n)]
    for thread in consumers:
        thread.start()
    server.reset()
    sampler = _Sampler()
    sampler.start()
    barrier.wait()
    t_start = time.perf_counter()
    user0, sys0 = cpu_times()
    for thread in consumers:
        thread.join(timeout=max(1.0, t_start + 3 * tokens * pace_ms / 1000.0 + 60 - time.perf_counter()))
    user1, sys1 = cpu_times()
    run.peak = sampler.stop()
    run.cpu_user_s, run.cpu_sys_s = user1 - user0, sys1 - sys0
    done = [span for span in spans if span is not None]
    if done:
        run.wall_s = max(end for _, end in done) - t_start
    run.durations = [end - start for start, end in done]
    run.server = server.stats()
    if len(done) < n and not run.problems:
        run.problems.append(f"{n - len(done)} streams did not finish in time")


def _adapter_run(server: ImitationServer, n: int, tokens: int, pace_ms: float) -> Run:
    gc.collect()
    run = Run("tgi_adapter", n, base={"threads": threads_now(), "fds": fds_now(), "rss": rss_kib()})
    adapter = TgiHttpAdapter(server.url, config=AdapterConfig(pool_maxsize=n))

    def run_stream(k: int, prompt: str) -> str:
        text, end = adapter.submit(make_task(k, prompt=prompt)).collect()
        if end.get("tokens_out") != k:
            raise AssertionError(f"end data {end!r}")
        return text

    try:
        adapter.engine_info()  # /info once, not by every thread at once
        _measure(server, run, run_stream, n, tokens, pace_ms)
        if adapter.in_flight:
            run.leaks.append(f"adapter.in_flight is {adapter.in_flight} after every stream ended")
    finally:
        adapter.close()
    _after_close(server, run)
    return run


def _measure(
    server: ImitationServer, run: Run, run_stream: Callable[[int, str], str], n: int, tokens: int, pace_ms: float
) -> None:
    """Open the pool's connections, run the burst, and see threads settle back (the pool still open)."""
    run.warm_s = _fill_pool(server, run_stream, n)
    settle(threads_now, run.base["threads"], SETTLE_S)
    _burst(server, run, run_stream, tokens, pace_ms)
    gc.collect()
    run.threads_after, run.threads_wait_s = settle(threads_now, run.base["threads"], SETTLE_S)
    run.fds_with_pool = fds_now()


def _minimal_run(server: ImitationServer, n: int, tokens: int, pace_ms: float) -> Run:
    gc.collect()
    run = Run("minimal parse", n, base={"threads": threads_now(), "fds": fds_now(), "rss": rss_kib()})
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=n))
    url = server.url + "/generate_stream"

    def run_stream(k: int, prompt: str) -> str:
        response = session.post(url, json=stream_body(k, prompt), stream=True, timeout=120)
        parts: List[str] = []
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                token = json.loads(line[5:])["token"]
                if not token["special"]:
                    parts.append(token["text"])
        return "".join(parts)

    try:
        _measure(server, run, run_stream, n, tokens, pace_ms)
    finally:
        session.close()
    _after_close(server, run)
    return run


def _after_close(server: ImitationServer, run: Run) -> None:
    run.fds_after, run.fds_wait_s = settle(fds_now, run.base["fds"], SETTLE_S)
    # Connections the server still has open, less the control connection.
    server_open = settle(lambda: int(server.stats()["open"]), 1, SETTLE_S)[0] - 1
    if run.threads_after is not None and run.threads_after > run.base["threads"]:
        run.leaks.append(f"threads {run.threads_after} > baseline {run.base['threads']}")
    if run.fds_after > run.base["fds"]:
        run.leaks.append(f"fds {run.fds_after} > baseline {run.base['fds']}")
    if server_open > 0:
        run.leaks.append(f"{server_open} connections still open at the server after close()")


def _raw_run(server: ImitationServer, n: int, tokens: int, pace_ms: float) -> Run:
    """The same paced streams read by one selector thread that only discards bytes."""
    run = Run("raw reader (server check)", n)
    body = json.dumps(stream_body(tokens, f"PACE_MS={pace_ms} {PROMPT}")).encode()
    request = b"POST /generate_stream HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    try:
        server.reset()
        t0 = time.perf_counter()
        user0, sys0 = cpu_times()
        for sock in socks:
            sock.sendall(request)
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, [b"", t0])
        deadline = t0 + 3 * tokens * pace_ms / 1000.0 + 60
        while sel.get_map() and time.perf_counter() < deadline:
            for key, _ in sel.select(1.0):
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                tail = (key.data[0] + data)[-7:]
                key.data[0] = tail
                if tail == b"\r\n0\r\n\r\n" or not data:
                    sel.unregister(key.fileobj)
                    run.durations.append(time.perf_counter() - key.data[1])
                    if not data:
                        run.problems.append("the imitation closed a connection mid-stream")
        run.wall_s = time.perf_counter() - t0
        user1, sys1 = cpu_times()
        run.cpu_user_s, run.cpu_sys_s = user1 - user0, sys1 - sys0
        run.server = server.stats()
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    return run


def run_concurrency(
    server: ImitationServer,
    *,
    counts: List[int],
    tokens: int,
    pace_ms: float,
    log: Callable[[str], None] = print,
) -> Section:
    section = Section(
        f"Concurrency: paced streams ({tokens} tokens at {pace_ms:g} ms/token), each read by its own thread",
        [
            "streams",
            "client",
            "tokens/s",
            "% of ideal",
            "CPU µs/token (user+sys)",
            "stream time p50 / max s",
            "peak threads (base)",
            "peak fds (base)",
            "peak RSS MiB (base)",
            "threads after",
            "fds after close",
            "server lateness mean / max ms",
        ],
    )
    ideal_s = tokens * pace_ms / 1000.0
    raw_percent = float("nan")
    for n in counts:
        ideal_rate = n * 1000.0 / pace_ms
        runs = []
        for runner in (_raw_run, _adapter_run, _minimal_run):
            run = runner(server, n, tokens, pace_ms)
            runs.append(run)
            log(f"  {n} streams, {run.client}: {fmt(len(run.durations) * tokens / run.wall_s, 0)} tokens/s")
        for run in runs:
            total = len(run.durations) * tokens
            rate = total / run.wall_s if run.durations else float("nan")
            cpu = (run.cpu_user_s + run.cpu_sys_s) / total * 1e6 if total else float("nan")
            has_threads = run.threads_after is not None
            section.rows.append(
                [
                    str(n),
                    run.client,
                    fmt(rate, 0),
                    fmt(100 * rate / ideal_rate, 1),
                    f"{fmt(cpu, 1)} ({fmt(run.cpu_user_s / total * 1e6 if total else None, 1)}"
                    f"+{fmt(run.cpu_sys_s / total * 1e6 if total else None, 1)})",
                    f"{fmt(median(run.durations))} / {fmt(max(run.durations) if run.durations else None)}",
                    f"{run.peak['threads']} ({run.base['threads']})" if has_threads else "–",
                    f"{run.peak['fds']} ({run.base['fds']})" if has_threads else "–",
                    f"{fmt(run.peak['rss'] / 1024, 1)} ({fmt(run.base['rss'] / 1024, 1)})" if has_threads else "–",
                    f"{run.threads_after} after {fmt(run.threads_wait_s)} s" if has_threads else "–",
                    f"{run.fds_after} after {fmt(run.fds_wait_s)} s" if has_threads else "–",
                    f"{fmt(run.server.get('late_mean_ms'))} / {fmt(run.server.get('late_max_ms'), 1)}",
                ]
            )
            section.failures += [f"concurrency {n}, {run.client}: {p}" for p in run.problems[:3]]
            if run.client == "raw reader (server check)":
                raw_percent = 100 * rate / ideal_rate
                section.check(
                    f"the imitation keeps {n} streams at {pace_ms:g} ms/token at ≥ {MIN_EFFICIENCY:.0%} of ideal "
                    "(raw reader: the server is not the bottleneck)",
                    rate >= MIN_EFFICIENCY * ideal_rate,
                    f"{fmt(100 * rate / ideal_rate, 1)}% of ideal; "
                    f"{int(run.server.get('late_over_5ms', 0))} of {int(run.server.get('writes_paced', 0))} "
                    "server writes > 5 ms late",
                )
                continue
            if run.client == "tgi_adapter":
                section.check(
                    f"{n} concurrent streams at {pace_ms:g} ms/token at ≥ {MIN_EFFICIENCY:.0%} of ideal throughput "
                    "with nothing leaked",
                    rate >= MIN_EFFICIENCY * ideal_rate and not run.problems and not run.leaks,
                    f"{fmt(100 * rate / ideal_rate, 1)}% of ideal (raw reader {fmt(raw_percent, 1)}%), "
                    f"{len(run.durations)}/{n} completed; "
                    + ("; ".join(run.leaks) if run.leaks else "threads and fds back to baseline"),
                )
            section.notes.append(
                f"{n} streams, {run.client}: wall {fmt(run.wall_s, 3)} s vs ideal {fmt(ideal_s, 3)} s; "
                f"opening the pool's {n} connections first took {fmt(run.warm_s, 3)} s; fds with the pool still "
                f"open {run.fds_with_pool}; VmHWM so far {fmt(hwm_kib() / 1024, 1)} MiB; server: "
                f"{int(run.server.get('peak_active_scheduled', 0))} streams paced at once, "
                f"{int(run.server.get('late_over_5ms', 0))} of {int(run.server.get('writes_paced', 0))} writes "
                "> 5 ms late"
                + (f"; LEAKS: {'; '.join(run.leaks)}" if run.leaks else "")
                + "."
            )
    section.notes.append(
        "tgi_adapter: one adapter with `AdapterConfig(pool_maxsize=<streams>)` (the default 32 would drop every "
        "connection beyond 32 after use); minimal parse: one `requests.Session` with an `HTTPAdapter(pool_maxsize="
        "<streams>)`. Before each measured run, <streams> streams held by the imitation until all are in open the "
        "pool's connections (so the run measures the steady state, not connection set-up). Consumer threads are "
        "started first and released together by a barrier; each submits one stream and reads it to its end. "
        "tokens/s = streams × tokens / (last end − release); ideal = streams / pace. CPU: this process's user and "
        "system time during the run / tokens. Threads, fds and RSS: sampled every 20 ms from /proc/self; \"after\": "
        f"polled until back at the baseline (at most {SETTLE_S:g} s), fds after closing the adapter/session. "
        "Server lateness: how late the imitation's paced writes left versus their schedule. The raw reader (one "
        "selector thread discarding bytes) shows what the imitation and this machine deliver with next to no "
        "client work."
    )
    return section
