"""One reader thread for every open stream: many streams at once, faults among them, TLS, the fallback.

The streams of a process are read by one shared thread (plus a few workers
that send requests); these tests run many streams through it at once and
check that each keeps the contract whatever its neighbours do, that the
library's threads do not grow with the streams, and that a transport with
no socket to hand over still works on a thread of its own.
"""

from __future__ import annotations

import io
import ssl
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import requests
import requests.adapters
import urllib3

from tgi_adapter import (
    AdapterConfig,
    RetryPolicy,
    StreamSet,
    TaskRequest,
    TgiHttpAdapter,
    Timeouts,
    TokenEvent,
    TokenStream,
    runtime,
)
from tgi_adapter.testing import FakeTgiServer, Fault

from fixtures import native_frames
from test_streaming import check_invariants

MakeTask = Callable[..., TaskRequest]


def library_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tgi-")]


def test_two_hundred_streams_with_faults_cancels_and_a_held_consumer(make_task: MakeTask) -> None:
    once = AdapterConfig(retry=RetryPolicy(attempts=1), timeouts=Timeouts(token_idle=0.5), pool_maxsize=64)
    faulty = {
        "reset": [Fault("reset", at_token=3, times=20)],
        "error": [Fault("error_frame", at_token=2, error_type="generation", message="the batch failed", times=20)],
        "stall": [Fault("stall", at_token=2, times=20)],
        "truncate": [Fault("truncate", at_token=4, times=20)],
    }
    expected_end = {"reset": "WORKER_RESET", "error": "INTERNAL", "stall": "DECODE_TIMEOUT", "truncate": "WORKER_RESET"}
    servers = {name: FakeTgiServer(pace_s=0.002, faults=faults) for name, faults in faulty.items()}
    servers["clean"] = FakeTgiServer(pace_s=0.002)
    # Streams to cancel go silent after 3 tokens: the cancel, not the engine, ends them.
    servers["cancel"] = FakeTgiServer(pace_s=0.002, faults=[Fault("stall", at_token=3, times=20)])
    for server in servers.values():
        server.start()
    patient = AdapterConfig(retry=RetryPolicy(attempts=1), pool_maxsize=64)
    adapters = {
        name: TgiHttpAdapter(server.url, config=patient if name == "cancel" else once)
        for name, server in servers.items()
    }
    try:
        kind_of: Dict[str, str] = {}
        streams: List[TokenStream] = []
        for name in faulty:
            for _ in range(20):
                stream = adapters[name].submit(make_task(max_tokens=12, deadline_ms=30_000))
                kind_of[stream.task_id] = name
                streams.append(stream)
        for n in range(120):
            kind = "cancel" if n % 6 == 0 else "clean"
            stream = adapters[kind].submit(make_task(max_tokens=20, deadline_ms=30_000))
            kind_of[stream.task_id] = kind
            streams.append(stream)
        held = streams[-5:]  # consumed last, by a thread that waits until everything else ended
        peak = len(library_threads())
        got: Dict[str, List[TokenEvent]] = defaultdict(list)
        durations: Dict[str, float] = {}
        t0 = time.monotonic()
        with StreamSet(s for s in streams if s not in held) as group:
            for stream, event in group:
                events = got[stream.task_id]
                events.append(event)
                if kind_of[stream.task_id] == "cancel" and event.kind == "token" and event.data["i"] == 1:
                    stream.cancel()
                if event.kind in ("end", "error"):
                    durations[stream.task_id] = time.monotonic() - t0
                peak = max(peak, len(library_threads()))
        for stream in held:  # events queued up meanwhile, complete and in order
            got[stream.task_id] = list(stream)
    finally:
        for adapter in adapters.values():
            adapter.close()
        for server in servers.values():
            server.stop()
    assert len(got) == 200
    for task_id, events in got.items():
        check_invariants(events)
        kind = kind_of[task_id]
        last = events[-1]
        if kind == "clean":
            assert last.kind == "end" and last.data["tokens_out"] == 20
        elif kind == "cancel":
            assert last.data.get("finish_reason") == "cancelled"
        else:
            assert last.kind == "error" and last.data["code"] == expected_end[kind], (kind, last.data)
    # One stalled stream (0.5 s until its idle timeout) holds up no other: clean
    # streams of 20 tokens at 2 ms take about 40 ms plus their share of the start.
    clean = [durations[t] for t, k in kind_of.items() if k == "clean" and t in durations]
    assert max(clean) < 5.0
    # No thread per stream: the shared reader and the send workers only.
    assert peak <= 1 + runtime.MAX_WORKERS
    assert all(n == "tgi-adapter-reader" or n.startswith("tgi-adapter-worker-") for n in library_threads())


