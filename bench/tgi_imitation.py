"""A fast loopback imitation of TGI's streaming route, for benchmarks only.

Every response is rendered once, up front, to the exact bytes TGI 3.x sends
(one chunk per SSE frame), so serving costs one ``sendall`` per write and
never shares the client's interpreter lock: run it as its own process.

    python bench/tgi_imitation.py --port 0 --tokens 20000

It prints ``READY <port>`` on stdout once listening. ``POST /generate_stream``
answers with ``--tokens`` frames (or ``max_new_tokens`` from the request when
smaller); ``--pace-ms`` spaces frames out; a request whose inputs contain
``STALL`` sends its headers and then nothing; the control port prints each
client disconnect as ``DISCONNECT <monotonic ns>`` on stdout.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
from typing import Dict, List, Tuple

VERSION = "3.3.6"
INFO = {
    "model_id": "bench/imitation",
    "model_sha": None,
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 4096,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 1_000_000,
    "max_total_tokens": 2_000_000,
    "validation_workers": 2,
    "max_client_batch_size": 4,
    "router": "text-generation-router",
    "version": VERSION,
    "sha": "0123456789abcdef0123456789abcdef01234567",
    "docker_label": None,
}


def token_text(i: int) -> str:
    return f" tok{i}"


def render_stream(tokens: int) -> List[bytes]:
    """The chunks of a /generate_stream body of ``tokens`` frames (last one final)."""
    chunks: List[bytes] = []
    text: List[str] = []
    for i in range(tokens):
        t = token_text(i)
        text.append(t)
        last = i == tokens - 1
        frame = {
            "index": i + 1,
            "token": {"id": 1000 + i, "text": t, "logprob": -0.5, "special": False},
            "generated_text": "".join(text) if last else None,
            "details": {"finish_reason": "length", "generated_tokens": tokens, "seed": None, "input_length": 3}
            if last
            else None,
        }
        data = b"data: " + json.dumps(frame, separators=(",", ":")).encode() + b"\n\n"
        chunks.append(b"%x\r\n%s\r\n" % (len(data), data))
    chunks.append(b"0\r\n\r\n")
    return chunks


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"x-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n"
)


def json_response(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class Server:
    def __init__(self, port: int, tokens: int, pace_s: float) -> None:
        self.tokens = tokens
        self.pace_s = pace_s
        self.cache: Dict[int, Tuple[bytes, List[bytes]]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(1024)
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.rendered(tokens)

    def rendered(self, n: int) -> Tuple[bytes, List[bytes]]:
        with self.lock:
            if n not in self.cache:
                chunks = render_stream(n)
                self.cache[n] = (b"".join(chunks), chunks)
            return self.cache[n]

    def say(self, line: str) -> None:
        with self.out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def serve(self) -> None:
        self.say(f"READY {self.sock.getsockname()[1]}")
        while True:
            conn, _ = self.sock.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path, _ = lines[0].split(b" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                if path.endswith(b"/info"):
                    conn.sendall(json_response(INFO))
                elif path.endswith(b"/health"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif path.endswith(b"/generate_stream"):
                    if not self.stream(conn, body):
                        return
                else:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def stream(self, conn: socket.socket, body: bytes) -> bool:
        request = json.loads(body)
        n = self.tokens
        wanted = (request.get("parameters") or {}).get("max_new_tokens")
        if isinstance(wanted, int) and 0 < wanted < n:
            n = wanted
        whole, chunks = self.rendered(n)
        if "STALL" in str(request.get("inputs", "")):
            conn.sendall(STREAM_HEAD)
            return self.wait_gone(conn, None)
        if self.pace_s <= 0:
            conn.sendall(STREAM_HEAD + whole)
            return True
        conn.sendall(STREAM_HEAD)
        for chunk in chunks:
            if not self.wait_gone(conn, self.pace_s):
                return False
            conn.sendall(chunk)
        return True

    def wait_gone(self, conn: socket.socket, timeout: float | None) -> bool:
        """Wait ``timeout`` (forever if None); False (and reported) if the client left."""
        readable, _, _ = select.select([conn], [], [], timeout)
        if readable:
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            except OSError:
                data = b""
            if not data:
                self.say(f"DISCONNECT {time.monotonic_ns()}")
                return False
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--pace-ms", type=float, default=0.0)
    args = parser.parse_args()
    Server(args.port, args.tokens, args.pace_ms / 1000.0).serve()


if __name__ == "__main__":
    main()
