"""The adapter's configuration: one immutable value, validated when built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from .redact import redact_headers
from .retry import RetryPolicy, Timeouts

__all__ = ["AdapterConfig", "ROUTES", "config_from_env", "ENV_VARS"]

#: The routes an adapter can drive (see the endpoint mapping table).
ROUTES = ("native", "openai-completions", "openai-chat")

Verify = Union[bool, str]
ClientCert = Union[None, str, Tuple[str, str]]


@dataclass(frozen=True)
class AdapterConfig:
    """How a :class:`~tgi_adapter.TgiHttpAdapter` talks to its engine.

    :param timeouts: see :class:`~tgi_adapter.Timeouts`.
    :param retry: see :class:`~tgi_adapter.RetryPolicy`.
    :param route: ``"native"`` (``/generate_stream``, ``/generate``),
        ``"openai-completions"`` (``/v1/completions``) or ``"openai-chat"``
        (``/v1/chat/completions``).
    :param pool_id: the orchestrator's pool label, for logs and metrics.
    :param replica_id: the orchestrator's replica label, for logs and metrics.
    :param headers: extra headers sent with every request.
    :param verify: ``True`` (system trust store), ``False``, or a CA bundle path.
    :param cert: a client certificate for mutual TLS: a PEM path holding both
        certificate and key, or a ``(cert, key)`` pair of paths.
    :param max_frame_bytes: the longest SSE line accepted from the engine.
    :param pool_maxsize: kept-alive connections per replica.
    :param info_ttl: seconds a fetched ``/info`` is reused.
    :param tokenize_check: check prompt length exactly through ``POST /tokenize``
        before sending (one more round trip per task).
    :param model: the ``model`` sent on the OpenAI routes; TGI reads any value
        other than ``"tgi"`` as a LoRA adapter id.
    :param tracing: with ``opentelemetry-api`` installed, one span per task and
        its W3C ``traceparent`` sent to the engine; ``False`` turns both off.
    :param record: a cassette file: every engine exchange of the adapter is
        appended to it as JSON Lines (see "Record and replay" in the README);
        None (the default) records nothing.
    """

    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    route: str = "native"
    pool_id: Optional[str] = None
    replica_id: Optional[str] = None
    headers: Mapping[str, str] = field(default_factory=dict)
    verify: Verify = True
    cert: ClientCert = None
    max_frame_bytes: int = 1 << 20
    pool_maxsize: int = 32
    info_ttl: float = 30.0
    tokenize_check: bool = False
    model: str = "tgi"
    tracing: bool = True
    record: Union[None, str, os.PathLike[str]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.timeouts, Timeouts):
            raise ValueError(f"AdapterConfig.timeouts must be a Timeouts, got {type(self.timeouts).__name__}")
        if not isinstance(self.retry, RetryPolicy):
            raise ValueError(f"AdapterConfig.retry must be a RetryPolicy, got {type(self.retry).__name__}")
        if self.route not in ROUTES:
            raise ValueError(f"AdapterConfig.route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        for name in ("pool_id", "replica_id"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"AdapterConfig.{name} must be a string or None, got {value!r}")
        if not isinstance(self.headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.headers.items()
        ):
            raise ValueError("AdapterConfig.headers must map header names to string values")
        # A copy, so the caller's later changes to their dict cannot leak in.
        object.__setattr__(self, "headers", dict(self.headers))
        if not isinstance(self.verify, (bool, str)) or self.verify == "":
            raise ValueError("AdapterConfig.verify must be True, False or the path of a CA bundle")
        if self.cert is not None and not (
            isinstance(self.cert, str)
            or (isinstance(self.cert, tuple) and len(self.cert) == 2 and all(isinstance(p, str) for p in self.cert))
        ):
            raise ValueError("AdapterConfig.cert must be a PEM path or a (cert, key) pair of paths")
        for name, low in (("max_frame_bytes", 64), ("pool_maxsize", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AdapterConfig.{name} must be an integer >= {low}, got {value!r}")
        ttl = self.info_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 0:
            raise ValueError(f"AdapterConfig.info_ttl must be a number of seconds >= 0, got {ttl!r}")
        if not isinstance(self.tokenize_check, bool):
            raise ValueError("AdapterConfig.tokenize_check must be a boolean")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("AdapterConfig.model must be a non-empty string")
        if not isinstance(self.tracing, bool):
            raise ValueError(f"AdapterConfig.tracing must be True or False, got {self.tracing!r}")
        if self.record is not None:
            record: Any = self.record
            if not isinstance(record, (str, os.PathLike)) or not os.fspath(record):
                raise ValueError(f"AdapterConfig.record must be the path of a cassette file or None, got {record!r}")
            object.__setattr__(self, "record", os.fspath(record))

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.name == "headers":
                value = redact_headers(value)
            parts.append(f"{f.name}={value!r}")
        return f"AdapterConfig({', '.join(parts)})"


#: The environment variables :meth:`TgiHttpAdapter.from_env` reads.
ENV_VARS: Dict[str, str] = {
    "TGI_ADAPTER_URL": "the engine's base URL (required)",
    "TGI_ADAPTER_TOKEN": "bearer token sent as Authorization (optional)",
    "TGI_ADAPTER_ROUTE": "native | openai-completions | openai-chat",
    "TGI_ADAPTER_POOL_ID": "pool label for logs and metrics",
    "TGI_ADAPTER_REPLICA_ID": "replica label for logs and metrics",
    "TGI_ADAPTER_VERIFY": "true | false | path of a CA bundle",
    "TGI_ADAPTER_CONNECT_TIMEOUT": "Timeouts.connect, seconds",
    "TGI_ADAPTER_CONTROL_TIMEOUT": "Timeouts.control, seconds",
    "TGI_ADAPTER_FIRST_TOKEN_TIMEOUT": "Timeouts.first_token, seconds",
    "TGI_ADAPTER_TOKEN_IDLE_TIMEOUT": "Timeouts.token_idle, seconds",
    "TGI_ADAPTER_RETRY_ATTEMPTS": "RetryPolicy.attempts",
    "TGI_ADAPTER_RECORD": "AdapterConfig.record, a cassette file to append every engine exchange to",
}


def _env_float(env: Mapping[str, str], name: str) -> Optional[float]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def config_from_env(env: Mapping[str, str], base: Optional[AdapterConfig] = None) -> AdapterConfig:
    """``base`` (or the defaults) with the ``TGI_ADAPTER_*`` overrides applied."""
    config = base or AdapterConfig()
    changes: Dict[str, Any] = {}
    if env.get("TGI_ADAPTER_ROUTE"):
        changes["route"] = env["TGI_ADAPTER_ROUTE"].strip()
    for key, name in (
        ("pool_id", "TGI_ADAPTER_POOL_ID"),
        ("replica_id", "TGI_ADAPTER_REPLICA_ID"),
        ("record", "TGI_ADAPTER_RECORD"),
    ):
        if env.get(name):
            changes[key] = env[name]
    verify = env.get("TGI_ADAPTER_VERIFY")
    if verify:
        lowered = verify.strip().lower()
        if lowered in ("1", "true", "yes"):
            changes["verify"] = True
        elif lowered in ("0", "false", "no"):
            changes["verify"] = False
        else:
            changes["verify"] = verify
    timeout_changes = {}
    for key, name in (
        ("connect", "TGI_ADAPTER_CONNECT_TIMEOUT"),
        ("control", "TGI_ADAPTER_CONTROL_TIMEOUT"),
        ("first_token", "TGI_ADAPTER_FIRST_TOKEN_TIMEOUT"),
        ("token_idle", "TGI_ADAPTER_TOKEN_IDLE_TIMEOUT"),
    ):
        value = _env_float(env, name)
        if value is not None:
            timeout_changes[key] = value
    if timeout_changes:
        changes["timeouts"] = replace(config.timeouts, **timeout_changes)
    attempts = env.get("TGI_ADAPTER_RETRY_ATTEMPTS")
    if attempts:
        try:
            changes["retry"] = replace(config.retry, attempts=int(attempts))
        except ValueError:
            raise ValueError(f"TGI_ADAPTER_RETRY_ATTEMPTS must be an integer, got {attempts!r}") from None
    return replace(config, **changes) if changes else config


def environ() -> Mapping[str, str]:
    """The process environment (a seam for tests)."""
    return os.environ