def test_many_tls_streams_on_the_shared_reader(tls: Tuple[ssl.SSLContext, str], make_task: MakeTask) -> None:
    context, ca_file = tls
    with FakeTgiServer(ssl_context=context, pace_s=0.001) as server:
        with TgiHttpAdapter(server.url, config=AdapterConfig(verify=ca_file)) as adapter:
            alone = adapter.submit(make_task(max_tokens=25, prompt="same")).collect()[0]
            group = StreamSet(adapter.submit(make_task(max_tokens=25, prompt="same")) for _ in range(40))
            texts: Dict[str, List[str]] = defaultdict(list)
            for stream, event in group:
                if event.kind == "token":
                    texts[stream.task_id].append(event.data["t"])
                elif event.kind == "error":
                    pytest.fail(f"{event.data}")
    assert len(texts) == 40 and all("".join(t) == alone for t in texts.values())


def test_tls_bytes_left_decrypted_in_the_ssl_object_are_read_at_once(
    tls: Tuple[ssl.SSLContext, str], make_task: MakeTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With tiny reads, most of each TLS record stays decrypted in the SSL object,
    # where no socket readiness announces it. The engine then goes silent: every
    # frame it sent must still reach the consumer before the idle timeout.
    context, ca_file = tls
    monkeypatch.setattr("tgi_adapter.body._READ_SIZE", 64)
    config = AdapterConfig(verify=ca_file, timeouts=Timeouts(token_idle=0.5), retry=RetryPolicy(attempts=1))
    with FakeTgiServer(ssl_context=context, faults=[Fault("stall", at_token=7)]) as server:
        with TgiHttpAdapter(server.url, config=config) as adapter:
            events = list(adapter.submit(make_task(max_tokens=50)))
    check_invariants(events)
    assert [e.kind for e in events].count("token") == 7
    assert events[-1].data["code"] == "DECODE_TIMEOUT"


class _RecordedBody(io.BytesIO):
    """A response body with no socket under it that notes which thread reads it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.readers: List[str] = []

    def read(self, size: Optional[int] = -1) -> bytes:
        self.readers.append(threading.current_thread().name)
        return super().read(size)

    def readinto(self, buffer: Any) -> int:
        self.readers.append(threading.current_thread().name)
        return super().readinto(buffer)


class _NoSocketAdapter(requests.adapters.BaseAdapter):
    """A user's mounted adapter whose responses expose no socket."""

    def __init__(self, body: _RecordedBody) -> None:
        super().__init__()
        self.body = body

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        streaming = (request.path_url or "").endswith("/generate_stream")
        raw = urllib3.HTTPResponse(
            body=self.body if streaming else io.BytesIO(b""), headers={"content-type": "text/event-stream"},
            status=200 if streaming else 404, preload_content=False,
        )
        response = requests.Response()
        response.status_code = raw.status
        response.raw = raw
        response.headers = requests.structures.CaseInsensitiveDict(raw.headers)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def test_a_transport_without_a_socket_falls_back_to_a_thread_of_its_own(make_task: MakeTask) -> None:
    body = _RecordedBody(native_frames([" w0", " w1", " w2"]))
    session = requests.Session()
    session.mount("http://", _NoSocketAdapter(body))
    adapter = TgiHttpAdapter("http://tgi.test", session=session, config=AdapterConfig(retry=RetryPolicy(attempts=1)))
    try:
        task = make_task(max_tokens=3)
        stream = adapter.submit(task)
        events = list(stream)
        assert stream.join(timeout=5.0)
    finally:
        adapter.close()
        session.close()
    check_invariants(events)
    assert "".join(e.data["t"] for e in events if e.kind == "token") == " w0 w1 w2"
    assert body.readers and set(body.readers) == {f"tgi-stream-{task.task_id}"}  # its own thread read it


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_a_tls_connection_broken_mid_stream_is_a_reset(
    tls: Tuple[ssl.SSLContext, str], make_task: MakeTask, fault: str
) -> None:
    context, ca_file = tls
    config = AdapterConfig(verify=ca_file, retry=RetryPolicy(attempts=1))
    with FakeTgiServer(ssl_context=context, pace_s=0.001, faults=[Fault(fault, at_token=4)]) as server:
        with TgiHttpAdapter(server.url, config=config) as adapter:
            events = list(adapter.submit(make_task(max_tokens=30)))
    check_invariants(events)
    assert [e.kind for e in events].count("token") == 4
    assert events[-1].data["code"] == "WORKER_RESET" and events[-1].data["retriable"] is True
