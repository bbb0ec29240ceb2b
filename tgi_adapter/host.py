"""``AdapterHost``: many engine replicas behind one facade with the adapter's contract.

The host is an in-process registry of ``(pool_id, replica_id) → adapter``
and a router. ``submit(pool_id, task)`` returns a :class:`HostStream` at once;
the replica is chosen when the first event is asked for, and a replica that
fails retriably before ``started`` is skipped for another one. After
``started`` the replica's events pass through untouched. The stream's side
lives in :mod:`tgi_adapter.host_stream`, which sees the host only through the
:class:`~tgi_adapter.host_stream.Placement` it is given; the pure parts (the
breaker, the choice) live in :mod:`tgi_adapter.breaker`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from . import runtime
from .breaker import BreakerState, CircuitBreaker, Outcome, check_breaker_settings, choose_replica
from .contract import TaskLike, WorkerAdapter, WorkerHealth, WorkerProps, as_task
from .determinism import DeterminismReport
from .errors import (
    InvalidParamsError,
    PoolUnavailableError,
    PoolUnreadyError,
    WorkerError,
)
from .host_stream import HostStream, Lease
from .probes import verify_determinism

__all__ = ["AdapterHost", "HostStream", "ReplicaStatus", "UnknownReplicaError"]

log = logging.getLogger(__name__)



class UnknownReplicaError(KeyError):
    """``rebind``/``unbind`` named a ``(pool_id, replica_id)`` that is not bound."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown replica"


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    """What the host knows about one replica, from its cache (no engine call).

    ``live``/``ready``/``slots_free`` are ``None`` before the first health
    check; ``slots_free`` is the engine's figure corrected by the tasks the
    host routed there (and saw finish) since that check.
    """

    pool_id: str
    replica_id: str
    breaker: BreakerState
    failures: int
    in_flight: int
    live: Optional[bool]
    ready: Optional[bool]
    slots_free: Optional[int]


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    at: float
    live: bool
    ready: bool
    slots_free: Optional[int]
    routed_base: int
    done_base: int


class _Replica:
    """One binding; replaced (not mutated) by ``rebind``. Counters are guarded by the host's lock."""

    def __init__(self, pool_id: str, replica_id: str, adapter: WorkerAdapter, position: int,
                 breaker: CircuitBreaker) -> None:
        self.pool_id = pool_id
        self.replica_id = replica_id
        self.adapter = adapter
        self.position = position
        self.breaker = breaker
        self.refresh_lock = threading.Lock()
        self.snapshot: Optional[_Snapshot] = None
        self.routed = 0  # attempts routed here, ever
        self.done = 0  # attempts that ended, ever
        self.in_flight = 0
        self.retired = False  # unbound or replaced: drains, then its adapter is closed
        self.closed = False

    def free_now(self) -> Optional[int]:
        snap = self.snapshot
        if snap is None:
            return None
        base = snap.slots_free if snap.slots_free is not None else 0
        return base - (self.routed - snap.routed_base) + (self.done - snap.done_base)


@dataclasses.dataclass
class _Lease:
    """One attempt's claim on a replica: counted in its in-flight tasks until released."""

    replica: _Replica
    trial: bool
    judged: bool = False
    released: bool = False

    @property
    def replica_id(self) -> str:
        return self.replica.replica_id

    @property
    def adapter(self) -> WorkerAdapter:
        return self.replica.adapter

    @property
    def binding(self) -> object:
        return self.replica


class _Placement:
    """The host as its streams see it (see :class:`~tgi_adapter.host_stream.Placement`)."""

    __slots__ = ("_host",)

    def __init__(self, host: AdapterHost) -> None:
        self._host = host

    def route(self, pool_id: str, tried: Set[object]) -> Union[_Lease, WorkerError]:
        return self._host._route(pool_id, tried)

    def settle(self, lease: Lease, outcome: Outcome) -> Optional[Tuple[str, str]]:
        assert isinstance(lease, _Lease)
        return self._host._settle(lease, outcome)

    def release(self, lease: Lease) -> None:
        assert isinstance(lease, _Lease)
        self._host._release(lease)

    def forget(self, stream: HostStream) -> None:
        self._host._forget(stream)


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


