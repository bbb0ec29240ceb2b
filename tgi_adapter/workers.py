"""A small pool of threads for the blocking steps no reader thread may take.

Sending a request and waiting for its response headers, or asking replicas
for their health before routing a task, block on the network. Those jobs run
here, on at most ``max_workers`` daemon threads that start on demand and end
once they have been idle for a while, so an idle process holds no threads.
Jobs run in the order they were submitted; a job must not raise (one that
does is logged and the worker goes on).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

Job = Callable[[], None]


class WorkerPool:
    """Runs jobs on up to ``max_workers`` threads named ``<name>-<n>``.

    :param idle_s: a callable giving how long an idle worker waits for more
        work before it ends (asked afresh each time, so the owner can shorten
        it when nothing is expected any more).
    """

    def __init__(self, max_workers: int, idle_s: Callable[[], float], name: str) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self._idle_s = idle_s
        self._name = name
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._busy = 0
        self._serial = 0
        self._quiet = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"<WorkerPool {self._name} threads={self._threads} busy={self._busy}>"

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads

    def submit(self, job: Job) -> None:
        """Run ``job`` on a worker thread, starting one if none is idle and the cap allows."""
        self._jobs.put(job)
        with self._lock:
            if self._idle > 0 or self._threads >= self.max_workers:
                return
            self._threads += 1
            self._serial += 1
            name = f"{self._name}-{self._serial}"
        threading.Thread(target=self._work, name=name, daemon=True).start()

    def nudge(self) -> None:
        """Wake every idle worker so it asks ``idle_s`` again (it may then end at once)."""
        with self._lock:
            idle = self._idle
        for _ in range(idle):
            self._jobs.put(_nothing)

    def wait_quiet(self, timeout: Optional[float]) -> bool:
        """Wait until no job is queued or running; True if that happened in time."""
        with self._quiet:
            return self._quiet.wait_for(lambda: self._busy == 0 and self._jobs.empty(), timeout)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = jobs.get(timeout=self._idle_s())
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if jobs.empty():  # a job put after the timeout is taken on the next turn
                        self._threads -= 1
                        self._quiet.notify_all()
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._busy += 1
            try:
                job()
            except Exception:  # a job's bug must not kill the worker that other tasks need
                log.exception("a background job failed")
            finally:
                with self._lock:
                    self._busy -= 1
                    if self._busy == 0 and jobs.empty():
                        self._quiet.notify_all()


def _nothing() -> None:
    return None
