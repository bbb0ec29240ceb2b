"""The shared reader thread: one ``selectors`` loop for the sockets and timers of every open stream.

One blocked thread per stream wakes once per token and fights every other
stream's thread for the interpreter lock; one thread that waits on all the
sockets at once wakes once per *batch* of ready sockets, and each of its
reads carries more frames the busier the process is. Everything the loop
runs is a short, non-blocking callback: a socket became readable, a timer
came due, or another thread handed over work with :meth:`Reactor.call_soon`.

The thread starts with the first piece of work and ends once it has had
nothing to do for ``idle_s()`` seconds; its selector and wake-up socket pair
go with it, so an idle process holds neither threads nor descriptors.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable, Optional

from .timers import Timer, TimerHeap

__all__ = ["Reactor"]

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class Reactor:
    """A loop over many sockets and timers on one thread; see the module docstring.

    :meth:`call_soon` may be called from any thread; every other method only
    from the loop's own thread (that is, from a callback).
    """

    def __init__(self, idle_s: Callable[[], float], *, clock: Callable[[], float] = time.monotonic,
                 name: str = "tgi-adapter-reader") -> None:
        self.clock = clock
        self._idle_s = idle_s
        self._name = name
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue[Callback] = queue.SimpleQueue()
        self._timers = TimerHeap()
        self._running = False
        self._woken = False
        self._selector: Optional[selectors.BaseSelector] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"<Reactor {self._name} running={self._running} readers={self.readers}>"

    # -- any thread ----------------------------------------------------------------

    def call_soon(self, callback: Callback) -> None:
        """Run ``callback`` on the loop's thread, starting the thread if it is not running."""
        self._commands.put(callback)
        with self._lock:
            if not self._running:
                self._start()
                return
            if self._woken:  # a wake-up is on its way; the loop drains every command after it
                return
            self._woken = True
            wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closing
                pass

    @property
    def running(self) -> bool:
        return self._running

    @property
    def readers(self) -> int:
        """Sockets being watched now."""
        selector = self._selector
        return 0 if selector is None else max(0, len(selector.get_map()) - 1)

    def wait_stopped(self, timeout: Optional[float]) -> bool:
        """Wait until the loop's thread has ended (it ends once idle); True if it has."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)

    # -- the loop's thread ---------------------------------------------------------------

    def add_reader(self, sock: socket.socket, callback: Callback) -> None:
        assert self._selector is not None
        self._selector.register(sock, selectors.EVENT_READ, callback)

    def remove_reader(self, sock: socket.socket) -> None:
        selector = self._selector
        if selector is None:
            return
        try:
            selector.unregister(sock)
        except (KeyError, ValueError):  # not registered, or its descriptor is gone
            pass

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self._timers.add(self.clock() + delay, callback)

    # -- internals ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Under the lock: make the selector and wake-up pair, start the thread."""
        selector = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        selector.register(wake_r, selectors.EVENT_READ, None)
        self._selector, self._wake_r, self._wake_w = selector, wake_r, wake_w
        self._running = True
        self._woken = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = self._selector
        wake_r = self._wake_r
        assert selector is not None and wake_r is not None
        commands = self._commands
        timers = self._timers
        clock = self.clock
        select = selector.select
        while True:
            while True:
                try:
                    command = commands.get_nowait()
                except queue.Empty:
                    break
                _run_guarded(command)
            for callback in timers.pop_due(clock()):
                _run_guarded(callback)
            due = timers.next_due()
            busy = due is not None or len(selector.get_map()) > 1
            if due is not None:
                timeout: Optional[float] = max(0.0, due - clock())
            else:
                timeout = None if busy else self._idle_s()
            ready = select(timeout)
            for key, _mask in ready:
                callback = key.data
                if callback is None:
                    continue  # the wake-up socket: drained below
                _run_guarded(callback)
            # Drain first, then clear the flag: a wake-up byte written after the
            # drain belongs to a command the next turn runs anyway.
            try:
                while wake_r.recv(4096):
                    pass
            except OSError:  # drained (would block)
                pass
            with self._lock:
                self._woken = False
            if not ready and not busy and commands.empty() and self._stop_if_idle():
                return

    def _stop_if_idle(self) -> bool:
        """End the thread if nothing is left to do; under the lock so no command is stranded."""
        with self._lock:
            selector = self._selector
            if selector is None or not self._commands.empty() or len(self._timers) or len(selector.get_map()) > 1:
                return False
            self._running = False
            selector.close()
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()
            self._selector = self._wake_r = self._wake_w = None
            self._idle.notify_all()
        return True


def _run_guarded(callback: Callback) -> None:
    try:
        callback()
    except Exception:  # one stream's bug must not stop the loop every other stream needs
        log.exception("a callback of the shared reader failed")
