"""``TgiHttpAdapter``: the worker contract over one TGI server's HTTP API."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, MutableMapping, Optional, Set, Tuple
from urllib.parse import urlsplit, urlunsplit

import requests

from . import __about__, runtime, tracing
from .attempts import Attempts, error_for_exception, record_failure, record_whole
from .cassette import Recorder, Tape
from .config import AdapterConfig, config_from_env
from .contract import EngineInfo, TaskLike, TaskRequest, WorkerAdapter, WorkerHealth, WorkerProps, as_task
from .errors import InvalidParamsError, PoolUnavailableError, WorkerError
from .events import cancelled_end
from .frames import FrameMapper, mapper_for_route
from .mapping import (
    build_request,
    check_fit,
    effective_sampling,
    engine_info_from_json,
    error_for,
    error_from_status,
    parse_prometheus,
    slots_free_from_metrics,
)
from .metrics import MetricsRegistry, TaskRecord
from .oneshot import call_once
from .reader import StreamReader
from .redact import redact_text, short_hash
from .retry import RetryPolicy
from .stream import StreamChannel, TokenStream
from .transport import Request, SendPlan, is_timeout, make_session

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["TgiHttpAdapter"]

log = logging.getLogger(__name__)

_NO_RETRY = RetryPolicy(attempts=1)

# After /info could not be fetched, submit() goes on without the fit check;
# it does not try again for this long, so a down engine costs one connect.
_INFO_RETRY_S = 1.0
# adapter.close() waits this long in all for the readers of the streams it cancelled.
_CLOSE_WAIT_S = 2.0


def _clean_base_url(base_url: str) -> Tuple[str, str]:
    """``(url for requests, url for humans)``; raises ``ValueError`` if unusable."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise ValueError("base_url must be a URL such as http://127.0.0.1:3000")
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http:// or https:// URL with a host, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError("base_url cannot have a query or a fragment")
    path = parts.path.rstrip("/")
    url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    shown = url
    if "@" in parts.netloc:
        shown = urlunsplit((parts.scheme, "[credentials]@" + parts.netloc.rsplit("@", 1)[1], path, "", ""))
    return url, shown


