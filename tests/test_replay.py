"""Record and replay: exchanges recorded by the adapter, or written by hand, served again by FakeTgiServer."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import requests

from tgi_adapter import AdapterConfig, RetryPolicy, TaskRequest, TgiHttpAdapter, Timeouts, TokenEvent, __version__
from tgi_adapter.cassette import CassetteError, read_cassette
from tgi_adapter.mapping import build_request
from tgi_adapter.testing import FakeTgiServer, Fault

from fixtures import INFO_2_0, INFO_3, native_frames

MakeTask = Callable[..., TaskRequest]
TOKEN = "hf_ReplayTestTokenThatMustNotLeak7"
SSE_HEADERS = [
    ["content-type", "text/event-stream"],
    ["cache-control", "no-cache"],
    ["x-accel-buffering", "no"],
    ["transfer-encoding", "chunked"],
    ["date", "Wed, 01 Jan 2025 00:00:00 GMT"],
]
ONE_TRY = RetryPolicy(attempts=1)


def task(n: int = 1, **overrides: Any) -> TaskRequest:
    values: Dict[str, Any] = dict(
        task_id=f"r-{n}",
        session_id="s",
        workload="completion",
        model_ref="m",
        engine="tgi",
        ctx=2048,
        priority="interactive",
        max_tokens=6,
        deadline_ms=10_000,
        prompt="Tell me",
        seed=11,
    )
    values.update(overrides)
    return TaskRequest(**values)


def summary(events: Sequence[TokenEvent]) -> List[Tuple[Any, ...]]:
    """What must be the same on replay: timings and ids aside, every event."""
    out: List[Tuple[Any, ...]] = []
    for event in events:
        data = event.data
        if event.kind == "token":
            out.append(("token", data["t"], data["i"]))
        elif event.kind == "end":
            out.append(("end", data["finish_reason"], data["tokens_out"], data["tokens_in"], data["seed"]))
        elif event.kind == "error":
            out.append(("error", data["code"], data["retriable"], data["retry_after_ms"]))
        elif event.kind == "started":
            out.append(("started", data["engine_version"], data["model_id"], data["task_id"]))
        else:
            out.append((event.kind,))
    return out


def run_stream(adapter: TgiHttpAdapter, t: TaskRequest, cancel_after: Optional[int] = None) -> List[TokenEvent]:
    events: List[TokenEvent] = []
    stream = adapter.submit(t, correlation_id="cid-1")
    for event in stream:
        events.append(event)
        if cancel_after is not None and event.kind == "token" and event.data["i"] + 1 == cancel_after:
            stream.cancel()
    assert stream.join(5.0)  # the reader has written its line
    return events


# -- hand-built cassettes -------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def exchange(
    body: Any,
    chunks: Sequence[Tuple[float, bytes]],
    *,
    path: str = "/generate_stream",
    method: str = "POST",
    status: int = 200,
    headers: Optional[List[List[str]]] = None,
    headers_ms: Optional[float] = 1.0,
    end: str = "complete",
    end_ms: Optional[float] = None,
) -> Dict[str, Any]:
    response: Dict[str, Any] = {
        "status": status,
        "headers": SSE_HEADERS if headers is None else headers,
        "headers_ms": headers_ms,
        "chunks": [{"t_ms": t, "b64": b64(data)} for t, data in chunks],
        "end": end,
    }
    if end_ms is not None:
        response["end_ms"] = end_ms
    return {"request": {"method": method, "path": path, "headers": {}, "body": body}, "response": response}


def info_exchange(info: Dict[str, Any]) -> Dict[str, Any]:
    return exchange(
        None,
        [(2.0, json.dumps(info).encode())],
        path="/info",
        method="GET",
        headers=[["content-type", "application/json"]],
    )


def write_cassette(path: Path, *exchanges: Dict[str, Any]) -> Path:
    header = {"cassette": 1, "tgi_adapter": "0.1.0", "recorded_at": "2025-01-01T00:00:00Z", "base_url": "http://gpu"}
    path.write_text("\n".join(json.dumps(line) for line in (header, *exchanges)) + "\n")
    return path


def stream_body(t: TaskRequest, route: str = "native") -> Any:
    return build_request(t, route=route, stream=True)[1]


def frames_at(body: bytes, step_ms: float, start_ms: float = 2.0) -> List[Tuple[float, bytes]]:
    """One chunk per SSE event, ``step_ms`` apart, as the reads of a paced stream return them."""
    events = [part + b"\n\n" for part in body.split(b"\n\n") if part]
    return [(start_ms + n * step_ms, event) for n, event in enumerate(events)]


# -- record, then replay -------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    end: str  # the stream exchange's recorded end
    last: Tuple[Any, ...]  # the terminal event's summary
    faults: Tuple[Fault, ...] = ()
    server: Dict[str, Any] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    cancel_after: Optional[int] = None


CASES = [
    Case("clean", "complete", ("end", "length", 6, 2, None)),
    Case(
        "error frame after tokens",
        "complete",
        ("error", "INTERNAL", False, None),
        (Fault("error_frame", at_token=3, error_type="generation", message="Request failed during generation: boom"),),
    ),
    Case(
        "validation frame before any token",
        "complete",
        ("error", "INVALID_PARAMS", False, None),
        (Fault("error_frame", at_token=0, error_type="validation", message="Input validation error: nope"),),
    ),
    Case("reset", "reset", ("error", "WORKER_RESET", True, None), (Fault("reset", at_token=2),)),
    Case("truncated", "eof", ("error", "WORKER_RESET", True, None), (Fault("truncate", at_token=2),)),
    Case(
        "stall",
        "timeout",
        ("error", "DECODE_TIMEOUT", True, None),
        (Fault("stall", at_token=2),),
        config={"timeouts": Timeouts(token_idle=0.3)},
    ),
    Case(
        "429 with Retry-After",
        "complete",
        ("error", "ADMISSION_REJECT", True, 7000),
        (Fault("status", status=429, headers={"Retry-After": "7"}),),
    ),
    Case("malformed frame", "complete", ("error", "INTERNAL", False, None), (Fault("malformed", at_token=2),)),
    Case(
        "oversized frame",
        "cancelled",
        ("error", "INTERNAL", False, None),
        (Fault("oversized", at_token=2, size=4096),),
        config={"max_frame_bytes": 1024},
    ),
    Case("cancelled by the consumer", "cancelled", ("end", "cancelled", 0, None, None), cancel_after=2),
    Case("TGI 2.0 framing", "complete", ("end", "length", 6, None, None), server={"version": "2.0.4"}),
    Case("OpenAI chat route", "complete", ("end", "length", 6, 5, None), config={"route": "openai-chat"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_recorded_stream_replays_to_the_same_events(case: Case, tmp_path: Path) -> None:
    path = tmp_path / "incident.jsonl"
    config = AdapterConfig(retry=ONE_TRY, **case.config)
    with FakeTgiServer(pace_s=0.002, faults=case.faults, **case.server) as engine:
        with TgiHttpAdapter(engine.url, config=AdapterConfig(record=str(path), retry=ONE_TRY, **case.config)) as a:
            recorded = run_stream(a, task(), case.cancel_after)
    assert summary(recorded)[-1] == case.last
    streams = [e for e in read_cassette(path).exchanges if e.request.method == "POST"]
    assert [e.response.end for e in streams] == [case.end]

    with FakeTgiServer(replay=path, speed=0) as replay, TgiHttpAdapter(replay.url, config=config) as adapter:
        replayed = run_stream(adapter, task(), case.cancel_after)
        assert [r.path for r in replay.requests] == ["/info", streams[0].request.path]
    assert summary(replayed) == summary(recorded)


def test_blocking_calls_and_control_calls_replay_to_the_same_answers(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"

    def session(adapter: TgiHttpAdapter) -> Dict[str, Any]:
        text, end = adapter.generate(task(1), correlation_id="c")
        end.pop("decode_ms")
        props = adapter.props()
        return {
            "generate": (text, end),
            "health": adapter.health(),
            "info": adapter.engine_info(),
            "props": (props.slots_free, props.slots_total, props.slots_source, props.engine_version),
            "metrics": adapter.metrics_text(),
        }

    config = AdapterConfig(tokenize_check=True)
    recording = AdapterConfig(record=path, tokenize_check=True)
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url, config=recording) as a:
        recorded = session(a)
    routes = [(e.request.method, e.request.path) for e in read_cassette(path).exchanges]
    assert routes == [
        ("GET", "/info"),
        ("POST", "/tokenize"),
        ("POST", "/generate"),
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("GET", "/metrics"),
    ]
    with FakeTgiServer(replay=path, speed=0, version="2.0.4") as replay, TgiHttpAdapter(replay.url, config=config) as b:
        replayed = session(b)
    assert replayed == recorded
    assert recorded["info"].version == "3.3.6"  # from the cassette, not from the replaying fake's 2.0.4


def test_each_retry_attempt_is_its_own_line_and_replays_in_order(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    retry = RetryPolicy(attempts=3, base=0.001, cap=0.001)
    with FakeTgiServer(faults=[Fault("status", status=503, times=1)]) as engine:
        with TgiHttpAdapter(engine.url, config=AdapterConfig(record=path, retry=retry)) as adapter:
            recorded = run_stream(adapter, task())
    statuses = [e.response.status for e in read_cassette(path).exchanges if e.request.method == "POST"]
    assert statuses == [503, 200]
    with FakeTgiServer(replay=path, speed=0) as replay:
        with TgiHttpAdapter(replay.url, config=AdapterConfig(retry=retry)) as adapter:
            assert summary(run_stream(adapter, task())) == summary(recorded)
        assert [r.path for r in replay.requests].count("/generate_stream") == 2


def test_several_adapters_record_sessions_into_one_file_from_many_threads(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    n_threads, per_thread = 8, 4
    with FakeTgiServer(pace_s=0.001) as engine:
        adapters = [TgiHttpAdapter(engine.url, config=AdapterConfig(record=path)) for _ in range(2)]
        errors: List[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(per_thread):
                    events = run_stream(adapters[n % 2], task(n * 100 + i, prompt=f"prompt {n} {i}"))
                    assert events[-1].kind == "end"
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for adapter in adapters:
            adapter.close()
    assert not errors
    cassette = read_cassette(path)
    assert len(cassette.sessions) == 2
    prompts = sorted(e.request.body["inputs"] for e in cassette.exchanges if e.request.method == "POST")
    assert prompts == sorted(f"prompt {n} {i}" for n in range(n_threads) for i in range(per_thread))
    with FakeTgiServer(replay=path, speed=0) as replay, TgiHttpAdapter(replay.url) as adapter:
        for n in (0, 7):  # recorded by the first and by the second adapter
            text, _end = adapter.submit(task(n, prompt=f"prompt {n} 3")).collect()
            assert len(text) > 0


def test_the_token_is_absent_from_the_cassette_in_any_form(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    echo = Fault(
        "status",
        status=503,
        body=json.dumps({"error": f"gateway saw Authorization: Bearer {TOKEN}", "error_type": "x"}),
        headers={"x-seen-key": TOKEN, "set-cookie": "session=1"},
        content_type="application/json",
    )
    config = AdapterConfig(record=path, headers={"X-Api-Key": TOKEN}, retry=RetryPolicy(attempts=2, base=0.001))
    with FakeTgiServer(api_key=TOKEN, faults=[echo]) as engine:
        with TgiHttpAdapter(engine.url, token=TOKEN, config=config) as adapter:
            text, _end = adapter.submit(task(prompt=f"Is {TOKEN} a secret?")).collect()
            assert adapter.health().ready
    raw = path.read_bytes()
    assert TOKEN.encode() not in raw
    assert base64.b64encode(TOKEN.encode()).rstrip(b"=") not in raw
    for exchange_ in read_cassette(path).exchanges:  # nor inside a decoded chunk
        assert TOKEN.encode() not in exchange_.response.body
        assert not {"authorization", "x-api-key"} & set(exchange_.request.headers)
        assert "set-cookie" not in {name for name, _ in exchange_.response.headers}
    assert b"[sha256:" in raw and text


# -- replay of hand-built cassettes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("era", "info", "marker"),
    [("2.0", INFO_2_0, b"data:{"), ("3", INFO_3, b"data: {")],
    ids=["TGI 2.0 data:{", "TGI 3 data: {"],
)
def test_hand_written_cassettes_of_both_framing_eras_replay(
    era: str, info: Dict[str, Any], marker: bytes, tmp_path: Path
) -> None:
    t = task()
    body = native_frames([" Hello", ",", " world", "!"], era=era, finish="eos_token", seed=None)
    assert body.startswith(marker)
    # A read may hold several events or split one: replay sends the bytes as they were read.
    chunks = [(2.0, body[:10]), (3.0, body[10:200]), (9.0, body[200:])]
    path = write_cassette(tmp_path / "c.jsonl", info_exchange(info), exchange(stream_body(t), chunks))
    with FakeTgiServer(replay=path, speed=0) as replay, TgiHttpAdapter(replay.url) as adapter:
        events = run_stream(adapter, t)
    assert [(e.kind, e.data.get("t")) for e in events if e.kind in ("token", "end")] == [
        ("token", " Hello"),
        ("token", ","),
        ("token", " world"),
        ("token", "!"),
        ("end", None),
    ]
    assert events[0].data["engine_version"].startswith(info["version"])
    assert events[-1].data["finish_reason"] == "eos_token"


ENDINGS = [
    ("reset after two tokens", 200, "reset", 2, "WORKER_RESET"),
    ("eof after two tokens", 200, "eof", 2, "WORKER_RESET"),
    ("stall after two tokens", 200, "timeout", 2, "DECODE_TIMEOUT"),
    ("client went away after two tokens", 200, "cancelled", 2, "DECODE_TIMEOUT"),
    ("reset before any header", 0, "reset", 0, "WORKER_RESET"),
    ("no header ever", 0, "timeout", 0, "DECODE_TIMEOUT"),
]


@pytest.mark.parametrize(("status", "end", "tokens", "code"), [e[1:] for e in ENDINGS], ids=[e[0] for e in ENDINGS])
def test_recorded_endings_are_reproduced(status: int, end: str, tokens: int, code: str, tmp_path: Path) -> None:
    t = task()
    frames = native_frames([" a", " b", " c", " d"])
    chunks = frames_at(frames, 1.0)[:tokens] if status else []
    headers, headers_ms = (SSE_HEADERS, 1.0) if status else ([], None)
    recorded = exchange(stream_body(t), chunks, status=status, headers=headers, headers_ms=headers_ms, end=end)
    path = write_cassette(tmp_path / "c.jsonl", recorded)
    config = AdapterConfig(retry=ONE_TRY, timeouts=Timeouts(first_token=0.5, token_idle=0.3))
    with FakeTgiServer(replay=path, speed=0) as replay, TgiHttpAdapter(replay.url, config=config) as adapter:
        started = time.monotonic()
        events = run_stream(adapter, t)
        elapsed = time.monotonic() - started
        if end in ("timeout", "cancelled"):
            # Silence until the client gave up: the server saw it go.
            assert replay.wait_for_disconnect(5.0)
    assert [e.kind for e in events].count("token") == tokens
    assert events[-1].kind == "error" and events[-1].data["code"] == code
    if code == "DECODE_TIMEOUT":
        assert elapsed >= 0.25  # the replay held its silence
    else:
        assert elapsed < 3.0


@pytest.mark.parametrize(("end", "expected"), [("reset", "reset"), ("eof", "fin")])
def test_a_recorded_reset_is_a_tcp_reset_and_an_eof_a_close(end: str, expected: str, tmp_path: Path) -> None:
    t = task()
    path = write_cassette(tmp_path / "c.jsonl", exchange(stream_body(t), [(1.0, b"data: {")], end=end))
    with FakeTgiServer(replay=path, speed=0) as replay:
        body = json.dumps(stream_body(t)).encode()
        with socket.create_connection((replay.host, replay.port), timeout=5) as sock:
            sock.sendall(
                b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        seen = "fin"
                        break
                    received += data
            except ConnectionResetError:
                seen = "reset"
    assert seen == expected
    assert received.endswith(b"\r\n7\r\ndata: {\r\n")  # the recorded bytes, then no terminating chunk


def test_a_paced_recording_replays_at_its_pace(tmp_path: Path) -> None:
    t = task()
    frames = frames_at(native_frames([" one", " two", " three"]), 300.0)  # tokens at 2, 302, 602 ms
    path = write_cassette(tmp_path / "c.jsonl", exchange(stream_body(t), frames))

    def timed(speed: float) -> Tuple[float, float]:
        with FakeTgiServer(replay=path, speed=speed) as replay, TgiHttpAdapter(replay.url) as adapter:
            start = time.monotonic()
            arrivals = []
            for event in adapter.submit(t):
                if event.kind == "token":
                    arrivals.append(time.monotonic())
            return arrivals[-1] - start, arrivals[1] - arrivals[0]

    total, gap = timed(1.0)
    assert total >= 0.55 and gap >= 0.25
    assert timed(2.0)[0] >= 0.27
    assert timed(0)[0] < 0.45


def test_headers_arrive_at_their_recorded_time(tmp_path: Path) -> None:
    t = task()
    path = write_cassette(
        tmp_path / "c.jsonl",
        exchange(stream_body(t), frames_at(native_frames([" x"]), 1.0, start_ms=400.0), headers_ms=400.0),
        exchange(stream_body(t), frames_at(native_frames([" x"]), 1.0, start_ms=400.0), headers_ms=400.0),
    )
    slow_first_token = AdapterConfig(retry=ONE_TRY, timeouts=Timeouts(first_token=0.15))
    with FakeTgiServer(replay=path) as replay:
        with TgiHttpAdapter(replay.url, config=slow_first_token) as adapter:
            events = run_stream(adapter, t)
        assert events[-1].data["code"] == "DECODE_TIMEOUT"
        with TgiHttpAdapter(replay.url, config=AdapterConfig(retry=ONE_TRY)) as adapter:
            assert adapter.submit(t).collect()[0] == " x"


def test_repeated_requests_get_the_recorded_answers_in_order_then_404(tmp_path: Path) -> None:
    t = task()
    path = write_cassette(
        tmp_path / "c.jsonl",
        exchange(stream_body(t), [(1.0, native_frames([" first"]))]),
        exchange(None, [], path="/health", method="GET", status=503, headers=[], end="complete"),
        exchange(stream_body(t), [(1.0, native_frames([" second"]))]),
    )
    config = AdapterConfig(retry=ONE_TRY)
    with FakeTgiServer(replay=path, speed=0) as replay, TgiHttpAdapter(replay.url, config=config) as a:
        assert a.submit(task(1)).collect()[0] == " first"
        assert a.submit(task(2)).collect()[0] == " second"
        events = run_stream(a, task(3))
        assert events[-1].data["code"] == "POOL_UNAVAILABLE" and "were all served" in events[-1].data["message"]
        # A GET route repeats its last recorded answer.
        assert [a.health().ready for _ in range(3)] == [False, False, False]
        # /info was not recorded: the fake's own.
        assert a.engine_info().version == "3.3.6"


def test_an_unmatched_request_gets_a_tgi_shaped_404_saying_what_came_closest(tmp_path: Path) -> None:
    recorded_body = {"inputs": "Hi", "parameters": {"seed": 1, "max_new_tokens": 4}}
    path = write_cassette(
        tmp_path / "c.jsonl",
        exchange(recorded_body, [(1.0, b"{}")], path="/generate", headers=[["content-type", "application/json"]]),
    )
    with FakeTgiServer(replay=path, speed=0) as replay:
        url = replay.url
        # JSON-equal (key order, 4 vs 4.0) and headers ignored: a match.
        same = {"parameters": {"max_new_tokens": 4.0, "seed": 1}, "inputs": "Hi"}
        ok = requests.post(url + "/generate", json=same, headers={"X-Correlation-Id": "other"}, timeout=5)
        assert ok.status_code == 200 and ok.content == b"{}"

        other = requests.post(url + "/generate", json={"inputs": "Hi", "parameters": {"seed": 2, "max_new_tokens": 4}})
        assert other.status_code == 404 and other.headers["content-type"] == "application/json"
        body = other.json()
        assert set(body) == {"error", "error_type"} and body["error_type"] == "replay"
        assert body["error"].startswith("no recorded exchange matched POST /generate in ")
        assert "line 2" in body["error"] and "body.parameters.seed: recorded 1, got 2" in body["error"]

        elsewhere = requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=5).json()["error"]
        assert "nothing was recorded for /v1/completions" in elsewhere and "POST /generate ×1" in elsewhere
        assert "only for POST" in requests.get(url + "/generate", timeout=5).json()["error"]
        assert requests.get(url + "/metrics", timeout=5).status_code == 404
        assert requests.get(url + "/health", timeout=5).status_code == 200  # the fake's own


def test_status_headers_and_body_bytes_are_the_recorded_ones_framed_anew(tmp_path: Path) -> None:
    headers = [
        ["content-type", "text/plain"],
        ["x-gateway", "rewrote-this"],
        ["content-length", "999"],
        ["date", "Mon, 01 Jan 2001 00:00:00 GMT"],
        ["connection", "close"],
        ["keep-alive", "timeout=5"],
    ]
    path = write_cassette(
        tmp_path / "c.jsonl",
        exchange({"inputs": "x"}, [(1.0, b"slow "), (2.0, b"down")], path="/generate", status=429, headers=headers),
    )
    with FakeTgiServer(replay=path, speed=0) as replay:
        response = requests.post(replay.url + "/generate", json={"inputs": "x"}, timeout=5)
    assert response.status_code == 429 and response.content == b"slow down"
    assert response.headers["x-gateway"] == "rewrote-this"
    assert response.headers["content-length"] == "9"
    assert response.headers["date"] != "Mon, 01 Jan 2001 00:00:00 GMT"
    assert "keep-alive" not in response.headers


def test_a_malformed_cassette_fails_when_the_server_is_built(tmp_path: Path) -> None:
    path = write_cassette(tmp_path / "bad.jsonl", exchange(None, [(1.0, b"x")], path="/info", method="GET"))
    text = path.read_text().replace('"b64": "eA=="', '"b64": "not base64!"')
    path.write_text(text)
    with pytest.raises(CassetteError, match=r"bad\.jsonl, line 2: response\.chunks\[0\]\.b64 is not base64"):
        FakeTgiServer(replay=path)
    with pytest.raises(ValueError, match="speed must be a number >= 0"):
        FakeTgiServer(replay=write_cassette(tmp_path / "ok.jsonl"), speed=-1)


# -- the command line -------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "tgi_adapter"]


def cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_ADAPTER_")}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(name="serve")
def _serve() -> Iterator[Callable[..., str]]:
    """Start ``tgi-adapter fake-server ARGS --port 0``; returns its URL. Stopped with Ctrl-C at the end."""
    procs: List[subprocess.Popen] = []  # type: ignore[type-arg]

    def start(*args: str) -> str:
        proc = subprocess.Popen(CLI + ["fake-server", "--port", "0", *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening at http://" in line, line
        return line.split("listening at ", 1)[1].split()[0]

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0


def test_the_command_line_records_and_replays(tmp_path: Path, serve: Callable[..., str]) -> None:
    path = tmp_path / "session.jsonl"
    args = ["generate", "--json", "--max-tokens", "5", "--seed", "9", "--timeout", "20", "Hello"]
    engine = serve("--pace-ms", "2")
    recorded = cli(*args, "--url", engine, "--record", str(path))
    assert recorded.returncode == 0, recorded.stderr
    assert [e.request.path for e in read_cassette(path).exchanges] == ["/info", "/generate_stream"]

    replay = serve("--replay", str(path), "--speed", "0")
    replayed = cli(*args, "--url", replay)
    assert replayed.returncode == 0, replayed.stderr

    def texts(out: str) -> List[Tuple[str, Any]]:
        events = [json.loads(line) for line in out.splitlines()]
        return [(e["kind"], e["data"].get("t") or e["data"].get("finish_reason")) for e in events]

    assert texts(replayed.stdout) == texts(recorded.stdout)
    assert texts(recorded.stdout)[-1] == ("end", "length")
    other = cli(*args[:-1], "Another prompt", "--url", replay)
    assert other.returncode == 1 and "no recorded exchange matched POST /generate_stream" in other.stderr


def test_the_command_line_refuses_a_malformed_cassette(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"cassette": 7}\n')
    result = cli("fake-server", "--port", "0", "--replay", str(path))
    assert result.returncode == 2
    expected = f"error: {path}, line 1: unknown cassette version 7 (this tgi_adapter {__version__} reads version 1)"
    assert result.stderr.strip() == expected
