"""``verify_determinism``: send the probes of a determinism check and compare what came back.

The check first asks every replica what it runs (``engine_version`` and
``model_sha``); replicas that differ there are incomparable and get no
generation request at all. Then each replica runs every prompt ``repeats``
times in both modes, one probe at a time, so an idle probe has nothing of
ours beside it; replicas run side by side, one thread each (at most
:data:`MAX_PARALLEL`). A run *under load* first starts ``under_load`` long
streams on the replica, waits for their ``started``, sends the probe, checks
that they outlasted it, and cancels them. The comparison rules live in
:mod:`tgi_adapter.determinism`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import uuid
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar, Union

from .adapter import TgiHttpAdapter
from .contract import U64_MAX, EventStream, SamplingParams, TaskRequest, WorkerAdapter
from .determinism import (
    MODES,
    DeterminismReport,
    Token,
    compare_runs,
    identity_mismatch,
    planned_comparisons,
    run_label,
    verdict_of,
)
from .errors import DeadlineUnmetError, InternalError, WorkerError

__all__ = ["DEFAULT_PROMPTS", "MAX_PARALLEL", "verify_determinism"]

log = logging.getLogger(__name__)

#: Used when no prompts are given: short and long answers, code, numbers, non-ASCII text.
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List the first ten prime numbers, separated by commas:",
    "Traduis en français : « The weather is lovely today, so we will walk to the lake. »",
)
#: Replicas probed at the same time, at most.
MAX_PARALLEL = 8
_LOAD_PROMPTS = (
    "Tell a long story about a lighthouse keeper and a storm.",
    "Describe, step by step and at length, how a bridge is built.",
    "Write a long letter from a sailor to a friend at home.",
    "Explain in detail how a compiler turns source code into machine code.",
)
# Load streams are this many times longer than a probe; when the engine still
# finishes one before the probe, the run is repeated with longer ones.
_LOAD_FACTOR = 8
_LOAD_MIN_TOKENS = 256
_LOAD_GROWTH = 4
_LOAD_ATTEMPTS = 3
# Room left in the engine's max_total_tokens for a load stream's prompt.
_LOAD_PROMPT_ROOM = 64

Replicas = Union[Mapping[str, WorkerAdapter], Sequence[WorkerAdapter]]
#: One replica's runs: ``(prompt, mode, repeat, under_load) → tokens``.
_Runs = Dict[Tuple[str, str, int, bool], List[Token]]
R = TypeVar("R")
# How long a load stream's reader may take to see its cancel (it is immediate
# with this library's streams; a user's adapter gets this much grace).
_LOAD_JOIN_S = 10.0


class _Stopped(Exception):
    """Another replica failed: this one stops without an error of its own."""


class _Check:
    """What the replicas' threads share: the settings, the deadline, the open streams."""

    def __init__(self, prompts: Sequence[str], max_tokens: int, seed: int, repeats: int, under_load: int,
                 timeout_s: float, clock: Callable[[], float]) -> None:
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.seed = seed
        self.repeats = repeats
        self.under_load = under_load
        self.timeout_s = timeout_s
        self.clock = clock
        self.deadline = clock() + timeout_s
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._open: Set[EventStream] = set()
        self._ids = uuid.uuid4().hex[:8]
        self._count = 0

    def task(self, prompt: str, max_tokens: int, mode: Optional[str], ctx: int) -> TaskRequest:
        """A probe (``mode`` given) or a load stream's task, with what is left of the deadline."""
        with self._lock:
            self._count += 1
            task_id = f"determinism-{self._ids}-{self._count}"
        remaining_ms = int((self.deadline - self.clock()) * 1000)
        if remaining_ms < 1:
            raise self.late()
        return TaskRequest(
            task_id=task_id, session_id=f"determinism-{self._ids}", workload="completion",
            model_ref="determinism-check", engine="tgi", ctx=ctx, priority="batch", max_tokens=max_tokens,
            deadline_ms=remaining_ms, prompt=prompt, seed=self.seed,
            determinism="strict" if mode == "strict" else "best_effort",
            sampling=SamplingParams(do_sample=True) if mode == "seeded" else None,
        )

    def submit(self, adapter: WorkerAdapter, task: TaskRequest) -> EventStream:
        if self.stop.is_set():
            raise _Stopped
        stream = adapter.submit(task)
        with self._lock:
            self._open.add(stream)
        if self.stop.is_set():  # stopped while submitting: cancel_all() may have missed it
            stream.cancel()
        return stream

    def release(self, stream: EventStream) -> None:
        stream.close()
        with self._lock:
            self._open.discard(stream)

    def cancel_all(self) -> None:
        self.stop.set()
        with self._lock:
            streams = list(self._open)
        for stream in streams:
            stream.cancel()

    def late(self) -> DeadlineUnmetError:
        return DeadlineUnmetError(
            f"the determinism check did not finish within timeout_s={self.timeout_s:g}",
            advice="raise timeout_s, or check fewer prompts, repeats or max_tokens",
        )


