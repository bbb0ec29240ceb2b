"""Time to first token over a kept-alive connection, and cancel latency as the server sees it."""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Dict, List, Optional

import requests
from clients import PROMPT, make_task, stream_body
from report import Section, fmt, median, percentile
from server_proc import ImitationServer

from tgi_adapter import TgiHttpAdapter, TokenStream

TTFT_MAX_EXTRA_MS = 0.3
CANCEL_P99_MAX_MS = 5.0
# How long the server may take to report a cancelled stream's disconnect before it counts as not seen.
CANCEL_SEEN_WITHIN_S = 2.0


# -- time to first token --------------------------------------------------------------


def _adapter_ttft(adapter: TgiHttpAdapter) -> float:
    """Seconds from ``submit()`` to the first token event; the stream is then read to its end."""
    t0 = time.perf_counter()
    stream = adapter.submit(make_task(1))
    first: Optional[float] = None
    text = ""
    for event in stream:
        if event.kind == "token" and first is None:
            first = time.perf_counter()
            text = event.data["t"]
        elif event.kind == "error":
            raise RuntimeError(f"stream failed: {event.data}")
    if first is None or text != " tok0":
        raise RuntimeError(f"no first token (got {text!r})")
    return first - t0


def _minimal_ttft(session: requests.Session, url: str) -> float:
    """Seconds from ``post()`` to the first parsed data line; the body is then drained."""
    t0 = time.perf_counter()
    response = session.post(url, json=stream_body(1), stream=True, timeout=30)
    lines = response.iter_lines()
    first: Optional[float] = None
    text = ""
    for line in lines:
        if line.startswith(b"data:"):
            text = json.loads(line[5:])["token"]["text"]
            first = time.perf_counter()
            break
    for _ in lines:  # the rest, so the connection goes back to the pool
        pass
    if first is None or text != " tok0":
        raise RuntimeError(f"no first token (got {text!r})")
    return first - t0


def run_ttft(server: ImitationServer, *, samples: int, warmup: int = 20) -> Section:
    section = Section(
        "Time to first token: max_new_tokens=1 streams over a kept-alive connection",
        ["client", "median ms", "p90 ms", "p99 ms", "min ms", "new connections for 5 streams"],
    )
    adapter = TgiHttpAdapter(server.url)
    session = requests.Session()
    url = server.url + "/generate_stream"
    times: Dict[str, List[float]] = {"tgi_adapter": [], "minimal parse": []}
    runners: Dict[str, Callable[[], float]] = {
        "tgi_adapter": lambda: _adapter_ttft(adapter),
        "minimal parse": lambda: _minimal_ttft(session, url),
    }
    try:
        for _ in range(warmup):
            for run in runners.values():
                run()
        new: Dict[str, int] = {}
        for name, run in runners.items():
            # Connections a client opens for 5 more streams: 0 means each one reused its connection.
            before = server.stats()["accepted"]
            for _ in range(5):
                run()
            new[name] = server.stats()["accepted"] - before
        before = server.stats()["accepted"]
        for i in range(samples):
            order = list(runners) if i % 2 == 0 else list(runners)[::-1]
            for name in order:
                times[name].append(runners[name]() * 1000)
        new_while_sampling = server.stats()["accepted"] - before
    finally:
        adapter.close()
        session.close()
    for name, values in times.items():
        section.rows.append(
            [
                name,
                fmt(median(values), 3),
                fmt(percentile(values, 90), 3),
                fmt(percentile(values, 99), 3),
                fmt(min(values), 3),
                str(new[name]),
            ]
        )
    section.notes.append(
        f"{samples} samples each after {warmup} warm-up requests, alternating clients; tgi_adapter: "
        "`submit()` → first `token` event (includes starting the stream's reader thread); minimal parse: "
        "`Session.post(stream=True)` → first parsed `data:` line. Each stream is read to its end so its "
        f"connection is reused. Connections opened during all {2 * samples} timed samples: {new_while_sampling}."
    )
    a, m = median(times["tgi_adapter"]), median(times["minimal parse"])
    section.check(
        f"time to first token ≤ the minimal parse + {TTFT_MAX_EXTRA_MS} ms",
        a <= m + TTFT_MAX_EXTRA_MS,
        f"median {fmt(a, 3)} ms vs {fmt(m, 3)} ms: {fmt(a - m, 3)} ms more",
    )
    if any(new.values()) or new_while_sampling:
        section.failures.append(
            f"time to first token: connections opened while sampling ({new}, {new_while_sampling} in all): "
            "keep-alive broken"
        )
    return section


# -- cancel latency ---------------------------------------------------------------------


