"""OpenTelemetry spans for tasks, when ``opentelemetry-api`` is installed (``pip install tgi-adapter[otel]``).

Every task is one CLIENT span "tgi.generate", started at ``submit()`` (or
``generate()``) under the caller's current context and ended exactly once,
when the task's outcome is recorded. Its W3C ``traceparent`` goes to the
engine, which continues the trace. Nothing here runs per token: the span is
touched at submit, at each retry, and at the end, where the "first_token"
event is added with the time the first token arrived.

Without opentelemetry nothing is imported and every entry point returns
``None``; whether it is there is looked up once, at the first adapter (or
host task) that asks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, MutableMapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .__about__ import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from .contract import TaskRequest
    from .errors import WorkerError

__all__ = ["TaskSpan", "available", "tracer_for", "start_task_span", "capture_context", "replica_attempt"]

log = logging.getLogger(__name__)

SPAN_NAME = "tgi.generate"
FIRST_TOKEN_EVENT = "first_token"
RETRY_EVENT = "retry"

_lock = threading.Lock()
_state: Dict[str, Any] = {}  # filled once by _load(): "available", and the modules when they are


def _load() -> bool:
    """Import opentelemetry once per process; False when it is not installed."""
    found = _state.get("available")
    if found is not None:
        return bool(found)
    with _lock:
        if "available" not in _state:
            try:
                from opentelemetry import context, propagate, trace
            except ImportError:
                _state["available"] = False
            else:
                _state.update(context=context, propagate=propagate, trace=trace)
                _state["failover_key"] = context.create_key("tgi_adapter.replicas_tried")
                _state["available"] = True
    return bool(_state["available"])


def available() -> bool:
    """Whether ``opentelemetry-api`` can be imported (checked once)."""
    return _load()


def tracer_for(provider: Optional[TracerProvider] = None) -> Optional[Tracer]:
    """The adapter's tracer from ``provider`` (default: the global one), or None without opentelemetry."""
    if not _load():
        return None
    tracer: Tracer = _state["trace"].get_tracer("tgi_adapter", __version__, tracer_provider=provider)
    return tracer


@functools.lru_cache(maxsize=64)  # one per adapter's URL: no parsing per task
def _server(base_url: str) -> Tuple[Tuple[str, Any], ...]:
    parts = urlsplit(base_url)
    if not parts.hostname:
        return ()
    return (("server.address", parts.hostname), ("server.port", parts.port or (443 if parts.scheme == "https" else 80)))


def start_task_span(
    tracer: Tracer,
    task: TaskRequest,
    *,
    route: str,
    started: Mapping[str, Any],
    labels: Mapping[str, str],
    base_url: str,
) -> Optional[TaskSpan]:
    """Start the task's span under the current context (call in the submitting thread).

    None if the tracer failed: a tracing problem never fails a task.
    """
    attributes: Dict[str, Any] = {
        "gen_ai.system": "tgi",
        "gen_ai.operation.name": "chat" if route == "openai-chat" else "text_completion",
        "gen_ai.request.model": task.model_ref,
        "gen_ai.request.max_tokens": task.max_tokens,
        "tgi.task_id": task.task_id,
        "tgi.correlation_id": started["correlation_id"],
        "tgi.route": route,
        **dict(_server(base_url)),
    }
    if task.seed is not None:
        attributes["gen_ai.request.seed"] = task.seed
    if started.get("model_id"):
        attributes["gen_ai.response.model"] = started["model_id"]
    if started.get("engine_version"):
        attributes["tgi.engine_version"] = started["engine_version"]
    for name in ("pool_id", "replica_id"):
        if labels.get(name):
            attributes[f"tgi.{name}"] = labels[name]
    tried = _state["context"].get_value(_state["failover_key"])
    if tried:
        attributes["tgi.replicas_tried"] = list(tried)
        attributes["tgi.replica_attempt"] = len(tried)
    start_ns = time.time_ns()
    try:
        span = tracer.start_span(
            SPAN_NAME, kind=_state["trace"].SpanKind.CLIENT, attributes=attributes, start_time=start_ns
        )
    except Exception:
        log.debug("task %s: could not start its span", task.task_id, exc_info=True)
        return None
    return TaskSpan(span, start_ns)


