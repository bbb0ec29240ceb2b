"""``MockAdapter``: the worker contract with scripted answers, for orchestrator tests.

It needs no server and no sockets, yet its streams are real
:class:`~tgi_adapter.TokenStream` objects fed by a thread, so cancel, close,
the event order and the error events behave exactly as they do with
:class:`~tgi_adapter.TgiHttpAdapter`.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

from ..contract import (
    TaskLike,
    TaskRequest,
    TokenEvent,
    WorkerAdapter,
    WorkerHealth,
    WorkerProps,
    as_task,
    make_event,
)
from ..errors import ErrorKind, InvalidParamsError, WorkerError
from ..stream import StreamChannel, TokenStream

__all__ = ["MockAdapter", "MockFault"]

_FAULT_KINDS = ("error", "raise", "stall")


@dataclass(frozen=True)
class MockFault:
    """A scripted failure for the next task(s).

    :param kind: ``"error"``: the stream ends with an ``error`` event of
        ``code`` after ``at_token`` tokens; ``"raise"``: ``submit()`` raises the
        ``WorkerError``; ``"stall"``: after ``at_token`` tokens nothing more
        comes until the task is cancelled or its deadline passes (then
        ``DEADLINE_UNMET``).
    :param times: how many tasks it applies to.
    """

    kind: str
    code: str = "WORKER_RESET"
    at_token: int = 0
    retriable: Optional[bool] = None
    retry_after_ms: Optional[int] = None
    message: str = "injected fault"
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"MockFault.kind must be one of {', '.join(_FAULT_KINDS)}, got {self.kind!r}")
        ErrorKind(self.code)  # raises ValueError for an unknown code
        if self.at_token < 0 or self.times < 1:
            raise ValueError("MockFault.at_token must be >= 0 and times >= 1")

    def error(self) -> WorkerError:
        return WorkerError.from_code(
            self.code, self.message, retriable=self.retriable, retry_after_ms=self.retry_after_ms
        )


class MockAdapter(WorkerAdapter):
    """A scripted engine behind the worker contract.

    :param text: what every task generates (cut to its ``max_tokens``; a
        "token" is a word with its leading space).
    :param pace_s: seconds between tokens.
    :param faults: :class:`MockFault` values applied to the next tasks, in order.

    ``live``, ``ready`` and ``slots_total`` are plain attributes you may change;
    ``submitted`` and ``cancelled`` record what the orchestrator did.
    """

    def __init__(
        self,
        *,
        text: str = "Hello from the mock engine: every word is one token.",
        engine_version: str = "mock-1.0.0",
        model_id: str = "mock/model",
        slots_total: int = 4,
        live: bool = True,
        ready: bool = True,
        pace_s: float = 0.0,
        faults: Tuple[MockFault, ...] = (),
    ) -> None:
        self.text = text
        self._engine_version = engine_version
        self.model_id = model_id
        self.slots_total = slots_total
        self.live = live
        self.ready = ready
        self.pace_s = pace_s
        self.submitted: List[TaskRequest] = []
        self.cancelled: List[str] = []
        self._faults: Deque[List[Any]] = deque([fault, fault.times] for fault in faults)
        self._lock = threading.Lock()
        self._streams: Dict[str, TokenStream] = {}

    def inject(self, fault: MockFault) -> None:
        """Apply ``fault`` to the next task(s)."""
        with self._lock:
            self._faults.append([fault, fault.times])

    def _next_fault(self) -> Optional[MockFault]:
        with self._lock:
            if not self._faults:
                return None
            entry = self._faults[0]
            entry[1] -= 1
            if entry[1] <= 0:
                self._faults.popleft()
            fault: MockFault = entry[0]
            return fault

    # -- the contract -------------------------------------------------------------

    def health(self) -> WorkerHealth:
        return WorkerHealth(live=self.live, ready=self.live and self.ready)

    def props(self) -> WorkerProps:
        with self._lock:
            in_flight = len(self._streams)
        return WorkerProps(
            slots_total=self.slots_total,
            slots_free=max(0, self.slots_total - in_flight),
            in_flight=in_flight,
            slots_source="adapter",
            engine_version=self._engine_version,
            model_id=self.model_id,
        )

    def engine_version(self) -> str:
        return self._engine_version

    def submit(self, task: TaskLike, correlation_id: Optional[str] = None) -> TokenStream:
        task = as_task(task)
        with self._lock:
            if task.task_id in self._streams:
                raise InvalidParamsError(f"invalid task field 'task_id': {task.task_id!r} is already in flight")
        fault = self._next_fault()
        if fault is not None and fault.kind == "raise":
            raise fault.error()
        self.submitted.append(task)
        started = {
            "engine": "tgi",
            "engine_version": self._engine_version,
            "model_id": self.model_id,
            "model_sha": None,
            "task_id": task.task_id,
            "seed": task.seed,
            "determinism": task.determinism,
            "sampler_profile_version": task.sampler_profile_version,
            "correlation_id": correlation_id or str(uuid.uuid4()),
        }
        deadline = time.monotonic() + task.deadline_ms / 1000.0
        channel = StreamChannel(task.task_id)
        thread = threading.Thread(
            target=self._produce,
            args=(task, channel, started, fault, deadline),
            name=f"mock-stream-{task.task_id}",
            daemon=True,
        )
        stream = TokenStream(task.task_id, channel, started_data=started, deadline=deadline, on_done=self._done)
        with self._lock:
            self._streams[task.task_id] = stream
        thread.start()
        return stream

    def cancel(self, task_id: str) -> None:
        with self._lock:
            stream = self._streams.get(task_id)
        if stream is not None:
            self.cancelled.append(task_id)
            stream.cancel()

    def generate(self, task: TaskLike, correlation_id: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
        """The blocking form: ``(text, end_data)`` or raise ``WorkerError``."""
        with self.submit(task, correlation_id) as stream:
            return stream.collect()

    def close(self) -> None:
        """Cancel everything in flight."""
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.close()

    # -- the scripted engine ----------------------------------------------------------

    def _done(self, stream: TokenStream) -> None:
        with self._lock:
            if self._streams.get(stream.task_id) is stream:
                del self._streams[stream.task_id]

    def _produce(
        self,
        task: TaskRequest,
        channel: StreamChannel,
        started: Dict[str, Any],
        fault: Optional[MockFault],
        deadline: float,
    ) -> None:
        try:
            self._script(task, channel, started, fault, deadline)
        finally:
            channel.reader_finished()

    def _script(
        self,
        task: TaskRequest,
        channel: StreamChannel,
        started: Dict[str, Any],
        fault: Optional[MockFault],
        deadline: float,
    ) -> None:
        pieces = re.findall(r"\s*\S+", self.text)[: task.max_tokens]
        finish = "length" if len(pieces) == task.max_tokens else "eos_token"
        t0 = time.monotonic()
        out: List[TokenEvent] = []
        for i, piece in enumerate(pieces):
            if fault is not None and i == fault.at_token:
                break
            if i == 0:
                out.append(make_event("started", started))
            out.append(make_event("token", {"t": piece, "i": i}))
            if self.pace_s > 0:
                channel.put(out)
                out = []
                if channel.abort.wait(self.pace_s):
                    return
        if fault is not None and fault.kind == "error" and fault.at_token <= len(pieces):
            channel.put(out + [fault.error().to_event()])
            return
        if fault is not None and fault.kind == "stall" and fault.at_token <= len(pieces):
            channel.put(out)
            if not channel.abort.wait(max(0.0, deadline - time.monotonic())):
                channel.put([WorkerError.from_code("DEADLINE_UNMET", "the mock engine stalled").to_event()])
            return
        if not pieces:
            out.append(make_event("started", started))
        decode_ms = int((time.monotonic() - t0) * 1000)
        out.append(make_event("metrics", {"latency_first_token_ms": 0, "latency_decode_ms": decode_ms,
                                          "tokens_out": len(pieces)}))
        out.append(
            make_event(
                "end",
                {
                    "tokens_out": len(pieces),
                    "decode_ms": decode_ms,
                    "finish_reason": finish,
                    "tokens_in": len(re.findall(r"\S+", task.prompt or "")),
                    "seed": task.seed,
                    "engine_version": self._engine_version,
                },
            )
        )
        channel.put(out)