class _Consumer(threading.Thread):
    """Reads a stream the way an orchestrator's worker does, noting when each token arrived."""

    def __init__(self, stream: TokenStream, tokens_before_signal: int) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.signal_after = tokens_before_signal
        self.signal = threading.Event()
        self.token_times: List[int] = []
        self.kinds: List[str] = []
        self.end: Optional[Dict[str, object]] = None

    def run(self) -> None:
        for event in self.stream:
            self.kinds.append(event.kind)
            if event.kind == "token":
                self.token_times.append(time.monotonic_ns())
                if len(self.token_times) >= self.signal_after:
                    self.signal.set()
            elif event.kind in ("end", "error"):
                self.end = {"kind": event.kind, **event.data}
        self.signal.set()


def _cancel_sample(
    adapter: TgiHttpAdapter, server: ImitationServer, mode: str, i: int, pace_ms: float, after_tokens: int
) -> Dict[str, object]:
    """One stream cancelled from another thread than its consumer; what the server saw."""
    cid = f"cancel-{mode}-{i}-{time.monotonic_ns()}"
    prompt = f"STALL {PROMPT}" if mode == "stalled" else f"PACE_MS={pace_ms} {PROMPT}"
    task = make_task(100_000, prompt=prompt)
    stream = adapter.submit(task, correlation_id=cid)
    consumer = _Consumer(stream, after_tokens if mode == "paced" else 1 << 30)
    consumer.start()
    if mode == "paced":
        consumer.signal.wait(10)
    else:
        server.wait_state(cid, ("active",), 10)
        time.sleep(0.01)  # headers are out: let the reader reach its blocking read
    t_cancel = time.monotonic_ns()
    adapter.cancel(task.task_id)
    t_returned = time.monotonic_ns()
    state = server.wait_state(cid, ("gone", "done"), CANCEL_SEEN_WITHIN_S)
    consumer.join(10)
    late_tokens = sum(1 for t in consumer.token_times if t > t_returned)
    seen = state["state"] == "gone" and state["disconnect_ns"] is not None
    return {
        "latency_ms": (int(state["disconnect_ns"]) - t_cancel) / 1e6 if seen else None,
        "call_ms": (t_returned - t_cancel) / 1e6,
        "late_tokens": late_tokens,
        "ended_cancelled": bool(consumer.end and consumer.end.get("finish_reason") == "cancelled"),
        "consumer_done": not consumer.is_alive(),
    }


def run_cancel(server: ImitationServer, *, samples: int, pace_ms: float = 2.0, after_tokens: int = 5) -> Section:
    section = Section(
        "Cancel latency: `cancel()` → the server sees the disconnect",
        ["stream", "p50 ms", "p90 ms", "p99 ms", "max ms", "cancel() call p50 ms", "not seen", "wrong ending"],
    )
    adapter = TgiHttpAdapter(server.url)
    results: Dict[str, List[Dict[str, object]]] = {"paced": [], "stalled": []}
    try:
        adapter.engine_info()
        for i in range(samples):
            for mode in ("paced", "stalled"):
                results[mode].append(_cancel_sample(adapter, server, mode, i, pace_ms, after_tokens))
    finally:
        adapter.close()
    labels = {
        "paced": f"paced ({pace_ms:g} ms/token, cancelled after {after_tokens} tokens)",
        "stalled": "stalled (headers, then nothing: the reader blocked in recv)",
    }
    for mode, rows in results.items():
        seen = [float(r["latency_ms"]) for r in rows if r["latency_ms"] is not None]  # type: ignore[arg-type]
        calls = [float(r["call_ms"]) for r in rows]  # type: ignore[arg-type]
        wrong = [r for r in rows if r["late_tokens"] or not r["ended_cancelled"] or not r["consumer_done"]]
        section.rows.append(
            [
                labels[mode],
                fmt(median(seen), 3),
                fmt(percentile(seen, 90), 3),
                fmt(percentile(seen, 99), 3),
                fmt(max(seen) if seen else None, 3),
                fmt(median(calls), 3),
                str(len(rows) - len(seen)),
                str(len(wrong)),
            ]
        )
        p99 = percentile(seen, 99)
        section.check(
            f"cancel seen by the server ≤ {CANCEL_P99_MAX_MS} ms p99, {mode} streams",
            len(seen) == len(rows) and p99 <= CANCEL_P99_MAX_MS,
            f"p99 {fmt(p99, 3)} ms, {len(rows) - len(seen)} of {len(rows)} not seen within {CANCEL_SEEN_WITHIN_S:g} s",
        )
        if wrong:
            section.failures.append(
                f"cancel ({mode}): {len(wrong)} of {len(rows)} streams handed out a token after cancel() returned "
                "or did not end with finish_reason 'cancelled'"
            )
    section.notes.append(
        f"{samples} samples per kind, one stream at a time, cancelled by `adapter.cancel(task_id)` from another "
        "thread than the stream's consumer. Latency = the server's `time.monotonic_ns()` when its socket turned "
        "readable at EOF − the client's just before `cancel()` (CLOCK_MONOTONIC is system-wide on Linux). "
        "\"wrong ending\": a token handed out after `cancel()` returned, or no `end` with finish_reason "
        "'cancelled'."
    )
    return section
