"""The cassette format: what the recorder writes, what the reader accepts and refuses."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tgi_adapter import AdapterConfig
from tgi_adapter.cassette import (
    CASSETTE_VERSION,
    CassetteError,
    Recorder,
    json_key,
    parse_cassette,
    read_cassette,
)
from tgi_adapter.config import config_from_env

TOKEN = "hf_TheAdapterTokenNeverWritten42"


class Clock:
    """A clock the test moves by hand, so times in the file are exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def header_line(**changes: Any) -> str:
    line = {"cassette": 1, "tgi_adapter": "0.1.0", "recorded_at": "2025-01-01T00:00:00+00:00", "base_url": "http://e"}
    line.update(changes)
    return json.dumps(line)


def exchange_line(**changes: Any) -> Dict[str, Any]:
    line: Dict[str, Any] = {
        "request": {"method": "POST", "path": "/generate", "headers": {}, "body": {"inputs": "Hi"}},
        "response": {
            "status": 200,
            "headers": [["content-type", "application/json"]],
            "headers_ms": 1.0,
            "chunks": [{"t_ms": 2.0, "b64": base64.b64encode(b'{"generated_text":"x"}').decode()}],
            "end": "complete",
        },
    }
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        target = line
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is DELETE:
            del target[leaf]
        else:
            target[leaf] = value
    return line


DELETE = object()


def write(path: Path, *lines: Any) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -- writing -------------------------------------------------------------------------------


