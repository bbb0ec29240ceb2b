"""The pure core of the fake TGI engine: no sockets, no threads, no clock.

It holds what a TGI version decides (:class:`Profile`), the scripted faults
(:class:`Fault`), a toy tokenizer and generator, and TGI's own request
validation with its exact messages and order (``router/src/validation.rs``).
The request decoding that axum's ``Json`` extractor performs before any TGI
code runs lives in :mod:`tgi_adapter.testing.fake_axum`; rendering of bodies
and frames in :mod:`tgi_adapter.testing.fake_render`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import types
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = [
    "FAULT_KINDS",
    "GENERATION_ROUTES",
    "Fault",
    "Generation",
    "Limits",
    "Params",
    "Profile",
    "Reply",
    "SimpleToken",
    "Token",
    "count_tokens",
    "generate",
    "parse_version",
    "planned_new_tokens",
    "tokenize",
    "validate",
]

GENERATION_ROUTES = frozenset({"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})

# Optional Fault arguments each kind accepts; anything else set on a fault is a
# mistake in the test that scripted it, so construction refuses it.
_FAULT_ARGS: dict[str, frozenset[str]] = {
    "status": frozenset({"status", "body", "headers", "content_type", "error_type", "message"}),
    "error_frame": frozenset({"at_token", "error_type", "message"}),
    "stall": frozenset({"at_token"}),
    "keepalive_only": frozenset({"at_token", "delay_s"}),
    "reset": frozenset({"at_token", "at_byte"}),
    "truncate": frozenset({"at_token", "at_byte"}),
    "slow_headers": frozenset({"delay_s"}),
    "malformed": frozenset({"at_token"}),
    "oversized": frozenset({"at_token", "size"}),
    "disconnect_before_headers": frozenset(),
    "diverge": frozenset({"at_token"}),
}
FAULT_KINDS = frozenset(_FAULT_ARGS)


@dataclasses.dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour for the next matching request(s) of a ``FakeTgiServer``.

    Token positions count token frames: "after ``at_token``" means once that many
    token frames were written (0: before the first). A token-positioned fault acts
    only when the answer has more than ``at_token`` token frames; either way a
    fault that matched a request is used up. Kinds:

    - ``"status"``: answer HTTP ``status`` instead, on any route ``path`` matches;
      the body defaults to TGI's JSON error for that status (502/504: a proxy's
      HTML page; others: empty), plus ``headers`` (e.g. ``Retry-After``).
    - ``"error_frame"``: after ``at_token`` token frames, an error frame of
      ``error_type`` (default ``"generation"``) in the route's shape, then the
      stream ends as TGI ends it (``[DONE]`` on OpenAI routes since 2.2). A
      non-streamed answer becomes the HTTP error of that type instead. Acts only
      on a request that would have succeeded.
    - ``"stall"``: after ``at_token`` token frames (non-streamed: before any
      byte), send nothing until the client leaves or the server stops.
    - ``"keepalive_only"``: like stall, but write ``:\\n\\n`` every ``delay_s``
      (default: the server's ``keepalive_s``); a non-streamed answer just stalls.
    - ``"reset"``: after ``at_token`` token frames, or after exactly ``at_byte``
      response bytes (headers included), abort the connection with RST.
    - ``"truncate"``: after ``at_token`` token frames, end the chunked body
      cleanly (``0\\r\\n\\r\\n``) without the rest, the final frame included;
      the connection stays usable. With ``at_byte``: close (FIN) after exactly
      that many response bytes. Non-streamed without ``at_byte``: the headers,
      then FIN.
    - ``"slow_headers"``: hold the request ``delay_s`` before answering normally.
    - ``"malformed"``: after ``at_token`` token frames, insert the frame
      ``data: {"index":`` (not JSON), then continue normally. Non-streamed: the
      body is cut to its first half.
    - ``"oversized"``: the token frame after ``at_token`` ones carries padding
      (``x``) in its token text so its data line is ``size`` bytes, then the
      stream continues. Streams only.
    - ``"disconnect_before_headers"``: read the request, then close (FIN).
    - ``"diverge"``: the generated text departs from the fault-free text at
      token ``at_token`` (the tokens before it are unchanged) and stays a
      different, equally plausible text to the end. The diverged text is a
      function of the request, like the fault-free one, so the same request
      diverges the same way every time. Any generation route, streamed or
      not; the answer is otherwise normal (length, details, seed).

    :param times: how many matching requests get the fault (consumed first in, first out).
    :param path: the request path it applies to; None means any generation route.
    :raises ValueError: on an unknown kind, a missing or out-of-range argument, or
        an argument the kind does not use.
    """

    kind: str
    at_token: int = 0
    status: int | None = None
    body: bytes | str | None = None
    headers: Mapping[str, str] | None = None
    content_type: str | None = None
    error_type: str | None = None
    message: str | None = None
    delay_s: float = 0.0
    at_byte: int | None = None
    size: int | None = None
    times: int = 1
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(FAULT_KINDS)}")
        for field in dataclasses.fields(self):
            unused = field.name not in _FAULT_ARGS[self.kind] | {"kind", "times", "path"}
            if unused and getattr(self, field.name) != field.default:
                raise ValueError(f"fault {self.kind!r} does not take {field.name}")
        if self.at_token < 0:
            raise ValueError("at_token must be >= 0")
        if self.times < 1:
            raise ValueError("times must be >= 1")
        if self.delay_s < 0:
            raise ValueError("delay_s must be >= 0")
        if self.at_byte is not None:
            if self.at_byte < 0:
                raise ValueError("at_byte must be >= 0")
            if self.at_token:
                raise ValueError("give at_token or at_byte, not both")
        if self.kind == "status" and (self.status is None or not 100 <= self.status <= 599):
            raise ValueError("fault 'status' needs status between 100 and 599")
        if self.kind == "oversized" and (self.size is None or self.size < 1):
            raise ValueError("fault 'oversized' needs size >= 1")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if self.headers is not None:
            object.__setattr__(self, "headers", types.MappingProxyType(dict(self.headers)))

    def matches(self, path: str) -> bool:
        """Whether a request for ``path`` (no query string) gets this fault."""
        if self.path is None:
            return path in GENERATION_ROUTES
        return path == self.path


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:[-+.][0-9A-Za-z.+-]*)?$")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"3.3.6-dev0"`` → ``(3, 3, 6)``.

    :raises ValueError: when ``text`` is not a TGI version.
    """
    match = _VERSION_RE.match(text)
    if match is None:
        raise ValueError(f"not a TGI version: {text!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


@dataclasses.dataclass(frozen=True)
class Profile:
    """Every wire difference between TGI releases, as flags of one version."""

    version: str
    v: tuple[int, int, int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "v", parse_version(self.version))

    def ge(self, major: int, minor: int, patch: int = 0) -> bool:
        return self.v >= (major, minor, patch)

    @property
    def sse_prefix(self) -> bytes:
        # axum 0.7 (TGI 2.1.0, PR #1959) writes a space after the field name.
        return b"data: " if self.ge(2, 1) else b"data:"

    @property
    def default_max_new_tokens(self) -> int | None:
        if not self.ge(1, 2):
            return 20
        if not self.ge(1, 3, 3):
            return None
        if not self.ge(3, 0):
            return 100
        return None

    def has_route(self, path: str) -> bool:
        since = {
            "/ping": (0, 5, 0),
            "/info": (0, 6, 0),
            "/metrics": (0, 3, 0),
            "/tokenize": (1, 4, 0),
            "/v1/chat/completions": (1, 4, 0),
            "/v1/completions": (1, 4, 4),
            "/v1/models": (2, 3, 0),
        }.get(path)
        return since is None or self.v >= since


@dataclasses.dataclass(frozen=True)
class Limits:
    """The router limits a TGI launcher was started with."""

    max_concurrent_requests: int = 128
    max_total_tokens: int = 4096
    max_input_tokens: int = 4095
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_client_batch_size: int = 4
    max_top_n_tokens: int = 5
    payload_limit: int = 2_000_000
    validation_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_total_tokens < 2 or not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError("need 0 < max_input_tokens < max_total_tokens")
        if self.max_concurrent_requests < 1 or self.max_client_batch_size < 1 or self.max_best_of < 1:
            raise ValueError("max_concurrent_requests, max_client_batch_size and max_best_of must be >= 1")
        if self.max_stop_sequences < 0:
            raise ValueError("max_stop_sequences must be >= 0")


@dataclasses.dataclass(frozen=True)
class Reply:
    """A complete, non-streamed HTTP answer."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    #: "" when no generation was asked for, else "success" or the error type.
    outcome: str = ""
    #: generated tokens (the server paces a non-streamed answer by this count).
    tokens: int = 0
    #: increments of tgi_request_count (OpenAI routes count twice).
    counted: int = 1


