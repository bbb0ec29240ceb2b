"""Pure tables and functions between the contract and TGI's HTTP API.

No I/O happens here: these functions turn tasks into request bodies, engine
answers into contract values, and failures into :class:`WorkerError`. The
tables (:data:`ERROR_TABLE`, :data:`ROUTE_TABLE`, :data:`SAMPLER_PROFILES`) are
rendered in README.rst; a test keeps the two in step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .contract import U64_MAX, EngineInfo, SamplingParams, TaskRequest
from .errors import ErrorKind, InvalidParamsError, WorkerError, error_class
from .redact import clip, redact_text

__all__ = [
    "ErrorRule",
    "ERROR_TABLE",
    "RouteSpec",
    "ROUTE_TABLE",
    "SAMPLER_PROFILES",
    "error_for",
    "error_for_failure",
    "error_from_status",
    "error_from_frame",
    "error_from_openai_frame",
    "build_request",
    "effective_sampling",
    "check_fit",
    "engine_info_from_json",
    "parse_prometheus",
    "slots_free_from_metrics",
]


# --------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ErrorRule:
    """One row of the error table: what happened, the code, and what to do."""

    key: str
    what: str
    code: ErrorKind
    retriable: bool
    advice: str


_R = ErrorRule
_K = ErrorKind

#: Every failure the adapter can report, in the order README.rst lists them.
ERROR_TABLE: Tuple[ErrorRule, ...] = (
    _R("invalid_task", "a task field is invalid (the message names it)", _K.INVALID_PARAMS, False,
       "fix the named field; the same task will fail again"),
    _R("does_not_fit", "the task cannot fit the deployed model (ctx or max_tokens over max_total_tokens, "
       "or the engine's 422 about input/total token limits)", _K.POOL_UNAVAILABLE, False,
       "send it to a pool with a larger context, or shorten the prompt / max_tokens"),
    _R("engine_oom", "the engine ran out of GPU memory for this task", _K.POOL_UNAVAILABLE, False,
       "send it to a pool with more memory, or lower max_tokens"),
    _R("connect_failed", "connection refused, DNS failure or connect timeout (engine down or still loading)",
       _K.POOL_UNAVAILABLE, True, "check the engine is running and the URL is right; TGI listens only once loaded"),
    _R("tls", "TLS failure: the certificate failed verification or names another host", _K.POOL_UNAVAILABLE,
       False, "set AdapterConfig(verify=<CA bundle path>) for a private CA, or fix the engine's certificate"),
    _R("proxy", "the HTTP proxy refused or failed the connection", _K.POOL_UNAVAILABLE, True,
       "check HTTPS_PROXY / NO_PROXY and the proxy itself"),
    _R("auth", "HTTP 401/403: the token is missing or wrong", _K.POOL_UNAVAILABLE, False,
       "pass token= or set TGI_ADAPTER_TOKEN to the engine's --api-key"),
    _R("not_found", "HTTP 404: the route is not served at this URL", _K.POOL_UNAVAILABLE, False,
       "check the base URL's path prefix and AdapterConfig.route (the /v1 routes need TGI >= 1.4)"),
    _R("unready", "HTTP 503 or /health 503: the engine is not ready", _K.POOL_UNREADY, True,
       "retry after /health reports ready"),
    _R("overloaded", "HTTP 429 or stream error 'overloaded': the engine is at max_concurrent_requests",
       _K.ADMISSION_REJECT, True, "retry later or on another replica"),
    _R("validation", "HTTP 422 or stream error 'validation': the engine rejected a parameter",
       _K.INVALID_PARAMS, False, "fix the parameter the message names"),
    _R("too_large", "HTTP 413: the request body is over the engine's payload limit", _K.INVALID_PARAMS, False,
       "shorten the prompt or raise the engine's --payload-limit"),
    _R("generation", "HTTP 424 or stream error 'generation': the engine failed while generating",
       _K.INTERNAL, False, "check the engine's logs; its batch was dropped"),
    _R("incomplete", "the engine reported an incomplete generation", _K.WORKER_RESET, True,
       "retry the task"),
    _R("reset", "the connection was reset or closed before the final frame", _K.WORKER_RESET, True,
       "retry the task; check the engine and any proxy between"),
    _R("bad_gateway", "HTTP 502 from a proxy in front of the engine", _K.POOL_UNAVAILABLE, True,
       "retry; the proxy could not reach the engine"),
    _R("gateway_timeout", "HTTP 504 from a proxy in front of the engine", _K.DECODE_TIMEOUT, True,
       "retry; raise the proxy's timeout for long generations"),
    _R("first_token_timeout", "no data frame within Timeouts.first_token (queue wait and prefill)",
       _K.DECODE_TIMEOUT, True, "retry, or raise Timeouts.first_token"),
    _R("token_idle_timeout", "no data frame within Timeouts.token_idle (keep-alive comments do not count)",
       _K.DECODE_TIMEOUT, True, "retry, or raise Timeouts.token_idle"),
    _R("deadline", "the task's deadline_ms passed", _K.DEADLINE_UNMET, False,
       "give the task a longer deadline_ms or fewer max_tokens"),
    _R("malformed", "the engine sent a frame or body the adapter cannot parse", _K.INTERNAL, False,
       "check the URL points at TGI (or a compatible server) and report the engine version"),
    _R("frame_too_large", "a frame exceeded AdapterConfig.max_frame_bytes", _K.INTERNAL, False,
       "raise AdapterConfig.max_frame_bytes if such frames are expected"),
    _R("server_error", "HTTP 500 or another unexpected status", _K.INTERNAL, False,
       "check the engine's logs"),
    _R("unknown_error_type", "an error frame of a type this adapter does not know", _K.INTERNAL, False,
       "report the engine version and the message"),
)

_RULES: Dict[str, ErrorRule] = {rule.key: rule for rule in ERROR_TABLE}


def error_for(
    key: str,
    detail: str = "",
    *,
    retry_after_ms: Optional[int] = None,
    retriable: Optional[bool] = None,
    secrets: Sequence[Optional[str]] = (),
) -> WorkerError:
    """The :class:`WorkerError` for row ``key`` of :data:`ERROR_TABLE`.

    ``detail`` (an engine's message, say) is redacted and clipped before it
    becomes part of the message.
    """
    rule = _RULES[key]
    message = rule.what
    if detail:
        message = f"{message}: {clip(redact_text(detail, secrets))}"
    return error_class(rule.code)(
        message,
        retriable=rule.retriable if retriable is None else retriable,
        retry_after_ms=retry_after_ms,
        advice=rule.advice,
    )


#: What a transport failure (see ``transport.FAILURE_CAUSES``) means: the error
#: table's row, and the detail shown instead of the exception's own text
#: (``None``: show the exception's text).
_FAILURE_RULES: Dict[str, Tuple[str, Optional[str]]] = {
    "tls": ("tls", None),
    "proxy": ("proxy", None),
    "dns": ("connect_failed", "the host name did not resolve"),
    "refused": ("connect_failed", "connection refused"),
    "connect": ("connect_failed", None),
    "connect_timeout": ("connect_failed", "connect timed out"),
    "invalid_url": ("connect_failed", None),
    "reset": ("reset", None),
}


def error_for_failure(
    cause: str, detail: str, *, phase: str, secrets: Sequence[Optional[str]] = ()
) -> WorkerError:
    """The :class:`WorkerError` for a transport failure of ``cause``.

    ``phase`` is ``"connect"`` (no response yet) or ``"read"`` (a body was
    streaming). An unexplained broken connection means the engine could not be
    reached before a response, and that the stream broke off after one. Read
    timeouts are the caller's to name (first token, token idle or deadline).
    """
    if cause == "broken" or cause == "read_timeout":
        return error_for("connect_failed" if phase == "connect" else "reset", detail, secrets=secrets)
    if cause == "tls_eof":
        if phase == "connect":
            return error_for("tls", detail, secrets=secrets)
        return error_for("reset", "the engine closed the TLS connection", secrets=secrets)
    rule = _FAILURE_RULES.get(cause)
    if rule is None:
        return error_for("server_error", detail, secrets=secrets)
    key, shown = rule
    return error_for(key, shown or detail, retriable=False if cause == "invalid_url" else None, secrets=secrets)


_FIT_MESSAGES = re.compile(
    r"`inputs` tokens \+ `max_new_tokens` must be <=|`inputs` must have less than|"
    r"`max_new_tokens` must be <=|`truncate` must be strictly positive and less than",
)
_OOM = re.compile(r"(?i)out of memory|\bOOM\b")

_ERROR_TYPES: Dict[str, str] = {
    "overloaded": "overloaded",
    "validation": "validation",
    "generation": "generation",
    "incomplete_generation": "incomplete",
    "incomplete_generation_stream": "incomplete",
    "template_error": "validation",
    "missing_template_variable": "validation",
    "tool_error": "validation",
    "healthcheck": "unready",
    "stream_serialization_error": "server_error",
    "Input validation error": "validation",
    "suffix not supported": "validation",
    "batch size exceeded": "validation",
}


def _rule_for_message(error_type: Optional[str], message: str) -> str:
    key = _ERROR_TYPES.get(error_type or "", "unknown_error_type")
    if key == "validation" and _FIT_MESSAGES.search(message):
        return "does_not_fit"
    if key == "generation" and _OOM.search(message):
        return "engine_oom"
    return key


def error_from_frame(error: Any, error_type: Any, secrets: Sequence[Optional[str]] = ()) -> WorkerError:
    """The error for TGI's ``{"error", "error_type"}`` shape (in a stream or a body)."""
    message = error if isinstance(error, str) else json.dumps(error)
    kind = error_type if isinstance(error_type, str) else None
    return error_for(_rule_for_message(kind, message), message, secrets=secrets)


_OPENAI_PREFIXES = (
    ("Model is overloaded", "overloaded"),
    ("Input validation error", "validation"),
    ("Request failed during generation", "generation"),
    ("Incomplete generation", "incomplete_generation"),
    ("Template error", "template_error"),
    ("Missing template", "missing_template_variable"),
    ("Tool error", "tool_error"),
)


def error_from_openai_frame(error: Any, secrets: Sequence[Optional[str]] = ()) -> WorkerError:
    """The error for the OpenAI routes' ``{"error": {"message", "http_status_code"}}``.

    TGI sends ``http_status_code`` 422 for every in-stream error on these routes,
    overload included, so the message is what tells the cases apart.
    """
    if isinstance(error, Mapping):
        message = str(error.get("message", ""))
    else:
        message = str(error)
    for prefix, error_type in _OPENAI_PREFIXES:
        if message.startswith(prefix):
            return error_for(_rule_for_message(error_type, message), message, secrets=secrets)
    return error_for("unknown_error_type", message, secrets=secrets)


_STATUS_RULES: Dict[int, str] = {
    400: "malformed",
    401: "auth",
    403: "auth",
    404: "not_found",
    413: "too_large",
    415: "malformed",
    422: "validation",
    424: "generation",
    429: "overloaded",
    500: "server_error",
    502: "bad_gateway",
    503: "unready",
    504: "gateway_timeout",
}


def error_from_status(
    status: int,
    body: bytes,
    content_type: str,
    *,
    retry_after_ms: Optional[int] = None,
    secrets: Sequence[Optional[str]] = (),
) -> WorkerError:
    """The error for an HTTP status other than 200.

    TGI's own errors are JSON ``{"error", "error_type"}``; its request
    extractor answers in plain text; proxies answer in HTML. Only the first
    two are quoted in the message (clipped and redacted); HTML is not.
    """
    detail = ""
    error_type: Optional[str] = None
    parsed: Any = None
    if "json" in content_type or body[:1] in (b"{", b"["):
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
    if isinstance(parsed, list) and parsed and isinstance(parsed[0], Mapping):
        parsed = parsed[0]
    if isinstance(parsed, Mapping) and "error" in parsed:
        raw_error = parsed["error"]
        if isinstance(raw_error, Mapping):  # OpenAI-style nested object
            detail = str(raw_error.get("message", ""))
        else:
            detail = str(raw_error)
        raw_type = parsed.get("error_type")
        error_type = raw_type if isinstance(raw_type, str) else None
    elif "html" in content_type or body.lstrip()[:1] == b"<":
        detail = f"HTTP {status} with an HTML page (from a proxy, not TGI)"
    elif body:
        detail = body.decode("utf-8", "replace")
    if not detail:
        detail = f"HTTP {status}"
    elif not detail.startswith("HTTP "):
        detail = f"HTTP {status}: {detail}"
    if error_type is not None and status not in (401, 403, 404, 502, 504):
        key = _rule_for_message(error_type, detail)
        if key == "unknown_error_type":
            key = _STATUS_RULES.get(status, "server_error")
    else:
        key = _STATUS_RULES.get(status, "server_error")
        if key == "validation" and _FIT_MESSAGES.search(detail):
            key = "does_not_fit"
    return error_for(key, detail, retry_after_ms=retry_after_ms, secrets=secrets)


# --------------------------------------------------------------------------
# Sampling and request bodies

#: Named sampling profiles, selected by ``TaskRequest.sampler_profile_version``.
#: A task's own ``sampling`` values override the profile's; ``determinism=
#: "strict"`` overrides both with greedy decoding.
SAMPLER_PROFILES: Dict[str, Mapping[str, Any]] = {
    "greedy-v1": {"do_sample": False},
    "precise-v1": {"do_sample": True, "temperature": 0.2, "top_p": 0.9},
    "balanced-v1": {"do_sample": True, "temperature": 0.7, "top_p": 0.95},
    "creative-v1": {"do_sample": True, "temperature": 1.0, "top_p": 0.98, "repetition_penalty": 1.05},
}

_WARPERS = ("temperature", "top_k", "top_p", "typical_p")


def _invalid(field_name: str, problem: str) -> InvalidParamsError:
    return InvalidParamsError(f"invalid task field {field_name!r}: {problem}")


def effective_sampling(task: TaskRequest) -> Dict[str, Any]:
    """The sampling values the engine should use, route-independent.

    Profile defaults, then the task's values, then the ``strict`` rule;
    values meaning "off" are dropped and ``temperature=0`` becomes greedy.
    The result always has ``do_sample`` (True or False).
    """
    values: Dict[str, Any] = {}
    version = task.sampler_profile_version
    if version is not None:
        if version not in SAMPLER_PROFILES:
            known = ", ".join(sorted(SAMPLER_PROFILES))
            raise _invalid("sampler_profile_version", f"unknown profile {version!r} (known: {known})")
        values.update(SAMPLER_PROFILES[version])
    sampling = task.sampling or SamplingParams()
    for name in (
        "temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "frequency_penalty",
        "do_sample", "truncate", "watermark", "grammar", "best_of",
    ):
        value = getattr(sampling, name)
        if value is not None:
            values[name] = value
    if sampling.stop:
        values["stop"] = list(sampling.stop)
    if values.get("temperature") == 0:
        del values["temperature"]
        values["do_sample"] = False
    if values.get("top_p") == 1:
        del values["top_p"]
    if values.get("typical_p") == 1:
        del values["typical_p"]
    if values.get("top_k") == 0:
        del values["top_k"]
    if values.get("best_of") == 1:
        del values["best_of"]
    if task.determinism == "strict":
        for name in _WARPERS:
            values.pop(name, None)
        values["do_sample"] = False
    sampling_on = bool(values.get("do_sample")) or any(
        name in values and not (name == "temperature" and values[name] == 1) for name in _WARPERS
    )
    values["do_sample"] = sampling_on
    best_of = values.get("best_of")
    if best_of is not None and best_of > 1:
        if not sampling_on:
            raise _invalid("sampling.best_of", "best_of > 1 needs sampling (the engine would reject it)")
        if task.seed is not None:
            raise _invalid("sampling.best_of", "best_of > 1 cannot be combined with a seed")
    return values


@dataclass(frozen=True)
class RouteSpec:
    """How one contract operation is carried on one route."""

    route: str
    operation: str
    method: str
    path: str
    body: str
    answer: str


#: The endpoint mapping: contract operation × route → HTTP request and parser.
ROUTE_TABLE: Tuple[RouteSpec, ...] = (
    RouteSpec("native", "submit", "POST", "/generate_stream",
              "{inputs, parameters{max_new_tokens, details:true, seed, ...}}",
              "SSE data frames {index, token, generated_text, details}; final frame has generated_text"),
    RouteSpec("native", "generate", "POST", "/generate",
              "{inputs, parameters{max_new_tokens, details:true, seed, ...}}",
              "JSON {generated_text, details}; x-prompt-tokens header"),
    RouteSpec("openai-completions", "submit", "POST", "/v1/completions",
              "{model, prompt, max_tokens, seed, temperature, stream:true}",
              "SSE chunks {choices[{text, finish_reason}]}, usage on the last, then [DONE]"),
    RouteSpec("openai-completions", "generate", "POST", "/v1/completions",
              "{model, prompt, max_tokens, seed, temperature, stream:false}",
              "JSON {choices[{text, finish_reason}], usage}"),
    RouteSpec("openai-chat", "submit", "POST", "/v1/chat/completions",
              "{model, messages, max_tokens, seed, temperature, stream:true, stream_options}",
              "SSE chunks {choices[{delta{content}, finish_reason}]}, usage chunk, then [DONE]"),
    RouteSpec("openai-chat", "generate", "POST", "/v1/chat/completions",
              "{model, messages, max_tokens, seed, temperature, stream:false}",
              "JSON {choices[{message{content}, finish_reason}], usage}"),
    RouteSpec("any", "health", "GET", "/health", "-", "200 ready; 503 not ready; no answer: not live"),
    RouteSpec("any", "engine_info", "GET", "/info", "-", "JSON Info (three eras of field names)"),
    RouteSpec("any", "props", "GET", "/metrics", "-",
              "Prometheus text: tgi_queue_size, tgi_batch_current_size"),
    RouteSpec("any", "fit check", "POST", "/tokenize", "{inputs}",
              "JSON list of tokens (only with AdapterConfig(tokenize_check=True))"),
)

_PATHS: Dict[Tuple[str, str], str] = {(r.route, r.operation): r.path for r in ROUTE_TABLE}

# What each OpenAI route cannot express: TGI would silently ignore these.
_OPENAI_UNSUPPORTED: Dict[str, Tuple[str, ...]] = {
    "openai-completions": ("top_k", "typical_p", "truncate", "watermark", "grammar", "best_of"),
    "openai-chat": ("top_k", "typical_p", "truncate", "watermark", "best_of"),
}


def _prompt_or_fail(task: TaskRequest, route: str) -> str:
    if task.prompt is None:
        raise _invalid("inputs", f"a conversation needs route 'openai-chat'; route {route!r} takes a prompt")
    return task.prompt


def build_request(
    task: TaskRequest,
    *,
    route: str,
    stream: bool,
    info: Optional[EngineInfo] = None,
    model: str = "tgi",
) -> Tuple[str, Dict[str, Any]]:
    """``(path, body)`` for ``task`` on ``route``; raises ``InvalidParamsError``.

    The body always carries what the contract needs back (``details`` on the
    native routes, usage on chat streams) and the task's seed.
    """
    values = effective_sampling(task)
    stop = values.get("stop", [])
    if info is not None and info.max_stop_sequences is not None and len(stop) > info.max_stop_sequences:
        raise _invalid(
            "sampling.stop", f"{len(stop)} stop sequences, the engine allows {info.max_stop_sequences}"
        )
    truncate = values.get("truncate")
    if info is not None and truncate is not None and info.max_input_tokens and truncate > info.max_input_tokens:
        raise _invalid("sampling.truncate", f"must be <= the engine's max_input_tokens {info.max_input_tokens}")
    best_of = values.get("best_of")
    if best_of is not None and best_of > 1:
        if stream:
            raise _invalid("sampling.best_of", "best_of > 1 is not supported when streaming; use generate()")
        if info is not None and info.max_best_of is not None and best_of > info.max_best_of:
            raise _invalid("sampling.best_of", f"the engine allows at most {info.max_best_of}")
    operation = "submit" if stream else "generate"
    path = _PATHS[(route, operation)]
    if route == "native":
        return path, _native_body(task, values)
    for name in _OPENAI_UNSUPPORTED[route]:
        if name in values:
            raise _invalid(f"sampling.{name}", f"not supported on route {route!r}; use the native route")
    body: Dict[str, Any] = {"model": model, "max_tokens": task.max_tokens, "stream": stream}
    if route == "openai-chat":
        if task.inputs is not None:
            body["messages"] = [dict(m) for m in task.inputs]
        else:
            body["messages"] = [{"role": "user", "content": task.prompt}]
        if stream:
            body["stream_options"] = {"include_usage": True}
        if "grammar" in values:
            body["response_format"] = dict(values["grammar"])
        if "repetition_penalty" in values:
            # TGI's chat route computes repetition_penalty = presence_penalty + 2.
            body["presence_penalty"] = values["repetition_penalty"] - 2.0
    else:
        body["prompt"] = _prompt_or_fail(task, route)
        if "repetition_penalty" in values:
            body["repetition_penalty"] = values["repetition_penalty"]
    if values["do_sample"]:
        body["temperature"] = values.get("temperature", 1.0)
        if "top_p" in values:
            body["top_p"] = values["top_p"]
    else:
        # Absent, the temperature means "sample at 1.0" on these routes.
        body["temperature"] = 0.0
    if "frequency_penalty" in values:
        body["frequency_penalty"] = values["frequency_penalty"]
    if stop:
        body["stop"] = list(stop)
    if task.seed is not None:
        body["seed"] = task.seed
    return path, body


def _native_body(task: TaskRequest, values: Mapping[str, Any]) -> Dict[str, Any]:
    prompt = _prompt_or_fail(task, "native")
    parameters: Dict[str, Any] = {"max_new_tokens": task.max_tokens, "details": True}
    # The key must always be present: without "parameters" TGI samples.
    for name in (
        "do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "frequency_penalty", "stop", "truncate", "watermark", "grammar", "best_of",
    ):
        if name in values:
            parameters[name] = values[name]
    if not parameters.get("do_sample"):
        # "do_sample": false with a temperature still samples in TGI's shards.
        parameters.pop("temperature", None)
    if task.seed is not None:
        parameters["seed"] = task.seed
    return {"inputs": prompt, "parameters": parameters}


def check_fit(task: TaskRequest, info: Optional[EngineInfo], prompt_tokens: Optional[int] = None) -> None:
    """Raise ``POOL_UNAVAILABLE`` (not retriable) when the task cannot fit the model.

    The rule is the engine's own: ``ctx`` and ``max_tokens`` must stay within
    ``max_total_tokens`` (``max_tokens`` strictly below it, since the prompt
    takes at least one token), and with a known prompt length,
    ``prompt_tokens + max_tokens`` must too.
    """
    if info is None or not info.max_total_tokens:
        return
    limit = info.max_total_tokens
    if task.ctx > limit:
        raise error_for("does_not_fit", f"ctx {task.ctx} > the engine's max_total_tokens {limit}")
    if task.max_tokens >= limit:
        raise error_for("does_not_fit", f"max_tokens {task.max_tokens} >= the engine's max_total_tokens {limit}")
    if prompt_tokens is not None:
        if info.max_input_tokens and prompt_tokens > info.max_input_tokens:
            raise error_for(
                "does_not_fit",
                f"the prompt is {prompt_tokens} tokens, the engine's max_input_tokens is {info.max_input_tokens}",
            )
        if prompt_tokens + task.max_tokens > limit:
            raise error_for(
                "does_not_fit",
                f"{prompt_tokens} prompt tokens + max_tokens {task.max_tokens} > max_total_tokens {limit}",
            )


# --------------------------------------------------------------------------
# Control plane

_INFO_FIELDS = (
    "model_id", "model_sha", "version", "sha", "docker_label", "max_total_tokens", "max_input_tokens",
    "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_client_batch_size",
    "validation_workers", "model_pipeline_tag", "model_dtype", "model_device_type", "router",
)
_INT_FIELDS = frozenset(
    {"max_total_tokens", "max_input_tokens", "max_concurrent_requests", "max_best_of", "max_stop_sequences",
     "max_client_batch_size", "validation_workers"}
)


def engine_info_from_json(data: Any) -> EngineInfo:
    """An :class:`EngineInfo` from ``/info``'s JSON, whatever the TGI era.

    Raises ``ValueError`` when ``data`` is not an object.
    """
    if not isinstance(data, Mapping):
        raise ValueError("/info did not return a JSON object")
    values: Dict[str, Any] = {}
    for name in _INFO_FIELDS:
        value = data.get(name)
        if name == "max_input_tokens" and value is None:
            value = data.get("max_input_length")
        if name in _INT_FIELDS:
            value = value if isinstance(value, int) and not isinstance(value, bool) else None
        elif value is not None and not isinstance(value, str):
            value = str(value)
        values[name] = value
    known = set(_INFO_FIELDS) | {"max_input_length"}
    extra = {k: v for k, v in data.items() if k not in known}
    return EngineInfo(extra=extra, **values)


_SAMPLE = re.compile(
    r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)(?:\s+-?\d+)?\s*$"
)


