"""This process's threads, file descriptors and memory, as the kernel counts them (Linux /proc)."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Tuple

#: The names of the threads tgi_adapter starts: the shared reader and workers, and a stream's own reader
#: (for a transport without a socket).
LIBRARY_THREAD_PREFIXES = ("tgi-adapter-", "tgi-stream-")


def _status(key: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def threads_now() -> int:
    return int(_status("Threads"))


def library_threads() -> int:
    """Threads tgi_adapter runs now, told apart by name from the benchmark's own."""
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(LIBRARY_THREAD_PREFIXES))


def fds_now() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    """VmRSS: resident memory now."""
    return int(_status("VmRSS").split()[0])


def hwm_kib() -> int:
    """VmHWM: the peak resident memory of the process so far."""
    return int(_status("VmHWM").split()[0])


def cpu_times() -> Tuple[float, float]:
    """``(user, system)`` CPU seconds of this process, every thread included."""
    times = os.times()
    return times.user, times.system


def settle(probe: Callable[[], int], target: int, timeout: float) -> Tuple[int, float]:
    """Poll ``probe`` until it is at most ``target``; ``(last value, seconds waited)``."""
    t0 = time.monotonic()
    while True:
        value = probe()
        waited = time.monotonic() - t0
        if value <= target or waited > timeout:
            return value, waited
        time.sleep(0.02)