def verify_determinism(
    replicas: Replicas,
    *,
    prompts: Optional[Sequence[str]] = None,
    max_tokens: int = 32,
    seed: int = 1234,
    repeats: int = 2,
    under_load: int = 0,
    timeout_s: float = 60.0,
) -> DeterminismReport:
    """Check that replicas give the same tokens for the same prompt, parameters and seed.

    :param replicas: name → adapter, or a list of adapters (named ``"0"``, ``"1"``, …).
    :param prompts: the prompts to probe; by default :data:`DEFAULT_PROMPTS`.
    :param max_tokens: tokens generated per probe.
    :param seed: the seed of the seeded (sampling) probes.
    :param repeats: runs of each prompt and mode on each replica.
    :param under_load: also run each probe while this many other streams are
        in flight on the same replica (0: only idle runs).
    :param timeout_s: bound on the whole check.
    :returns: a :class:`~tgi_adapter.determinism.DeterminismReport`.
    :raises ValueError: for a bad argument (the message names it).
    :raises WorkerError: when a replica cannot be reached or a probe ends in
        an error (the message names the replica); ``DeadlineUnmetError`` past
        ``timeout_s``. A control call (``/info``) under way at that moment
        still ends within the adapter's ``Timeouts.control``.
    """
    named = _named(replicas)
    chosen = _prompts(prompts)
    _check_int("max_tokens", max_tokens, 1)
    _check_int("seed", seed, 0, U64_MAX)
    _check_int("repeats", repeats, 1)
    _check_int("under_load", under_load, 0)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if len(named) == 1 and repeats == 1 and under_load == 0:
        raise ValueError("nothing to compare: give two replicas, repeats >= 2 or under_load >= 1")
    check = _Check(chosen, max_tokens, seed, repeats, under_load, float(timeout_s), time.monotonic)
    names = list(named)
    workers = min(len(names), MAX_PARALLEL)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tgi-determinism") as pool:
        identities = _all(check, pool, {name: functools.partial(_identify, named[name]) for name in names})
        seen = {name: {"engine_version": ident[0], "model_sha": ident[1]} for name, ident in identities.items()}
        why = identity_mismatch(seen)
        if why is not None:
            log.info("determinism check: the replicas are incomparable: %s", why)
            return DeterminismReport("incomparable", seen)
        runs_of = _all(
            check, pool,
            {name: functools.partial(_replica_runs, check, named[name], identities[name][2]) for name in names},
        )
    runs = {(name, *key): tokens for name, own in runs_of.items() for key, tokens in own.items()}
    probes = [
        compare_runs(a[1], a[2], b[4], run_label(a[0], a[3], a[4]), runs[a], run_label(b[0], b[3], b[4]), runs[b])
        for a, b in planned_comparisons(names, chosen, repeats, under_load > 0)
    ]
    report = DeterminismReport(verdict_of(probes), seen, tuple(probes))
    log.info("determinism check: %s (%d comparisons, %d differ)", report.verdict, len(probes),
             len(report.divergences))
    return report