def parse_prometheus(text: str) -> Dict[str, float]:
    """Unlabelled samples of Prometheus text, by name; tolerant of garbage.

    Labelled series are summed under their bare name (``tgi_request_failure``
    over every ``err``), which is what capacity needs. Lines that do not parse
    are skipped, not fatal: a scrape is advisory.
    """
    out: Dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, _labels, raw = match.groups()
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isnan(value):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def slots_free_from_metrics(metrics: Mapping[str, float], slots_total: Optional[int]) -> Optional[int]:
    """``max_concurrent_requests − (queue + batch)``, floored at 0; ``None`` if unknown."""
    if slots_total is None:
        return None
    if "tgi_queue_size" not in metrics and "tgi_batch_current_size" not in metrics:
        return None
    busy = metrics.get("tgi_queue_size", 0.0) + metrics.get("tgi_batch_current_size", 0.0)
    if not math.isfinite(busy):
        return None
    return max(0, slots_total - int(busy))


def seed_from_engine(value: Any) -> Optional[int]:
    """The engine's reported seed if it is a valid unsigned 64-bit integer."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX:
        return value
    return None


def int_or_none(value: Any) -> Optional[int]:
    """``value`` if it is a non-negative integer (not a bool), else ``None``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def header_int(headers: Mapping[str, str], name: str) -> Optional[int]:
    """An integer response header such as ``x-prompt-tokens``."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return None


# --------------------------------------------------------------------------
# Non-streaming answers


_FINISH = {"stop": "eos_token", "eos_token": "eos_token", "length": "length", "stop_sequence": "stop_sequence"}


def result_from_body(
    route: str,
    data: Any,
    headers: Mapping[str, str],
    *,
    engine_version: Optional[str],
    elapsed_ms: int,
    sampled_seed: Optional[int],
) -> Tuple[str, Dict[str, Any]]:
    """``(text, end_data)`` from a non-streaming answer on ``route``.

    Raises ``ValueError`` when the body does not have the route's shape.
    """
    if route == "native":
        if isinstance(data, list) and data:  # the compat route wraps it in a list
            data = data[0]
        if not isinstance(data, Mapping) or not isinstance(data.get("generated_text"), str):
            raise ValueError("no generated_text in the answer")
        text = data["generated_text"]
        details = data.get("details")
        details = details if isinstance(details, Mapping) else {}
        reason = details.get("finish_reason")
        tokens_out = int_or_none(details.get("generated_tokens"))
        seed = seed_from_engine(details.get("seed"))
        tokens_in = header_int(headers, "x-prompt-tokens")
    else:
        if not isinstance(data, Mapping) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise ValueError("no choices in the answer")
        choice = data["choices"][0]
        if not isinstance(choice, Mapping):
            raise ValueError("a choice is not an object")
        if route == "openai-chat":
            message = choice.get("message")
            content = message.get("content") if isinstance(message, Mapping) else None
        else:
            content = choice.get("text")
        text = content if isinstance(content, str) else ""
        reason = choice.get("finish_reason")
        usage = data.get("usage")
        usage = usage if isinstance(usage, Mapping) else {}
        tokens_out = int_or_none(usage.get("completion_tokens"))
        tokens_in = int_or_none(usage.get("prompt_tokens"))
        seed = sampled_seed
    inference_ms = header_int(headers, "x-inference-time")
    return text, {
        "tokens_out": tokens_out if tokens_out is not None else 0,
        "decode_ms": inference_ms if inference_ms is not None else elapsed_ms,
        "finish_reason": _FINISH.get(str(reason), "length"),
        "tokens_in": tokens_in,
        "seed": seed,
        "engine_version": engine_version,
    }
