"""The contract's error codes and the one exception tree that carries them.

Every failure a public call can report is a :class:`WorkerError` whose class
names its :class:`ErrorKind`. The error knows whether retrying can help, how
long the engine asked us to wait, and what the user can do about it, so the
orchestrator never has to look inside a ``requests`` or ``urllib3`` exception.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from .events import TokenEvent, make_event

__all__ = [
    "ErrorKind",
    "WorkerError",
    "AdmissionRejectError",
    "QueueFullDropLruError",
    "InvalidParamsError",
    "PoolUnreadyError",
    "PoolUnavailableError",
    "ReplicaExhaustedError",
    "DecodeTimeoutError",
    "WorkerResetError",
    "InternalError",
    "DeadlineUnmetError",
    "ModelDeprecatedError",
    "UntrustedArtifactError",
    "error_class",
]


class ErrorKind(str, enum.Enum):
    """The orchestrator's error codes (the value is the code on the wire)."""

    ADMISSION_REJECT = "ADMISSION_REJECT"
    QUEUE_FULL_DROP_LRU = "QUEUE_FULL_DROP_LRU"
    INVALID_PARAMS = "INVALID_PARAMS"
    POOL_UNREADY = "POOL_UNREADY"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    REPLICA_EXHAUSTED = "REPLICA_EXHAUSTED"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    WORKER_RESET = "WORKER_RESET"
    INTERNAL = "INTERNAL"
    DEADLINE_UNMET = "DEADLINE_UNMET"
    MODEL_DEPRECATED = "MODEL_DEPRECATED"
    UNTRUSTED_ARTIFACT = "UNTRUSTED_ARTIFACT"

    def __str__(self) -> str:
        return self.value


class WorkerError(Exception):
    """A failure reported through the worker contract.

    :param message: what happened, in one short human sentence; it must already
        be free of secrets (the adapter redacts engine bodies before they get here).
    :param retriable: whether the same task may succeed if tried again; defaults
        to the code's usual answer.
    :param retry_after_ms: how long the engine or a proxy asked us to wait.
    :param advice: what the user can do; defaults to the code's usual advice.
    """

    code: ClassVar[ErrorKind] = ErrorKind.INTERNAL
    default_retriable: ClassVar[bool] = False
    default_advice: ClassVar[str] = "report this with the engine version and the task"

    def __init__(
        self,
        message: str,
        *,
        retriable: Optional[bool] = None,
        retry_after_ms: Optional[int] = None,
        advice: Optional[str] = None,
        engine: str = "tgi",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retriable = self.default_retriable if retriable is None else bool(retriable)
        self.retry_after_ms = retry_after_ms
        self.advice = self.default_advice if advice is None else advice
        self.engine = engine

    def __str__(self) -> str:
        return f"{self.code.value}: {self.full_message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, retriable={self.retriable!r}, "
            f"retry_after_ms={self.retry_after_ms!r})"
        )

    def __reduce__(self) -> Tuple[Any, ...]:
        # Exceptions pickle their args only; keyword-only state would be lost.
        return (
            _rebuild,
            (type(self), self.message, self.retriable, self.retry_after_ms, self.advice, self.engine),
        )

    @property
    def full_message(self) -> str:
        """The message followed by the advice: what happened and what to do."""
        return f"{self.message}; {self.advice}" if self.advice else self.message

    def to_event_data(self) -> Dict[str, Any]:
        """The ``data`` of the terminal ``error`` event."""
        return {
            "code": self.code.value,
            "message": self.full_message,
            "retriable": self.retriable,
            "retry_after_ms": self.retry_after_ms,
            "engine": self.engine,
        }

    def to_event(self) -> TokenEvent:
        """This error as the stream's terminal ``error`` :class:`TokenEvent`."""
        return make_event("error", self.to_event_data())

    def to_envelope(self) -> Dict[str, Any]:
        """The orchestrator's ``ErrorEnvelope``: a plain, JSON-ready dict."""
        return self.to_event_data()

    @staticmethod
    def from_code(
        code: ErrorKind | str,
        message: str,
        *,
        retriable: Optional[bool] = None,
        retry_after_ms: Optional[int] = None,
        advice: Optional[str] = None,
    ) -> WorkerError:
        """Build the subclass that belongs to ``code``."""
        return error_class(code)(
            message, retriable=retriable, retry_after_ms=retry_after_ms, advice=advice
        )

    @staticmethod
    def from_event_data(data: Dict[str, Any]) -> WorkerError:
        """Rebuild an error from the ``data`` of an ``error`` event."""
        return error_class(str(data.get("code", "INTERNAL")))(
            str(data.get("message", "")),
            retriable=bool(data.get("retriable", False)),
            retry_after_ms=data.get("retry_after_ms"),
            advice="",
        )