def _all(check: _Check, pool: concurrent.futures.ThreadPoolExecutor, work: Mapping[str, Callable[[], R]]
         ) -> Dict[str, R]:
    """Run one job per replica; on the first failure stop the others and raise it, naming the replica."""
    futures = {pool.submit(job): name for name, job in work.items()}
    failure: Optional[Tuple[str, BaseException]] = None
    for future in concurrent.futures.as_completed(futures):
        error = future.exception()
        if error is not None and not isinstance(error, _Stopped) and failure is None:
            failure = (futures[future], error)
            check.cancel_all()
    if failure is not None:
        name, error = failure
        if isinstance(error, WorkerError):
            if isinstance(error, DeadlineUnmetError):
                # Every task's deadline is the check's: this is timeout_s passing.
                error = check.late()
            raise type(error)(
                f"replica {name!r}: {error.message}", retriable=error.retriable,
                retry_after_ms=error.retry_after_ms, advice=error.advice, engine=error.engine,
            ) from error
        raise error
    return {name: future.result() for future, name in futures.items()}


def _identify(adapter: WorkerAdapter) -> Tuple[str, Optional[str], Optional[int]]:
    """``(engine_version, model_sha, max_total_tokens)``, read afresh where the adapter can."""
    info_of = getattr(adapter, "engine_info", None)
    if callable(info_of):
        # A cached /info could predate an upgrade: the check wants what runs now.
        info = info_of(refresh=True) if isinstance(adapter, TgiHttpAdapter) else info_of()
        return adapter.engine_version(), getattr(info, "model_sha", None), getattr(info, "max_total_tokens", None)
    return adapter.engine_version(), None, None


def _replica_runs(check: _Check, adapter: WorkerAdapter, limit: Optional[int]) -> _Runs:
    """Every run of one replica, one at a time; repeats outermost, so runs of one prompt are apart."""
    ctx = limit or max(2048, check.max_tokens + 1)
    runs: _Runs = {}
    for repeat in range(1, check.repeats + 1):
        for prompt in check.prompts:
            for mode in MODES:
                task = check.task(prompt, check.max_tokens, mode, ctx)
                runs[(prompt, mode, repeat, False)] = _run(check, adapter, task)
    if check.under_load:
        length = max(_LOAD_FACTOR * check.max_tokens, _LOAD_MIN_TOKENS)
        cap = max(1, limit - _LOAD_PROMPT_ROOM) if limit else None
        for repeat in range(1, check.repeats + 1):
            for prompt in check.prompts:
                for mode in MODES:
                    # A length that once outlasted the probe is kept for the next runs.
                    tokens, length = _loaded_run(check, adapter, prompt, mode, ctx, length, cap)
                    runs[(prompt, mode, repeat, True)] = tokens
    return runs


def _run(check: _Check, adapter: WorkerAdapter, task: TaskRequest) -> List[Token]:
    """Send one probe and read its tokens; raise the stream's error."""
    stream = check.submit(adapter, task)
    tokens: List[Token] = []
    try:
        for event in stream:
            kind, data = event.kind, event.data
            if kind == "token":
                token_id = data.get("id")
                tokens.append((data["t"], token_id if isinstance(token_id, int) else None))
            elif kind == "end":
                if data.get("finish_reason") == "cancelled":
                    raise _Stopped
                return tokens
            elif kind == "error":
                raise WorkerError.from_event_data(data)
    finally:
        check.release(stream)
    raise InternalError("the probe's stream ended without a terminal event")  # pragma: no cover


