"""Profile the adapter's hot path: where the per-token time goes.

    python bench/profile_adapter.py [--tokens 20000] [--streams 5] [--top 25]
    python bench/profile_adapter.py --stages

By default, reads ``--streams`` streams of ``--tokens`` tokens from the TGI
imitation through ``TgiHttpAdapter.submit().collect()`` under ``cProfile``
(per-thread CPU time), profiling the consumer (this thread), the shared
reader thread and the worker threads (sending, response headers), and prints
each side's functions by own time, plus the wall and CPU time per token
without the profiler for scale. Many one-token streams (``--tokens 1
--streams 500``) show where sending a request goes.

``--stages`` times each stage of the read path on its own, without sockets
or threads, on the imitation's exact bytes cut into 64 KiB reads (what one
``read1(65536)`` gets): chunked decoding, SSE decoding, frame mapping (JSON
included) and the consumer's iteration. No profiler overhead, little noise.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import threading
import time
from typing import Any, Callable, Dict, List

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from clients import AdapterClient  # noqa: E402
from server_proc import ImitationServer  # noqa: E402
from tgi_imitation import render_stream  # noqa: E402

from tgi_adapter import runtime  # noqa: E402
from tgi_adapter.chunked import ChunkedDecoder  # noqa: E402
from tgi_adapter.contract import TokenEvent  # noqa: E402
from tgi_adapter.frames import NativeFrames  # noqa: E402
from tgi_adapter.reactor import Reactor  # noqa: E402
from tgi_adapter.sse import SseDecoder  # noqa: E402
from tgi_adapter.stream import StreamChannel, TokenStream  # noqa: E402
from tgi_adapter.workers import WorkerPool  # noqa: E402

_lock = threading.Lock()
# The shared threads' profiles, by kind: "reader" and "worker".
_shared_profiles: Dict[str, List[cProfile.Profile]] = {"reader": [], "worker": []}


def _profiled(kind: str, original: Any) -> Any:
    """``original`` (a shared thread's body) run under a profile of its own thread's CPU time."""

    def run(self: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()
            with _lock:
                _shared_profiles[kind].append(profile)

    return run


def _wait_shared_threads_gone(timeout: float = 10.0) -> None:
    """Once no adapter is open, the shared threads end within moments (their profiles are then complete)."""
    deadline = time.monotonic() + timeout
    runtime.reactor().wait_stopped(timeout)
    while runtime.workers().threads and time.monotonic() < deadline:
        time.sleep(0.01)


def _table(stats: pstats.Stats, title: str, top: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    print(f"== {title} ==", file=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


class _CountingDecoder(ChunkedDecoder):
    """Counts how many reads fall back to the exact, byte-by-byte path."""

    __slots__ = ("slow_calls",)

    def __init__(self) -> None:
        super().__init__()
        self.slow_calls = 0

    def _slow(self, buf: bytes) -> bytes:
        self.slow_calls += 1
        return super()._slow(buf)


def _best_of(repeat: int, fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def stages(tokens: int, repeat: int = 7) -> None:
    """Per-token cost of each stage of the read path, on the imitation's bytes in 64 KiB reads."""
    body = b"".join(render_stream(tokens))
    reads = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    decoder = _CountingDecoder()
    pieces = [decoder.feed(r) for r in reads]
    assert decoder.done and b"".join(pieces) == ChunkedDecoder().feed(body)
    sse = SseDecoder()
    payload_batches = [sse.feed(p) for p in pieces]
    assert sum(map(len, payload_batches)) == tokens
    started = {"engine_version": "3.3.6"}

    def chunked() -> None:
        d = ChunkedDecoder()
        for r in reads:
            d.feed(r)

    def sse_decode() -> None:
        s = SseDecoder()
        for p in pieces:
            s.feed(p)

    def json_only() -> None:
        for batch in payload_batches:
            json.loads(b"[" + b",".join(batch) + b"]")

    def mapping() -> None:
        m = NativeFrames(started, t_submit=0.0)
        for batch in payload_batches:
            m.feed(batch, 1.0)

    m = NativeFrames(started, t_submit=0.0)
    event_batches: List[List[TokenEvent]] = [m.feed(batch, 1.0) for batch in payload_batches]

    def consume() -> None:
        channel = StreamChannel("t")
        for batch in event_batches:
            channel.put(list(batch))
        TokenStream("t", channel, started_data=started, deadline=time.monotonic() + 60).collect()

    timings = [
        (
            f"chunked decoding ({decoder.slow_calls} of {len(reads)} reads took the byte-by-byte path)",
            _best_of(repeat, chunked),
        ),
        ("SSE decoding", _best_of(repeat, sse_decode)),
        ("frame mapping: one json.loads per read (alone)", _best_of(repeat, json_only)),
        ("frame mapping: the rest (frame checks, token events)", _best_of(repeat, mapping)),
        ("consumer: TokenStream iteration in collect()", _best_of(repeat, consume)),
    ]
    # The mapping stage includes its json.loads: show the two parts separately.
    timings[3] = (timings[3][0], timings[3][1] - timings[2][1])
    results = timings
    total = sum(t for _, t in results)
    print(f"{tokens:,} tokens, {len(body):,} body bytes in {len(reads)} reads of 64 KiB; best of {repeat}")
    for name, seconds in results:
        print(f"  {seconds / tokens * 1e6:6.3f} us/token  {100 * seconds / total:5.1f}%  {name}")
    print(f"  {total / tokens * 1e6:6.3f} us/token  total (no sockets, threads or queue waits)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--streams", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stages", action="store_true", help="time each stage offline instead")
    args = parser.parse_args()
    n = args.tokens
    if args.stages:
        stages(n)
        return
    with ImitationServer(n) as server:
        client = AdapterClient(server.url)
        try:
            client.run(n)  # warm up: /info, the connection
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.streams):
                client.run(n)
            wall = (time.perf_counter() - t0) / (args.streams * n) * 1e6
            cpu = (time.process_time() - c0) / (args.streams * n) * 1e6
            print(f"without the profiler: {wall:.2f} us/token wall, {cpu:.2f} us/token CPU (every thread)")
        finally:
            client.close()
        # The shared threads started above end once no adapter is open; the next ones run under a profile.
        _wait_shared_threads_gone()
        Reactor._run = _profiled("reader", Reactor._run)  # type: ignore[method-assign]
        WorkerPool._work = _profiled("worker", WorkerPool._work)  # type: ignore[method-assign]
        client = AdapterClient(server.url)
        try:
            client.run(1)  # the connection and /info again, as short as a stream gets
            consumer = cProfile.Profile(time.thread_time)
            consumer.enable()
            for _ in range(args.streams):
                client.run(n)
            consumer.disable()
        finally:
            client.close()
        _wait_shared_threads_gone()
    print(_table(pstats.Stats(consumer), "consumer thread (submit + collect)", args.top))
    for kind, title in (("reader", "the shared reader thread"), ("worker", "worker threads (send, response headers)")):
        profiles = _shared_profiles[kind]
        if not profiles:
            print(f"== {title}: none ran ==")
            continue
        merged = pstats.Stats(profiles[0])
        for extra in profiles[1:]:
            merged.add(extra)
        print(_table(merged, f"{title} ({len(profiles)} thread(s))", args.top))


if __name__ == "__main__":
    main()
