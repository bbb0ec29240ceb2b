"""The worker contract: the values the orchestrator exchanges with an adapter.

Everything here is plain data with no I/O. The names, event kinds, data keys
and error codes are the orchestrator's and must not drift.
"""

from __future__ import annotations

import abc
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import (
    Any,
    Dict,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from .errors import ErrorKind, InvalidParamsError, WorkerError
from .events import EVENT_KINDS, FINISH_REASONS, TokenEvent, make_event

__all__ = [
    "TaskRequest",
    "SamplingParams",
    "TokenEvent",
    "WorkerHealth",
    "WorkerProps",
    "EngineInfo",
    "WorkerAdapter",
    "EventStream",
    "ErrorKind",
    "WorkerError",
    "EVENT_KINDS",
    "FINISH_REASONS",
    "U64_MAX",
    "make_event",
]

#: Seeds are unsigned 64-bit on the engine side.
U64_MAX = (1 << 64) - 1

WORKLOADS = ("completion",)
PRIORITIES = ("interactive", "batch")
DETERMINISM = ("strict", "best_effort")


def _bad(field_name: str, problem: str) -> InvalidParamsError:
    return InvalidParamsError(f"invalid task field {field_name!r}: {problem}")


def _check_type(name: str, value: Any, kinds: Tuple[type, ...], optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int in Python but never a valid count, seed or length here.
    if isinstance(value, bool) and bool not in kinds:
        raise _bad(name, f"expected {_type_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise _bad(name, f"expected {_type_names(kinds)}, got {type(value).__name__}")


def _type_names(kinds: Tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _check_number(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if value is None:
        return
    _check_type(name, value, (int, float))
    if not math.isfinite(value):
        raise _bad(name, "must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise _bad(name, f"must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise _bad(name, f"must be {'<' if high_open else '<='} {high}, got {value}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs beyond the task's seed and ``max_tokens``.

    Values that mean "off" are normalised (``temperature=0`` is greedy,
    ``top_p``/``typical_p`` of 1.0 and ``top_k`` of 0 are left out); values the
    engine would reject raise ``InvalidParamsError`` naming the field.
    """

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    typical_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stop: Tuple[str, ...] = ()
    do_sample: Optional[bool] = None
    truncate: Optional[int] = None
    watermark: Optional[bool] = None
    grammar: Optional[Mapping[str, Any]] = None
    best_of: Optional[int] = None

    def __post_init__(self) -> None:
        _check_number("sampling.temperature", self.temperature, low=0.0)
        _check_number("sampling.top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("sampling.typical_p", self.typical_p, low=0.0, high=1.0, low_open=True)
        if self.top_k is not None:
            _check_type("sampling.top_k", self.top_k, (int,))
            _check_number("sampling.top_k", self.top_k, low=0)
        _check_number("sampling.repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_number("sampling.frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise _bad("sampling.stop", "expected a list of strings")
        for item in self.stop:
            _check_type("sampling.stop", item, (str,))
            if not item:
                raise _bad("sampling.stop", "a stop sequence cannot be empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.do_sample is not None:
            _check_type("sampling.do_sample", self.do_sample, (bool,))
        if self.watermark is not None:
            _check_type("sampling.watermark", self.watermark, (bool,))
        if self.truncate is not None:
            _check_type("sampling.truncate", self.truncate, (int,))
            _check_number("sampling.truncate", self.truncate, low=1)
        if self.best_of is not None:
            _check_type("sampling.best_of", self.best_of, (int,))
            _check_number("sampling.best_of", self.best_of, low=1)
        if self.grammar is not None:
            _check_type("sampling.grammar", self.grammar, (dict,))
            if self.grammar.get("type") not in ("json", "json_object", "json_schema", "regex"):
                raise _bad("sampling.grammar", "type must be json, json_object, json_schema or regex")
            if "value" not in self.grammar:
                raise _bad("sampling.grammar", "needs a 'value'")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON object; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise _bad("sampling", f"expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _bad("sampling", f"unknown key(s) {', '.join(unknown)}")
        values = dict(data)
        if "stop" in values and values["stop"] is None:
            values["stop"] = ()
        return cls(**values)

    @property
    def wants_sampling(self) -> bool:
        """Whether these values make the engine sample rather than decode greedily."""
        if self.do_sample:
            return True
        if self.temperature is not None and self.temperature not in (0, 1):
            return True
        return bool(
            (self.top_k or 0) > 0
            or (self.top_p is not None and self.top_p < 1)
            or (self.typical_p is not None and self.typical_p < 1)
        )


@dataclass(frozen=True)
class TaskRequest:
    """A task as the orchestrator sends it.

    Exactly one of ``prompt`` (text) and ``inputs`` (a conversation: a list of
    ``{"role": ..., "content": ...}`` messages, for the ``openai-chat`` route)
    is given. ``deadline_ms`` is the wall-clock budget from ``submit()``.
    Construction validates every field and raises ``InvalidParamsError``
    (code ``INVALID_PARAMS``) naming the first bad one.
    """

    task_id: str
    session_id: str
    workload: str
    model_ref: str
    engine: str
    ctx: int
    priority: str
    max_tokens: int
    deadline_ms: int
    prompt: Optional[str] = None
    inputs: Optional[Sequence[Mapping[str, Any]]] = None
    seed: Optional[int] = None
    determinism: str = "best_effort"
    sampler_profile_version: Optional[str] = None
    expected_tokens: Optional[int] = None
    kv_hint: Optional[str] = None
    placement: Optional[Mapping[str, Any]] = None
    sampling: Optional[SamplingParams] = None

    def __post_init__(self) -> None:
        for name in ("task_id", "session_id", "workload", "model_ref", "engine", "priority", "determinism"):
            value = getattr(self, name)
            _check_type(name, value, (str,))
            if not value:
                raise _bad(name, "cannot be empty")
        if self.workload not in WORKLOADS:
            raise _bad(
                "workload",
                f"TGI serves text completions only, so workload must be 'completion', got {self.workload!r}",
            )
        if self.engine != "tgi":
            raise _bad("engine", f"this adapter drives TGI, so engine must be 'tgi', got {self.engine!r}")
        if self.priority not in PRIORITIES:
            raise _bad("priority", f"must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if self.determinism not in DETERMINISM:
            raise _bad("determinism", f"must be one of {', '.join(DETERMINISM)}, got {self.determinism!r}")
        for name in ("ctx", "max_tokens", "deadline_ms"):
            value = getattr(self, name)
            _check_type(name, value, (int,))
            if value < 1:
                raise _bad(name, f"must be at least 1, got {value}")
        self._check_prompt()
        if self.seed is not None:
            _check_type("seed", self.seed, (int,))
            if not 0 <= self.seed <= U64_MAX:
                raise _bad("seed", f"must be an unsigned 64-bit integer (0 to {U64_MAX}), got {self.seed}")
        _check_type("sampler_profile_version", self.sampler_profile_version, (str,), optional=True)
        _check_type("kv_hint", self.kv_hint, (str,), optional=True)
        _check_type("expected_tokens", self.expected_tokens, (int,), optional=True)
        if self.expected_tokens is not None and self.expected_tokens < 0:
            raise _bad("expected_tokens", f"cannot be negative, got {self.expected_tokens}")
        _check_type("placement", self.placement, (dict,), optional=True)
        if self.sampling is not None and not isinstance(self.sampling, SamplingParams):
            raise _bad("sampling", f"expected SamplingParams, got {type(self.sampling).__name__}")

    def _check_prompt(self) -> None:
        if self.prompt is None and self.inputs is None:
            raise _bad("prompt", "a task needs a prompt (or inputs, a conversation)")
        if self.prompt is not None and self.inputs is not None:
            raise _bad("prompt", "give either prompt or inputs, not both")
        if self.prompt is not None:
            _check_type("prompt", self.prompt, (str,))
            if not self.prompt:
                raise _bad("prompt", "cannot be empty (TGI rejects empty inputs)")
            return
        if isinstance(self.inputs, (str, bytes)) or not isinstance(self.inputs, (list, tuple)):
            raise _bad("inputs", "expected a list of messages ({'role': ..., 'content': ...})")
        if not self.inputs:
            raise _bad("inputs", "cannot be empty")
        for n, message in enumerate(self.inputs):
            where = f"inputs[{n}]"
            if not isinstance(message, Mapping):
                raise _bad(where, "expected a message object")
            if not isinstance(message.get("role"), str) or not message["role"]:
                raise _bad(f"{where}.role", "expected a non-empty string")
            content = message.get("content")
            if not isinstance(content, (str, list)):
                raise _bad(f"{where}.content", "expected a string or a list of content parts")
        object.__setattr__(self, "inputs", tuple(dict(m) for m in self.inputs))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRequest:
        """Build a task from the orchestrator's JSON object.

        Keys this adapter does not know are ignored (the orchestrator's task
        carries fields for other engines); missing required keys and values
        of the wrong type raise ``InvalidParamsError`` naming the field.
        """
        if not isinstance(data, Mapping):
            raise _bad("task", f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in values:
                raise _bad(f.name, "is required")
        sampling = values.get("sampling")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            values["sampling"] = SamplingParams.from_dict(sampling)
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The task as a JSON-ready dict (``from_dict`` reads it back)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "sampling" and value is not None:
                value = {k.name: getattr(value, k.name) for k in fields(value)}
                value["stop"] = list(value["stop"])
            elif f.name == "inputs" and value is not None:
                value = [dict(m) for m in value]
            out[f.name] = value
        return out


@dataclass(frozen=True)
class WorkerHealth:
    """``live``: the engine answers HTTP; ``ready``: it can take tasks now."""

    live: bool
    ready: bool


@dataclass(frozen=True)
class WorkerProps:
    """What the orchestrator needs to place work on this engine.

    ``slots_free`` comes from the engine's ``/metrics`` when it answers
    (``slots_source == "metrics"``), else from the adapter's own in-flight count
    (``"adapter"``); it is ``None`` when nothing is known.
    """

    slots_total: Optional[int]
    slots_free: Optional[int]
    max_total_tokens: Optional[int] = None
    max_input_tokens: Optional[int] = None
    in_flight: int = 0
    slots_source: str = "unknown"
    engine_version: Optional[str] = None
    model_id: Optional[str] = None


@dataclass(frozen=True)
class EngineInfo:
    """The engine's ``/info``, across TGI's eras of field names.

    ``max_input_tokens`` is filled from ``max_input_length`` on engines older
    than 2.1; fields an engine does not send are ``None``; fields this adapter
    does not know are kept in ``extra``.
    """

    model_id: Optional[str] = None
    model_sha: Optional[str] = None
    version: Optional[str] = None
    sha: Optional[str] = None
    docker_label: Optional[str] = None
    max_total_tokens: Optional[int] = None
    max_input_tokens: Optional[int] = None
    max_concurrent_requests: Optional[int] = None
    max_best_of: Optional[int] = None
    max_stop_sequences: Optional[int] = None
    max_client_batch_size: Optional[int] = None
    validation_workers: Optional[int] = None
    model_pipeline_tag: Optional[str] = None
    model_dtype: Optional[str] = None
    model_device_type: Optional[str] = None
    router: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def engine_version(self) -> str:
        """``version`` plus a build id: ``"3.3.6+sha.1a2b3c4"``.

        The build id is the first 7 characters of ``sha``, else the
        ``docker_label``, else nothing, so every replica of one deployment
        reports the same string.
        """
        version = self.version or "unknown"
        if self.sha:
            return f"{version}+sha.{self.sha[:7]}"
        if self.docker_label:
            return f"{version}+{self.docker_label}"
        return version


class EventStream(Protocol):
    """What :meth:`WorkerAdapter.submit` returns: the task's events, in contract order.

    An iterator and a context manager; ``cancel()`` stops the task and
    ``close()`` also releases what the stream holds. ``collect()`` reads it to
    its end: ``(text, end_data)``, or raises the stream's ``WorkerError``.
    """

    task_id: str

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def __next__(self) -> TokenEvent: ...

    @property
    def finished(self) -> bool: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...

    def collect(self) -> Tuple[str, Dict[str, Any]]: ...


class WorkerAdapter(abc.ABC):
    """The contract every engine adapter implements for the orchestrator."""

    @abc.abstractmethod
    def health(self) -> WorkerHealth:
        """Whether the engine is live and ready; never raises for a down engine."""

    @abc.abstractmethod
    def props(self) -> WorkerProps:
        """Capacity and limits for placement decisions."""

    @abc.abstractmethod
    def submit(self, task: TaskRequest, correlation_id: Optional[str] = None) -> EventStream:
        """Start ``task`` and return its stream of :class:`TokenEvent`."""

    @abc.abstractmethod
    def cancel(self, task_id: str) -> None:
        """Cancel a task; idempotent, and unknown ids are not an error."""

    @abc.abstractmethod
    def engine_version(self) -> str:
        """A stable version string for the engine deployment."""


TaskLike = Union[TaskRequest, Mapping[str, Any]]


def as_task(task: TaskLike) -> TaskRequest:
    """Accept a :class:`TaskRequest` or the orchestrator's JSON object."""
    if isinstance(task, TaskRequest):
        return task
    if isinstance(task, Mapping):
        return TaskRequest.from_dict(task)
    raise _bad("task", f"expected a TaskRequest or a JSON object, got {type(task).__name__}")

