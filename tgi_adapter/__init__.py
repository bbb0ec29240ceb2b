"""tgi_adapter: drive Hugging Face Text Generation Inference servers through one worker contract."""

import logging

from .__about__ import __version__
from .adapter import TgiHttpAdapter
from .config import AdapterConfig
from .contract import (
    EngineInfo,
    SamplingParams,
    TaskRequest,
    TokenEvent,
    WorkerAdapter,
    WorkerHealth,
    WorkerProps,
)
from .determinism import DeterminismReport
from .errors import (
    AdmissionRejectError,
    DeadlineUnmetError,
    DecodeTimeoutError,
    ErrorKind,
    InternalError,
    InvalidParamsError,
    ModelDeprecatedError,
    PoolUnavailableError,
    PoolUnreadyError,
    QueueFullDropLruError,
    ReplicaExhaustedError,
    UntrustedArtifactError,
    WorkerError,
    WorkerResetError,
)
from .host import AdapterHost
from .metrics import MetricsRegistry
from .probes import verify_determinism
from .retry import RetryPolicy, Timeouts
from .stream import TokenStream
from .streamset import StreamSet

__all__ = [
    "__version__",
    "TgiHttpAdapter",
    "AdapterConfig",
    "Timeouts",
    "RetryPolicy",
    "TaskRequest",
    "SamplingParams",
    "TokenEvent",
    "TokenStream",
    "WorkerHealth",
    "WorkerProps",
    "EngineInfo",
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
    "WorkerAdapter",
    "MetricsRegistry",
    "AdapterHost",
    "StreamSet",
    "DeterminismReport",
    "verify_determinism",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