# --- tokenizer ------------------------------------------------------------------

# Chat-template markers and </s> count as one token each, like a real vocabulary.
_TOKEN_RE = re.compile(r"<\|[^|\s]{1,32}\|>|</?s>|\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class SimpleToken:
    """One entry of ``POST /tokenize``: ``start``/``stop`` are byte offsets into the input."""

    id: int
    text: str
    start: int
    stop: int


def _token_id(text: str) -> int:
    return 1000 + zlib.crc32(text.encode("utf-8")) % 30000


def tokenize(text: str) -> list[SimpleToken]:
    """Split ``text`` into words and punctuation, as ``/tokenize`` reports them."""
    out: list[SimpleToken] = []
    char_pos = byte_pos = 0
    for match in _TOKEN_RE.finditer(text):
        byte_pos += len(text[char_pos : match.start()].encode("utf-8"))
        start = byte_pos
        byte_pos += len(match.group().encode("utf-8"))
        char_pos = match.end()
        # TGI slices the text by *characters* using byte offsets (server.rs
        # tokenize); reproduced so non-ASCII inputs look as they do there.
        out.append(SimpleToken(_token_id(match.group()), text[start:byte_pos], start, byte_pos))
    return out


def count_tokens(text: str) -> int:
    """The prompt length TGI would see: at least one token for any non-empty text."""
    return max(1, len(_TOKEN_RE.findall(text)))


# --- generator ------------------------------------------------------------------

_CORPUS = (
    "The model reads the prompt and writes a short answer. It sends one token at a time, so the "
    "client can show the text while it is still being made. Each word comes from a small fixed "
    "list, which keeps the output the same from one run to the next. A real server would think "
    "much harder, but this one only has to look right on the wire, and that is enough for a test."
)
_WORDS: tuple[str, ...] = tuple(re.findall(r" ?\w+|[^\w\s]", _CORPUS))
_WIDE_WORDS = (" café", " naïve", " über", " 🙂", " façade", " déjà")
EOS_ID, EOS_TEXT = 2, "</s>"


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token as TGI reports it."""

    id: int
    text: str
    logprob: float | None
    special: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One finished sequence."""

    tokens: tuple[Token, ...]
    text: str
    finish_reason: str
    seed: int | None
    top_tokens: tuple[tuple[Token, ...], ...] = ()


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big")


def _word_pieces(word: str, rng: random.Random, utf8_split: bool) -> list[Token]:
    def logprob() -> float:
        return -round(rng.uniform(0.001, 3.0), 4)

    if not utf8_split or word.isascii():
        return [Token(_token_id(word), word, logprob())]
    # Byte-fallback vocabularies split a multi-byte character into byte tokens;
    # TGI holds back their text ("") until the character is complete (decode_token).
    head = word[:-1]
    tail = word[-1]
    raw = tail.encode("utf-8")
    pieces = [Token(_token_id(head), head, logprob())] if head else []
    pieces += [Token(3 + b, "", logprob()) for b in raw[:-1]]
    pieces.append(Token(3 + raw[-1], tail, logprob()))
    return pieces


def _words(key: int, utf8_split: bool) -> Iterator[str]:
    position = key % len(_WORDS)
    count = 0
    while True:
        count += 1
        if utf8_split and count % 4 == 0:
            yield _WIDE_WORDS[(key + count) % len(_WIDE_WORDS)]
        else:
            yield _WORDS[position]
            position = (position + 1) % len(_WORDS)


def generate(
    prompt: str,
    *,
    seed: int | None,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    eos_after: int | None = None,
    utf8_split: bool = False,
    top_n_tokens: int = 0,
    depart: tuple[int, object] | None = None,
) -> Generation:
    """Produce readable text, deterministic in ``prompt`` (greedy) or ``(prompt, seed)``.

    :param seed: the sampling seed, or None for greedy decoding (reported seed null).
    :param eos_after: emit the special EOS token after this many tokens.
    :param depart: ``(at_token, variant)``: from token ``at_token`` on (with
        ``utf8_split``, from the first whole character there), continue with
        another text, deterministic in the request and ``variant``; its first
        word differs from the one the undisturbed text has there.
    """
    key = _digest(prompt) if seed is None else _digest(prompt, seed)
    rng = random.Random(key)
    words = _words(key, utf8_split)
    limit = max_new_tokens if eos_after is None else min(max_new_tokens, eos_after)
    tokens: list[Token] = []
    text = ""
    finish = "length"
    while len(tokens) < max_new_tokens:
        if len(tokens) >= limit:
            tokens.append(Token(EOS_ID, EOS_TEXT, -round(rng.uniform(0.001, 1.0), 4), special=True))
            finish = "eos_token"
            break
        word = next(words)
        if depart is not None and len(tokens) >= depart[0]:
            words = _departed(key, depart[1], word, utf8_split)
            word = next(words)
            depart = None
        pieces = _word_pieces(word, rng, utf8_split)
        if len(pieces) > limit - len(tokens):
            # Never cut a character in half: the text would not decode.
            pieces = _word_pieces(_WORDS[len(tokens) % len(_WORDS)], rng, False)
        tokens.extend(pieces)
        text += "".join(p.text for p in pieces)
        if any(s and s in text for s in stop):
            finish = "stop_sequence"
            break
    top: tuple[tuple[Token, ...], ...] = ()
    if top_n_tokens:
        top = tuple(_alternatives(t, top_n_tokens) for t in tokens)
    return Generation(tuple(tokens), text, finish, seed, top)


def _departed(key: int, variant: object, avoid: str, utf8_split: bool) -> Iterator[str]:
    """Another word stream for the same request, whose first word is not ``avoid``."""
    words = _words(_digest(key, variant), utf8_split)
    word = next(words)
    while word == avoid:
        word = next(words)
    yield word
    yield from words


def _alternatives(token: Token, n: int) -> tuple[Token, ...]:
    out = [token]
    base = token.logprob if token.logprob is not None else 0.0
    for i in range(1, n):
        word = _WORDS[(token.id + i) % len(_WORDS)]
        out.append(Token(_token_id(word), word, round(base - 0.5 * i, 4)))
    return tuple(out)


# --- parameters and validation ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Params:
    """``GenerateParameters`` after serde defaults."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    grammar: Mapping[str, Any] | None = None

    @classmethod
    def from_request(cls, body: Mapping[str, Any], profile: Profile) -> Params:
        """The parameters of a native request body (already shape-checked)."""
        present = "parameters" in body
        raw: Mapping[str, Any] = body.get("parameters") or {}
        # An absent `parameters` key takes default_parameters(), which samples (≥ 1.4);
        # an explicit null max_new_tokens is None, not the era's default.
        return cls(
            best_of=raw.get("best_of"),
            temperature=raw.get("temperature"),
            repetition_penalty=raw.get("repetition_penalty"),
            frequency_penalty=raw.get("frequency_penalty"),
            top_k=raw.get("top_k"),
            top_p=raw.get("top_p"),
            typical_p=raw.get("typical_p"),
            do_sample=bool(raw.get("do_sample", not present and profile.ge(1, 4))),
            max_new_tokens=raw.get("max_new_tokens", profile.default_max_new_tokens),
            return_full_text=raw.get("return_full_text"),
            stop=tuple(raw.get("stop") or ()),
            truncate=raw.get("truncate"),
            details=bool(raw.get("details", False)),
            decoder_input_details=bool(raw.get("decoder_input_details", False)),
            seed=raw.get("seed"),
            top_n_tokens=raw.get("top_n_tokens"),
            grammar=raw.get("grammar"),
        )

    @property
    def sampling(self) -> bool:
        """Whether the shard samples (``NextTokenChooser``), which decides the reported seed."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )


def validate_best_of(limits: Limits, best_of: int) -> str | None:
    """The extra best_of check of the non-stream path (``Infer::generate_best_of``)."""
    if limits.max_best_of == 1 and best_of != 1:
        return "`best_of` != 1 is not allowed for this endpoint"
    if best_of > limits.max_best_of:
        return f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
    return None


def planned_new_tokens(profile: Profile, limits: Limits, input_length: int, requested: int | None) -> int:
    """How many tokens a request that passed validation really produces.

    Since 3.0 a null ``max_new_tokens`` (and since 3.1.1 any value) is generated in
    1024-token chunks, re-validated each time; a failed re-validation just stops.
    """
    total = requested if requested is not None else max(0, limits.max_total_tokens - input_length)
    if not (profile.ge(3, 1, 1) or (requested is None and profile.ge(3, 0))):
        return total
    generated = 0
    while generated < total:
        chunk = min(total - generated, 1024)
        grown = input_length + generated
        if generated and (grown + chunk > limits.max_total_tokens or grown > limits.max_input_tokens):
            break
        generated += chunk
    return generated


def validate(profile: Profile, limits: Limits, params: Params, inputs: str) -> tuple[str | None, int]:
    """TGI's ``Validation::validate``, in its order.

    :returns: the error message (without the ``Input validation error: `` prefix) or
        None, and the prompt length in tokens after truncation.
    """
    best_of = params.best_of if params.best_of is not None else 1
    # The router's notion of "sampling" here is "any sampling field was sent".
    sampling = params.do_sample or any(
        v is not None for v in (params.temperature, params.top_k, params.top_p, params.typical_p)
    )
    input_length = count_tokens(inputs) if inputs else 0
    if params.truncate:
        input_length = min(input_length, params.truncate)

    def fail(message: str) -> tuple[str | None, int]:
        return message, input_length

    if best_of > 1 and not sampling:
        return fail("you must use sampling when `best_of` is > 1")
    if params.temperature is not None and params.temperature <= 0:
        return fail("`temperature` must be strictly positive")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0:
        return fail("`repetition_penalty` must be strictly positive")
    if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
        return fail("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if params.top_p is not None and not 0.0 < params.top_p < 1.0:
        return fail("`top_p` must be > 0.0 and < 1.0")
    if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
        return fail("`typical_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        return fail("`top_k` must be strictly positive")
    if params.max_new_tokens == 0:
        return fail("`max_new_tokens` must be strictly positive")
    if len(params.stop) > limits.max_stop_sequences:
        return fail(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(params.stop)}")
    if params.seed is not None and best_of > 1:
        return fail("`seed` must not be set when `best_of` > 1")
    if params.top_n_tokens is not None and params.top_n_tokens > limits.max_top_n_tokens:
        return fail(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {params.top_n_tokens}")
    if not inputs:
        return fail("`inputs` cannot be empty")
    if params.truncate is not None and (params.truncate == 0 or params.truncate > limits.max_input_tokens):
        return fail(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {params.truncate}"
        )
    requested = params.max_new_tokens
    new_tokens = requested if requested is not None else max(0, limits.max_total_tokens - input_length)
    if profile.ge(3, 1, 1) or (requested is None and profile.ge(3, 0)):
        new_tokens = min(new_tokens, 1024)
    if input_length + new_tokens > limits.max_total_tokens:
        return fail(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {new_tokens} `max_new_tokens`"
        )
    if input_length > limits.max_input_tokens:
        return fail(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}")
    grammar = params.grammar
    if grammar is not None:
        kind = grammar.get("type")
        value = grammar.get("value")
        if kind in ("json", "json_object", "json_schema"):
            schema = value.get("schema") if kind == "json_schema" and isinstance(value, dict) else value
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    return fail(f"grammar is not valid: {exc}")
            if not isinstance(schema, dict) or "properties" not in schema:
                return fail("grammar is not valid: Grammar must have a 'properties' field")
    return None, input_length
