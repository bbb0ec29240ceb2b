"""What a fake TGI sends: bodies, SSE frames and headers of each route, per version.

:class:`TgiRoutes` turns one decoded HTTP request into a :class:`Reply` (a whole
body) or a :class:`Stream` (headers and SSE frames), without I/O: the socket
server decides when each frame goes out. Key order, framing and error shapes
follow TGI's serde structs (``router/src/lib.rs``) and ``server.rs``.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Union

from .fake_axum import CHAT_REQUEST, COMPAT_REQUEST, COMPLETION_REQUEST, GENERATE_REQUEST, decode_body
from .fake_engine import (
    GENERATION_ROUTES,
    Fault,
    Generation,
    Limits,
    Params,
    Profile,
    Reply,
    generate,
    planned_new_tokens,
    tokenize,
    validate,
    validate_best_of,
)

__all__ = ["Frame", "Job", "MetricsState", "Stream", "TgiRoutes", "render_metrics", "rust_float", "status_reply"]

JSON_TYPE = ("content-type", "application/json")
ERROR_MESSAGES = {
    "validation": "Input validation error: `temperature` must be strictly positive",
    "overloaded": "Model is overloaded",
    "generation": "Request failed during generation: Server error: CUDA out of memory. Tried to allocate 1.00 GiB",
    "incomplete_generation": "Incomplete generation",
    "incomplete_generation_stream": "Incomplete generation stream",
    "template_error": "Template error: template not found",
    "missing_template_variable": "Missing template vatiable: messages",
    "tool_error": "Tool error: Grammar and tools are mutually exclusive",
    "stream_serialization_error": "Stream event serialization error",
    "healthcheck": "unhealthy",
}
ERROR_STATUS = {"validation": 422, "overloaded": 429, "generation": 424, "healthcheck": 503}
ERROR_STATUS.update(dict.fromkeys(("template_error", "missing_template_variable", "tool_error"), 422))
_STATUS_ERROR = {
    429: "overloaded",
    503: "healthcheck",
    424: "generation",
    500: "incomplete_generation",
    422: "validation",
}
# The err label of tgi_request_failure for each error type.
FAILURE_LABEL = {"incomplete_generation": "incomplete", "incomplete_generation_stream": "incomplete"}
_PROXY_TITLES = {502: "502 Bad Gateway", 504: "504 Gateway Time-out"}


def dumps(obj: Any) -> bytes:
    """Compact JSON with raw UTF-8, as serde_json writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def rust_float(value: float) -> str:
    """Format a float as Rust's ``Display`` does (shortest round-trip, never an exponent)."""
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    text = repr(value)
    return format(decimal.Decimal(text), "f") if "e" in text else text


def error_body(profile: Profile, message: str, error_type: str) -> dict[str, Any]:
    # ErrorResponse had no error_type before 0.4.
    return {"error": message, "error_type": error_type} if profile.ge(0, 4) else {"error": message}


def json_reply(status: int, obj: Any, headers: Sequence[tuple[str, str]] = (), **meta: Any) -> Reply:
    return Reply(status, (JSON_TYPE, *headers), dumps(obj), **meta)


def status_reply(profile: Profile, fault: Fault) -> Reply:
    """The answer of a ``"status"`` fault: TGI's error for that status unless scripted otherwise."""
    assert fault.status is not None
    status = fault.status
    body: bytes
    content_type = fault.content_type
    if fault.body is not None:
        body = fault.body.encode("utf-8") if isinstance(fault.body, str) else fault.body
        if content_type is None:
            try:
                json.loads(body)
                content_type = "application/json"
            except ValueError:
                content_type = "text/plain; charset=utf-8"
    elif fault.error_type is not None or fault.message is not None or status in _STATUS_ERROR:
        error_type = fault.error_type or _STATUS_ERROR.get(status, "generation")
        body = dumps(error_body(profile, fault.message or ERROR_MESSAGES.get(error_type, error_type), error_type))
        content_type = content_type or "application/json"
    elif status in _PROXY_TITLES:
        title = _PROXY_TITLES[status]
        page = f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
        body = (page + "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n").encode()
        content_type = content_type or "text/html"
    else:
        body = b""
    headers = ((("content-type", content_type),) if content_type else ()) + tuple(
        (name.lower(), value) for name, value in (fault.headers or {}).items()
    )
    return Reply(status, headers, body)


