"""Reading a response body: its framing, a blocking reader, and a non-blocking one.

``http.client`` hands a streamed body over one chunk per call; the readers
here take the socket's bytes in bulk (64 KiB at a time) and undo the framing
themselves (:class:`BodyFraming`). :class:`BodyReader` reads on the thread
that calls it, with socket timeouts as its timers; :class:`SocketBody` never
blocks and is driven by the shared reader when the socket says it is
readable. Both fall back to nothing clever: a body that is not a plain
``http.client`` one (a mocked response, a compressed body) is read through
urllib3's own streaming, by :class:`BodyReader` only.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from typing import Any, Callable, Iterator, Mapping, Optional

import urllib3

from .chunked import ChunkedDecoder, ChunkedError

__all__ = ["Head", "IncompleteBody", "BodyFraming", "BodyReader", "SocketBody", "shutdown_socket"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
# How far past its bound the reader lets one socket read run, to spare a system call per frame.
_TIMEOUT_SLACK_S = 0.001
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class IncompleteBody(Exception):
    """The connection ended before the body did."""


class Head:
    """A response whose headers have arrived; its body is not read yet.

    ``raw`` is urllib3's response; ``close()`` gives the connection up
    (a body not read to its end never goes back to the pool).
    """

    __slots__ = ("status_code", "headers", "raw", "_close")

    def __init__(self, status_code: int, headers: Mapping[str, str], raw: Any, close: Callable[[], None]) -> None:
        self.status_code = status_code
        self.headers = headers
        self.raw = raw
        self._close = close

    def close(self) -> None:
        self._close()


def shutdown_socket(sock: socket.socket) -> None:
    """Shut ``sock`` down both ways: wakes a blocked reader and tells the peer now."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected


def plain_http(head: Head) -> Optional[http.client.HTTPResponse]:
    """The ``http.client`` response under ``head`` when its body can be read in bulk, else None."""
    hr = getattr(head.raw, "_fp", None)
    encoding = head.headers.get("content-encoding", "identity").lower()
    if (
        isinstance(hr, http.client.HTTPResponse)
        and hr.fp is not None
        and encoding in ("", "identity")
        and getattr(hr, "chunk_left", None) is None
        and hasattr(hr.fp, "read1")
    ):
        return hr
    return None


def socket_of(head: Head) -> Optional[socket.socket]:
    connection = getattr(head.raw, "connection", None)
    sock = getattr(connection, "sock", None) if connection is not None else None
    return sock if isinstance(sock, socket.socket) else None


class BodyFraming:
    """Where a body ends: after its last chunk, after ``Content-Length`` bytes, or when the connection closes."""

    __slots__ = ("complete", "_dechunk", "_left")

    def __init__(self, hr: http.client.HTTPResponse) -> None:
        self.complete = False
        self._dechunk: Optional[ChunkedDecoder] = ChunkedDecoder() if hr.chunked else None
        self._left: Optional[int] = None if hr.chunked else hr.length
        if self._left == 0:
            self.complete = True

    def feed(self, raw: bytes) -> bytes:
        """The payload bytes in ``raw`` (the bytes after the body's end, if any, are dropped)."""
        dechunk = self._dechunk
        if dechunk is not None:
            try:
                out = dechunk.feed(raw)
            except ChunkedError as exc:
                raise IncompleteBody(f"broken chunked framing: {exc}") from exc
            if dechunk.done:
                self.complete = True
            return out
        left = self._left
        if left is None:
            return raw
        if len(raw) >= left:
            raw = raw[:left]
            self.complete = True
        self._left = left - len(raw)
        return raw

    def at_close(self) -> None:
        """The connection closed: fine for a body that ends with it, else :class:`IncompleteBody`."""
        if self.complete:
            return
        if self._dechunk is None and self._left is None:
            self.complete = True
            return
        if self._dechunk is not None:
            raise IncompleteBody("the connection closed inside the chunked body")
        raise IncompleteBody(f"the connection closed {self._left} bytes before the body's end")


