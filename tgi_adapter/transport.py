"""The HTTP seam: a requests ``Session`` over urllib3, and bulk body reads.

TLS, certificate checks, proxies, pooling and header parsing are urllib3's
(through requests, which also gives the ``HTTPS_PROXY``/``NO_PROXY`` rules
its users expect). Two things are added, both through documented hooks:

* the connection classes report their socket to the thread that uses them,
  so ``cancel()`` can shut it down even while the reader is blocked in
  ``recv`` (closing a response from another thread does not wake it);
* :class:`BodyReader` takes a streamed body's bytes in bulk with ``read1``
  from the socket's buffered reader and undoes the chunked framing itself,
  instead of ``http.client``'s one-chunk-per-call reads.

Every exception from requests or urllib3 is translated here, at one
boundary, into a :class:`~tgi_adapter.WorkerError`.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .chunked import ChunkedDecoder, ChunkedError
from .errors import WorkerError
from .mapping import error_for

__all__ = [
    "make_session",
    "socket_hook",
    "BodyReader",
    "IncompleteBody",
    "translate_exception",
    "shutdown_socket",
    "ending_of",
]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
# How far past its bound the reader lets one socket read run, to spare a system call per frame.
_TIMEOUT_SLACK_S = 0.001

# -- socket capture -----------------------------------------------------------

_local = threading.local()


class socket_hook:
    """Context manager: report the socket of the next request made in this thread.

    ``callback(sock)`` is called once the connection has a socket (new or
    kept-alive), before the request is written.
    """

    def __init__(self, callback: Callable[[socket.socket], None]) -> None:
        self.callback = callback

    def __enter__(self) -> socket_hook:
        _local.callback = self.callback
        return self

    def __exit__(self, *exc: object) -> None:
        _local.callback = None


def _report(sock: Optional[socket.socket]) -> None:
    callback = getattr(_local, "callback", None)
    if callback is not None and sock is not None:
        _local.callback = None
        callback(sock)


class _ReportingHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _report(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report(self.sock)
        super().request(*args, **kwargs)


class _ReportingHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _report(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _report(self.sock)
        super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _ReportingHTTPConnection


class _SPool(HTTPSConnectionPool):
    ConnectionCls = _ReportingHTTPSConnection


_POOL_CLASSES = {"http": _Pool, "https": _SPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with connection classes that report their socket."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


def make_session(pool_maxsize: int) -> requests.Session:
    """A session whose connections report their sockets; ``pool_maxsize`` per host."""
    session = requests.Session()
    adapter = _Adapter(pool_connections=16, pool_maxsize=pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Compression would make a proxy buffer the stream; TGI never compresses.
    session.headers["Accept-Encoding"] = "identity"
    return session


class SendPlan:
    """How ``Session.request`` would send a POST to a URL, worked out once per URL.

    ``Session.request`` merges the session's headers, cookies and auth
    (reading ``~/.netrc``) and looks up the proxy and CA-bundle environment on
    every call, on the path to the first token. The plan does that
    once per URL and then only copies the prepared template, adds the body
    and the task's headers. The environment is therefore read at an adapter's
    first request to each URL, not at every request.
    """

    __slots__ = ("session", "headers", "verify", "cert", "_plans")

    def __init__(self, session: requests.Session, headers: Mapping[str, str], verify: Any, cert: Any) -> None:
        self.session = session
        self.headers = dict(headers)
        self.verify = verify
        self.cert = cert
        self._plans: Dict[str, Tuple[requests.PreparedRequest, Dict[str, Any]]] = {}

    def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> Tuple[requests.PreparedRequest, Dict[str, Any]]:
        """A prepared POST of ``body`` with ``headers`` added, and the keyword arguments for ``Session.send``."""
        plan = self._plans.get(url)
        if plan is None:  # a race makes two equal plans; either will do
            session = self.session
            template = session.prepare_request(requests.Request("POST", url, data=b"", headers=self.headers))
            merged = session.merge_environment_settings(url, {}, True, self.verify, self.cert)
            plan = self._plans[url] = (template, dict(merged))
        template, settings = plan
        prepared = template.copy()
        prepared.body = body
        assert prepared.headers is not None
        prepared.headers["Content-Length"] = str(len(body))
        prepared.headers.update(headers)
        return prepared, settings


def shutdown_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways: wakes a blocked reader and tells the peer now."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


# -- body reading ---------------------------------------------------------------


class IncompleteBody(Exception):
    """The connection ended before the body did."""


class BodyReader:
    """The bytes of a streamed response body, taken in bulk.

    :meth:`read` returns the next body bytes, ``b""`` once the body ended
    cleanly, and raises :class:`IncompleteBody` (or ``OSError``,
    ``socket.timeout``) otherwise. When the response is not a plain
    ``http.client`` one (a mocked response, a compressed body) it falls back
    to urllib3's own streaming.
    """

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        raw = response.raw
        self.sock: Optional[socket.socket] = None
        connection = getattr(raw, "connection", None)
        if connection is not None:
            self.sock = getattr(connection, "sock", None)
        self.complete = False
        self._timeout: Optional[float] = None
        self._http: Optional[http.client.HTTPResponse] = None
        self._read1: Optional[Callable[[int], bytes]] = None
        self._left: Optional[int] = None
        self._dechunk: Optional[ChunkedDecoder] = None
        fp = getattr(raw, "_fp", None)
        encoding = response.headers.get("content-encoding", "identity").lower()
        if (
            isinstance(fp, http.client.HTTPResponse)
            and fp.fp is not None
            and encoding in ("", "identity")
            and getattr(fp, "chunk_left", None) is None
            and hasattr(fp.fp, "read1")
        ):
            self._http = fp
            self._read1 = fp.fp.read1
            if fp.chunked:
                self._dechunk = ChunkedDecoder()
                self.read = self._read_chunked  # type: ignore[method-assign]
            elif fp.length is not None:
                self._left = fp.length
                self.read = self._read_length  # type: ignore[method-assign]
            else:
                self.read = self._read_to_close  # type: ignore[method-assign]
        else:
            self._iter = raw.stream(_READ_SIZE, decode_content=True)

    def read(self) -> bytes:
        """The next bytes of the body (fallback path)."""
        try:
            data = next(self._iter)
        except StopIteration:
            self.complete = True
            return b""
        except urllib3.exceptions.ProtocolError as exc:
            raise IncompleteBody(str(exc)) from exc
        return data

    def _read_chunked(self) -> bytes:
        read1 = self._read1
        dechunk = self._dechunk
        assert read1 is not None and dechunk is not None
        while True:
            if dechunk.done:
                self.complete = True
                return b""
            data = read1(_READ_SIZE)
            if not data:
                raise IncompleteBody("the connection closed inside the chunked body")
            try:
                out = dechunk.feed(data)
            except ChunkedError as exc:
                raise IncompleteBody(f"broken chunked framing: {exc}") from exc
            if out:
                return out

    def _read_length(self) -> bytes:
        left = self._left
        assert self._read1 is not None and left is not None
        if left <= 0:
            self.complete = True
            return b""
        data = self._read1(min(left, _READ_SIZE))
        if not data:
            raise IncompleteBody(f"the connection closed {left} bytes before the body's end")
        self._left = left - len(data)
        return data

    def _read_to_close(self) -> bytes:
        assert self._read1 is not None
        data = self._read1(_READ_SIZE)
        if not data:
            self.complete = True
        return data

    def settimeout(self, seconds: float) -> None:
        """Bound the next read to at most ``seconds`` (the reader's timers); a no-op on the fallback path.

        Setting a socket's timeout is a system call, and a socket timeout
        bounds each read afresh. So while frames keep coming the timeout set
        after the previous frame is still right; it is changed only when it
        would let a read run more than 1 ms past ``seconds``, or end before
        half of it.
        """
        sock = self.sock
        if sock is None or self._http is None:
            return
        current = self._timeout
        if current is not None and seconds * 0.5 <= current <= seconds + _TIMEOUT_SLACK_S:
            return
        sock.settimeout(seconds)
        self._timeout = seconds

    def release(self) -> None:
        """Return the connection to the pool if the body ended cleanly, else drop it."""
        hr = self._http
        if hr is None:
            self.response.close()
            return
        if self.complete and not hr.will_close:
            hr.close()  # closes only the file object; the socket stays with the connection
            self.response.raw.release_conn()
        else:
            self.abort()

    def abort(self) -> None:
        """Close the connection for good; it never goes back to the pool."""
        sock = self.sock
        if sock is not None:
            shutdown_socket(sock)
        try:
            self.response.close()
        except Exception:  # closing a broken connection may raise anything
            log.debug("error closing an aborted response", exc_info=True)


# -- exception translation --------------------------------------------------------


def _chain(exc: BaseException) -> Sequence[BaseException]:
    seen: List[BaseException] = []
    current: Optional[BaseException] = exc
    while current is not None and len(seen) < 10:
        seen.append(current)
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException) and reason is not current:
            current = reason
            continue
        args = getattr(current, "args", ())
        nested = next((a for a in args if isinstance(a, BaseException)), None)
        current = nested or current.__cause__ or current.__context__
    return seen


def translate_exception(exc: BaseException, *, phase: str, secrets: Sequence[Optional[str]] = ()) -> WorkerError:
    """The :class:`WorkerError` for an exception raised by requests/urllib3/sockets.

    ``phase`` is ``"connect"`` (before the response), ``"read"`` (while the
    body streams) or ``"headers"``; a timeout's meaning depends on it, and the
    caller turns ``"timeout"`` results into the right timer's code.
    """
    chain = _chain(exc)
    text = str(exc)
    if any(isinstance(e, (ssl.SSLError, ssl.CertificateError)) for e in chain) or isinstance(
        exc, requests.exceptions.SSLError
    ):
        return error_for("tls", _tls_detail(chain), secrets=secrets)
    if isinstance(exc, requests.exceptions.ProxyError) or any(
        isinstance(e, urllib3.exceptions.ProxyError) for e in chain
    ):
        return error_for("proxy", text, secrets=secrets)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(e, urllib3.exceptions.ConnectTimeoutError) for e in chain
    ):
        return error_for("connect_failed", "connect timed out", secrets=secrets)
    if any(isinstance(e, urllib3.exceptions.NameResolutionError) for e in chain):
        return error_for("connect_failed", "the host name did not resolve", secrets=secrets)
    if any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain) or any(
        isinstance(e, ConnectionRefusedError) for e in chain
    ):
        return error_for("connect_failed", "connection refused", secrets=secrets)
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
        return error_for("connect_failed", text, retriable=False, secrets=secrets)
    if isinstance(exc, IncompleteBody) or isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return error_for("reset", text, secrets=secrets)
    if any(isinstance(e, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)) for e in chain):
        return error_for("reset", "the engine closed the connection", secrets=secrets)
    if isinstance(exc, (requests.exceptions.ConnectionError, urllib3.exceptions.ProtocolError, OSError)):
        # Before any response, an unexplained connection failure means the
        # engine could not be reached; once a body streams, it broke off.
        return error_for("connect_failed" if phase == "connect" else "reset", text, secrets=secrets)
    return error_for("server_error", f"{type(exc).__name__}: {text}", secrets=secrets)


def ending_of(exc: BaseException) -> Optional[str]:
    """How ``exc`` ended an exchange, as a cassette says it; None when the request never reached the engine."""
    chain = _chain(exc)
    if is_connect_timeout(exc):
        return None
    if is_timeout(exc):
        return "timeout"
    if any(isinstance(e, (IncompleteBody, http.client.RemoteDisconnected, http.client.IncompleteRead)) for e in chain):
        return "eof"
    if any(isinstance(e, (ConnectionResetError, BrokenPipeError)) for e in chain):
        return "reset"
    if translate_exception(exc, phase="connect").code.value == "POOL_UNAVAILABLE":
        return None  # refused, unresolved, TLS or proxy failure: nothing was exchanged
    return "reset"


def _tls_detail(chain: Sequence[BaseException]) -> str:
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {e.verify_message}"
        if isinstance(e, ssl.CertificateError):
            return f"certificate error: {e}"
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {e.reason or e}"
    return "TLS error"


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a read or connect timeout."""
    return any(
        isinstance(e, (socket.timeout, urllib3.exceptions.TimeoutError, requests.exceptions.Timeout))
        for e in _chain(exc)
    )


def is_connect_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is a timeout while connecting (not while reading)."""
    return isinstance(exc, requests.exceptions.ConnectTimeout) or any(
        isinstance(e, urllib3.exceptions.ConnectTimeoutError) for e in _chain(exc)
    )


def response_headers(response: requests.Response) -> Mapping[str, str]:
    """The response's headers (case-insensitive mapping)."""
    return response.headers


def request_kwargs(
    *, verify: Any, cert: Any, connect_timeout: float, read_timeout: float
) -> Dict[str, Any]:
    """The keyword arguments every request shares."""
    kwargs: Dict[str, Any] = {
        "timeout": (connect_timeout, read_timeout),
        "verify": verify,
        "allow_redirects": False,
    }
    if cert is not None:
        kwargs["cert"] = cert
    return kwargs


def timeouts_pair(connect: float, read: float) -> Tuple[float, float]:
    """A ``(connect, read)`` pair with both at least a millisecond."""
    return max(connect, 0.001), max(read, 0.001)