@dataclasses.dataclass(frozen=True)
class Frame:
    """One SSE event, exactly as written to the wire (``data: …\\n\\n``)."""

    data: bytes
    token: bool = False


@dataclasses.dataclass(frozen=True)
class Stream:
    """A ``text/event-stream`` answer (always HTTP 200)."""

    headers: tuple[tuple[str, str], ...]
    frames: tuple[Frame, ...]
    outcome: str = "success"
    counted: int = 1


@dataclasses.dataclass(frozen=True)
class Job:
    """A generation request that passed routing, auth and decoding; it needs a permit."""

    route: str
    body: Mapping[str, Any]
    stream: bool
    prompts: tuple[str, ...]
    params: Params


@dataclasses.dataclass
class MetricsState:
    """What ``/metrics`` reports; mutated by the server under its lock."""

    requests: int = 0
    success: int = 0
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    durations: list[float] = dataclasses.field(default_factory=list)
    generated: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 0
    queued: bool = False


def _buckets(name: str, values: Sequence[float], bounds: Sequence[float]) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{rust_float(b)}"}} {sum(v <= b for v in values)}' for b in bounds]
    lines += [f'{name}_bucket{{le="+Inf"}} {len(values)}', f"{name}_sum {rust_float(sum(values))}"]
    return [*lines, f"{name}_count {len(values)}", ""]


def render_metrics(profile: Profile, limits: Limits, state: MetricsState) -> str:
    """Prometheus text as metrics-exporter-prometheus renders TGI's metrics.

    A metric appears only once it has been recorded, as the exporter does.
    """
    lines: list[str] = []
    counters = {"tgi_request_count": state.requests, "tgi_request_success": state.success}
    for name, value in counters.items():
        if value:
            lines += [f"# TYPE {name} counter", f"{name} {value}", ""]
    if state.failures:
        lines.append("# TYPE tgi_request_failure counter")
        lines += [f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(state.failures.items())]
        lines.append("")
    if state.queued:
        lines += ["# TYPE tgi_batch_current_size gauge", f"tgi_batch_current_size {state.batch_size}", ""]
    if profile.ge(3, 0):
        lines += ["# TYPE tgi_batch_max_total_tokens gauge", f"tgi_batch_max_total_tokens {_batch_tokens(limits)}", ""]
    if state.queued:
        lines += ["# TYPE tgi_queue_size gauge", "tgi_queue_size 0", ""]
    if state.durations:
        duration_bounds = [0.00015 * 1.5**i for i in range(35)]
        lines += _buckets("tgi_request_duration", state.durations, duration_bounds)
        token_bounds = [limits.max_total_tokens / 100.0 * (i + 1) for i in range(100)]
        lines += _buckets("tgi_request_generated_tokens", [float(n) for n in state.generated], token_bounds)
    return "\n".join(lines)


def _batch_tokens(limits: Limits) -> int:
    return max(limits.max_total_tokens * 16, 16000)


Answer = Union[Reply, Stream]


