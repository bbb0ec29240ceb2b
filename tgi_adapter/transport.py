"""The HTTP seam: sending a request over urllib3 (under a requests ``Session``) up to its headers.

TLS, certificate checks, proxies, pooling and header parsing are urllib3's
(through requests, which also gives the ``HTTPS_PROXY``/``NO_PROXY`` rules
its users expect). Two things are added, both through documented hooks:

* the connection classes report their socket to the thread that uses them,
  so ``cancel()`` can shut it down even while a thread is blocked in
  ``recv`` (closing a response from another thread does not wake it);
* a request on the adapter's own session goes straight to the urllib3 pool
  that requests would pick (same connection, TLS and proxy settings),
  without ``Session.send``'s per-call hooks, cookie handling and response
  building: sending hundreds of requests at once is on every stream's path
  to its first token. A session of the user's, or a mocked one, is sent
  through as it is.

The body is :mod:`tgi_adapter.body`'s business.

Every exception from requests or urllib3 is classified here into a
:class:`Failure` (a fact about the transport); what it means for the
contract is the mapping module's business.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import requests
import requests.adapters
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .body import Head, IncompleteBody
from .cassette import Recorder, Tape

__all__ = [
    "make_session",
    "socket_hook",
    "SendPlan",
    "Request",
    "Failure",
    "FAILURE_CAUSES",
    "classify_failure",
    "ending_of",
    "is_timeout",
]

log = logging.getLogger(__name__)

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

    def close(self) -> None:
        # urllib3 2 no longer closes a pool when its manager is cleared: the
        # idle kept-alive sockets would wait for the garbage collector.
        managers = [self.poolmanager, *self.proxy_manager.values()]
        pools = [manager.pools[key] for manager in managers for key in manager.pools.keys()]
        super().close()
        for pool in pools:
            pool.close()


def make_session(pool_maxsize: int) -> requests.Session:
    """A session whose connections report their sockets; ``pool_maxsize`` per host."""
    session = requests.Session()
    adapter = _Adapter(pool_connections=16, pool_maxsize=pool_maxsize)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Compression would make a proxy buffer the stream; TGI never compresses.
    session.headers["Accept-Encoding"] = "identity"
    # HTTP/1.1 keeps connections alive and accepts anything by default: two
    # headers fewer to write on every request.
    del session.headers["Connection"]
    del session.headers["Accept"]
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

    __slots__ = ("session", "headers", "verify", "cert", "_plans", "_pools")

    def __init__(self, session: requests.Session, headers: Mapping[str, str], verify: Any, cert: Any) -> None:
        self.session = session
        self.headers = dict(headers)
        self.verify = verify
        self.cert = cert
        self._plans: Dict[str, Tuple[requests.PreparedRequest, Dict[str, Any]]] = {}
        self._pools: Dict[str, Tuple[Any, str]] = {}

    def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        secrets: Sequence[Optional[str]],
        recorder: Optional[Recorder] = None,
    ) -> Request:
        """A POST of ``body`` to ``url`` with ``headers`` added, ready to send (more than once if need be)."""
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
        return Request(self, prepared, settings, secrets, recorder)

    def pool_for(self, adapter: _Adapter, prepared: requests.PreparedRequest, settings: Mapping[str, Any]) -> Any:
        """``(urllib3 pool, URL to give urlopen)`` for a request on the adapter's own session, found once per URL.

        What ``HTTPAdapter.send`` looks up on every call (the pool for the URL,
        TLS and proxy settings, the request target) does not change for a URL.
        A pool closed since (the session was closed) is looked up again.
        """
        url = prepared.url or ""
        found = self._pools.get(url)
        if found is not None and found[0].pool is not None:
            return found
        verify = settings.get("verify", True)
        cert = settings.get("cert")
        proxies = settings.get("proxies") or {}
        pool: Any
        if hasattr(adapter, "get_connection_with_tls_context"):
            pool = adapter.get_connection_with_tls_context(prepared, verify, proxies=proxies, cert=cert)
        else:  # requests < 2.32.2
            pool = adapter.get_connection(url, proxies)
        adapter.cert_verify(pool, url, verify, cert)  # type: ignore[no-untyped-call]
        found = self._pools[url] = (pool, adapter.request_url(prepared, proxies))
        return found


# requests' own HTTPAdapter.send, as long as nothing (a mocking library, say) replaced it.
_GENUINE_SEND = requests.adapters.HTTPAdapter.send


class Request:
    """One prepared HTTP request as a reader sends it (possibly several times).

    ``settings`` are the keyword arguments ``Session.request`` would give
    ``Session.send`` (proxies, ``verify``, ``cert``, ``stream``). With a
    ``recorder`` each attempt is recorded on its own
    :class:`~tgi_adapter.cassette.Tape`.
    """

    __slots__ = ("plan", "session", "prepared", "settings", "secrets", "recorder")

    def __init__(
        self,
        plan: SendPlan,
        prepared: requests.PreparedRequest,
        settings: Mapping[str, Any],
        secrets: Sequence[Optional[str]],
        recorder: Optional[Recorder] = None,
    ) -> None:
        self.plan = plan
        self.session = plan.session
        self.prepared = prepared
        self.settings = settings
        self.secrets = secrets
        self.recorder = recorder

    def tape(self) -> Optional[Tape]:
        """A tape for the attempt about to be sent, when recording."""
        recorder = self.recorder
        if recorder is None:
            return None
        prepared = self.prepared
        body = prepared.body if isinstance(prepared.body, bytes) else None
        return recorder.begin(prepared.method or "POST", prepared.url or "/", prepared.headers, body)

    def send(self, connect_timeout: float, read_timeout: float) -> Head:
        """Send and wait for the response headers (the body is not read). Raises what sending raises."""
        connect_timeout = max(connect_timeout, 0.001)
        read_timeout = max(read_timeout, 0.001)
        prepared = self.prepared
        adapter = self.session.get_adapter(prepared.url or "")
        if type(adapter) is _Adapter and _Adapter.send is _GENUINE_SEND:
            return self._send_direct(adapter, connect_timeout, read_timeout)
        response = self.session.send(
            prepared, timeout=(connect_timeout, read_timeout), allow_redirects=False, **self.settings
        )
        return Head(response.status_code, response.headers, response.raw, response.close)

    def _send_direct(self, adapter: _Adapter, connect_timeout: float, read_timeout: float) -> Head:
        # What HTTPAdapter.send does up to urlopen, without building a requests Response.
        prepared = self.prepared
        pool, target = self.plan.pool_for(adapter, prepared, self.settings)
        raw = pool.urlopen(
            method=prepared.method,
            url=target,
            body=prepared.body,
            headers=prepared.headers,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=False,
            retries=adapter.max_retries,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            chunked=False,
        )

        def close() -> None:
            raw.close()
            raw.release_conn()

        return Head(raw.status, raw.headers, raw, close)


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


class Failure(NamedTuple):
    """What went wrong under a request, as the transport sees it (no contract code yet).

    ``cause`` is one of :data:`FAILURE_CAUSES`; ``detail`` is the exception's
    own account, not yet redacted.
    """

    cause: str
    detail: str


#: The causes :func:`classify_failure` reports.
FAILURE_CAUSES = (
    "tls", "tls_eof", "proxy", "dns", "refused", "connect", "connect_timeout", "read_timeout", "invalid_url",
    "reset", "broken", "unknown",
)


def classify_failure(exc: BaseException) -> Failure:
    """The :class:`Failure` behind an exception raised by requests, urllib3 or a socket.

    The order matters: urllib3's ``NewConnectionError`` (refused, unreachable)
    and ``NameResolutionError`` subclass ``ConnectTimeoutError``, so they are
    told apart before any timeout is considered.
    """
    chain = _chain(exc)
    text = str(exc)

    def first(*types: type) -> Optional[BaseException]:
        return next((e for e in chain if isinstance(e, types)), None)

    if first(ssl.SSLEOFError, ssl.SSLZeroReturnError) is not None:
        # The TLS connection ended: during the handshake a TLS refusal (a
        # missing client certificate, say), under way a broken connection.
        return Failure("tls_eof", _tls_detail(chain))
    if first(ssl.SSLError, ssl.CertificateError) is not None or isinstance(exc, requests.exceptions.SSLError):
        return Failure("tls", _tls_detail(chain))
    if isinstance(exc, requests.exceptions.ProxyError) or first(urllib3.exceptions.ProxyError) is not None:
        return Failure("proxy", text)
    if first(urllib3.exceptions.NameResolutionError, socket.gaierror) is not None:
        return Failure("dns", "the host name did not resolve")
    if first(ConnectionRefusedError) is not None:
        return Failure("refused", "connection refused")
    new_connection = first(urllib3.exceptions.NewConnectionError)
    if new_connection is not None:
        cause = first(OSError)
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(new_connection)
        return Failure("connect", reason)
    if isinstance(exc, requests.exceptions.ConnectTimeout) or first(urllib3.exceptions.ConnectTimeoutError):
        return Failure("connect_timeout", "connect timed out")
    if first(socket.timeout, urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout) is not None:
        return Failure("read_timeout", "no answer in time")
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
        return Failure("invalid_url", text)
    if isinstance(exc, (IncompleteBody, requests.exceptions.ChunkedEncodingError)):
        return Failure("reset", text)
    if first(ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) is not None:
        return Failure("reset", "the engine closed the connection")
    if isinstance(exc, (requests.exceptions.ConnectionError, urllib3.exceptions.ProtocolError, OSError)):
        return Failure("broken", text)
    return Failure("unknown", f"{type(exc).__name__}: {text}")


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


def ending_of(exc: BaseException) -> Optional[str]:
    """How ``exc`` ended an exchange, as a cassette says it; None when the request never reached the engine."""
    cause = classify_failure(exc).cause
    if cause in ("tls", "proxy", "dns", "refused", "connect", "connect_timeout", "invalid_url"):
        return None  # nothing was exchanged
    if cause == "read_timeout":
        return "timeout"
    chain = _chain(exc)
    if any(isinstance(e, (IncompleteBody, http.client.RemoteDisconnected, http.client.IncompleteRead)) for e in chain):
        return "eof"
    return "reset"


def is_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) a read or connect timeout; a refused or unreachable connect is not."""
    return classify_failure(exc).cause in ("connect_timeout", "read_timeout")
