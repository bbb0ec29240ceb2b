"""Whatever bytes an engine sends, a stream ends with exactly one typed terminal event."""

from __future__ import annotations

import socket
import threading
from typing import Callable, Iterator, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgi_adapter import AdapterConfig, RetryPolicy, TaskRequest, TgiHttpAdapter, Timeouts
from tgi_adapter.contract import EVENT_KINDS

MakeTask = Callable[..., TaskRequest]


class RawServer:
    """Answers every connection with ``self.response`` verbatim, then closes it."""

    def __init__(self) -> None:
        self.response = b""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5.0)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(self.response)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=5.0)


@pytest.fixture(name="raw", scope="module")
def _raw() -> Iterator[RawServer]:
    server = RawServer()
    yield server
    server.close()


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


SSE_BITS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"{",
        b"}",
        b'"token":',
        b'{"text":"a","special":false}',
        b'"generated_text":',
        b"null",
        b'"x"',
        b"\n",
        b"\r\n",
        b"\n\n",
        b":",
        b"[DONE]",
        b'"error":"e","error_type":"validation"',
        b",",
        b"\xff\xfe",
        b"\xe2\x82",
        b"[",
        b"]",
        b"1e999",
        b"0",
    ]
)
BODIES = st.one_of(st.binary(max_size=600), st.lists(SSE_BITS, max_size=60).map(b"".join))
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=BODIES,
    framing=st.sampled_from(["chunked", "raw-chunked", "length", "close"]),
    size=st.integers(min_value=1, max_value=64),
)
def test_arbitrary_bytes_end_in_one_typed_terminal_event(
    raw: RawServer, make_task: MakeTask, body: bytes, framing: str, size: int
) -> None:
    if framing == "chunked":
        raw.response = HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(body, size)
    elif framing == "raw-chunked":  # the framing itself is garbage
        raw.response = HEAD + b"transfer-encoding: chunked\r\n\r\n" + body
    elif framing == "length":
        raw.response = HEAD + b"content-length: %d\r\n\r\n" % len(body) + body
    else:
        raw.response = HEAD + b"\r\n" + body
    config = AdapterConfig(
        retry=RetryPolicy(attempts=1), timeouts=Timeouts(connect=2.0, first_token=2.0, token_idle=2.0)
    )
    with TgiHttpAdapter(raw.url, config=config) as adapter:
        adapter._info_failed_at = adapter._clock()  # no /info: this server answers anything with the body
        events: List[str] = [e.kind for e in adapter.submit(make_task(max_tokens=4))]
    assert events and all(kind in EVENT_KINDS for kind in events)
    assert events[-1] in ("end", "error")
    assert events.count("end") + events.count("error") == 1
    assert events.count("started") == (0 if events == ["error"] else 1)
