"""Each way a connection can fail gets its own detail, from the exception chain requests and urllib3 really raise.

urllib3 2 files ``NewConnectionError`` (refused, unreachable) and
``NameResolutionError`` under ``ConnectTimeoutError``; an operator who reads
"connect timed out" for a dead engine chases a firewall instead.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Callable, Iterator, List, Optional

import pytest
import requests
import trustme

from tgi_adapter import AdapterConfig, ErrorKind, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError
from tgi_adapter.mapping import error_for_failure
from tgi_adapter.testing import FakeTgiServer
from tgi_adapter.transport import classify_failure, is_timeout, make_session

MakeTask = Callable[..., TaskRequest]


def raised_by(url: str, *, connect_timeout: float = 2.0, **kwargs: object) -> BaseException:
    """The exception a real GET through the adapter's session raises."""
    session = make_session(1)
    try:
        session.get(url, timeout=(connect_timeout, 2.0), **kwargs)  # type: ignore[arg-type]
    except Exception as exc:  # the point: whatever requests really raises
        return exc
    finally:
        session.close()
    raise AssertionError(f"GET {url} succeeded")


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(name="full_backlog")
def _full_backlog() -> Iterator[int]:
    """A port whose accept queue is full, so a new connection's SYN goes unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: List[socket.socket] = []
    try:
        for _ in range(64):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except OSError:
                break  # this one timed out: the queue is full
        else:
            pytest.fail("the accept queue never filled")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class Resetter:
    """Accepts, reads the request, and answers with a TCP RST."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="resetter")
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    def close(self) -> None:
        self.thread.join(timeout=5.0)
        self.listener.close()


def detail(exc: BaseException, phase: str = "connect") -> WorkerError:
    cause, text = classify_failure(exc)
    return error_for_failure(cause, text, phase=phase)


def test_a_refused_connection_is_refused_not_a_timeout() -> None:
    exc = raised_by(f"http://127.0.0.1:{closed_port()}/health")
    assert classify_failure(exc).cause == "refused"
    assert not is_timeout(exc)
    error = detail(exc)
    assert error.code is ErrorKind.POOL_UNAVAILABLE and error.retriable
    assert "connection refused" in error.message and "timed out" not in error.message


def test_a_name_that_does_not_resolve_is_a_dns_failure() -> None:
    exc = raised_by("http://tgi-adapter-test.invalid:3000/health")
    assert classify_failure(exc).cause == "dns" and not is_timeout(exc)
    error = detail(exc)
    assert error.retriable and "did not resolve" in error.message


def test_an_unanswered_connect_is_a_connect_timeout(full_backlog: int) -> None:
    exc = raised_by(f"http://127.0.0.1:{full_backlog}/health", connect_timeout=0.3)
    assert classify_failure(exc).cause == "connect_timeout" and is_timeout(exc)
    error = detail(exc)
    assert error.retriable and "connect timed out" in error.message


def test_an_untrusted_certificate_is_a_tls_failure() -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with FakeTgiServer(ssl_context=context) as server:
        exc = raised_by(server.url + "/health")
    assert classify_failure(exc).cause == "tls" and not is_timeout(exc)
    error = detail(exc)
    assert not error.retriable and "certificate verify failed" in error.message


def test_a_proxy_that_cannot_be_reached_is_a_proxy_failure() -> None:
    proxy = f"http://127.0.0.1:{closed_port()}"
    exc = raised_by("http://engine.example:3000/health", proxies={"http": proxy})
    assert isinstance(exc, requests.exceptions.ProxyError)
    assert classify_failure(exc).cause == "proxy"
    error = detail(exc)
    assert error.retriable and "proxy" in error.message.lower()


def test_a_reset_connection_is_a_reset() -> None:
    resetter = Resetter()
    try:
        exc = raised_by(f"http://127.0.0.1:{resetter.port}/health")
    finally:
        resetter.close()
    assert classify_failure(exc).cause == "reset" and not is_timeout(exc)
    error = detail(exc, phase="read")
    assert error.code is ErrorKind.WORKER_RESET and error.retriable


def test_generate_against_a_closed_port_says_refused(make_task: MakeTask, caplog: pytest.LogCaptureFixture) -> None:
    config = AdapterConfig(retry=RetryPolicy(attempts=1))
    with caplog.at_level(logging.DEBUG, logger="tgi_adapter"):
        with TgiHttpAdapter(f"http://127.0.0.1:{closed_port()}", config=config) as adapter:
            with pytest.raises(WorkerError) as info:
                adapter.generate(make_task())
    assert info.value.code is ErrorKind.POOL_UNAVAILABLE
    assert "connection refused" in info.value.message and "timed out" not in info.value.message
    fit_check: Optional[str] = next((r.getMessage() for r in caplog.records if "/info" in r.getMessage()), None)
    assert fit_check is not None and "connection refused" in fit_check and "within" not in fit_check