class BodyReader:
    """A streamed body read on the calling thread, in bulk.

    :meth:`read` returns the next body bytes, ``b""`` once the body ended
    cleanly, and raises :class:`IncompleteBody` (or ``OSError``,
    ``socket.timeout``) otherwise.
    """

    def __init__(self, head: Head) -> None:
        self.head = head
        self.sock = socket_of(head)
        self.complete = False
        self._timeout: Optional[float] = None
        self._http = plain_http(head)
        self._framing: Optional[BodyFraming] = None
        self._iter: Optional[Iterator[bytes]] = None
        if self._http is not None:
            self._framing = BodyFraming(self._http)
            self._read1: Callable[[int], bytes] = self._http.fp.read1
        else:
            self._iter = head.raw.stream(_READ_SIZE, decode_content=True)

    def read(self) -> bytes:
        framing = self._framing
        if framing is None:
            return self._read_streamed()
        while True:
            if framing.complete:
                self.complete = True
                return b""
            raw = self._read1(_READ_SIZE)
            if not raw:
                framing.at_close()
                self.complete = True
                return b""
            out = framing.feed(raw)
            if out:
                return out

    def _read_streamed(self) -> bytes:
        assert self._iter is not None
        try:
            data = next(self._iter)
        except StopIteration:
            self.complete = True
            return b""
        except urllib3.exceptions.ProtocolError as exc:
            raise IncompleteBody(str(exc)) from exc
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
            self.head.close()
            return
        if self.complete and not hr.will_close:
            _give_back(hr, self.head)
        else:
            self.abort()

    def abort(self) -> None:
        """Close the connection for good; it never goes back to the pool."""
        _abort(self.sock, self.head)


class SocketBody:
    """A streamed body read straight from its socket, never blocking (the shared reader's side).

    Made by :meth:`take` on the thread that read the headers; after that only
    the shared reader touches it.
    """

    __slots__ = ("head", "sock", "framing", "_http", "_pending", "_timeout_before", "_tls", "_recv")

    def __init__(self, head: Head, hr: http.client.HTTPResponse, sock: socket.socket, pending: bytes,
                 timeout_before: Optional[float]) -> None:
        self.head = head
        self.sock = sock
        self.framing = BodyFraming(hr)
        self._http = hr
        self._pending: Optional[bytes] = pending or None
        self._timeout_before = timeout_before
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._recv = sock.recv

    @classmethod
    def take(cls, head: Head) -> Optional[SocketBody]:
        """The body of ``head`` as a non-blocking reader, or None if its socket cannot be had."""
        hr = plain_http(head)
        sock = socket_of(head)
        if hr is None or sock is None:
            return None
        timeout_before = sock.gettimeout()
        sock.settimeout(0.0)
        # Bytes after the headers may already sit in http.client's buffer (or,
        # with TLS, decrypted in the SSL object): take them now, without waiting.
        fp = hr.fp
        assert fp is not None
        try:
            pending = fp.peek(_READ_SIZE)
        except _WOULD_BLOCK:
            pending = b""
        except OSError:  # the connection broke already: the first pull will say so
            pending = b""
        if pending:
            fp.read(len(pending))
        return cls(head, hr, sock, pending, timeout_before)

    def pull(self) -> Optional[bytes]:
        """The payload bytes one read brought (maybe none), or None if the socket had nothing.

        After it, ``framing.complete`` says whether the body ended. Raises
        :class:`IncompleteBody` when the connection closed early, ``OSError``
        when it broke.
        """
        raw = self._pending
        if raw is not None:
            self._pending = None
        else:
            try:
                raw = self._recv(_READ_SIZE)
            except _WOULD_BLOCK:
                return None
            if not raw:
                self.framing.at_close()
                return b""
            if self._tls:
                raw = self._more_tls(raw)
        return self.framing.feed(raw)

    def _more_tls(self, raw: bytes) -> bytes:
        """What else TLS has ready now, up to one read's worth, and every byte left decrypted.

        One TLS ``recv`` returns at most one record, and a server that writes
        each frame on its own makes one record per token: taking the records
        already here in one go keeps the per-read work per batch, not per
        token. Decrypted bytes left in the SSL object make no socket
        readable, so they are always taken now.
        """
        parts = [raw]
        size = len(raw)
        recv = self._recv
        while size < _READ_SIZE:
            try:
                more = recv(_READ_SIZE)
            except OSError:  # nothing more now, or a broken end the next pull meets again
                break
            if not more:  # the end: the next pull sees it again
                break
            parts.append(more)
            size += len(more)
        sock: Any = self.sock
        left = sock.pending()
        while left:
            parts.append(recv(left))
            left = sock.pending()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Give the connection back to the pool (body complete), else drop it."""
        hr = self._http
        if self.framing.complete and not hr.will_close:
            try:
                self.sock.settimeout(self._timeout_before)
            except OSError:
                self.abort()
                return
            _give_back(hr, self.head)
        else:
            self.abort()

    def abort(self) -> None:
        """Close the connection for good."""
        _abort(self.sock, self.head)


def _give_back(hr: http.client.HTTPResponse, head: Head) -> None:
    hr.close()  # closes only the file object; the socket stays with the connection
    head.raw.release_conn()


def _abort(sock: Optional[socket.socket], head: Head) -> None:
    if sock is not None:
        shutdown_socket(sock)
    try:
        head.close()
    except Exception:  # closing a broken connection may raise anything
        log.debug("error closing an aborted response", exc_info=True)
