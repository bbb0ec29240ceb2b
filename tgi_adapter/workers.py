"""A small pool of threads for the blocking steps no reader thread may take.

Sending a request and waiting for its response headers, or asking replicas
for their health before routing a task, block on the network. Those jobs run
here, on at most ``max_workers`` daemon threads that start on demand and end
once they have been idle for a while, so an idle process holds no threads.
Jobs run in the order they were submitted; a job must not raise (one that
does is logged and the worker goes on).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Deque, Optional

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

Job = Callable[[], None]


class WorkerPool:
    """Runs jobs on up to ``max_workers`` threads named ``<name>-<n>``.

    :param idle_s: a callable giving how long an idle worker waits for more
        work before it ends; asked again whenever :meth:`nudge` is called, so
        the owner can let idle workers go at once when nothing more is expected.
    """

    def __init__(self, max_workers: int, idle_s: Callable[[], float], name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._idle_s = idle_s
        self._name = name
        self._jobs: Deque[Job] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads = 0
        self._idle = 0
        self._busy = 0
        self._serial = 0

    def __repr__(self) -> str:
        return f"<WorkerPool {self._name} threads={self._threads} busy={self._busy}>"

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads

    def submit(self, job: Job) -> None:
        """Run ``job`` on a worker thread, starting one if none is idle and the cap allows."""
        with self._cond:
            self._jobs.append(job)
            if self._idle > len(self._jobs) - 1:
                self._cond.notify()
                return
            if self._threads >= self.max_workers:
                return
            self._threads += 1
            self._serial += 1
            name = f"{self._name}-{self._serial}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def nudge(self) -> None:
        """Make every idle worker ask ``idle_s`` again (it may then end at once)."""
        with self._cond:
            self._cond.notify_all()

    def wait_quiet(self, timeout: Optional[float]) -> bool:
        """Wait until no job is queued or running; True if that happened in time."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0 and not self._jobs, timeout)

    def _work(self) -> None:
        cond = self._cond
        jobs = self._jobs
        clock = time.monotonic
        while True:
            with cond:
                idle_since = clock()
                while not jobs:
                    left = self._idle_s() - (clock() - idle_since)
                    if left <= 0:
                        self._threads -= 1
                        cond.notify_all()
                        return
                    self._idle += 1
                    cond.wait(left)
                    self._idle -= 1
                job = jobs.popleft()
                self._busy += 1
            try:
                job()
            except Exception:  # a job's bug must not kill the worker that other tasks need
                log.exception("a background job failed")
            finally:
                with cond:
                    self._busy -= 1
                    if self._busy == 0 and not jobs:
                        cond.notify_all()