class AdapterHost:
    """Several engine replicas per pool behind the adapter's contract.

    :param failure_threshold: consecutive failures (retriable errors before
        ``started``, or ``submit`` raising a retriable error) that open a
        replica's breaker.
    :param cooldown_s: how long an open breaker keeps the replica out; then
        one trial task decides (success closes, failure re-opens).
    :param props_ttl_s: how long a replica's ``health()``/``props()`` answer
        is reused for routing.
    :param clock: monotonic clock for the breaker, the cache and deadlines.

    The host owns the adapters bound to it: it closes them on ``unbind``,
    ``rebind`` (once their streams have finished) and ``close()``.
    """

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 30.0, props_ttl_s: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        check_breaker_settings(failure_threshold, cooldown_s)
        if isinstance(props_ttl_s, bool) or not isinstance(props_ttl_s, (int, float)) or not props_ttl_s >= 0:
            raise ValueError(f"props_ttl_s must be a number of seconds >= 0, got {props_ttl_s!r}")
        self.failure_threshold = failure_threshold
        self.cooldown_s = float(cooldown_s)
        self.props_ttl_s = float(props_ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._pools: Dict[str, Dict[str, _Replica]] = {}
        self._tasks: Dict[str, weakref.WeakValueDictionary[str, HostStream]] = {}
        self._last_pick: Dict[str, int] = {}
        self._draining: List[_Replica] = []
        self._positions = 0
        self._closed = False
        self._placement = _Placement(self)
        runtime.hold()
        self._held = weakref.finalize(self, runtime.release)

    def __repr__(self) -> str:
        with self._lock:
            pools = {pool: list(replicas) for pool, replicas in self._pools.items()}
        return f"AdapterHost({pools!r})"

    # -- registry ------------------------------------------------------------------

    def bind(self, pool_id: str, replica_id: str, adapter: WorkerAdapter) -> None:
        """Add a replica to a pool (creating the pool); ``ValueError`` if already bound (use :meth:`rebind`)."""
        with self._lock:
            self._check_bindable(pool_id, replica_id, adapter)
            pool = self._pools.setdefault(pool_id, {})
            if replica_id in pool:
                raise ValueError(f"replica {replica_id!r} is already bound in pool {pool_id!r}; use rebind()")
            self._positions += 1
            pool[replica_id] = self._new_replica(pool_id, replica_id, adapter, self._positions)
        log.debug("pool %s: bound replica %s", pool_id, replica_id)

    def rebind(self, pool_id: str, replica_id: str, adapter: WorkerAdapter) -> None:
        """Swap a replica's adapter atomically; streams on the old one finish, then it is closed."""
        with self._lock:
            self._check_bindable(pool_id, replica_id, adapter)
            old = self._bound(pool_id, replica_id)
            self._pools[pool_id][replica_id] = self._new_replica(pool_id, replica_id, adapter, old.position)
            close_now = self._retire(old)
        log.debug("pool %s: rebound replica %s (%d stream(s) draining)", pool_id, replica_id, old.in_flight)
        if close_now:
            _close_adapter(old)

    def unbind(self, pool_id: str, replica_id: str) -> None:
        """Remove a replica; its streams finish, then its adapter is closed."""
        with self._lock:
            old = self._bound(pool_id, replica_id)
            pool = self._pools[pool_id]
            del pool[replica_id]
            if not pool:
                del self._pools[pool_id]
            close_now = self._retire(old)
        log.debug("pool %s: unbound replica %s (%d stream(s) draining)", pool_id, replica_id, old.in_flight)
        if close_now:
            _close_adapter(old)

    def _check_bindable(self, pool_id: str, replica_id: str, adapter: WorkerAdapter) -> None:
        _check_id("pool_id", pool_id)
        _check_id("replica_id", replica_id)
        if not isinstance(adapter, WorkerAdapter):
            raise ValueError(f"adapter must be a WorkerAdapter, got {type(adapter).__name__}")
        if self._closed:
            raise ValueError("the host is closed")
        for replica in self._all_replicas():
            if replica.adapter is adapter and not replica.closed:
                raise ValueError(f"this adapter is already bound as {replica.pool_id}/{replica.replica_id}")

    def _new_replica(self, pool_id: str, replica_id: str, adapter: WorkerAdapter, position: int) -> _Replica:
        set_placement = getattr(adapter, "set_placement", None)
        if callable(set_placement):
            set_placement(pool_id, replica_id)
        return _Replica(pool_id, replica_id, adapter, position, CircuitBreaker(self.failure_threshold, self.cooldown_s))

    def _bound(self, pool_id: str, replica_id: str) -> _Replica:
        replica = self._pools.get(pool_id, {}).get(replica_id)
        if replica is None:
            raise UnknownReplicaError(f"no replica {replica_id!r} is bound in pool {pool_id!r}")
        return replica

    def _retire(self, replica: _Replica) -> bool:
        """Mark ``replica`` as leaving (under the lock); True if its adapter can be closed now."""
        replica.retired = True
        if replica.in_flight == 0:
            replica.closed = True
            return True
        self._draining.append(replica)
        return False

    def _all_replicas(self) -> List[_Replica]:
        return [r for pool in self._pools.values() for r in pool.values()] + self._draining

    # -- tasks ---------------------------------------------------------------------

    def submit(self, pool_id: str, task: TaskLike, correlation_id: Optional[str] = None) -> HostStream:
        """Start ``task`` on a replica of ``pool_id``; returns its stream at once.

        Raises ``InvalidParamsError`` for a bad task, a bad ``correlation_id`` or
        a ``task_id`` already in flight in the pool, and ``PoolUnavailableError``
        for a pool with no replica bound (or a closed host). Routing happens
        when the first event is taken; see the class documentation.
        """
        task = as_task(task)
        if correlation_id is not None and (not isinstance(correlation_id, str) or not correlation_id):
            raise InvalidParamsError("invalid 'correlation_id': expected a non-empty string")
        cid = correlation_id or str(uuid.uuid4())
        deadline = self._clock() + task.deadline_ms / 1000.0
        with self._lock:
            if self._closed:
                raise PoolUnavailableError("the host is closed", retriable=False, advice="make a new AdapterHost")
            if not self._pools.get(pool_id):
                raise PoolUnavailableError(f"no replica is bound to pool {pool_id!r}", retriable=False,
                                           advice="bind a replica to the pool first")
            tasks = self._tasks.setdefault(pool_id, weakref.WeakValueDictionary())
            if task.task_id in tasks:
                raise InvalidParamsError(
                    f"invalid task field 'task_id': {task.task_id!r} is already in flight in pool {pool_id!r}",
                    advice="use a new task_id per task",
                )
            stream = HostStream(self._placement, pool_id, task, cid, deadline, self._clock)
            tasks[task.task_id] = stream
        stream._route.log("submitted to pool %s", pool_id)
        return stream

    def cancel(self, pool_id: str, task_id: str) -> None:
        """Cancel a task on whichever replica holds it; idempotent, unknown ids are fine."""
        with self._lock:
            tasks = self._tasks.get(pool_id)
            stream = tasks.get(task_id) if tasks is not None else None
        if stream is not None:
            stream._route.log("cancel")
            stream.cancel()

    def _route(self, pool_id: str, tried: Set[object]) -> Union[_Lease, WorkerError]:
        """Claim the best replica not yet tried, or the error saying why there is none."""
        with self._lock:
            replicas = [r for r in self._pools.get(pool_id, {}).values() if r not in tried]
        for replica in replicas:
            self._refresh(replica)
        now = self._clock()
        with self._lock:
            candidates: List[_Replica] = []
            reasons: List[str] = []
            any_live = False
            waits: List[float] = []
            for replica in self._pools.get(pool_id, {}).values():
                snap = replica.snapshot
                if replica in tried:
                    continue
                if snap is None or not snap.live:
                    reasons.append(f"{replica.replica_id}: {'not checked yet' if snap is None else 'not live'}")
                    continue
                any_live = True
                if not snap.ready:
                    reasons.append(f"{replica.replica_id}: not ready")
                elif not replica.breaker.admits(now):
                    wait = replica.breaker.retry_in(now)
                    if wait is None:
                        reasons.append(f"{replica.replica_id}: breaker half-open, trial in flight")
                    else:
                        waits.append(wait)
                        reasons.append(f"{replica.replica_id}: breaker open for {wait:.1f} s more")
                else:
                    candidates.append(replica)
            if candidates:
                index = choose_replica([(r.position, r.free_now() or 0) for r in candidates],
                                       self._last_pick.get(pool_id))
                replica = candidates[index]
                trial = replica.breaker.acquire(now)
                assert trial is not None
                replica.routed += 1
                replica.in_flight += 1
                self._last_pick[pool_id] = replica.position
                return _Lease(replica, trial)
        why = "; ".join(reasons) or "no replica is bound"
        if not any_live:
            return PoolUnavailableError(f"no replica of pool {pool_id!r} is live ({why})", retriable=True)
        retry_ms = int(min(waits) * 1000) if waits else None
        return PoolUnreadyError(f"no replica of pool {pool_id!r} is ready ({why})", retry_after_ms=retry_ms)

    def _refresh(self, replica: _Replica) -> None:
        """Re-read health and props when stale; one caller at a time, the others use the old answer."""
        snap = replica.snapshot
        if snap is not None and self._clock() - snap.at < self.props_ttl_s:
            return
        if not replica.refresh_lock.acquire(blocking=snap is None):
            return
        try:
            snap = replica.snapshot
            if snap is not None and self._clock() - snap.at < self.props_ttl_s:
                return
            with self._lock:
                routed, done = replica.routed, replica.done
            health = _health_of(replica.adapter)
            free: Optional[int] = None
            if health.ready:
                try:
                    free = replica.adapter.props().slots_free
                except Exception as exc:  # slots unknown; readiness still counts
                    log.debug("pool %s: props of replica %s failed: %s", replica.pool_id, replica.replica_id, exc)
            replica.snapshot = _Snapshot(self._clock(), health.live, health.ready, free, routed, done)
        finally:
            replica.refresh_lock.release()

    def _settle(self, lease: _Lease, outcome: Outcome) -> Optional[Tuple[str, str]]:
        """Tell the replica's breaker how the attempt went (once per attempt); its change of state, if any."""
        replica = lease.replica
        with self._lock:
            if lease.judged:
                return None
            lease.judged = True
            change = replica.breaker.record(outcome, self._clock(), lease.trial)
        return None if change is None else (change[0].value, change[1].value)

    def _release(self, lease: _Lease) -> None:
        """An attempt ended: free its claim, and close a retired adapter that has drained."""
        replica = lease.replica
        with self._lock:
            if lease.released:
                return
            lease.released = True
            replica.in_flight -= 1
            replica.done += 1
            close_now = replica.retired and replica.in_flight == 0 and not replica.closed
            if close_now:
                replica.closed = True
                self._draining.remove(replica)
        if close_now:
            _close_adapter(replica)

    def _forget(self, stream: HostStream) -> None:
        """A stream's consumer is done with it: the task id may be used again."""
        with self._lock:
            tasks = self._tasks.get(stream.pool_id)
            if tasks is not None and tasks.get(stream.task_id) is stream:
                del tasks[stream.task_id]

    # -- pool-wide views -----------------------------------------------------------

    def health(self, pool_id: str) -> WorkerHealth:
        """Live if any replica is; ready if any replica is ready and its breaker admits tasks. Never raises."""
        with self._lock:
            replicas = list(self._pools.get(pool_id, {}).values())
        live = ready = False
        now = self._clock()
        for replica in replicas:
            health = _health_of(replica.adapter)
            live = live or health.live
            with self._lock:
                admits = replica.breaker.admits(now)
            ready = ready or (health.ready and admits)
        return WorkerHealth(live=live, ready=ready)

    def props(self, pool_id: str) -> WorkerProps:
        """The replicas' props summed (slots, in-flight); the smallest token limits; ``PoolUnavailableError``
        if no replica answers."""
        with self._lock:
            replicas = list(self._pools.get(pool_id, {}).values())
        answers: List[WorkerProps] = []
        last: Optional[WorkerError] = None
        for replica in replicas:
            try:
                answers.append(replica.adapter.props())
            except WorkerError as error:
                last = error
        if not answers:
            detail = f": {last.message}" if last is not None else ": no replica is bound"
            raise PoolUnavailableError(f"no replica of pool {pool_id!r} answered props(){detail}")
        return WorkerProps(
            slots_total=_sum(p.slots_total for p in answers),
            slots_free=_sum(p.slots_free for p in answers),
            max_total_tokens=_min(p.max_total_tokens for p in answers),
            max_input_tokens=_min(p.max_input_tokens for p in answers),
            in_flight=sum(p.in_flight for p in answers),
            slots_source=_same(p.slots_source for p in answers) or "mixed",
            engine_version=_same(p.engine_version for p in answers),
            model_id=_same(p.model_id for p in answers),
        )

    def replicas(self, pool_id: str) -> Tuple[ReplicaStatus, ...]:
        """The host's cached view of each replica of ``pool_id``, in bind order (no engine call)."""
        now = self._clock()
        with self._lock:
            return tuple(
                ReplicaStatus(
                    pool_id=r.pool_id,
                    replica_id=r.replica_id,
                    breaker=r.breaker.state(now),
                    failures=r.breaker.failures,
                    in_flight=r.in_flight,
                    live=r.snapshot.live if r.snapshot else None,
                    ready=r.snapshot.ready if r.snapshot else None,
                    slots_free=r.free_now(),
                )
                for r in sorted(self._pools.get(pool_id, {}).values(), key=lambda r: r.position)
            )

    def verify_determinism(self, pool_id: str, **kw: Any) -> DeterminismReport:
        """:func:`tgi_adapter.verify_determinism` over the pool's live replicas, named by replica_id.

        Each replica's ``health()`` is asked first (within its adapter's
        ``Timeouts.control``); those not live are left out and listed in the
        report's ``skipped``. ``PoolUnavailableError`` when none is live.
        """
        with self._lock:
            replicas = sorted(self._pools.get(pool_id, {}).values(), key=lambda r: r.position)
        live = {r.replica_id: r.adapter for r in replicas if _health_of(r.adapter).live}
        if not live:
            raise PoolUnavailableError(f"no replica of pool {pool_id!r} is live to verify", retriable=True)
        report = verify_determinism(live, **kw)
        return dataclasses.replace(report, skipped=tuple(r.replica_id for r in replicas if r.replica_id not in live))

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Cancel every stream in flight and close every adapter (bound or draining)."""
        with self._lock:
            self._closed = True
            streams = [s for tasks in self._tasks.values() for s in list(tasks.values())]
            replicas = [r for r in self._all_replicas() if not r.closed]
            for replica in replicas:
                replica.closed = True
            self._pools.clear()
            self._draining.clear()
        for stream in streams:
            stream.cancel()
        for replica in replicas:
            _close_adapter(replica)
        self._held()

    def __enter__(self) -> AdapterHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _health_of(adapter: WorkerAdapter) -> WorkerHealth:
    try:
        return adapter.health()
    except Exception:  # health() must not raise; treat one that does as down
        log.debug("health() raised", exc_info=True)
        return WorkerHealth(live=False, ready=False)


def _close_adapter(replica: _Replica) -> None:
    close = getattr(replica.adapter, "close", None)
    if not callable(close):
        return
    try:
        close()
    except Exception:
        log.debug("pool %s: closing replica %s failed", replica.pool_id, replica.replica_id, exc_info=True)
    log.debug("pool %s: closed the adapter of replica %s", replica.pool_id, replica.replica_id)


def _sum(values: Iterable[Any]) -> Optional[int]:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _min(values: Iterable[Any]) -> Optional[int]:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def _same(values: Iterable[Any]) -> Optional[Any]:
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None