def _rebuild(
    cls: Type[WorkerError],
    message: str,
    retriable: bool,
    retry_after_ms: Optional[int],
    advice: str,
    engine: str,
) -> WorkerError:
    return cls(message, retriable=retriable, retry_after_ms=retry_after_ms, advice=advice, engine=engine)


class AdmissionRejectError(WorkerError):
    """The engine refused the task for now (HTTP 429, ``overloaded``)."""

    code = ErrorKind.ADMISSION_REJECT
    default_retriable = True
    default_advice = "the engine is at max_concurrent_requests; retry later or on another replica"


class QueueFullDropLruError(WorkerError):
    """The task was dropped from a full queue."""

    code = ErrorKind.QUEUE_FULL_DROP_LRU
    default_retriable = True
    default_advice = "retry later"


class InvalidParamsError(WorkerError, ValueError):
    """The task (or a field of it) is not valid for this engine."""

    code = ErrorKind.INVALID_PARAMS
    default_advice = "fix the named field of the task; retrying the same task will fail again"


class PoolUnreadyError(WorkerError):
    """The engine is up but not ready (``/health`` 503, HTTP 503)."""

    code = ErrorKind.POOL_UNREADY
    default_retriable = True
    default_advice = "the engine is loading or unhealthy; retry after it reports ready"


class PoolUnavailableError(WorkerError):
    """The engine cannot serve this task: unreachable, refused, or it cannot fit."""

    code = ErrorKind.POOL_UNAVAILABLE
    default_retriable = True
    default_advice = "check that the engine is running and reachable at the configured URL"


class ReplicaExhaustedError(WorkerError):
    """Every replica that could serve the task was tried."""

    code = ErrorKind.REPLICA_EXHAUSTED
    default_retriable = True
    default_advice = "add capacity or retry later"


class DecodeTimeoutError(WorkerError):
    """No progress from the engine within the first-token or token-idle timeout."""

    code = ErrorKind.DECODE_TIMEOUT
    default_retriable = True
    default_advice = "the engine stalled; retry, or raise Timeouts.first_token / token_idle"


class WorkerResetError(WorkerError):
    """The connection or the generation broke off before the final frame."""

    code = ErrorKind.WORKER_RESET
    default_retriable = True
    default_advice = "the engine or the network dropped the stream; retry the task"


class InternalError(WorkerError):
    """The engine failed or sent something the adapter cannot understand."""

    code = ErrorKind.INTERNAL
    default_advice = "report this with the engine version and the task"


class DeadlineUnmetError(WorkerError):
    """The task's ``deadline_ms`` passed before it finished."""

    code = ErrorKind.DEADLINE_UNMET
    default_advice = "give the task a longer deadline_ms or fewer max_tokens"


class ModelDeprecatedError(WorkerError):
    """The requested model is deprecated."""

    code = ErrorKind.MODEL_DEPRECATED
    default_advice = "use a supported model"


class UntrustedArtifactError(WorkerError):
    """The artifact failed a trust check."""

    code = ErrorKind.UNTRUSTED_ARTIFACT
    default_advice = "use a trusted, verified artifact"


_BY_CODE: Dict[ErrorKind, Type[WorkerError]] = {
    cls.code: cls
    for cls in (
        AdmissionRejectError,
        QueueFullDropLruError,
        InvalidParamsError,
        PoolUnreadyError,
        PoolUnavailableError,
        ReplicaExhaustedError,
        DecodeTimeoutError,
        WorkerResetError,
        InternalError,
        DeadlineUnmetError,
        ModelDeprecatedError,
        UntrustedArtifactError,
    )
}


def error_class(code: ErrorKind | str) -> Type[WorkerError]:
    """The :class:`WorkerError` subclass for ``code`` (``InternalError`` if unknown)."""
    try:
        return _BY_CODE[ErrorKind(code)]
    except ValueError:
        return InternalError
