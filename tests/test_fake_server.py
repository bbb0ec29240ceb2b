"""The fake TGI server on real sockets, seen from stdlib and requests clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import trustme

from tgi_adapter.testing.fake_engine import Fault
from tgi_adapter.testing.fake_server import FakeTgiServer


class RawClient:
    """A minimal HTTP/1.1 client that shows exactly what the server wrote."""

    def __init__(self, server: FakeTgiServer, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.buf = b""
        self.received = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
        all_headers = {"Host": "fake", "Content-Length": str(len(data))}
        if body is not None and not isinstance(body, bytes):
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
        self.sock.sendall(head.encode() + b"\r\n" + data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.received += len(data)
        self.buf += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buf)} of {size} bytes")
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("EOF inside a line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def head(self) -> tuple[int, list[tuple[str, str]]]:
        status = int(self._line().split()[1])
        headers = []
        while line := self._line():
            name, _, value = line.decode().partition(": ")
            headers.append((name, value))
        return status, headers

    def body(self, headers: list[tuple[str, str]]) -> bytes:
        return self._take(int(dict(headers)["content-length"]))

    def chunk(self) -> bytes | None:
        """One chunk's data; None for the terminating zero-size chunk."""
        size = int(self._line(), 16)
        data = self._take(size)
        assert self._take(2) == b"\r\n"
        return data if size else None

    def chunks(self) -> list[bytes]:
        out = []
        while (data := self.chunk()) is not None:
            out.append(data)
        return out

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        """Send, then read a whole response: the body, or the list of chunks of a stream."""
        self.send(method, path, body, **kw)
        status, headers = self.head()
        as_dict = dict(headers)
        if as_dict.get("transfer-encoding") == "chunked":
            return status, as_dict, self.chunks()
        return status, as_dict, self.body(headers)


def data_of(frame: bytes) -> Any:
    assert frame.startswith(b"data:") and frame.endswith(b"\n\n")
    payload = frame[5:].strip()
    return payload.decode() if payload == b"[DONE]" else json.loads(payload)


@pytest.fixture(name="server")
def _server() -> Iterator[FakeTgiServer]:
    with FakeTgiServer() as server:
        yield server


STREAM_BODY = {"inputs": "Hello there", "parameters": {"max_new_tokens": 3, "details": True}}


# --- framing and headers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "start"),
    [("0.9.4", b'data:{"token":'), ("2.0.4", b'data:{"index":1,"token":'), ("3.3.6", b'data: {"index":1,"token":')],
)
def test_stream_framing_per_version(version: str, start: bytes) -> None:
    with FakeTgiServer(version=version) as server, RawClient(server) as client:
        status, headers, frames = client.request("POST", "/generate_stream", STREAM_BODY)
    assert status == 200
    assert headers["content-type"] == "text/event-stream" and headers["cache-control"] == "no-cache"
    assert headers["x-accel-buffering"] == "no" and headers["x-compute-type"] == "gpu+optimized"
    assert headers["x-compute-characters"] == str(len("Hello there")) and "date" in headers
    assert all(name == name.lower() for name in headers)
    assert len(frames) == 3 and frames[0].startswith(start)
    assert all(f.count(b"\n") == 2 and f.endswith(b"}\n\n") for f in frames)  # one event per chunk
    final = data_of(frames[-1])
    assert final["generated_text"] and ("input_length" in final["details"]) == (version == "3.3.6")


def test_split_writes_produce_the_same_bytes() -> None:
    with FakeTgiServer() as whole, RawClient(whole) as client:
        expected = client.request("POST", "/generate_stream", STREAM_BODY)[2]
    with FakeTgiServer(split_writes=1) as split, RawClient(split) as client:
        client.send("POST", "/generate_stream", STREAM_BODY)
        assert client.head()[0] == 200
        assert client.chunks() == expected


def test_utf8_split_tokens_over_one_byte_writes() -> None:
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 16, "details": True}}
    with FakeTgiServer(utf8_split=True, split_writes=1) as server, RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", body)
    events = [data_of(f) for f in frames]
    texts = [e["token"]["text"] for e in events]
    assert "" in texts and any(not t.isascii() for t in texts)
    assert "".join(texts) == events[-1]["generated_text"]


