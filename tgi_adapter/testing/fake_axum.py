"""What axum's ``Json<T>`` extractor does to a request body before any TGI code runs.

The fake engine's request types are written as data (serde types as tuples),
and :func:`decode_body` checks a body against them the way axum and serde do:
content type, size limit, JSON syntax, then shape, with their exact plain-text
messages, positions and status codes (415, 413, 400, 422). Pure: no sockets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .fake_engine import Reply

__all__ = ["CHAT_REQUEST", "COMPAT_REQUEST", "COMPLETION_REQUEST", "GENERATE_REQUEST", "decode_body"]


# --- request decoding (axum's Json extractor) --------------------------------------

if TYPE_CHECKING:  # only in annotations, which Python 3.9 never evaluates
    PathT = tuple[str | int, ...]
# A serde type, as data: "str", "bool", "f32", "u32", "u64", "usize", "i32", "any",
# ("opt", T), ("vec", T, message-if-empty), ("either", message, T...),
# ("enum", names), ("struct", name, {field: T}, required-fields).
SpecT = Any

_INT_RANGES = {"u32": (0, 2**32 - 1), "u64": (0, 2**64 - 1), "usize": (0, 2**64 - 1), "i32": (-(2**31), 2**31 - 1)}
_EXPECTING = {"str": "a string", "bool": "a boolean", "vec": "a sequence", "enum": "variant identifier"}


class _Problem(Exception):
    """A serde deserialisation error: where it happened and what serde says."""

    def __init__(self, path: PathT, message: str, anchor: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.anchor = anchor  # "end" / "start" of the value at path, or "close" of the object at path


def _unexpected(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{repr(value).replace('e+', 'e')}`"
    if isinstance(value, str):
        return "string " + json.dumps(value, ensure_ascii=False)
    return "sequence" if isinstance(value, list) else "map"


def _expecting(spec: SpecT) -> str:
    if isinstance(spec, str):
        return _EXPECTING.get(spec, spec)
    if spec[0] == "opt":
        return _expecting(spec[1])
    if spec[0] == "struct":
        return f"struct {spec[1]}"
    return str(spec[1]) if spec[0] == "either" else _EXPECTING[spec[0]]


def _check(spec: SpecT, value: Any, path: PathT) -> None:
    """Raise :class:`_Problem` where serde would refuse ``value``."""
    kind = spec if isinstance(spec, str) else spec[0]
    ok = True
    if kind == "opt":
        if value is not None:
            _check(spec[1], value, path)
        return
    if kind in _INT_RANGES:
        ok = isinstance(value, int) and not isinstance(value, bool)
        low, high = _INT_RANGES[kind]
        if ok and not low <= value <= high:
            raise _Problem(path, f"invalid value: integer `{value}`, expected {kind}", "end")
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "f32":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "either":
        for option in spec[2:]:
            try:
                _check(option, value, path)
                return
            except _Problem:
                pass
        raise _Problem(path, spec[1], "end")
    elif kind == "enum" and isinstance(value, str):
        if value not in spec[1]:
            choices = ", ".join(f"`{n}`" for n in spec[1])
            raise _Problem(path, f"unknown variant `{value}`, expected one of {choices}", "end")
    elif kind == "vec" and isinstance(value, list):
        if spec[2] and not value:
            raise _Problem(path, spec[2], "end")
        for index, item in enumerate(value):
            _check(spec[1], item, path + (index,))
    elif kind == "struct" and isinstance(value, dict):
        # serde visits keys in document order and reports missing fields last.
        for key, item in value.items():
            if key in spec[2]:
                _check(spec[2][key], item, path + (key,))
        for key in spec[3]:
            if key not in value:
                raise _Problem(path, f"missing field `{key}`", "close")
    elif kind != "any":
        ok = False
    if not ok:
        anchor = "start" if isinstance(value, (list, dict)) else "end"
        raise _Problem(path, f"invalid type: {_unexpected(value)}, expected {_expecting(spec)}", anchor)


_GRAMMAR = ("struct", "GrammarType", {"type": ("enum", ("json", "json_object", "regex", "json_schema"))}, ("type",))
_PARAMETERS = (
    "struct",
    "GenerateParameters",
    {
        **dict.fromkeys(("best_of", "truncate"), ("opt", "usize")),
        **dict.fromkeys(
            ("temperature", "repetition_penalty", "frequency_penalty", "top_p", "typical_p"), ("opt", "f32")
        ),
        **dict.fromkeys(("do_sample", "watermark", "details", "decoder_input_details"), "bool"),
        **dict.fromkeys(("max_new_tokens", "top_n_tokens"), ("opt", "u32")),
        "top_k": ("opt", "i32"),
        "return_full_text": ("opt", "bool"),
        "stop": ("vec", "str", ""),
        "seed": ("opt", "u64"),
        "grammar": ("opt", _GRAMMAR),
        "adapter_id": ("opt", "str"),
    },
    (),
)
_GENERATE_FIELDS: dict[str, SpecT] = {"inputs": "str", "parameters": _PARAMETERS, "add_special_tokens": "bool"}
GENERATE_REQUEST = ("struct", "GenerateRequest", _GENERATE_FIELDS, ("inputs",))
COMPAT_REQUEST = ("struct", "CompatGenerateRequest", {**_GENERATE_FIELDS, "stream": "bool"}, ("inputs",))
_OPENAI_FIELDS: dict[str, SpecT] = {
    **dict.fromkeys(("model", "suffix"), ("opt", "str")),
    **dict.fromkeys(("max_tokens", "max_completion_tokens", "top_logprobs", "n"), ("opt", "u32")),
    **dict.fromkeys(
        ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"), ("opt", "f32")
    ),
    "seed": ("opt", "u64"),
    "stop": ("opt", ("vec", "str", "")),
    "stream": "bool",
    "logprobs": ("opt", "bool"),
    "response_format": ("opt", _GRAMMAR),
    "stream_options": ("opt", ("struct", "StreamOptions", {"include_usage": "bool"}, ())),
}
_CONTENT = (
    "either",
    "data did not match any variant of untagged enum MessageContent",
    "str",
    ("vec", ("struct", "MessageChunk", {"type": "str"}, ("type",)), ""),
)
_MESSAGE = ("struct", "Message", {"role": "str", "content": _CONTENT, "name": ("opt", "str")}, ("role",))
CHAT_REQUEST = ("struct", "ChatRequest", {**_OPENAI_FIELDS, "messages": ("vec", _MESSAGE, "")}, ("messages",))
_PROMPT = (
    "either",
    "data did not match any variant of untagged enum Prompt",
    "str",
    ("vec", "str", "Empty array detected. Do not use an empty array for the prompt."),
)
COMPLETION_REQUEST = ("struct", "CompletionRequest", {**_OPENAI_FIELDS, "prompt": _PROMPT}, ("prompt",))

_PLAIN = (("content-type", "text/plain; charset=utf-8"),)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _locate(text: str, path: PathT) -> tuple[int, int]:
    """Character span of the value at ``path`` inside the JSON document ``text``."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    for segment in path:
        opener = text[pos]
        pos = _skip_ws(text, pos + 1)
        index = 0
        while True:
            if opener == "{":
                key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
                pos = _skip_ws(text, _skip_ws(text, pos) + 1)
                found = key == segment
            else:
                found = index == segment
            if found:
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)
            index += 1
    _, end = decoder.raw_decode(text, pos)
    return pos, end


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    line_start = text.rfind("\n", 0, offset) + 1
    # serde_json counts columns in bytes.
    return f"line {line} column {len(text[line_start:offset].encode('utf-8'))}"