class TgiHttpAdapter(WorkerAdapter):
    """Drives one TGI server (or a gateway in front of it) through the worker contract.

    :param base_url: the server's URL; a path prefix is kept
        (``https://gateway/tgi/replica-3``).
    :param token: sent as ``Authorization: Bearer …`` on every request; never
        read from ambient Hugging Face settings, shown only as a fingerprint.
    :param config: an :class:`~tgi_adapter.AdapterConfig`.
    :param session: a ``requests.Session`` to use (your proxies, adapters and
        certificates); by default the adapter makes its own.
    :param metrics: a :class:`~tgi_adapter.metrics.MetricsRegistry` to record
        into (shared between adapters if you like); by default a private one.
    :param clock: monotonic clock (tests inject one).
    :param rng: the jitter source, returning floats in [0, 1).
    :param sleep: how retries wait (tests inject a recorder); by default a
        stream waits on a timer of the shared reader, and a blocking call in
        a wait that ``cancel()`` interrupts.
    :param tracer_provider: the OpenTelemetry ``TracerProvider`` for task
        spans (default: the global one); see ``AdapterConfig.tracing``.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        config: Optional[AdapterConfig] = None,
        session: Optional[requests.Session] = None,
        *,
        metrics: Optional[MetricsRegistry] = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Optional[Callable[[float], None]] = None,
        tracer_provider: Optional[TracerProvider] = None,
    ) -> None:
        self.base_url, self._shown_url = _clean_base_url(base_url)
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        if config is not None and not isinstance(config, AdapterConfig):
            raise ValueError(f"config must be an AdapterConfig, got {type(config).__name__}")
        self.config = config or AdapterConfig()
        self._token = token
        self._secrets = (token,) + tuple(
            v for k, v in self.config.headers.items() if k.lower() in ("authorization", "x-api-key")
        )
        self._recorder: Optional[Recorder] = None
        if self.config.record is not None:
            password = urlsplit(self.base_url).password
            self._recorder = Recorder(
                self.config.record, base_url=self.base_url, secrets=self._secrets + (password,), clock=clock
            )
        self._owns_session = session is None
        self._session = session if session is not None else make_session(self.config.pool_maxsize)
        self._headers: Dict[str, str] = {
            "User-Agent": f"tgi-adapter/{__about__.__version__}",
            "Content-Type": "application/json",
            **self.config.headers,
        }
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._plan = SendPlan(self._session, self._headers, self.config.verify, self.config.cert)
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        self._labels = {
            "engine": "tgi",
            "engine_version": "unknown",
            "pool_id": self.config.pool_id or "",
            "replica_id": self.config.replica_id or "",
        }
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        self._tracer = tracing.tracer_for(tracer_provider) if self.config.tracing else None
        self._lock = threading.Lock()
        self._streams: weakref.WeakValueDictionary[str, TokenStream] = weakref.WeakValueDictionary()
        self._calls: Dict[str, StreamChannel] = {}
        #: Channels whose reader is not done yet (close() waits for them).
        self._readers: Set[StreamChannel] = set()
        self._info: Optional[EngineInfo] = None
        self._info_at = 0.0
        self._info_failed_at: Optional[float] = None
        self._info_stale = False
        self._closed = False
        runtime.hold()
        # Let go of the shared threads on close(), or when the adapter is collected unclosed.
        self._held = weakref.finalize(self, runtime.release)

    @classmethod
    def from_env(
        cls,
        env: Optional[Mapping[str, str]] = None,
        *,
        config: Optional[AdapterConfig] = None,
        **kwargs: Any,
    ) -> TgiHttpAdapter:
        """An adapter configured from ``TGI_ADAPTER_*`` environment variables.

        ``TGI_ADAPTER_URL`` is required; ``TGI_ADAPTER_TOKEN`` is the only
        source of a token besides the constructor (no ambient Hugging Face token).
        """
        env = os.environ if env is None else env
        url = env.get("TGI_ADAPTER_URL")
        if not url:
            raise ValueError("TGI_ADAPTER_URL is not set (the engine's base URL)")
        token = env.get("TGI_ADAPTER_TOKEN") or None
        return cls(url, token=token, config=config_from_env(env, config), **kwargs)

    def __repr__(self) -> str:
        return (
            f"TgiHttpAdapter({self._shown_url!r}, token={short_hash(self._token)}, "
            f"route={self.config.route!r}, pool_id={self.config.pool_id!r}, replica_id={self.config.replica_id!r})"
        )

    @property
    def labels(self) -> Dict[str, str]:
        """The metric labels of this adapter (``engine``, ``engine_version``, ``pool_id``, ``replica_id``)."""
        return dict(self._labels)

    def set_placement(self, pool_id: Optional[str], replica_id: Optional[str]) -> None:
        """Label this adapter's logs and metrics with where the orchestrator placed it.

        ``AdapterHost.bind`` calls this; tasks already in flight keep their labels.
        """
        self._labels["pool_id"] = pool_id or ""
        self._labels["replica_id"] = replica_id or ""

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Cancel every task in flight, wait briefly for their readers, close the connections.

        When it returns, every cancelled stream's socket is closed and its task
        counted in the metrics (unless a reader is stuck past the brief wait).
        The session is closed only if the adapter made it.
        """
        with self._lock:
            self._closed = True
            streams = list(self._streams.values())
            calls = list(self._calls.values())
            readers = list(self._readers)
        for stream in streams:
            stream.close()
        for channel in calls:
            channel.cancel()
        give_up = time.monotonic() + _CLOSE_WAIT_S
        for channel in readers:
            channel.cancel()
            channel.reader_done.wait(max(0.0, give_up - time.monotonic()))
        if self._owns_session:
            self._session.close()
        self._held()

    def __enter__(self) -> TgiHttpAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control plane ---------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _tape(self, method: str, path: str, body: Optional[bytes] = None) -> Optional[Tape]:
        recorder = self._recorder
        return None if recorder is None else recorder.begin(method, path, self._headers, body)

    def _control(
        self, path: str, *, retry: bool = True, total: Optional[float] = None
    ) -> Tuple[int, Mapping[str, str], bytes]:
        """GET ``path`` within the control timeout (retries included)."""
        timeouts = self.config.timeouts
        deadline = self._clock() + (timeouts.control if total is None else total)
        result: Dict[str, Any] = {}

        def attempt() -> Optional[WorkerError]:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return error_for("connect_failed", f"no answer to {path} within Timeouts.control", retriable=False)
            tape = self._tape("GET", path)
            try:
                response = self._session.get(
                    self._url(path),
                    headers=self._headers,
                    timeout=(min(timeouts.connect, remaining), remaining),
                    verify=self.config.verify,
                    cert=self.config.cert,
                    allow_redirects=False,
                )
            except Exception as exc:
                record_failure(tape, exc)
                if is_timeout(exc):
                    return error_for("connect_failed", f"no answer to {path} within Timeouts.control")
                error = error_for_exception(exc, phase="connect", secrets=self._secrets)
                if error.retriable:
                    self._info_stale = True
                return error
            record_whole(tape, response)
            result["response"] = (response.status_code, response.headers, response.content)
            return None

        attempts = Attempts(
            self.config.retry if retry else _NO_RETRY,
            deadline=deadline,
            clock=self._clock,
            rng=self._rng,
            wait=self._waiter(None),
            label=f"GET {path}",
        )
        error = attempts.run(attempt)
        if error is not None:
            raise error
        status, headers, body = result["response"]
        return status, headers, body

    def health(self) -> WorkerHealth:
        """``/health``: 200 → live and ready; 503 → live, not ready; no answer → neither.

        Never raises; returns within ``Timeouts.control``.
        """
        try:
            status, _headers, _body = self._control("/health", retry=False)
        except WorkerError as error:
            log.debug("health: %s", error.message)
            result = WorkerHealth(live=False, ready=False)
        else:
            result = WorkerHealth(live=True, ready=status == 200)
        self.metrics.set_health(self._labels, result.live, result.ready)
        return result

    def engine_info(self, refresh: bool = False) -> EngineInfo:
        """``/info`` as an :class:`~tgi_adapter.EngineInfo`, cached for ``AdapterConfig.info_ttl``.

        Refetched after a connection to the engine failed (it may have been
        restarted with another version). Raises ``WorkerError``.
        """
        now = self._clock()
        info = self._info
        if not refresh and info is not None and not self._info_stale and now - self._info_at < self.config.info_ttl:
            return info
        status, headers, body = self._control("/info")
        if status != 200:
            raise error_from_status(status, body, headers.get("content-type", ""), secrets=self._secrets)
        try:
            info = engine_info_from_json(json.loads(body))
        except (ValueError, RecursionError) as exc:
            raise error_for("malformed", f"/info: {exc}") from None
        with self._lock:
            self._info = info
            self._info_at = self._clock()
            self._info_stale = False
            self._info_failed_at = None
        self._labels["engine_version"] = info.engine_version
        return info

    def engine_version(self) -> str:
        """``version`` plus build id (``"3.3.6+sha.1a2b3c4"``); same for every replica of a deployment."""
        return self.engine_info().engine_version

    def props(self) -> WorkerProps:
        """Slots and limits: ``slots_free`` from ``/metrics``, else from the adapter's own count."""
        info = self.engine_info()
        in_flight = self.in_flight
        slots_total = info.max_concurrent_requests
        slots_free: Optional[int] = None
        source = "unknown"
        try:
            status, _headers, body = self._control("/metrics", retry=False)
            if status == 200:
                slots_free = slots_free_from_metrics(
                    parse_prometheus(body.decode("utf-8", "replace")), slots_total
                )
                if slots_free is not None:
                    source = "metrics"
        except WorkerError as error:
            log.debug("props: /metrics unavailable: %s", error.message)
        if slots_free is None and slots_total is not None:
            slots_free = max(0, slots_total - in_flight)
            source = "adapter"
        return WorkerProps(
            slots_total=slots_total,
            slots_free=slots_free,
            max_total_tokens=info.max_total_tokens,
            max_input_tokens=info.max_input_tokens,
            in_flight=in_flight,
            slots_source=source,
            engine_version=info.engine_version,
            model_id=info.model_id,
        )

    def metrics_text(self) -> str:
        """The engine's own ``/metrics`` (Prometheus text). Raises ``WorkerError``."""
        status, headers, body = self._control("/metrics")
        if status != 200:
            raise error_from_status(status, body, headers.get("content-type", ""), secrets=self._secrets)
        return body.decode("utf-8", "replace")

    @property
    def in_flight(self) -> int:
        """Tasks submitted through this adapter whose terminal event was not yet taken."""
        with self._lock:
            return len(self._streams) + len(self._calls)

    # -- tasks -------------------------------------------------------------------------

    def _info_for_task(self) -> Optional[EngineInfo]:
        """The engine info for the fit check, or None (go on without) if unavailable."""
        now = self._clock()
        info = self._info
        if info is not None and not self._info_stale and now - self._info_at < self.config.info_ttl:
            return info
        failed_at = self._info_failed_at
        if failed_at is not None and now - failed_at < _INFO_RETRY_S:
            return info
        try:
            return self.engine_info(refresh=True)
        except WorkerError as error:
            log.debug("no /info for the fit check: %s", error.message)
            self._info_failed_at = now
            return info

    def _prepare(
        self, task: TaskLike, correlation_id: Optional[str], *, stream: bool
    ) -> Tuple[TaskRequest, Request, Dict[str, Any], Optional[int], Optional[tracing.TaskSpan]]:
        if self._closed:
            raise PoolUnavailableError("the adapter is closed", retriable=False, advice="make a new adapter")
        task = as_task(task)
        if correlation_id is not None and (not isinstance(correlation_id, str) or not correlation_id):
            raise InvalidParamsError("invalid 'correlation_id': expected a non-empty string")
        with self._lock:
            if task.task_id in self._streams or task.task_id in self._calls:
                raise InvalidParamsError(
                    f"invalid task field 'task_id': {task.task_id!r} is already in flight on this adapter",
                    advice="use a new task_id per task",
                )
        info = self._info_for_task()
        check_fit(task, info, self._prompt_tokens(task, info))
        route = self.config.route
        path, body = build_request(task, route=route, stream=stream, info=info, model=self.config.model)
        cid = correlation_id or str(uuid.uuid4())
        payload = json.dumps(body).encode("utf-8")
        started = {
            "engine": "tgi",
            "engine_version": info.engine_version if info is not None else None,
            "model_id": info.model_id if info is not None else None,
            "model_sha": info.model_sha if info is not None else None,
            "task_id": task.task_id,
            "seed": task.seed,
            "determinism": task.determinism,
            "sampler_profile_version": task.sampler_profile_version,
            "correlation_id": cid,
        }
        headers = {"X-Correlation-Id": cid}
        span = None
        if self._tracer is not None:
            span = tracing.start_task_span(
                self._tracer, task, route=route, started=started, labels=self._labels, base_url=self.base_url
            )
            if span is not None:
                span.inject(headers)
        request = self._plan.post(self._url(path), payload, headers, self._secrets, self._recorder)
        sampled_seed = task.seed if effective_sampling(task)["do_sample"] else None
        return task, request, started, sampled_seed, span

    def _prompt_tokens(self, task: TaskRequest, info: Optional[EngineInfo]) -> Optional[int]:
        if not self.config.tokenize_check or task.prompt is None or info is None:
            return None
        body = json.dumps({"inputs": task.prompt}).encode("utf-8")
        tape = self._tape("POST", "/tokenize", body)
        try:
            response = self._session.post(
                self._url("/tokenize"),
                data=body,
                headers=self._headers,
                timeout=(self.config.timeouts.connect, self.config.timeouts.control),
                verify=self.config.verify,
                cert=self.config.cert,
                allow_redirects=False,
            )
            record_whole(tape, response)
            tokens = response.json() if response.status_code == 200 else None
        except (requests.RequestException, ValueError) as exc:
            record_failure(tape, exc)  # a no-op once the answer was recorded
            log.debug("tokenize check skipped: %s", redact_text(str(exc), self._secrets))
            return None
        return len(tokens) if isinstance(tokens, list) else None

    def submit(self, task: TaskLike, correlation_id: Optional[str] = None) -> TokenStream:
        """Start ``task``; returns its :class:`~tgi_adapter.TokenStream`.

        Validation and the fit policy run here and raise ``WorkerError``
        (``INVALID_PARAMS``, ``POOL_UNAVAILABLE``); everything on the wire
        arrives as events. ``correlation_id`` (or a new UUID) is sent as
        ``X-Correlation-Id`` and carried in ``started``.
        """
        task, request, started, sampled_seed, span = self._prepare(task, correlation_id, stream=True)
        t_submit = self._clock()
        deadline = t_submit + task.deadline_ms / 1000.0
        channel = self._channel_for(task, started, span)
        route = self.config.route
        secrets = self._secrets

        def make_mapper() -> FrameMapper:
            return mapper_for_route(route, started, t_submit=t_submit, secrets=secrets, sampled_seed=sampled_seed)

        reader = StreamReader(
            request,
            channel,
            make_mapper,
            timeouts=self.config.timeouts,
            retry=self.config.retry,
            deadline=deadline,
            max_frame_bytes=self.config.max_frame_bytes,
            clock=self._clock,
            rng=self._rng,
            sleep=self._sleep,
            on_connect_failure=self._mark_info_stale,
            on_retry=span.retry if span is not None else None,
            reactor=runtime.reactor(),
            workers=runtime.workers(),
        )
        channel.on_settled = self._stream_settled
        stream = TokenStream(
            task.task_id,
            channel,
            started_data=started,
            deadline=deadline,
            on_done=self._stream_done,
            clock=self._clock,
        )
        weakref.finalize(stream, channel.abandon).atexit = False  # counts it, and so ends its span
        with self._lock:
            self._streams[task.task_id] = stream
            self._readers.add(channel)
        self.metrics.task_started(channel.stats["labels"])
        log.debug("task %s: submitted (correlation id %s)", task.task_id, started["correlation_id"])
        reader.start()
        return stream

    def _channel_for(
        self, task: TaskRequest, started: Mapping[str, Any], span: Optional[tracing.TaskSpan]
    ) -> StreamChannel:
        """A task's channel, its stats seeded with what its record will carry."""
        channel = StreamChannel(task.task_id)
        channel.stats.update(
            session_id=task.session_id, correlation_id=started["correlation_id"], labels=dict(self._labels), span=span
        )
        return channel

    def _waiter(self, channel: Optional[StreamChannel]) -> Callable[[float], bool]:
        """How a retry waits: the injected sleep, or a wait that cancel interrupts."""
        sleep = self._sleep
        if sleep is not None:

            def wait(seconds: float) -> bool:
                sleep(seconds)
                return channel is not None and channel.cancelled

            return wait
        if channel is not None:
            return channel.abort.wait

        def plain(seconds: float) -> bool:
            time.sleep(seconds)
            return False

        return plain

    def _mark_info_stale(self) -> None:
        self._info_stale = True

    def _stream_done(self, stream: TokenStream) -> None:
        """The consumer took the terminal event (or closed the stream): forget the task."""
        with self._lock:
            if self._streams.get(stream.task_id) is stream:
                del self._streams[stream.task_id]

    def _stream_settled(self, channel: StreamChannel) -> None:
        """Both the consumer and the reader are done with a stream: count what happened."""
        with self._lock:
            self._readers.discard(channel)
        stats = channel.stats
        outcome = str(stats.get("outcome", "end")) if channel.natural_end else "cancelled"
        self._record_task(channel.task_id, outcome, stats)

    def _record_task(self, task_id: str, outcome: str, stats: MutableMapping[str, Any]) -> None:
        labels = stats.get("labels") or self._labels
        record = TaskRecord(
            job_id=task_id,
            session_id=stats.get("session_id"),
            engine="tgi",
            engine_version=labels["engine_version"],
            pool_id=labels["pool_id"] or None,
            replica_id=labels["replica_id"] or None,
            tokens_in=stats.get("tokens_in"),
            tokens_out=stats.get("tokens_out"),
            decode_time_ms=stats.get("decode_ms"),
            latency_first_token_ms=stats.get("latency_first_token_ms"),
            outcome=outcome,
            retries=int(stats.get("retries", 0)),
            correlation_id=stats.get("correlation_id"),
        )
        self.metrics.task_finished(labels, record)
        span = stats.get("span")
        if span is not None:
            span.finish(outcome, stats)

    def cancel(self, task_id: str) -> None:
        """Cancel a task: best effort, idempotent; an unknown id is fine."""
        with self._lock:
            stream = self._streams.get(task_id)
            channel = self._calls.get(task_id)
        if stream is not None:
            log.debug("task %s: cancel", task_id)
            stream.cancel()
        if channel is not None:
            channel.cancel()

    def generate(self, task: TaskLike, correlation_id: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
        """Run ``task`` without streaming: ``(text, end_data)``, or raise ``WorkerError``.

        One request to the route's non-stream form, with the same validation,
        fit policy, retries and error mapping as :meth:`submit`; the task's
        deadline bounds the whole call. ``cancel(task_id)`` from another
        thread ends it with ``finish_reason`` "cancelled".
        """
        task, request, started, sampled_seed, span = self._prepare(task, correlation_id, stream=False)
        t_submit = self._clock()
        deadline = t_submit + task.deadline_ms / 1000.0
        channel = self._channel_for(task, started, span)
        with self._lock:
            self._calls[task.task_id] = channel
        self.metrics.task_started(channel.stats["labels"])
        result: Dict[str, Any] = {}

        def attempt() -> Optional[WorkerError]:
            outcome = call_once(
                request,
                channel,
                deadline=deadline,
                connect_timeout=self.config.timeouts.connect,
                route=self.config.route,
                engine_version=started["engine_version"],
                sampled_seed=sampled_seed,
                clock=self._clock,
                secrets=self._secrets,
                on_connect_failure=self._mark_info_stale,
            )
            if isinstance(outcome, tuple):
                result["answer"] = outcome
                return None
            return outcome

        attempts = Attempts(
            self.config.retry,
            deadline=deadline,
            clock=self._clock,
            rng=self._rng,
            wait=self._waiter(channel),
            label=f"task {task.task_id}",
            on_retry=span.retry if span is not None else None,
        )
        try:
            error = attempts.run(attempt)
        except BaseException:  # a bug, or KeyboardInterrupt: the task still ends (metrics, span)
            self._record_task(task.task_id, "INTERNAL", channel.stats)
            raise
        finally:
            with self._lock:
                self._calls.pop(task.task_id, None)
        channel.stats["retries"] = attempts.retries
        if channel.cancelled:
            self._record_task(task.task_id, "cancelled", channel.stats)
            return "", cancelled_end(started["engine_version"])
        if error is not None:
            channel.stats["error_message"] = error.full_message
            self._record_task(task.task_id, error.code.value, channel.stats)
            raise error
        text, end = result["answer"]
        channel.stats.update(
            tokens_in=end["tokens_in"], tokens_out=end["tokens_out"], decode_ms=end["decode_ms"],
            finish_reason=end["finish_reason"],
        )
        self._record_task(task.task_id, "end", channel.stats)
        return text, end