class TgiRoutes:
    """The routes of one TGI version, as pure functions of a request.

    :param rng: source of the random seeds TGI draws for unseeded requests.
    :param clock: wall clock for the ``created`` field of OpenAI objects.
    """

    def __init__(
        self,
        profile: Profile,
        limits: Limits,
        *,
        model_id: str,
        model_sha: str | None,
        sha: str | None,
        docker_label: str | None,
        api_key: str | None,
        eos_after: int | None,
        utf8_split: bool,
        prefill_s: float,
        pace_s: float,
        rng: random.Random,
        clock: Callable[[], float],
        batch_sensitive: bool = False,
    ) -> None:
        self.profile = profile
        self.limits = limits
        self.model_id = model_id
        self.model_sha = model_sha
        self.sha = sha
        self.docker_label = docker_label
        #: What TGI puts in ``system_fingerprint`` on the OpenAI routes.
        self.system_id = f"{profile.version}-{docker_label or 'native'}"
        self.api_key = api_key
        self.eos_after = eos_after
        self.utf8_split = utf8_split
        self.prefill_s = prefill_s
        self.pace_s = pace_s
        self.rng = rng
        self.clock = clock
        self.batch_sensitive = batch_sensitive

    # --- static routes ------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /info`` of this version's era, in serialisation order."""
        p = self.profile
        out: dict[str, Any] = {"model_id": self.model_id, "model_sha": self.model_sha}
        legacy = not p.ge(2, 3)
        if legacy:
            out.update(model_dtype="torch.float16", model_device_type="cuda")
        out["model_pipeline_tag"] = "text-generation"
        if p.ge(0, 7):
            lim = self.limits
            out.update(max_concurrent_requests=lim.max_concurrent_requests, max_best_of=lim.max_best_of)
            out["max_stop_sequences"] = lim.max_stop_sequences
            out["max_input_tokens" if p.ge(2, 1) else "max_input_length"] = lim.max_input_tokens
            out["max_total_tokens"] = lim.max_total_tokens
            if legacy:
                out.update(waiting_served_ratio=0.3, max_batch_total_tokens=_batch_tokens(lim), max_waiting_tokens=20)
                if p.ge(1, 4, 1):
                    out["max_batch_size"] = None
            out["validation_workers"] = lim.validation_workers
            if p.ge(2, 0, 1):
                out["max_client_batch_size"] = lim.max_client_batch_size
            if p.ge(2, 0, 3):
                out["router"] = "text-generation-router"
        out.update(version=self.profile.version, sha=self.sha)
        if p.ge(0, 7):
            out["docker_label"] = self.docker_label
        return out

    def accept(self, method: str, path: str, headers: Mapping[str, str], body: bytes, healthy: bool) -> Answer | Job:
        """Route a request; anything that needs no permit is answered here.

        ``/metrics`` is the server's: it owns the counters.
        """
        p = self.profile
        known = {"/health": "GET", "/ping": "GET", "/info": "GET", "/v1/models": "GET", "/metrics": "GET"}
        known.update(dict.fromkeys(GENERATION_ROUTES | {"/tokenize"}, "POST"))
        if path not in known or not p.has_route(path):
            return Reply(404)
        if method == "OPTIONS" and "origin" in headers:
            return Reply(
                200, (("access-control-allow-methods", "GET,POST"), ("access-control-allow-headers", "content-type"))
            )
        allowed = ("GET", "POST") if path == "/" else (known[path],)
        if method not in allowed:
            return Reply(405, (("allow", ",".join(allowed)),))
        if method == "GET":
            if path in ("/health", "/ping", "/"):
                return Reply(200) if healthy else json_reply(503, error_body(p, "unhealthy", "healthcheck"))
            if path == "/info":
                return json_reply(200, self.info())
            entry = {"id": self.model_id, "object": "model", "created": 0, "owned_by": self.model_id}
            return json_reply(200, {"object": "list", "data": [entry]})
        if self.api_key is not None:
            given = headers.get("authorization", "")
            if given.lower() != f"bearer {self.api_key}".lower():
                return Reply(401)
        limit = self.limits.payload_limit
        if path == "/v1/chat/completions":
            return self._accept_chat(decode_body(headers, body, CHAT_REQUEST, limit))
        if path == "/v1/completions":
            return self._accept_completions(decode_body(headers, body, COMPLETION_REQUEST, limit))
        parsed = decode_body(headers, body, COMPAT_REQUEST if path == "/" else GENERATE_REQUEST, limit)
        if isinstance(parsed, Reply):
            return parsed
        params = Params.from_request(parsed, p)
        if path == "/tokenize":
            tokens = tokenize(parsed["inputs"])
            if params.truncate:
                tokens = tokens[-params.truncate :]
            return json_reply(200, [dataclasses.asdict(t) for t in tokens])
        if path == "/" and params.return_full_text is None:
            # The compat route returns the prompt too for text-generation models.
            params = dataclasses.replace(params, return_full_text=True)
        stream = path == "/generate_stream" or (path == "/" and bool(parsed.get("stream")))
        best_of = params.best_of if params.best_of is not None else 1
        early = None
        if stream and best_of != 1:
            early = "`best_of` != 1 is not supported when streaming tokens"
        elif stream and params.decoder_input_details:
            early = "`decoder_input_details` == true is not supported when streaming tokens"
        elif not stream and best_of > 1:
            early = validate_best_of(self.limits, best_of)
        if early is not None:
            message = f"Input validation error: {early}"
            if stream:
                frame = Frame(self._sse(error_body(p, message, "validation")))
                return Stream(self._stream_headers(parsed["inputs"]), (frame,), "validation")
            return json_reply(422, error_body(p, message, "validation"), outcome="validation")
        return Job("compat" if path == "/" else "generate", parsed, stream, (parsed["inputs"],), params)

    def _accept_chat(self, parsed: Any) -> Answer | Job:
        if isinstance(parsed, Reply):
            return parsed
        prompt = ""
        for message in parsed["messages"]:
            content = message.get("content") or ""
            if not isinstance(content, str):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            prompt += f"<|{message['role']}|>\n{content}</s>\n"
        prompt += "<|assistant|>\n"
        params = self._openai_params(parsed, parsed.get("max_tokens", parsed.get("max_completion_tokens")))
        presence = parsed.get("presence_penalty")
        if presence is not None:
            params = dataclasses.replace(params, repetition_penalty=presence + 2.0)
        if parsed.get("logprobs") and parsed.get("top_logprobs"):
            params = dataclasses.replace(params, top_n_tokens=parsed["top_logprobs"])
        return Job("chat", parsed, bool(parsed.get("stream")), (prompt,), params)

    def _accept_completions(self, parsed: Any) -> Answer | Job:
        if isinstance(parsed, Reply):
            return parsed
        p = self.profile
        prompts = parsed["prompt"] if isinstance(parsed["prompt"], list) else [parsed["prompt"]]
        if parsed.get("suffix") is not None:
            message = "Suffix is not supported and can be achieved by preprocessing the prompt."
            return json_reply(422, error_body(p, message, "suffix not supported"), outcome="validation", counted=1)
        if len(prompts) > self.limits.max_client_batch_size:
            message = f"Number of prompts exceeds the maximum allowed batch size of {self.limits.max_client_batch_size}"
            return json_reply(422, error_body(p, message, "batch size exceeded"), outcome="validation", counted=1)
        params = self._openai_params(parsed, parsed.get("max_tokens"))
        params = dataclasses.replace(params, repetition_penalty=parsed.get("repetition_penalty"))
        return Job("completions", parsed, bool(parsed.get("stream")), tuple(prompts), params)

    def _openai_params(self, parsed: Mapping[str, Any], max_tokens: int | None) -> Params:
        temperature = parsed.get("temperature")
        greedy = temperature == 0.0
        default = 100 if not self.profile.ge(3, 0) else None
        return Params(
            temperature=None if greedy else temperature,
            do_sample=not greedy,
            max_new_tokens=max_tokens if max_tokens is not None else default,
            top_p=parsed.get("top_p"),
            seed=parsed.get("seed"),
            stop=tuple(parsed.get("stop") or ()),
            frequency_penalty=parsed.get("frequency_penalty"),
            details=True,
        )

    # --- generation routes --------------------------------------------------------

    def run(self, job: Job, *, overloaded: bool, fault: Fault | None = None, in_flight: int = 0) -> Answer:
        """Answer a generation request that got (or was refused) a concurrency permit.

        :param in_flight: other generations in flight when this one arrived
            (what a batch-sensitive engine's numerics depend on).
        """
        depart: tuple[int, object] | None = None
        if fault is not None and fault.kind == "diverge":
            depart = (fault.at_token, "diverge")
        elif self.batch_sensitive and in_flight > 0:
            # Another batch size, other kernels: the text parts from the idle one at token n.
            depart = (in_flight, ("in flight", in_flight))
        results: list[tuple[Generation, int] | str] = []
        for prompt in job.prompts:
            results.append("Model is overloaded" if overloaded else self._generate(prompt, job.params, depart))
        stream = job.stream
        oversize = fault if fault is not None and fault.kind == "oversized" and stream else None
        answer: Answer
        if job.route in ("generate", "compat"):
            answer = self._native_stream(job, results, oversize) if stream else self._native_reply(job, results[0])
        elif job.route == "chat":
            answer = self._chat_stream(job, results, oversize) if stream else self._chat_reply(job, results[0])
        else:
            answer = (
                self._completions_stream(job, results, oversize) if stream else self._completions_reply(job, results)
            )
        if fault is not None and answer.outcome == "success":
            answer = self._apply_fault(job, answer, fault)
        return answer

    def _generate(
        self, prompt: str, params: Params, depart: tuple[int, object] | None = None
    ) -> tuple[Generation, int] | str:
        error, input_length = validate(self.profile, self.limits, params, prompt)
        if error is not None:
            return f"Input validation error: {error}"
        count = planned_new_tokens(self.profile, self.limits, input_length, params.max_new_tokens)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(64)
        return self._sequence(prompt, params, seed, count, depart), input_length

    def _sequence(
        self, prompt: str, params: Params, seed: int, count: int, depart: tuple[int, object] | None = None
    ) -> Generation:
        # The router always draws a seed; the shard uses (and reports) it only when sampling.
        return generate(
            prompt,
            seed=seed if params.sampling else None,
            max_new_tokens=count,
            stop=params.stop,
            eos_after=self.eos_after,
            utf8_split=self.utf8_split,
            top_n_tokens=params.top_n_tokens or 0,
            depart=depart,
        )

    def _error_type(self, message: str) -> str:
        return "overloaded" if message == "Model is overloaded" else "validation"

    def _error_reply(self, message: str, **meta: Any) -> Reply:
        error_type = self._error_type(message)
        status = ERROR_STATUS[error_type]
        return json_reply(status, error_body(self.profile, message, error_type), outcome=error_type, **meta)

    def _sse(self, obj: Any) -> bytes:
        return self.profile.sse_prefix + dumps(obj) + b"\n\n"

    def _stream_headers(self, prompt: str) -> tuple[tuple[str, str], ...]:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        headers += [("x-compute-type", "gpu+optimized"), ("x-compute-characters", str(len(prompt)))]
        if self.profile.ge(0, 9):
            headers.append(("x-accel-buffering", "no"))
        return tuple(headers)

    def _timing_headers(self, prompt: str, generated: int, input_length: int) -> list[tuple[str, str]]:
        total = self.prefill_s + self.pace_s * max(0, generated - 1)
        ms = int(total * 1000)
        compute = rust_float(total) if self.profile.ge(1, 4, 3) else str(ms)
        headers = [("x-compute-type", "gpu+optimized"), ("x-compute-time", compute)]
        headers += [("x-compute-characters", str(len(prompt))), ("x-total-time", str(ms))]
        headers += [("x-validation-time", "0"), ("x-queue-time", "0"), ("x-inference-time", str(ms))]
        headers.append(("x-time-per-token", str(ms // max(1, generated))))
        if self.profile.ge(1, 4):
            headers += [("x-prompt-tokens", str(input_length)), ("x-generated-tokens", str(generated))]
        return headers

    def _full_text(self, job: Job, prompt: str, gen: Generation) -> str:
        return prompt + gen.text if job.params.return_full_text else gen.text

    def _native_reply(self, job: Job, result: tuple[Generation, int] | str) -> Reply:
        if isinstance(result, str):
            return self._error_reply(result)
        gen, input_length = result
        prompt, params = job.prompts[0], job.params
        best = [gen]
        if params.best_of is not None and params.best_of > 1:
            for _ in range(params.best_of - 1):
                seed = self.rng.getrandbits(64)
                best.append(self._sequence(prompt, params, seed, len(gen.tokens)))
            # The returned sequence is the one with the best mean token logprob.
            best.sort(key=lambda g: -sum(t.logprob or 0.0 for t in g.tokens) / max(1, len(g.tokens)))
            gen = best[0]
        out: dict[str, Any] = {"generated_text": self._full_text(job, prompt, gen)}
        if params.details or params.decoder_input_details:
            details = self._details(job, gen, input_length)
            if len(best) > 1:
                details["best_of_sequences"] = [
                    {"generated_text": self._full_text(job, prompt, other), **self._details(job, other, input_length)}
                    for other in best[1:]
                ]
            if gen.top_tokens:
                details["top_tokens"] = [[t.as_json() for t in alts] for alts in gen.top_tokens]
            out["details"] = details
        headers = self._timing_headers(prompt, len(gen.tokens), input_length)
        # The compat route wraps the result in a list, to match the Inference API.
        body = [out] if job.route == "compat" else out
        return json_reply(200, body, headers, outcome="success", tokens=len(gen.tokens))

    def _details(self, job: Job, gen: Generation, input_length: int) -> dict[str, Any]:
        prefill: list[dict[str, Any]] = []
        if job.params.decoder_input_details and not self.profile.ge(3, 0):
            # Prefill logprobs are off by default since 3.0; the first is always NaN.
            for i, token in enumerate(tokenize(job.prompts[0])[-input_length:]):
                prefill.append({"id": token.id, "text": token.text, "logprob": None if i == 0 else -1.5})
        return {
            "finish_reason": gen.finish_reason,
            "generated_tokens": len(gen.tokens),
            "seed": gen.seed,
            "prefill": prefill,
            "tokens": [t.as_json() for t in gen.tokens],
        }

    def _native_stream(self, job: Job, results: list[tuple[Generation, int] | str], oversize: Fault | None) -> Stream:
        prompt, params, p = job.prompts[0], job.params, self.profile
        headers = self._stream_headers(prompt)
        result = results[0]
        if isinstance(result, str):
            frame = Frame(self._sse(error_body(p, result, self._error_type(result))))
            return Stream(headers, (frame,), self._error_type(result))
        gen, input_length = result

        def build(gen: Generation) -> list[Frame]:
            frames = []
            for i, token in enumerate(gen.tokens):
                last = i == len(gen.tokens) - 1
                obj: dict[str, Any] = {"index": i + 1} if p.ge(1, 4) else {}
                obj["token"] = token.as_json()
                if gen.top_tokens:
                    obj["top_tokens"] = [t.as_json() for t in gen.top_tokens[i]]
                obj["generated_text"] = self._full_text(job, prompt, gen) if last else None
                details = None
                if last and params.details:
                    details = {
                        "finish_reason": gen.finish_reason,
                        "generated_tokens": len(gen.tokens),
                        "seed": gen.seed,
                    }
                    if p.ge(2, 3):
                        details["input_length"] = input_length
                obj["details"] = details
                frames.append(Frame(self._sse(obj), token=True))
            return frames

        return Stream(headers, tuple(_oversized(build, gen, oversize)))

    def _openai_error(self, message: str) -> list[Frame]:
        p = self.profile
        if p.ge(2, 4, 1):
            # Inside an OpenAI-route stream every error is reported as 422.
            frames = [Frame(self._sse({"error": {"message": message, "http_status_code": 422}}))]
        else:
            frames = [Frame(self._sse(error_body(p, message, self._error_type(message))))]
        return frames + self._done()

    def _done(self) -> list[Frame]:
        return [Frame(self.profile.sse_prefix + b"[DONE]\n\n")] if self.profile.ge(2, 2) else []

    def _head(self, obj_name: str, model: str) -> dict[str, Any]:
        """The leading keys of an OpenAI object; ``object`` moved to the front in 2.1."""
        created = int(self.clock())
        if self.profile.ge(2, 1):
            return {"object": obj_name, "id": "", "created": created, "model": model}
        return {"id": "", "object": obj_name, "created": created, "model": model}

    def _model(self, job: Job) -> str:
        # Any model name other than "tgi" selects a LoRA adapter and is echoed back.
        model = job.body.get("model")
        return model if model and model != "tgi" else self.model_id

    def _openai_finish(self, reason: str) -> str:
        return "stop" if reason == "eos_token" and self.profile.ge(2, 3) else reason

    def _chat_reply(self, job: Job, result: tuple[Generation, int] | str) -> Reply:
        if isinstance(result, str):
            return self._error_reply(result, counted=2)
        gen, input_length = result
        tagged = self.profile.ge(2, 1)
        body = self._head("chat.completion" if tagged else "text_completion", self._model(job))
        logprobs = self._logprobs(job, gen.tokens, gen.top_tokens)
        message = {"role": "assistant", "content": gen.text}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self._openai_finish(gen.finish_reason),
        }
        body["system_fingerprint"] = self.system_id
        body["choices"] = [choice]
        body["usage"] = _usage(input_length, len(gen.tokens))
        headers = self._timing_headers(job.prompts[0], len(gen.tokens), input_length)
        return json_reply(200, body, headers, outcome="success", tokens=len(gen.tokens), counted=2)

    def _logprobs(self, job: Job, tokens: Sequence[Any], top: Sequence[Sequence[Any]]) -> dict[str, Any] | None:
        if not job.body.get("logprobs"):
            return None
        content = []
        for i, token in enumerate(tokens):
            alts = [{"token": t.text, "logprob": t.logprob} for t in (top[i] if top else ())]
            content.append({"token": token.text, "logprob": token.logprob, "top_logprobs": alts})
        return {"content": content}

    def _chat_stream(self, job: Job, results: list[tuple[Generation, int] | str], oversize: Fault | None) -> Stream:
        p = self.profile
        headers = self._stream_headers(job.prompts[0])
        result = results[0]
        if isinstance(result, str):
            return Stream(headers, tuple(self._openai_error(result)), self._error_type(result), 2)
        gen, input_length = result
        usage_wanted = bool((job.body.get("stream_options") or {}).get("include_usage")) and p.ge(2, 3)
        tagged = p.ge(2, 1)
        model = self._model(job)

        def build(gen: Generation) -> list[Frame]:
            frames = []
            for i, token in enumerate(gen.tokens):
                last = i == len(gen.tokens) - 1
                chunk = self._head("chat.completion.chunk" if tagged else "text_completion", model)
                chunk["system_fingerprint"] = self.system_id
                top = gen.top_tokens[i : i + 1]
                delta = {"role": "assistant", "content": "" if token.special else token.text}
                reason = self._openai_finish(gen.finish_reason) if last else None
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": self._logprobs(job, [token], top),
                    "finish_reason": reason,
                }
                chunk["choices"] = [choice]
                if p.ge(2, 3):
                    attach = last and usage_wanted and not p.ge(3, 2)
                    chunk["usage"] = _usage(input_length, len(gen.tokens)) if attach else None
                frames.append(Frame(self._sse(chunk), token=True))
            if usage_wanted and p.ge(3, 2):
                # Since 3.2 usage comes in a chunk of its own, with no choices.
                chunk = self._head("chat.completion.chunk", model)
                chunk.update(
                    system_fingerprint=self.system_id, choices=[], usage=_usage(input_length, len(gen.tokens))
                )
                frames.append(Frame(self._sse(chunk)))
            return frames + self._done()

        return Stream(headers, tuple(_oversized(build, gen, oversize)), "success", 2)

    def _completions_reply(self, job: Job, results: list[tuple[Generation, int] | str]) -> Reply:
        for result in results:
            if isinstance(result, str):
                return self._error_reply(result, counted=1 + len(results))
        done = [(i, r) for i, r in enumerate(results) if not isinstance(r, str)]
        # Choices come back in completion order; shorter generations finish first.
        done.sort(key=lambda item: (len(item[1][0].tokens), item[0]))
        choices, prompt_tokens, completion_tokens, headers = [], 0, 0, [("x-compute-type", "gpu+optimized")]
        total_ms = 0
        for index, (gen, input_length) in done:
            text = gen.text
            choices.append(
                {
                    "index": index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": self._openai_finish(gen.finish_reason),
                }
            )
            prompt_tokens += input_length
            completion_tokens += len(gen.tokens)
            total_ms += int((self.prefill_s + self.pace_s * max(0, len(gen.tokens) - 1)) * 1000)
        body = self._head("text_completion", self._model(job))
        body.update(
            system_fingerprint=self.system_id, choices=choices, usage=_usage(prompt_tokens, completion_tokens)
        )
        headers.append(("x-compute-characters", str(sum(len(pr) for pr in job.prompts))))
        headers += [("x-total-time", str(total_ms)), ("x-validation-time", "0"), ("x-queue-time", "0")]
        headers += [
            ("x-inference-time", str(total_ms)),
            ("x-time-per-token", str(total_ms // max(1, completion_tokens))),
        ]
        headers += [("x-prompt-tokens", str(prompt_tokens)), ("x-generated-tokens", str(completion_tokens))]
        most = max(len(r[0].tokens) for _, r in done)
        return json_reply(200, body, headers, outcome="success", tokens=most, counted=1 + len(results))

    def _completions_stream(
        self, job: Job, results: list[tuple[Generation, int] | str], oversize: Fault | None
    ) -> Stream:
        p = self.profile
        headers = (*self._stream_headers("".join(job.prompts)),)
        model = self._model(job)

        def prompt_frames(index: int, gen: Generation, *, input_length: int) -> list[Frame]:
            frames = []
            for i, token in enumerate(gen.tokens):
                last = i == len(gen.tokens) - 1
                choice = {"index": index, "text": token.text, "logprobs": None, "finish_reason": ""}
                if last and p.ge(2, 3):
                    choice["finish_reason"] = gen.finish_reason
                    obj = self._head("text_completion", model)
                    obj.update(system_fingerprint=self.system_id, choices=[choice])
                    obj["usage"] = _usage(input_length, len(gen.tokens))
                else:
                    if last:
                        choice["finish_reason"] = gen.finish_reason
                    obj = self._head("text_completion", model)
                    del obj["model"]
                    obj.update(choices=[choice], model=model, system_fingerprint=self.system_id)
                frames.append(Frame(self._sse(obj), token=True))
            return frames

        per_prompt: list[list[Frame]] = []
        outcome = "success"
        for index, result in enumerate(results):
            if isinstance(result, str):
                outcome = self._error_type(result)
                per_prompt.append(self._openai_error(result)[:1])
                continue
            gen, input_length = result
            build = functools.partial(prompt_frames, index, input_length=input_length)
            per_prompt.append(_oversized(build, gen, oversize if index == 0 else None))
        # Frames of several prompts interleave, one token of each in turn.
        frames = [
            f for step in range(max(map(len, per_prompt))) for f in (fs[step] for fs in per_prompt if step < len(fs))
        ]
        return Stream(headers, tuple(frames + self._done()), outcome, 1 + len(results))

    # --- faults -------------------------------------------------------------------

    def _apply_fault(self, job: Job, answer: Answer, fault: Fault) -> Answer:
        """Apply the faults that only change bytes: error_frame and malformed."""
        if fault.kind not in ("error_frame", "malformed"):
            return answer
        error_type = fault.error_type or "generation"
        message = fault.message or ERROR_MESSAGES.get(error_type, error_type)
        if isinstance(answer, Reply):
            if fault.kind == "malformed":
                return dataclasses.replace(answer, body=answer.body[: max(1, len(answer.body) // 2)])
            status = ERROR_STATUS.get(error_type, 500)
            return json_reply(
                status, error_body(self.profile, message, error_type), outcome=error_type, counted=answer.counted
            )
        frames = list(answer.frames)
        seen = cut = 0
        for cut, frame in enumerate(frames):  # noqa: B007
            if seen == fault.at_token:
                break
            seen += frame.token
        if sum(f.token for f in frames) <= fault.at_token:
            return answer
        if fault.kind == "malformed":
            inserted = [Frame(self.profile.sse_prefix + b'{"index":\n\n')]
            return dataclasses.replace(answer, frames=(*frames[:cut], *inserted, *frames[cut:]))
        if job.route in ("chat", "completions"):
            tail = self._openai_error(message)
        else:
            tail = [Frame(self._sse(error_body(self.profile, message, error_type)))]
        return dataclasses.replace(
            answer, frames=(*frames[:cut], *tail), outcome=FAILURE_LABEL.get(error_type, error_type)
        )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _oversized(build: Callable[[Generation], list[Frame]], gen: Generation, fault: Fault | None) -> list[Frame]:
    """Frames of ``gen``; with an oversized fault, one token's text padded so its data line is ``size`` bytes."""
    frames = build(gen)
    if fault is None or fault.size is None or fault.at_token >= len(gen.tokens) or gen.tokens[fault.at_token].special:
        return frames
    token_frames = [f for f in frames if f.token]
    line = len(token_frames[fault.at_token].data) - 2
    if line >= fault.size:
        return frames
    padding = "x" * (fault.size - line)
    tokens = list(gen.tokens)
    tokens[fault.at_token] = dataclasses.replace(tokens[fault.at_token], text=tokens[fault.at_token].text + padding)
    return build(dataclasses.replace(gen, tokens=tuple(tokens), text="".join(t.text for t in tokens if not t.special)))