def test_generate_headers_and_body() -> None:
    with FakeTgiServer(version="3.3.6", pace_s=0.001) as server, RawClient(server) as client:
        status, headers, body = client.request(
            "POST", "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 4}}
        )
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-prompt-tokens"] == "1" and headers["x-generated-tokens"] == "4"
    assert float(headers["x-compute-time"]) == pytest.approx(0.003)
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert headers[name].isdigit()
    assert int(headers["content-length"]) == len(body) and list(json.loads(body)) == ["generated_text"]


def test_health_info_and_routes(server: FakeTgiServer) -> None:
    with RawClient(server) as client:
        assert client.request("GET", "/health")[0::2] == (200, b"")
        assert client.request("GET", "/ping")[0] == 200
        server.healthy = False
        status, _, body = client.request("GET", "/health")
        assert (status, json.loads(body)) == (503, {"error": "unhealthy", "error_type": "healthcheck"})
        assert client.request("GET", "/nope")[0::2] == (404, b"")
        status, headers, _ = client.request("GET", "/health", headers={"Origin": "http://app"})
        assert headers["access-control-allow-origin"] == "*" and headers["vary"].startswith("origin")
        status, headers, _ = client.request("GET", "/generate")
        assert status == 405 and headers["allow"] == "POST"
        info = json.loads(client.request("GET", "/info")[2])
        assert info["version"] == "3.3.6" and info["max_input_tokens"] == 4095 and info["model_id"] == server.model_id
        models = json.loads(client.request("GET", "/v1/models")[2])
        assert models["data"][0]["id"] == server.model_id
        tokens = json.loads(client.request("POST", "/tokenize", {"inputs": "Hi you"})[2])
        assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("Hi", 0, 2), ("you", 3, 6)]
    assert server.connections_accepted == 1


def test_info_per_era_over_http() -> None:
    for version, present, absent in (
        ("2.0.4", "max_input_length", "max_input_tokens"),
        ("2.2.0", "model_dtype", "max_input_length"),
        ("3.3.6", "router", "model_dtype"),
    ):
        with FakeTgiServer(version=version) as server, requests.Session() as session:
            info = session.get(server.url + "/info").json()
        assert present in info and absent not in info and info["version"] == version


# --- validation, auth, axum ---------------------------------------------------------


def test_validation_error_as_422_and_as_stream_frame(server: FakeTgiServer) -> None:
    bad = {"inputs": "Hi", "parameters": {"temperature": 0}}
    expected = {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}
    with RawClient(server) as client:
        status, _, body = client.request("POST", "/generate", bad)
        assert (status, json.loads(body)) == (422, expected)
        status, headers, frames = client.request("POST", "/generate_stream", bad)
        assert status == 200 and headers["content-type"] == "text/event-stream"
        assert [data_of(f) for f in frames] == [expected]


def test_axum_rejections_and_auth() -> None:
    with FakeTgiServer(api_key="s3cret") as server, RawClient(server) as client:
        assert client.request("POST", "/generate", {"inputs": "x"})[0::2] == (401, b"")
        assert client.request("GET", "/health")[0] == 200
        auth = {"Authorization": "Bearer s3cret"}
        status, headers, body = client.request("POST", "/generate", b"{", headers=auth)
        assert status == 415 and headers["content-type"] == "text/plain; charset=utf-8"
        json_auth = {**auth, "Content-Type": "application/json"}
        status, _, body = client.request("POST", "/generate", b'{"inputs": "x",', headers=json_auth)
        assert status == 400 and body.startswith(b"Failed to parse the request body as JSON: EOF while parsing")
        status, _, body = client.request("POST", "/generate", {"parameters": {}}, headers=auth)
        assert status == 422 and body == (
            b"Failed to deserialize the JSON body into the target type: missing field `inputs` at line 1 column 18"
        )
        status, _, body = client.request("POST", "/generate", b"[" + b" " * 2_000_000 + b"]", headers=json_auth)
        assert (status, body) == (413, b"Failed to buffer the request body: length limit exceeded")
        assert client.request("POST", "/generate", {"inputs": "x"}, headers=auth)[0] == 200
    assert server.connections_accepted == 1


