"""One client's burst of paced streams, measured in a process of its own.

    python bench/burst.py CLIENT --port PORT --streams N --tokens T --pace-ms P

prints one JSON object (see :func:`measure`). ``concurrency.py`` runs it once
per client against a running imitation, so every client starts from a fresh
interpreter: its RSS, threads, descriptors and CPU time are its own, not what
the clients before it left behind. CLIENT is one of ``burst_clients.CLIENTS``.

The sequence: baseline threads and descriptors; the client is built and reads
one short stream (one-off costs) and the RSS baseline is taken; ``N``
connections are opened (``N`` streams held by the imitation until all are
in); the consumer threads start and wait on a barrier; the release; every
stream read to its end; the client closed, and threads, descriptors and the
server's open connections polled until back at their baselines.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
# Measure the working tree's tgi_adapter, even when another copy is installed.
sys.path.insert(1, os.path.dirname(HERE))

from burst_clients import CLIENTS, BurstClient, Tally  # noqa: E402
from clients import PROMPT  # noqa: E402
from procstat import cpu_times, fds_now, library_threads, rss_kib, threads_now  # noqa: E402
from server_proc import ImitationServer  # noqa: E402

SETTLE_S = 10.0
SAMPLE_S = 0.02
PROBES = {"threads": threads_now, "library_threads": library_threads, "fds": fds_now, "rss_kib": rss_kib}


class Sampler(threading.Thread):
    """The peak of each probe, per phase of the run (the phase is switched by the measuring thread)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.phase = "setup"
        self.peaks: Dict[str, Dict[str, int]] = {}
        self._halt = threading.Event()
        #: Held while sampling: a probe reading /proc holds a descriptor open for a moment.
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_S)

    def sample(self) -> None:
        with self.lock:
            peak = self.peaks.setdefault(self.phase, dict.fromkeys(PROBES, 0))
            for key, probe in PROBES.items():
                peak[key] = max(peak[key], probe())

    def switch(self, phase: str) -> None:
        self.sample()  # the end of the phase before
        self.phase = phase
        self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _times(marks: List[float], origin: float) -> List[Optional[float]]:
    return [None if math.isnan(t) else t - origin for t in marks]


def _settle(targets: Dict[str, int], server: ImitationServer, server_open: int) -> Dict[str, Any]:
    """Poll until every probe is back at its target; the values then and how long each took."""
    t0 = time.perf_counter()
    probes = {"threads": threads_now, "library_threads": library_threads, "fds": fds_now}
    values: Dict[str, int] = {}
    waited: Dict[str, Optional[float]] = dict.fromkeys([*probes, "server_open"])
    while True:
        elapsed = time.perf_counter() - t0
        for key, probe in probes.items():
            if waited[key] is None:
                values[key] = probe()
                if values[key] <= targets[key]:
                    waited[key] = elapsed
        if waited["server_open"] is None:
            # The imitation's count includes our own control connection and the parent's: the baseline has both.
            values["server_open"] = int(server.stats()["open"])
            if values["server_open"] <= server_open:
                waited["server_open"] = elapsed
        if all(w is not None for w in waited.values()) or elapsed > SETTLE_S:
            return {"values": values, "seconds": waited}
        time.sleep(0.005)


def measure(client_key: str, port: int, n: int, tokens: int, pace_ms: float) -> Dict[str, Any]:
    """Run the burst; everything :mod:`concurrency` reports, as JSON-ready values (times in seconds)."""
    server = ImitationServer.attach(port)
    sampler = Sampler()
    sampler.start()
    server_open = int(server.stats()["open"])  # first: the control connection is part of the baseline
    gc.collect()
    with sampler.lock:
        base = {"threads": threads_now(), "library_threads": library_threads(), "fds": fds_now()}
    problems: List[str] = []
    cls = CLIENTS[client_key]
    client: BurstClient = cls(server, n)
    try:
        client.prime()
        gc.collect()
        rss_base = rss_kib()
        sampler.switch("warm")
        t_warm = time.perf_counter()
        problems += client.warm(server, n)
        warm_s = time.perf_counter() - t_warm
        gc.collect()

        tally = Tally(n, tokens)
        prompt = f"PACE_MS={pace_ms:g} {PROMPT}"
        groups: List[Sequence[int]] = [[i] for i in range(n)] if cls.thread_per_stream else [range(n)]
        barrier = threading.Barrier(len(groups) + 1)

        def consumer(indices: Sequence[int]) -> None:
            try:
                barrier.wait()
                client.consume(indices, tokens, prompt, tally)
            except Exception as exc:
                tally.problems.append(f"consumer of {len(indices)} stream(s): {type(exc).__name__}: {str(exc)[:300]}")

        consumers = [
            threading.Thread(target=consumer, args=(g,), daemon=True, name=f"bench-consumer-{k}")
            for k, g in enumerate(groups)
        ]
        for thread in consumers:
            thread.start()
        server.reset()
        sampler.switch("burst")
        barrier.wait()
        t_start = time.perf_counter()
        user0, sys0 = cpu_times()
        give_up = t_start + 3 * tokens * pace_ms / 1000.0 + 60
        for thread in consumers:
            thread.join(max(0.0, give_up - time.perf_counter()))
        user1, sys1 = cpu_times()
        sampler.switch("ended")
        server_stats = server.stats()
        stuck = sum(thread.is_alive() for thread in consumers)
        if stuck:
            problems.append(f"{stuck} consumer thread(s) still running {give_up - t_start:.0f} s after the release")
        problems += tally.problems
        leaks = client.leaks()
    finally:
        sampler.switch("close")
        t_close = time.perf_counter()
        client.close()
        close_s = time.perf_counter() - t_close
        gc.collect()
    after = _settle(base, server, server_open)
    sampler.stop()
    for key, target in base.items():
        if after["values"][key] > target:
            leaks.append(f"{key} {after['values'][key]} > baseline {target} {SETTLE_S:g} s after close")
    if after["values"]["server_open"] > server_open:
        leaks.append(f"{after['values']['server_open'] - server_open} connections still open at the server")
    return {
        "client": client_key,
        "label": cls.label,
        "parses": cls.parses,
        "consumer_threads": len(groups),
        "streams": n,
        "tokens": tokens,
        "pace_ms": pace_ms,
        "first_s": _times(tally.first, t_start),
        "end_s": _times(tally.end, t_start),
        "cpu_user_s": user1 - user0,
        "cpu_sys_s": sys1 - sys0,
        "base": base,
        "rss_base_kib": rss_base,
        "peaks": sampler.peaks,
        "warm_s": warm_s,
        "close_s": close_s,
        "after": after,
        "server": server_stats,
        "problems": problems,
        "leaks": leaks,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--port", type=int, required=True, help="a running imitation's port (plain HTTP)")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--pace-ms", type=float, required=True)
    args = parser.parse_args(argv)
    result = measure(args.client, args.port, args.streams, args.tokens, args.pace_ms)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
