"""What the whole process shares: the background threads and who is using them.

Adapters and hosts :func:`hold` the runtime while they are open. The shared
threads (the reader that serves every open stream, and the workers that send
requests and route tasks) linger while someone holds it, so the next task
does not pay for a new thread, and end as soon as they are idle once nobody
does: a process whose adapters are all closed runs none of the library's
threads.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from .reactor import Reactor
from .workers import WorkerPool

__all__ = ["hold", "release", "reactor", "workers", "LINGER_S", "MAX_WORKERS"]

#: How long an idle shared thread waits for work while an adapter is open.
LINGER_S = 5.0
#: Threads that send requests (until the response headers) and route host tasks.
MAX_WORKERS = 8
# Once nobody holds the runtime, an idle thread ends after this long.
_DRAIN_S = 0.05

_lock = threading.Lock()
_holders = 0
_workers: Optional[WorkerPool] = None
_reactor: Optional[Reactor] = None


def _idle_s() -> float:
    return LINGER_S if _holders > 0 else _DRAIN_S


def hold() -> None:
    """An adapter or host opened: keep the shared threads around between tasks."""
    global _holders
    with _lock:
        _holders += 1


def release() -> None:
    """An adapter or host closed; when it was the last one, idle threads end now."""
    global _holders
    with _lock:
        _holders = max(0, _holders - 1)
        last = _holders == 0
        pool, loop = _workers, _reactor
    if last and pool is not None:
        pool.nudge()
    if last and loop is not None and loop.running:
        loop.call_soon(_nothing)  # an idle loop looks at idle_s() again and ends


def workers() -> WorkerPool:
    """The process's worker pool (made on first use)."""
    global _workers
    pool = _workers
    if pool is None:
        with _lock:
            pool = _workers = _workers or WorkerPool(MAX_WORKERS, _idle_s, "tgi-adapter-worker")
    return pool


def reactor() -> Reactor:
    """The process's shared reader (made on first use)."""
    global _reactor
    loop = _reactor
    if loop is None:
        with _lock:
            loop = _reactor = _reactor or Reactor(_idle_s)
    return loop


def _nothing() -> None:
    return None


def _forget_after_fork() -> None:
    # Threads do not survive fork(): the child starts with a runtime of its own.
    global _lock, _holders, _workers, _reactor
    _lock = threading.Lock()
    _holders = 0
    _workers = None
    _reactor = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