def test_overload_answers_429_before_validation() -> None:
    with FakeTgiServer(max_concurrent_requests=1, faults=[Fault("stall")]) as server:
        with RawClient(server) as holder:
            holder.send("POST", "/generate_stream", STREAM_BODY)
            assert holder.head()[0] == 200  # headers go out once the permit is held
            assert server.in_flight == 1
            overloaded = {"error": "Model is overloaded", "error_type": "overloaded"}
            with RawClient(server) as client:
                status, _, body = client.request("POST", "/generate", {"inputs": "", "parameters": {"top_p": 5}})
                assert (status, json.loads(body)) == (429, overloaded)
                status, _, frames = client.request("POST", "/generate_stream", STREAM_BODY)
                assert status == 200 and [data_of(f) for f in frames] == [overloaded]
        assert server.wait_for_disconnect(5.0)
        with RawClient(server) as client:
            assert client.request("POST", "/generate", {"inputs": "x"})[0] == 200
        assert server.in_flight == 0


# --- metrics -----------------------------------------------------------------------


def metric_lines(server: FakeTgiServer) -> list[str]:
    with RawClient(server) as client:
        status, headers, body = client.request("GET", "/metrics")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    return body.decode().splitlines()


def test_metrics_reflect_requests_in_flight() -> None:
    with FakeTgiServer(version="3.3.6", faults=[Fault("stall", at_token=1)]) as server:
        before = metric_lines(server)
        assert not any(line.startswith("tgi_queue_size") for line in before)
        stream = RawClient(server)
        stream.send("POST", "/generate_stream", STREAM_BODY)
        stream.head()
        assert stream.chunk() is not None
        during = metric_lines(server)
        assert "tgi_batch_current_size 1" in during and "tgi_queue_size 0" in during
        assert "tgi_request_count 1" in during
        stream.close()
        assert server.wait_for_disconnect(5.0)
        with RawClient(server) as client:
            client.request("POST", "/generate", {"inputs": "x", "parameters": {"top_p": 1.0}})
            client.request("POST", "/generate", {"inputs": "x"})
        after = metric_lines(server)
        assert "tgi_batch_current_size 0" in after and "tgi_request_success 1" in after
        assert 'tgi_request_failure{err="dropped"} 1' in after and 'tgi_request_failure{err="validation"} 1' in after
        assert "tgi_request_duration_count 1" in after
    with FakeTgiServer(metrics=False) as server, RawClient(server) as client:
        assert client.request("GET", "/metrics")[0] == 404


# --- faults ------------------------------------------------------------------------


def test_status_fault_with_retry_after_is_used_up(server: FakeTgiServer) -> None:
    server.inject(Fault("status", status=503, headers={"Retry-After": "2"}, times=2))
    with RawClient(server) as client:
        assert client.request("GET", "/health")[0] == 200  # not a generation route
        for _ in range(2):
            status, headers, body = client.request("POST", "/generate", {"inputs": "x"})
            assert (status, headers["retry-after"]) == (503, "2")
            assert json.loads(body) == {"error": "unhealthy", "error_type": "healthcheck"}
        assert client.request("POST", "/generate", {"inputs": "x"})[0] == 200


def test_faults_are_fifo_and_path_scoped(server: FakeTgiServer) -> None:
    server.inject(Fault("status", status=429, path="/v1/completions"))
    server.inject(Fault("status", status=500))
    server.inject(Fault("status", status=502))
    with RawClient(server) as client:
        assert client.request("POST", "/generate", {"inputs": "x"})[0] == 500
        assert client.request("POST", "/v1/completions", {"prompt": "x"})[0] == 429
        status, headers, body = client.request("POST", "/generate", {"inputs": "x"})
        assert status == 502 and headers["content-type"] == "text/html" and b"Bad Gateway" in body
        server.inject(Fault("status", status=500))
        server.clear_faults()
        assert client.request("POST", "/generate", {"inputs": "x"})[0] == 200


def test_error_frame_fault_in_native_stream(server: FakeTgiServer) -> None:
    server.inject(Fault("error_frame", at_token=2))
    with RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", {**STREAM_BODY, "parameters": {"max_new_tokens": 5}})
    events = [data_of(f) for f in frames]
    assert len(events) == 3 and [e["index"] for e in events[:2]] == [1, 2]
    assert events[2]["error_type"] == "generation" and events[2]["error"].startswith("Request failed during generation")


def test_reset_fault_gives_connection_reset(server: FakeTgiServer) -> None:
    server.inject(Fault("reset", at_token=1))
    with RawClient(server) as client:
        client.send("POST", "/generate_stream", STREAM_BODY)
        client.head()
        assert client.chunk() is not None
        with pytest.raises(ConnectionResetError):
            client.chunk()


