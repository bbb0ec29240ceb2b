"""The clients under comparison, each reading one stream to its end and returning the joined text.

Every client has the same shape: built once for a base URL (so keep-alive
clients keep their connection between runs), ``run(n)`` reads a stream of
``n`` tokens and returns the text joined from its non-special tokens, and
``close()``. Peers are imported lazily; :func:`available` tells which are
installed. Peers run over plain HTTP only (their TLS settings differ).
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
from importlib import metadata
from typing import Any, Dict, List, Optional, Type, Union
from urllib.parse import urlsplit

import requests

from tgi_adapter import AdapterConfig, TaskRequest, TgiHttpAdapter

Verify = Union[bool, str]
PROMPT = "bench"
_ids = itertools.count()


def stream_body(n: int, prompt: str = PROMPT) -> Dict[str, Any]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}


def make_task(n: int, prompt: str = PROMPT, task_id: Optional[str] = None) -> TaskRequest:
    """A task asking for ``n`` tokens (the imitation's /info allows up to 2,000,000)."""
    return TaskRequest(
        task_id=task_id or f"bench-{next(_ids)}",
        session_id="bench",
        workload="completion",
        model_ref="m",
        engine="tgi",
        ctx=4096,
        priority="interactive",
        max_tokens=n,
        deadline_ms=600_000,
        prompt=prompt,
    )


class Client:
    """The common shape: ``run(n)`` → the joined text of an ``n``-token stream."""

    name = "?"

    def __init__(self, url: str, verify: Verify = True) -> None:
        self.url = url

    def run(self, n: int) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MinimalClient(Client):
    """The minimal correct client: ``iter_lines`` on a keep-alive ``requests.Session``."""

    name = "minimal parse"

    def __init__(self, url: str, verify: Verify = True) -> None:
        self.url = url + "/generate_stream"
        self.verify = verify  # per request: REQUESTS_CA_BUNDLE would override a session-level value
        self.session = requests.Session()

    def run(self, n: int) -> str:
        response = self.session.post(self.url, json=stream_body(n), stream=True, timeout=120, verify=self.verify)
        response.raise_for_status()
        parts: List[str] = []
        loads = json.loads
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                token = loads(line[5:])["token"]
                if not token["special"]:
                    parts.append(token["text"])
        return "".join(parts)

    def close(self) -> None:
        self.session.close()


class AdapterClient(Client):
    """``TgiHttpAdapter.submit(task).collect()``."""

    name = "tgi_adapter"

    def __init__(self, url: str, verify: Verify = True, pool_maxsize: int = 32) -> None:
        self.adapter = TgiHttpAdapter(url, config=AdapterConfig(verify=verify, pool_maxsize=pool_maxsize))

    def run(self, n: int) -> str:
        text, end = self.adapter.submit(make_task(n)).collect()
        if end.get("tokens_out") != n or end.get("finish_reason") != "length":
            raise AssertionError(f"unexpected end data {end!r}")
        return text

    def close(self) -> None:
        self.adapter.close()


class TextGenerationClient(Client):
    """``text_generation.Client(url).generate_stream(...)`` (pydantic models per frame)."""

    name = "text-generation"

    def __init__(self, url: str, verify: Verify = True) -> None:
        from text_generation import Client as TgClient

        self.client = TgClient(url, timeout=120)

    def run(self, n: int) -> str:
        parts: List[str] = []
        for response in self.client.generate_stream(PROMPT, max_new_tokens=n):
            if not response.token.special:
                parts.append(response.token.text)
        return "".join(parts)


class HubClient(Client):
    """``huggingface_hub.InferenceClient(url).text_generation(..., stream=True, details=True)``."""

    name = "huggingface_hub"

    def __init__(self, url: str, verify: Verify = True) -> None:
        from huggingface_hub import InferenceClient

        self.client = InferenceClient(url, timeout=120)

    def run(self, n: int) -> str:
        parts: List[str] = []
        for output in self.client.text_generation(PROMPT, max_new_tokens=n, stream=True, details=True):
            token = output.token
            if not token.special:
                parts.append(token.text)
        return "".join(parts)


class SseClientPy(Client):
    """``sseclient.SSEClient(response).events()`` over a streamed ``requests`` response."""

    name = "sseclient-py"

    def __init__(self, url: str, verify: Verify = True) -> None:
        from sseclient import SSEClient

        self.sse = SSEClient
        self.url = url + "/generate_stream"
        self.verify = verify
        self.session = requests.Session()

    def run(self, n: int) -> str:
        response = self.session.post(self.url, json=stream_body(n), stream=True, timeout=120, verify=self.verify)
        response.raise_for_status()
        parts: List[str] = []
        for event in self.sse(response).events():  # type: ignore[arg-type]  # iterable, as its docs use it
            token = json.loads(event.data)["token"]
            if not token["special"]:
                parts.append(token["text"])
        return "".join(parts)

    def close(self) -> None:
        self.session.close()


class RawSocketClient(Client):
    """Receives and discards the response over a kept-alive socket: what the server can deliver."""

    name = "raw socket (server check)"

    def __init__(self, url: str, verify: Verify = True) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.context: Optional[ssl.SSLContext] = None
        if parts.scheme == "https":
            cafile = verify if isinstance(verify, str) else None
            self.context = ssl.create_default_context(cafile=cafile)
        self.sock: Optional[socket.socket] = None
        self.buf = bytearray(1 << 18)
        #: Bytes received by the last run, status line and headers included.
        self.received = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_hostname=self.host)
        return sock

    def run(self, n: int) -> str:
        if self.sock is None:
            self.sock = self._connect()
        body = json.dumps(stream_body(n)).encode()
        head = (
            f"POST /generate_stream HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        view = memoryview(self.buf)
        recv_into = self.sock.recv_into
        total = 0
        tail = b""
        while True:
            k = recv_into(view)
            if not k:
                raise ConnectionError("the server closed the connection mid-response")
            total += k
            tail = (tail + bytes(view[max(0, k - 7) : k]))[-7:]
            if tail == b"\r\n0\r\n\r\n":
                break
        self.received = total
        return ""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


#: The parsing clients, in the table's order; the raw socket client is the server check.
CLIENTS: Dict[str, Type[Client]] = {
    "minimal": MinimalClient,
    "adapter": AdapterClient,
    "text-generation": TextGenerationClient,
    "huggingface_hub": HubClient,
    "sseclient": SseClientPy,
}
PEER_MODULES = {"text-generation": "text_generation", "huggingface_hub": "huggingface_hub", "sseclient": "sseclient"}


def available(key: str) -> bool:
    """Whether the client ``key`` can be built here (peers are optional)."""
    module = PEER_MODULES.get(key)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
