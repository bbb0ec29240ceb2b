"""An incremental decoder for Server-Sent Events: bytes in, data payloads out.

It follows the WHATWG event-stream rules (LF, CRLF and CR line ends; ``:``
comments; one optional space after the colon; a blank line dispatches the
event) and does no I/O. TGI only ever sends single-line ``data`` events
separated by blank lines, with ``:`` keep-alive comments, so the decoder has
a fast path for exactly that shape: when a whole read is made of such frames
it splits the read once instead of walking it line by line. Any other shape
goes through the general path, which gives the same result for any chunking.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["SseDecoder", "FrameTooLarge"]

_BOM = b"\xef\xbb\xbf"


class FrameTooLarge(ValueError):
    """A line or an event grew past the decoder's limit.

    ``payloads`` holds the events completed before the oversized one, so a
    caller can still deliver them before it reports the failure.
    """

    def __init__(self, limit: int, payloads: Optional[List[bytes]] = None) -> None:
        super().__init__(f"an SSE frame exceeded {limit} bytes")
        self.limit = limit
        self.payloads: List[bytes] = payloads or []


class SseDecoder:
    """Turns a byte stream into the ``data`` of each event, in order.

    ``event``, ``id`` and ``retry`` fields are read and ignored (TGI sends none);
    a multi-line ``data`` is joined with ``\\n`` as the specification says.

    :param max_frame_bytes: the longest line (and event) accepted; more raises
        :class:`FrameTooLarge` instead of buffering without bound.
    """

    __slots__ = ("max_frame_bytes", "_rem", "_data", "_data_size", "_cr", "_started")

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._rem = b""  # an incomplete line
        self._data: Optional[List[bytes]] = None  # data lines of the event being built
        self._data_size = 0
        self._cr = False  # the last line ended with CR, so a leading LF belongs to it
        self._started = False  # a leading byte-order mark has been dealt with

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished event are buffered."""
        return bool(self._rem) or self._data is not None

    def feed(self, chunk: bytes) -> List[bytes]:
        """Consume ``chunk``; return the data of every event it completed."""
        buf = self._rem + chunk if self._rem else chunk
        if not self._started:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._rem = buf
                return []
            self._started = True
            if buf.startswith(_BOM):
                buf = buf[3:]
        if self._data is None and not self._cr and buf[:5] == b"data:":
            cut = buf.rfind(b"\n\n")
            if cut > 0:
                body = buf[:cut]
                seps = body.count(b"\n\ndata:")
                if body.count(b"\n") == 2 * seps and b"\r" not in body:
                    out = _split_frames(body, seps)
                    limit = self.max_frame_bytes
                    if len(body) > limit:
                        lines = body.split(b"\n\n")
                        if max(map(len, lines)) > limit:
                            first = next(n for n, line in enumerate(lines) if len(line) > limit)
                            raise FrameTooLarge(limit, out[:first])
                    rest = buf[cut + 2 :]
                    self._rem = b""
                    if rest:
                        try:
                            out.extend(self._feed_lines(rest))
                        except FrameTooLarge as exc:
                            exc.payloads = out + exc.payloads
                            raise
                    return out
        self._rem = b""
        return self._feed_lines(buf)

    def _feed_lines(self, buf: bytes) -> List[bytes]:
        if self._cr and buf:
            self._cr = False
            if buf[:1] == b"\n":
                buf = buf[1:]
        if b"\r" in buf:
            if buf.endswith(b"\r"):
                self._cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        rem = lines.pop()
        self._rem = rem
        out: List[bytes] = []
        limit = self.max_frame_bytes
        for line in lines:
            if len(line) > limit:
                raise FrameTooLarge(limit, out)
            if not line:
                data = self._data
                if data is not None:
                    out.append(b"\n".join(data))
                    self._data = None
                    self._data_size = 0
                continue
            if line[:1] == b":":
                continue
            colon = line.find(b":")
            if colon < 0:
                name, value = line, b""
            else:
                name, value = line[:colon], line[colon + 1 :]
                if value[:1] == b" ":
                    value = value[1:]
            if name == b"data":
                self._data_size += len(value) + 1
                if self._data_size > limit:
                    raise FrameTooLarge(limit, out)
                if self._data is None:
                    self._data = [value]
                else:
                    self._data.append(value)
        if len(rem) > limit:
            raise FrameTooLarge(limit, out)
        return out


def _split_frames(body: bytes, seps: int) -> List[bytes]:
    """Split ``data:x\\n\\ndata:y`` into ``[x, y]`` with one leading space removed."""
    spaced = body.count(b"\n\ndata: ")
    if spaced == seps and body[5:6] == b" ":
        return body[6:].split(b"\n\ndata: ")
    parts = body[5:].split(b"\n\ndata:")
    if spaced == 0 and body[5:6] != b" ":
        return parts
    return [p[1:] if p[:1] == b" " else p for p in parts]