def test_a_recorded_exchange_reads_back_exactly(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(tmp_path / "c.jsonl", base_url="http://gw:8080/tgi/replica-3", clock=clock)
    tape = recorder.begin(
        "post",
        "http://gw:8080/tgi/replica-3/generate_stream",
        {"Content-Type": "application/json", "X-Correlation-Id": "c-1"},
        b'{"inputs":"Hi","parameters":{"seed":1}}',
    )
    clock.now += 0.0125
    tape.headers(200, [("content-type", "text/event-stream"), ("x-compute-type", "gpu+optimized")])
    clock.now += 0.25
    tape.chunk(b"data: {\"a\":1}\n\n")
    clock.now += 1.5
    tape.chunk(b"data: {\"b\":")
    tape.chunk(b"")  # the read that saw the body's end
    clock.now += 0.001
    tape.end("complete")

    cassette = read_cassette(tmp_path / "c.jsonl")
    assert [s.base_url for s in cassette.sessions] == ["http://gw:8080/tgi/replica-3"]
    (exchange,) = cassette.exchanges
    assert exchange.line == 2 and exchange.session == 0
    assert exchange.request.method == "POST" and exchange.request.path == "/generate_stream"
    assert dict(exchange.request.headers) == {"content-type": "application/json", "x-correlation-id": "c-1"}
    assert exchange.request.body == {"inputs": "Hi", "parameters": {"seed": 1}}
    response = exchange.response
    assert response.status == 200 and response.headers_ms == 12.5
    assert response.headers == (("content-type", "text/event-stream"), ("x-compute-type", "gpu+optimized"))
    assert [(c.t_ms, c.data) for c in response.chunks] == [(262.5, b'data: {"a":1}\n\n'), (1762.5, b'data: {"b":')]
    assert response.end == "complete" and response.end_ms == 1763.5
    assert response.body == b'data: {"a":1}\n\ndata: {"b":'


def test_every_recorder_starts_a_session_of_its_own_in_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    first = Recorder(path, base_url="http://a:1")
    first.begin("GET", "/health", {}, None).end("timeout")
    second = Recorder(str(path), base_url="http://b:2")
    second.begin("GET", "/info", {}, None).end("reset")
    first.begin("GET", "/metrics", {}, None).end("eof")
    cassette = read_cassette(path)
    assert [(s.line, s.base_url) for s in cassette.sessions] == [(1, "http://a:1"), (3, "http://b:2")]
    assert [(e.request.path, e.session, e.response.end) for e in cassette.exchanges] == [
        ("/health", 0, "timeout"),
        ("/info", 1, "reset"),
        ("/metrics", 1, "eof"),  # lines are in time order; a later line belongs to the latest header
    ]
    assert all(e.response.status == 0 and e.response.headers_ms is None for e in cassette.exchanges)


def test_a_tape_writes_once_and_only_when_ended(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    recorder = Recorder(path, base_url="http://e")
    recorder.begin("GET", "/info", {}, None)  # never ended: a request that never reached the engine
    tape = recorder.begin("GET", "/health", {}, None)
    tape.headers(200, {})
    tape.end("complete")
    tape.end("reset")
    with pytest.raises(ValueError, match="end must be one of"):
        recorder.begin("GET", "/health", {}, None).end("finished")
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["response"]["end"] == "complete"


def test_no_credential_reaches_the_file_in_any_form(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    recorder = Recorder(path, base_url=f"http://user:{TOKEN}@gw/key/{TOKEN}", secrets=[TOKEN, None])
    tape = recorder.begin(
        "POST",
        f"http://gw/key/{TOKEN}/generate?api_key={TOKEN}",
        {
            "Authorization": f"Bearer {TOKEN}",
            "X-Api-Key": TOKEN,
            "Cookie": "session=abc",
            "Proxy-Authorization": "Basic eHl6",
            "X-Echo": f"token {TOKEN}",
        },
        json.dumps({"inputs": f"my key is {TOKEN}", TOKEN: [TOKEN]}).encode(),
    )
    tape.headers(401, [("set-cookie", "s=1"), ("x-seen", TOKEN), ("www-authenticate", "Bearer")])
    half = len(TOKEN) // 2
    tape.chunk(b'{"error":"bad token ' + TOKEN[:half].encode())
    tape.chunk(TOKEN[half:].encode() + b" or " + base64.b64encode(TOKEN.encode()) + b'"}')
    tape.end("complete")
    raw = path.read_bytes()
    cassette = read_cassette(path)
    exchange = cassette.exchanges[0]
    for form in (TOKEN.encode(), base64.b64encode(TOKEN.encode()).rstrip(b"=")):
        assert form not in raw
        assert form not in exchange.response.body  # nor inside the base64 of the chunks
    assert exchange.response.body.startswith(b'{"error":"bad token [sha256:')
    # The read that completed the token carries the merged bytes, at its own time.
    assert len(exchange.response.chunks) == 1
    assert set(exchange.request.headers) == {"x-echo"}
    assert [name for name, _ in exchange.response.headers] == ["x-seen", "www-authenticate"]
    assert exchange.request.path.startswith("/generate?api_key=[sha256:")
    assert exchange.request.body["inputs"].startswith("my key is [sha256:")
    assert cassette.sessions[0].base_url.startswith("http://gw/key/[sha256:")


def test_many_threads_recording_to_one_file_leave_every_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    recorders = [Recorder(path, base_url=f"http://replica-{n}") for n in range(2)]
    threads_n, per_thread = 12, 20
    barrier = threading.Barrier(threads_n)

    def work(n: int) -> None:
        recorder = recorders[n % 2]
        barrier.wait()
        for i in range(per_thread):
            tag = f"{n}-{i}"
            tape = recorder.begin("POST", "/generate", {}, json.dumps({"inputs": tag}).encode())
            tape.headers(200, [])
            # Large lines (well past any write buffer) would show a torn write.
            for part in range(3):
                tape.chunk((tag + ":" + str(part)).encode() * 4000)
            tape.end("complete")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cassette = read_cassette(path)
    assert len(cassette.sessions) == 2 and len(cassette.exchanges) == threads_n * per_thread
    seen = set()
    for exchange in cassette.exchanges:
        tag = exchange.request.body["inputs"]
        expected = b"".join((tag + ":" + str(part)).encode() * 4000 for part in range(3))
        assert exchange.response.body == expected
        seen.add(tag)
    assert len(seen) == threads_n * per_thread


def test_a_file_that_cannot_be_written_fails_when_the_recorder_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot record to .*missing-dir"):
        Recorder(tmp_path / "missing-dir" / "c.jsonl", base_url="http://e")


# -- reading -------------------------------------------------------------------------------

B64 = base64.b64encode(b"x").decode()

MALFORMED = [
    ("not JSON Lines", [header_line(), "{not json"], 2, "not a JSON line"),
    ("a line that is not an object", [header_line(), "[1, 2]"], 2, "must be a JSON object"),
    ("unknown version", [header_line(cassette=2)], 1, "unknown cassette version 2"),
    ("version given as a string", [header_line(cassette="1")], 1, "unknown cassette version"),
    ("no header first", [json.dumps(exchange_line())], 1, "starts with a header line"),
    ("header without base_url", [header_line(base_url=None)], 1, "base_url must be a string"),
    ("chunk not base64", [header_line(), exchange_line(**{"response.chunks.0.b64": "###"})], 2, "b64 is not base64"),
    ("missing method", [header_line(), exchange_line(**{"request.method": DELETE})], 2, "missing field request.method"),
    ("missing body", [header_line(), exchange_line(**{"request.body": DELETE})], 2, "missing field request.body"),
    ("missing status", [header_line(), exchange_line(**{"response.status": DELETE})], 2, "response.status"),
    ("missing t_ms", [header_line(), exchange_line(**{"response.chunks.0.t_ms": DELETE})], 2, "chunks[0].t_ms"),
    ("missing end", [header_line(), exchange_line(**{"response.end": DELETE})], 2, "missing field response.end"),
    ("unknown end", [header_line(), exchange_line(**{"response.end": "done"})], 2, "response.end must be one of"),
    ("negative time", [header_line(), exchange_line(**{"response.headers_ms": -1})], 2, "headers_ms must be"),
    (
        "time going back",
        [header_line(), exchange_line(**{"response.chunks": [{"t_ms": 5, "b64": B64}, {"t_ms": 4, "b64": B64}]})],
        2,
        "goes back in time",
    ),
    ("status out of range", [header_line(), exchange_line(**{"response.status": 42})], 2, "HTTP status"),
    ("header pairs", [header_line(), exchange_line(**{"response.headers": {"a": "b"}})], 2, "[name, value]"),
    (
        "status 0 with a body",
        [header_line(), exchange_line(**{"response.status": 0, "response.headers": []})],
        2,
        "status 0",
    ),
    ("path without slash", [header_line(), exchange_line(**{"request.path": "generate"})], 2, "start with '/'"),
    ("neither kind", [header_line(), {"hello": 1}], 2, "neither a header line"),
]


@pytest.mark.parametrize(("lines", "line", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_cassette_is_refused_naming_file_and_line(
    tmp_path: Path, lines: List[Any], line: int, message: str
) -> None:
    path = write(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(CassetteError) as info:
        read_cassette(path)
    text = str(info.value)
    assert text.startswith(f"{path}, line {line}: "), text
    assert message in text


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", header_line(), "", exchange_line(), "   ", "{oops")
    with pytest.raises(CassetteError, match=r", line 5: not a JSON line"):
        read_cassette(path)
    ok = write(tmp_path / "ok.jsonl", header_line(), "", exchange_line())
    assert [e.line for e in read_cassette(ok).exchanges] == [3]


def test_empty_unreadable_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(CassetteError, match="empty.jsonl: empty"):
        read_cassette(empty)
    with pytest.raises(CassetteError, match="nowhere.jsonl: cannot read the cassette"):
        read_cassette(tmp_path / "nowhere.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(header_line().encode() + b'\n{"request": "\xe9"}\n')
    with pytest.raises(CassetteError, match="latin.jsonl, line 2: not UTF-8"):
        read_cassette(latin)


def test_exchange_values_are_immutable() -> None:
    cassette = parse_cassette([header_line(), json.dumps(exchange_line())], "mem")
    exchange = cassette.exchanges[0]
    with pytest.raises(AttributeError):
        exchange.line = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        exchange.request.headers["x"] = "y"  # type: ignore[index]
    body = exchange.request.body
    body["inputs"] = "changed"
    assert exchange.request.body == {"inputs": "Hi"}
    assert cassette.sessions[0].tgi_adapter == "0.1.0" and CASSETTE_VERSION == 1


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ({"a": 1, "b": [1, 2]}, {"b": [1, 2.0], "a": 1.0}, True),
        ({"a": True}, {"a": 1}, False),
        ([1, 2], [2, 1], False),
        (None, {}, False),
        ({"a": {"b": "x"}}, {"a": {"b": "x"}}, True),
        ("1", 1, False),
    ],
)
def test_json_key_is_json_equality(a: Any, b: Any, equal: bool) -> None:
    assert (json_key(a) == json_key(b)) is equal


# -- configuration ---------------------------------------------------------------------------


def test_record_is_validated_and_read_from_the_environment(tmp_path: Path) -> None:
    assert AdapterConfig().record is None
    assert AdapterConfig(record=tmp_path / "c.jsonl").record == str(tmp_path / "c.jsonl")
    for bad in ("", 5, b"c.jsonl"):
        with pytest.raises(ValueError, match="AdapterConfig.record must be the path of a cassette file"):
            AdapterConfig(record=bad)  # type: ignore[arg-type]
    assert config_from_env({"TGI_ADAPTER_RECORD": "/tmp/x.jsonl"}).record == "/tmp/x.jsonl"
    assert config_from_env({}).record is None