def test_reset_and_truncate_at_byte(server: FakeTgiServer) -> None:
    server.inject(Fault("truncate", at_byte=150))
    with RawClient(server) as client:
        client.send("POST", "/generate_stream", STREAM_BODY)
        while client._fill():
            pass
        assert client.received == 150
    server.inject(Fault("reset", at_byte=40))
    with RawClient(server) as client, pytest.raises(ConnectionResetError):
        client.send("POST", "/generate", STREAM_BODY)
        while client._fill():
            pass


def test_truncate_ends_cleanly_without_final_frame(server: FakeTgiServer) -> None:
    server.inject(Fault("truncate", at_token=2))
    with RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", STREAM_BODY)
        assert [data_of(f)["generated_text"] for f in frames] == [None, None]
        # The HTTP framing ended properly, so the connection can serve again.
        assert client.request("GET", "/health")[0] == 200


def test_stall_notices_client_close_quickly(server: FakeTgiServer) -> None:
    server.inject(Fault("stall", at_token=1))
    client = RawClient(server)
    client.send("POST", "/generate_stream", STREAM_BODY)
    client.head()
    assert client.chunk() is not None
    closed_at = time.monotonic()
    client.close()
    assert server.wait_for_disconnect(5.0)
    [gone] = server.disconnects
    assert gone.path == "/generate_stream" and gone.tokens_sent == 1
    assert 0 <= gone.t - closed_at < 0.5
    assert server.in_flight == 0


def test_keepalive_only_sends_comments() -> None:
    with FakeTgiServer(faults=[Fault("keepalive_only", at_token=1, delay_s=0.02)]) as server:
        with RawClient(server) as client:
            client.send("POST", "/generate_stream", STREAM_BODY)
            client.head()
            assert data_of(client.chunk() or b"")["index"] == 1
            assert [client.chunk() for _ in range(3)] == [b":\n\n"] * 3
        assert server.wait_for_disconnect(5.0)
        assert server.disconnects[0].tokens_sent == 1


def test_keepalive_comment_during_prefill() -> None:
    with FakeTgiServer(prefill_s=0.25, keepalive_s=0.1) as server, RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", STREAM_BODY)
    assert frames[0] == b":\n\n" and frames[-1].startswith(b"data: ")
    assert [f for f in frames if f != b":\n\n"][0].startswith(b'data: {"index":1')


def test_slow_headers_malformed_oversized_and_early_close(server: FakeTgiServer) -> None:
    server.inject(Fault("slow_headers", delay_s=0.2))
    with RawClient(server) as client:
        started = time.monotonic()
        assert client.request("GET", "/health")[0] == 200  # slow_headers matches generation routes only
        assert client.request("POST", "/generate", {"inputs": "x"})[0] == 200
        assert time.monotonic() - started >= 0.2
    server.inject(Fault("malformed", at_token=1))
    with RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", STREAM_BODY)
    assert frames[1] == b'data: {"index":\n\n' and len(frames) == 4 and data_of(frames[-1])["generated_text"]
    server.inject(Fault("oversized", at_token=0, size=70000))
    with RawClient(server) as client:
        _, _, frames = client.request("POST", "/generate_stream", STREAM_BODY)
    assert len(frames[0]) - 2 == 70000 and data_of(frames[0])["index"] == 1
    server.inject(Fault("disconnect_before_headers"))
    with RawClient(server) as client:
        client.send("POST", "/generate", {"inputs": "x"})
        assert not client._fill()
    assert server.wait_for_requests(5, 1.0) and len(server.requests) == 5


def test_client_leaving_a_paced_generate_is_recorded() -> None:
    with FakeTgiServer(prefill_s=30.0) as server:
        client = RawClient(server)
        client.send("POST", "/generate", {"inputs": "x"})
        assert server.wait_for_requests(1, 5.0)
        client.close()
        assert server.wait_for_disconnect(5.0)
        assert server.disconnects[0].tokens_sent == 0 and server.in_flight == 0