class _Load:
    """A load stream, read by a thread of its own so that its end can be seen while the probe runs."""

    def __init__(self, stream: EventStream, clock: Callable[[], float]) -> None:
        self.stream = stream
        self.clock = clock
        self.ready = threading.Event()  # started, or ended before that
        self.started = False
        self.ended_at: Optional[float] = None
        self.error: Optional[WorkerError] = None
        self.thread = threading.Thread(target=self._read, name=f"tgi-determinism-load-{stream.task_id}", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                if event.kind == "started":
                    self.started = True
                elif event.kind == "error":
                    self.error = WorkerError.from_event_data(event.data)
                    self.ended_at = self.clock()
                elif event.kind == "end" and event.data.get("finish_reason") != "cancelled":
                    self.ended_at = self.clock()
                self.ready.set()
        except Exception as exc:  # a user's adapter may raise from its stream
            self.error = InternalError(f"a load stream failed: {exc}")
        finally:
            self.ready.set()


def _loaded_run(check: _Check, adapter: WorkerAdapter, prompt: str, mode: str, ctx: int, length: int,
                cap: Optional[int]) -> Tuple[List[Token], int]:
    """One probe while ``under_load`` long streams are in flight on the replica: ``(tokens, load length)``.

    Should the engine finish a load stream before the probe, the run does not
    count: it is repeated with longer load streams (up to the engine's limit).
    """
    for _ in range(_LOAD_ATTEMPTS):
        length = min(length, cap) if cap is not None else length
        tokens = _under_load(check, adapter, prompt, mode, ctx, length)
        if tokens is not None:
            return tokens, length
        log.debug("load streams of %d tokens ended before the probe; trying longer ones", length)
        length *= _LOAD_GROWTH
    raise InternalError(
        f"the engine finished its load streams before a {check.max_tokens}-token probe, "
        f"{_LOAD_ATTEMPTS} times, the last at {min(length, cap or length)} tokens",
        advice="the load streams must outlast the probe: lower max_tokens, or pace a fake engine (pace_s)",
    )


def _under_load(check: _Check, adapter: WorkerAdapter, prompt: str, mode: str, ctx: int, length: int
                ) -> Optional[List[Token]]:
    """The probe's tokens, or None when a load stream ended before the probe did."""
    loads: List[_Load] = []
    try:
        for j in range(check.under_load):
            task = check.task(_LOAD_PROMPTS[j % len(_LOAD_PROMPTS)], length, None, ctx)
            loads.append(_Load(check.submit(adapter, task), check.clock))
        for load in loads:
            if not load.ready.wait(max(0.0, check.deadline - check.clock())):
                raise check.late()
            if load.error is not None:
                error = load.error
                raise type(error)(f"a load stream failed: {error.message}", retriable=error.retriable,
                                  retry_after_ms=error.retry_after_ms, advice="")
            if not load.started:  # cancelled: another replica failed
                raise _Stopped
        tokens = _run(check, adapter, check.task(prompt, check.max_tokens, mode, ctx))
        finished = check.clock()
        return tokens if all(load.ended_at is None or load.ended_at > finished for load in loads) else None
    finally:
        for load in loads:
            load.stream.cancel()
        for load in loads:
            load.thread.join(_LOAD_JOIN_S)
            check.release(load.stream)


def _named(replicas: Replicas) -> Dict[str, WorkerAdapter]:
    if isinstance(replicas, Mapping):
        named = dict(replicas)
    elif isinstance(replicas, (list, tuple)):
        named = {str(n): adapter for n, adapter in enumerate(replicas)}
    else:
        raise ValueError(f"replicas must be a mapping of name to adapter or a list of adapters, "
                         f"got {type(replicas).__name__}")
    if not named:
        raise ValueError("replicas is empty: give at least one adapter")
    seen: Dict[int, str] = {}
    for name, adapter in named.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"replica names must be non-empty strings, got {name!r}")
        if not isinstance(adapter, WorkerAdapter):
            raise ValueError(f"replica {name!r} must be a WorkerAdapter, got {type(adapter).__name__}")
        if id(adapter) in seen:
            # Its runs would overlap with the other name's: no probe would be idle.
            raise ValueError(f"replicas {seen[id(adapter)]!r} and {name!r} are the same adapter")
        seen[id(adapter)] = name
    return named


def _prompts(prompts: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if prompts is None:
        return DEFAULT_PROMPTS
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt, or None for the built-in ones")
    for n, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts[{n}] must be a non-empty string, got {prompt!r}")
    return tuple(dict.fromkeys(prompts))


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