def _syntax_message(text: str, error: json.JSONDecodeError) -> str:
    """Translate Python's JSON error into serde_json's words and position."""
    pos, msg = error.pos, error.msg
    stripped_end = len(text.rstrip(" \t\r\n"))
    at_eof = pos >= stripped_end
    prev = text[:pos].rstrip(" \t\r\n")[-1:]
    depth: list[str] = []
    in_string = escaped = False
    for char in text[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth.append(char)
        elif char in "]}" and depth:
            depth.pop()
    container = "an object" if depth and depth[-1] == "{" else "a list"
    peek = pos + 1
    if msg.startswith("Unterminated string"):
        return f"EOF while parsing a string at {_position(text, len(text))}"
    if msg.startswith("Invalid control character"):
        return f"control character (\\u0000-\\u001F) found while parsing a string at {_position(text, peek)}"
    if msg.startswith(("Invalid \\u", "Invalid \\escape")):
        return f"invalid escape at {_position(text, peek)}"
    if msg.startswith("Illegal trailing comma"):
        return f"trailing comma at {_position(text, _skip_ws(text, pos + 1) + 1)}"
    if msg == "Extra data":
        return f"trailing characters at {_position(text, peek)}"
    if at_eof:
        what = "a value" if msg == "Expecting value" and (not depth or prev in ":,[") else container
        return f"EOF while parsing {what} at {_position(text, len(text))}"
    if prev == "," and text[pos] in "]}":
        return f"trailing comma at {_position(text, peek)}"
    if msg.startswith("Expecting ',' delimiter"):
        closer = "}" if container == "an object" else "]"
        return f"expected `,` or `{closer}` at {_position(text, peek)}"
    if msg.startswith("Expecting ':'"):
        return f"expected `:` at {_position(text, peek)}"
    if msg.startswith("Expecting property name"):
        return f"key must be a string at {_position(text, peek)}"
    if text[pos] in "-0123456789":
        return f"invalid number at {_position(text, peek)}"
    return f"expected value at {_position(text, peek)}"


def _path_text(path: PathT) -> str:
    out = ""
    for segment in path:
        out += f"[{segment}]" if isinstance(segment, int) else (f".{segment}" if out else segment)
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def decode_body(headers: Mapping[str, str], body: bytes, spec: SpecT, payload_limit: int) -> Any | Reply:
    """Do what axum's ``Json<T>`` extractor does, in its order.

    :returns: the parsed JSON object, or the plain-text :class:`Reply` axum sends
        (415 content type, 413 body size, 400 syntax, 422 wrong shape).
    """
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    main, _, sub = content_type.partition("/")
    if main != "application" or not (sub == "json" or sub.endswith("+json")):
        return Reply(415, _PLAIN, b"Expected request with `Content-Type: application/json`")
    if len(body) > payload_limit:
        return Reply(413, _PLAIN, b"Failed to buffer the request body: length limit exceeded")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"invalid unicode code point at {_position(body[: exc.start].decode('utf-8'), exc.start)}"
        return Reply(400, _PLAIN, f"Failed to parse the request body as JSON: {message}".encode())
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        message = _syntax_message(text, exc)
        return Reply(400, _PLAIN, f"Failed to parse the request body as JSON: {message}".encode())
    except ValueError as exc:  # NaN / Infinity, which serde_json refuses
        offset = text.find(str(exc))
        message = f"expected value at {_position(text, offset + 1)}"
        return Reply(400, _PLAIN, f"Failed to parse the request body as JSON: {message}".encode())
    try:
        _check(spec, value, ())
    except _Problem as problem:
        start, end = _locate(text, problem.path)
        offset = start if problem.anchor == "start" else end
        prefix = _path_text(problem.path)
        # serde_path_to_error leaves out the path of errors at the root.
        where = f"{prefix}: " if prefix else ""
        message = f"{where}{problem.message} at {_position(text, offset)}"
        return Reply(422, _PLAIN, f"Failed to deserialize the JSON body into the target type: {message}".encode())
    return value