def test_paced_stream_disconnect_is_recorded() -> None:
    with FakeTgiServer(pace_s=0.05) as server:
        client = RawClient(server)
        client.send("POST", "/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 200}})
        client.head()
        assert client.chunk() is not None and client.chunk() is not None
        client.close()
        assert server.wait_for_disconnect(5.0)
        assert 2 <= server.disconnects[0].tokens_sent < 200
        assert server.in_flight == 0


# --- connections, recording, OpenAI routes, TLS ----------------------------------------


def test_keep_alive_reuses_one_connection(server: FakeTgiServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        for _ in range(2):
            conn.request(
                "POST", "/generate", body=json.dumps({"inputs": "x"}), headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["generated_text"]
        conn.request("GET", "/health", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.getheader("connection") == "close"
        response.read()
    finally:
        conn.close()
    assert server.connections_accepted == 1
    recorded = server.requests[0]
    assert (recorded.method, recorded.path, recorded.json) == ("POST", "/generate", {"inputs": "x"})
    assert recorded.headers["content-type"] == "application/json" and recorded.body == b'{"inputs": "x"}'


def test_chat_and_completions_streams_over_requests() -> None:
    with FakeTgiServer(version="3.3.6", eos_after=2) as server, requests.Session() as session:
        chat = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        with session.post(server.url + "/v1/chat/completions", json=chat, stream=True) as response:
            events = [data_of(line + b"\n\n") for line in response.iter_lines() if line]
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-2]["choices"][0]["delta"]["content"] == "" and events[0]["model"] == server.model_id
        assert events[0]["system_fingerprint"] == "3.3.6-sha-8e5a2b7" and events[0]["id"] == ""
        body = {"prompt": "Hi", "max_tokens": 5, "stream": True}
        with session.post(server.url + "/v1/completions", json=body, stream=True) as response:
            events = [data_of(line + b"\n\n") for line in response.iter_lines() if line]
        reasons = [e["choices"][0]["finish_reason"] for e in events[:-1]]
        assert reasons == ["", "", "eos_token"] and events[-1] == "[DONE]"
        reply = session.post(server.url + "/v1/chat/completions", json={**chat, "stream": False, "model": "lora-1"})
        assert reply.json()["model"] == "lora-1" and reply.json()["object"] == "chat.completion"
        assert reply.headers["x-generated-tokens"] == "3"


def test_openai_stream_error_shape_depends_on_version() -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "top_p": 1.0, "stream": True}
    for version, shape in (("2.4.0", "error_type"), ("2.4.1", "http_status_code")):
        with FakeTgiServer(version=version) as server, RawClient(server) as client:
            _, _, frames = client.request("POST", "/v1/chat/completions", chat)
        events = [data_of(f) for f in frames]
        assert events[-1] == "[DONE]" and shape in json.dumps(events[0])


@pytest.fixture(name="tls")
def _tls() -> Iterator[tuple[trustme.CA, ssl.SSLContext]]:
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    yield ca, context


def test_https_with_a_verified_certificate(tls: tuple[trustme.CA, ssl.SSLContext]) -> None:
    ca, context = tls
    with FakeTgiServer(ssl_context=context) as server, ca.cert_pem.tempfile() as bundle:
        assert server.url.startswith("https://127.0.0.1:")
        with requests.Session() as session:
            # Per request: REQUESTS_CA_BUNDLE in the environment would override Session.verify.
            assert session.get(server.url + "/health", verify=bundle).status_code == 200
            with session.post(
                server.url + "/generate_stream", json=STREAM_BODY, stream=True, verify=bundle
            ) as response:
                lines = [line for line in response.iter_lines() if line]
            assert len(lines) == 3 and lines[0].startswith(b"data: {")
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(server.url + "/health", timeout=5)


def test_stop_ends_stalled_and_waiting_connections() -> None:
    before = set(threading.enumerate())
    server = FakeTgiServer(faults=[Fault("stall", at_token=1), Fault("slow_headers", delay_s=60)]).start()
    stalled, waiting, idle = RawClient(server), RawClient(server), RawClient(server)
    try:
        stalled.send("POST", "/generate_stream", STREAM_BODY)
        stalled.head()
        waiting.send("POST", "/generate", {"inputs": "x"})
        assert server.wait_for_requests(2, 5.0)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
        assert set(threading.enumerate()) <= before
        for client in (waiting, idle):
            # EOF, or RST for a connection still waiting in the listen backlog.
            with contextlib.suppress(ConnectionResetError):
                assert not client._fill()
        server.stop()  # idempotent
    finally:
        for client in (stalled, waiting, idle):
            client.close()
