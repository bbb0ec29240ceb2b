"""Memory per open stream: many stalled streams held open through one adapter."""

from __future__ import annotations

import gc
import time
import tracemalloc
from typing import List

from clients import PROMPT, make_task
from procstat import fds_now, rss_kib, settle, threads_now
from report import Section, fmt
from server_proc import ImitationServer

from tgi_adapter import AdapterConfig, TgiHttpAdapter, TokenStream

SETTLE_S = 10.0


def _open_stalled(adapter: TgiHttpAdapter, server: ImitationServer, n: int) -> List[TokenStream]:
    before = server.stats()["active_scheduled"]
    streams = [adapter.submit(make_task(10, prompt=f"STALL {PROMPT}")) for _ in range(n)]
    deadline = time.monotonic() + 30
    while server.stats()["active_scheduled"] < before + n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # headers are out: let the reader take up every socket
    return streams


def _close_all(streams: List[TokenStream]) -> None:
    for stream in streams:
        stream.close()
    streams.clear()


def run_memory(server: ImitationServer, *, streams: int) -> Section:
    section = Section(
        f"Memory per open stream: {streams} stalled streams held open", ["measure", "total", "per stream"]
    )
    adapter = TgiHttpAdapter(server.url, config=AdapterConfig(pool_maxsize=streams))
    try:
        adapter.submit(make_task(1)).collect()  # warm: /info, imports, one connection
        gc.collect()
        base_threads, base_fds, base_rss = threads_now(), fds_now(), rss_kib()
        opened = _open_stalled(adapter, server, streams)
        gc.collect()
        rss = rss_kib() - base_rss
        threads = threads_now() - base_threads
        fds = fds_now() - base_fds
        _close_all(opened)
        settle(threads_now, base_threads, SETTLE_S)
        gc.collect()
        # A second, identical round under tracemalloc (its bookkeeping would inflate the RSS figure above).
        tracemalloc.start()
        traced_base = tracemalloc.get_traced_memory()[0]
        opened = _open_stalled(adapter, server, streams)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced_base
        tracemalloc.stop()
        _close_all(opened)
        threads_after, _ = settle(threads_now, base_threads, SETTLE_S)
    finally:
        adapter.close()
    section.rows += [
        ["RSS (VmRSS)", f"{fmt(rss / 1024, 1)} MiB", f"{fmt(rss / streams, 1)} KiB"],
        ["Python heap (tracemalloc)", f"{fmt(traced / 2**20, 2)} MiB", f"{fmt(traced / streams / 1024, 1)} KiB"],
        ["threads", str(threads), fmt(threads / streams)],
        ["file descriptors", str(fds), fmt(fds / streams)],
    ]
    section.notes.append(
        "Each stream: headers received, the body not started, its socket watched by the library's shared "
        "reader (threads: what the process runs beyond the baseline, taken after one stream had started the "
        "shared threads). tracemalloc counts Python allocations only (a second, identical round). Threads after "
        f"closing every stream: {threads_after} (baseline {base_threads})."
    )
    if threads_after > base_threads:
        section.failures.append(f"memory: {threads_after - base_threads} threads left after close()")
    return section