class TaskSpan:
    """One task's span: its ``traceparent``, its retries, and its one end."""

    __slots__ = ("span", "_start_ns", "_lock", "_open")

    def __init__(self, span: Span, start_ns: int) -> None:
        self.span = span
        self._start_ns = start_ns
        self._lock = threading.Lock()
        self._open = True

    def __repr__(self) -> str:
        return f"<TaskSpan {SPAN_NAME} {'open' if self._open else 'ended'}>"

    @property
    def ended(self) -> bool:
        return not self._open

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add the span's ``traceparent`` (and the caller's ``baggage``, if any) to ``headers``."""
        try:
            context = _state["trace"].set_span_in_context(self.span)
            _state["propagate"].inject(headers, context=context)
        except Exception:
            log.debug("could not add the trace context to a request", exc_info=True)

    def retry(self, retry: int, delay_s: float, error: WorkerError) -> None:
        """A "retry" event: the ``retry``-th retry starts in ``delay_s`` after ``error``."""
        try:
            span = self.span
            if span.is_recording():
                attributes = {"tgi.retry": retry, "tgi.retry_delay_ms": int(round(delay_s * 1000))}
                span.add_event(RETRY_EVENT, {**attributes, "error.type": error.code.value})
        except Exception:
            log.debug("could not record a retry on a span", exc_info=True)

    def finish(self, outcome: str, stats: Mapping[str, Any]) -> None:
        """End the span with the task's outcome (``"end"``, ``"cancelled"`` or an error code); once.

        ``stats`` is what the task's metrics record holds (``tokens_in``,
        ``tokens_out``, ``latency_first_token_ms``, ``finish_reason``,
        ``error_message``, ``labels``).
        """
        with self._lock:
            if not self._open:
                return
            self._open = False
        span = self.span
        try:
            try:
                if span.is_recording():
                    self._describe(span, outcome, stats)
            finally:
                span.end()
        except Exception:  # the task's outcome is recorded already; a tracer's failure stays here
            log.debug("could not end a task's span", exc_info=True)

    def abandon(self) -> None:
        """End the span of a stream dropped unfinished (its task was cancelled)."""
        self.finish("cancelled", {})

    def _describe(self, span: Span, outcome: str, stats: Mapping[str, Any]) -> None:
        attributes: Dict[str, Any] = {}
        for key, name in (("tokens_in", "gen_ai.usage.input_tokens"), ("tokens_out", "gen_ai.usage.output_tokens")):
            value = stats.get(key)
            if isinstance(value, int):
                attributes[name] = value
        labels = stats.get("labels") or {}
        version = labels.get("engine_version")
        if version and version != "unknown":
            attributes["tgi.engine_version"] = version
        first_ms = stats.get("latency_first_token_ms")
        if isinstance(first_ms, int):
            # The read loop is left alone: the event gets the moment the first
            # token frame arrived, written here, once, from the task's record.
            at = min(self._start_ns + max(first_ms, 0) * 1_000_000, time.time_ns())
            span.add_event(FIRST_TOKEN_EVENT, {"tgi.latency_first_token_ms": first_ms}, timestamp=at)
        trace = _state["trace"]
        if outcome == "cancelled":
            attributes["gen_ai.response.finish_reasons"] = ["cancelled"]
        elif outcome == "end":
            reason = stats.get("finish_reason")
            if isinstance(reason, str):
                attributes["gen_ai.response.finish_reasons"] = [reason]
        else:
            attributes["error.type"] = outcome
            message = stats.get("error_message")
            span.set_status(trace.Status(trace.StatusCode.ERROR, message if isinstance(message, str) else outcome))
        span.set_attributes(attributes)


def capture_context() -> Optional[Context]:
    """The caller's current context (for work started later in another thread), or None without opentelemetry."""
    if not _load():
        return None
    context: Context = _state["context"].get_current()
    return context


@contextlib.contextmanager
def replica_attempt(captured: Optional[Context], tried: Sequence[str]) -> Iterator[None]:
    """Make ``captured`` current, marked with the replicas tried so far, while a replica's task is submitted.

    The replica adapter's span is then a child of the host caller's context
    and carries ``tgi.replicas_tried`` and ``tgi.replica_attempt``.
    """
    if captured is None:
        yield
        return
    context = _state["context"]
    token = context.attach(context.set_value(_state["failover_key"], tuple(tried), captured))
    try:
        yield
    finally:
        context.detach(token)
