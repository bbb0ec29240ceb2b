"""An incremental decoder for HTTP/1.1 chunked transfer coding (RFC 9112 §7.1).

The streaming reader takes the socket's bytes in bulk (one ``read1`` of up to
64 KiB) instead of going through ``http.client``'s one-chunk-at-a-time
reads; this decoder then removes the chunk framing. TGI writes every SSE frame
as its own chunk, so a read holds hundreds of small chunks: the fast path
splits the read on CRLF once and checks every chunk's size against its data
in bulk; anything it cannot prove well-formed (a CRLF inside chunk data,
extensions, the last chunk, a chunk cut by the read) goes through the exact,
byte-by-byte path.
"""

from __future__ import annotations

from itertools import repeat
from typing import List

__all__ = ["ChunkedDecoder", "ChunkedError"]

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_MAX_LINE = 4096
_HEX = b"0123456789abcdefABCDEF"
# 16 hex digits already exceed any chunk a server could mean.
_MAX_SIZE_DIGITS = 16


class ChunkedError(ValueError):
    """The body's chunked framing is broken."""


class ChunkedDecoder:
    """Feed raw body bytes; get the payload bytes back. ``done`` after the last chunk."""

    __slots__ = ("_state", "_left", "_rem")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0
        self._rem = b""

    @property
    def done(self) -> bool:
        """Whether the terminating chunk and its trailer section were read."""
        return self._state == _DONE

    @property
    def pending(self) -> bool:
        """Whether the body is incomplete (more bytes are expected)."""
        return self._state != _DONE

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the payload bytes it carried."""
        if self._state == _DATA and self._left >= len(data):
            # Deep inside one big chunk: pass the bytes straight through.
            self._left -= len(data)
            if self._left == 0:
                self._state = _DATA_END
            return data
        buf = self._rem + data if self._rem else data
        self._rem = b""
        if self._state == _SIZE:
            fast = self._fast(buf)
            if fast is not None:
                return fast
        return self._slow(buf)

    def _fast(self, buf: bytes) -> bytes | None:
        parts = buf.split(b"\r\n")
        n = len(parts)
        pairs = (n - 1) // 2
        if pairs == 0:
            return None
        end = 2 * pairs
        datas = parts[1:end:2]
        heads = parts[0:end:2]
        # int(x, 16) also takes signs, "_" and "0x": only bare hex digits are sizes.
        widths = list(map(len, heads))
        if b"".join(heads).translate(None, _HEX) or min(widths) == 0 or max(widths) > _MAX_SIZE_DIGITS:
            return None  # extensions or garbage: let the exact path say which
        sizes = list(map(int, heads, repeat(16, pairs)))
        if sizes != list(map(len, datas)) or 0 in sizes:
            return None
        if n & 1:
            tail = parts[-1]
            if len(tail) > _MAX_LINE:
                return None
            self._rem = tail
            return b"".join(datas)
        # The read ended inside the data of one more chunk.
        head = parts[-2]
        if not head or head.translate(None, _HEX) or len(head) > _MAX_SIZE_DIGITS:
            return None
        size = int(head, 16)
        tail = parts[-1]
        if size == 0 or len(tail) > size:
            return None
        self._left = size - len(tail)
        self._state = _DATA if self._left else _DATA_END
        datas.append(tail)
        return b"".join(datas)

    def _slow(self, buf: bytes) -> bytes:
        out: List[bytes] = []
        pos = 0
        n = len(buf)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if n - pos < 2:
                    if buf[pos:] != b"\r"[: n - pos]:
                        raise ChunkedError("chunk data is not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ChunkedError("chunk data is not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _DONE:
                # Bytes after the body belong to nothing we asked for.
                raise ChunkedError("data after the last chunk")
            else:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > _MAX_LINE:
                        raise ChunkedError("chunk size line too long")
                    break
                if nl - pos > _MAX_LINE:
                    raise ChunkedError("chunk size line too long")
                line = buf[pos:nl]
                pos = nl + 2
                if state == _TRAILER:
                    if not line:
                        self._state = _DONE
                    continue
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if not size_text or size_text.translate(None, _HEX) or len(size_text) > _MAX_SIZE_DIGITS:
                    raise ChunkedError(f"bad chunk size line {line[:32]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._left = size
                    self._state = _DATA
        self._rem = buf[pos:]
        return b"".join(out)
