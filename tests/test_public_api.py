"""The public surface is exactly what the contract names, and it is documented."""

from __future__ import annotations

import inspect
import logging

import tgi_adapter

PUBLIC = [
    "AdapterConfig",
    "AdapterHost",
    "AdmissionRejectError",
    "DeadlineUnmetError",
    "DecodeTimeoutError",
    "DeterminismReport",
    "EngineInfo",
    "ErrorKind",
    "InternalError",
    "InvalidParamsError",
    "MetricsRegistry",
    "ModelDeprecatedError",
    "PoolUnavailableError",
    "PoolUnreadyError",
    "QueueFullDropLruError",
    "ReplicaExhaustedError",
    "RetryPolicy",
    "SamplingParams",
    "StreamSet",
    "TaskRequest",
    "TgiHttpAdapter",
    "Timeouts",
    "TokenEvent",
    "TokenStream",
    "UntrustedArtifactError",
    "WorkerAdapter",
    "WorkerError",
    "WorkerHealth",
    "WorkerProps",
    "WorkerResetError",
    "__version__",
    "verify_determinism",
]


def test_all_is_pinned() -> None:
    assert sorted(tgi_adapter.__all__) == sorted(PUBLIC)


def test_every_public_name_exists_and_is_documented() -> None:
    for name in tgi_adapter.__all__:
        obj = getattr(tgi_adapter, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_version_is_a_string() -> None:
    assert isinstance(tgi_adapter.__version__, str) and tgi_adapter.__version__.count(".") == 2


def test_the_package_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("tgi_adapter").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
