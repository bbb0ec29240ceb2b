"""The clients of the concurrency burst, each in the shape :mod:`burst` drives.

A client reads the streams it is given with :meth:`BurstClient.consume`, and
marks each stream's first token and end on a :class:`Tally`. The burst runs
``consume([i])`` on one thread per stream when ``thread_per_stream`` is set,
else ``consume(every index)`` on one thread:

- ``raw``: one selector thread that sends the requests and discards the bytes
  (no parse): what the imitation and the machine deliver with next to no
  client work;
- ``adapter``: tgi_adapter, one consumer thread per stream iterating its
  ``TokenStream``;
- ``streamset``: tgi_adapter, one consumer thread that submits every stream,
  adds each to one ``StreamSet`` and iterates the set to the end;
- ``minimal``: the minimal parse, ``requests`` with ``iter_lines`` and
  ``json.loads``, one consumer thread per stream.
"""

from __future__ import annotations

import json
import math
import selectors
import socket
import threading
import time
from typing import Dict, List, Optional, Sequence

import requests
import requests.adapters
from clients import PROMPT, make_task, stream_body
from server_proc import ImitationServer
from tgi_imitation import expected_text

from tgi_adapter import AdapterConfig, StreamSet, TgiHttpAdapter, TokenEvent, TokenStream

# How long the imitation may take to hold every warm-up stream.
GATE_WAIT_S = 60.0


class Tally:
    """When each stream's first token came and when it ended (``time.perf_counter()``), and what went wrong.

    Any thread may mark any stream; each stream is marked by one thread only.
    """

    def __init__(self, n: int, tokens: int) -> None:
        self.tokens = tokens
        self.expected = expected_text(tokens)
        self.first: List[float] = [math.nan] * n
        self.end: List[float] = [math.nan] * n
        self.problems: List[str] = []

    def first_token(self, i: int) -> None:
        self.first[i] = time.perf_counter()

    def ended(self, i: int, text: Optional[str]) -> None:
        """Stream ``i`` ended; ``text`` is its joined text (None: a client that does not parse)."""
        self.end[i] = time.perf_counter()
        if text is not None and text != self.expected:
            self.problems.append(f"stream {i}: text mismatch ({len(text)} chars, expected {len(self.expected)})")

    def check_end(self, i: int, data: Dict[str, object]) -> None:
        if data.get("tokens_out") != self.tokens or data.get("finish_reason") != "length":
            self.problems.append(f"stream {i}: unexpected end data {data!r}")

    def failed(self, i: int, what: str) -> None:
        self.problems.append(f"stream {i}: {what[:300]}")


class BurstClient:
    """One client of the burst; see the module docstring."""

    key = "?"
    label = "?"
    thread_per_stream = True
    #: Whether the client joins each stream's text (and so checks it).
    parses = True

    def __init__(self, server: ImitationServer, n: int) -> None:
        self.url = server.url

    def prime(self) -> None:
        """One short stream, so one-off costs (imports, /info, the shared threads) are paid before the baseline."""
        self.consume([0], 1, PROMPT, Tally(1, 1))

    def warm(self, server: ImitationServer, n: int) -> List[str]:
        """Open ``n`` connections: ``n`` streams held by the imitation until all are in; problems seen."""
        tally = Tally(n, 1)
        prompt = f"GATE {PROMPT}"
        groups: List[Sequence[int]] = [[i] for i in range(n)] if self.thread_per_stream else [range(n)]
        threads = [threading.Thread(target=self._guarded, args=(g, 1, prompt, tally), daemon=True) for g in groups]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + GATE_WAIT_S
        while server.stats()["gated"] < n and time.monotonic() < deadline:
            time.sleep(0.01)
        server.open_gate()
        for thread in threads:
            thread.join(GATE_WAIT_S)
        return [f"warm-up: {problem}" for problem in tally.problems[:3]]

    def _guarded(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        try:
            self.consume(indices, tokens, prompt, tally)
        except Exception as exc:
            tally.problems.append(f"consumer: {type(exc).__name__}: {str(exc)[:300]}")

    def consume(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        raise NotImplementedError

    def leaks(self) -> List[str]:
        """What the client still holds once every stream has ended."""
        return []

    def close(self) -> None:
        pass


class RawReader(BurstClient):
    """Sends every request, then one selector loop discards the bytes until each chunked body ends."""

    key = "raw"
    label = "raw reader (no parse, 1 thread)"
    thread_per_stream = False
    parses = False

    def __init__(self, server: ImitationServer, n: int) -> None:
        super().__init__(server, n)
        self.port = server.port
        self.socks: List[socket.socket] = []

    def prime(self) -> None:
        pass

    def warm(self, server: ImitationServer, n: int) -> List[str]:
        # Through a held stream like the others: a connection the imitation has not taken up yet would
        # count its set-up against the burst.
        self.socks = [socket.create_connection(("127.0.0.1", self.port)) for _ in range(n)]
        return super().warm(server, n)

    def consume(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        body = json.dumps(stream_body(tokens, prompt)).encode()
        request = b"POST /generate_stream HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        tails = dict.fromkeys(indices, b"")  # the last bytes of each body: where its end is seen
        started = set()
        with selectors.DefaultSelector() as sel:
            for i in indices:
                sock = self.socks[i]
                sock.setblocking(True)  # the warm-up left it non-blocking
                sock.sendall(request)
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, i)
            while sel.get_map():
                for key, _ in sel.select():
                    i = key.data
                    sock = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(65536)
                    if i not in started and b"data:" in data:
                        started.add(i)
                        tally.first_token(i)
                    tail = tails[i] = (tails[i] + data)[-7:]
                    if tail == b"\r\n0\r\n\r\n" or not data:
                        sel.unregister(sock)
                        tally.ended(i, None)
                        if not data:
                            tally.failed(i, "the imitation closed the connection mid-stream")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class _AdapterClient(BurstClient):
    def __init__(self, server: ImitationServer, n: int) -> None:
        super().__init__(server, n)
        # The default pool (32) would drop every connection beyond 32 after use.
        self.adapter = TgiHttpAdapter(server.url, config=AdapterConfig(pool_maxsize=n))

    def prime(self) -> None:
        self.adapter.engine_info()
        super().prime()

    def leaks(self) -> List[str]:
        left = self.adapter.in_flight
        return [f"adapter.in_flight is {left} after every stream ended"] if left else []

    def close(self) -> None:
        self.adapter.close()


class AdapterThreads(_AdapterClient):
    """One consumer thread per stream, iterating its ``TokenStream``."""

    key = "adapter"
    label = "tgi_adapter, thread per stream"

    def consume(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        for i in indices:
            parts: List[str] = []
            for event in self.adapter.submit(make_task(tokens, prompt=prompt)):
                kind = event.kind
                if kind == "token":
                    if not parts:
                        tally.first_token(i)
                    parts.append(event.data["t"])
                elif kind == "end":
                    tally.ended(i, "".join(parts))
                    tally.check_end(i, event.data)
                elif kind == "error":
                    tally.failed(i, f"error event {event.data!r}")


class AdapterStreamSet(_AdapterClient):
    """One consumer thread: submits every stream, adds each to one ``StreamSet``, iterates the set."""

    key = "streamset"
    label = "tgi_adapter, one StreamSet thread"
    thread_per_stream = False

    def consume(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        index: Dict[TokenStream, int] = {}
        parts: Dict[int, List[str]] = {}
        with StreamSet() as group:
            for i in indices:
                stream = self.adapter.submit(make_task(tokens, prompt=prompt))
                index[stream] = i
                parts[i] = []
                group.add(stream)
            event: TokenEvent
            for stream, event in group:
                i = index[stream]
                kind = event.kind
                if kind == "token":
                    texts = parts[i]
                    if not texts:
                        tally.first_token(i)
                    texts.append(event.data["t"])
                elif kind == "end":
                    tally.ended(i, "".join(parts[i]))
                    tally.check_end(i, event.data)
                elif kind == "error":
                    tally.failed(i, f"error event {event.data!r}")
        unended = [i for i in indices if math.isnan(tally.end[i])]
        if unended:
            tally.problems.append(f"the StreamSet ended with {len(unended)} streams never ended (first: {unended[0]})")


class MinimalParse(BurstClient):
    """One ``requests.Session`` (pool sized for every stream), ``iter_lines`` and ``json.loads`` per frame."""

    key = "minimal"
    label = "minimal parse (requests, thread per stream)"

    def __init__(self, server: ImitationServer, n: int) -> None:
        super().__init__(server, n)
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=n))
        self.endpoint = server.url + "/generate_stream"

    def consume(self, indices: Sequence[int], tokens: int, prompt: str, tally: Tally) -> None:
        for i in indices:
            response = self.session.post(self.endpoint, json=stream_body(tokens, prompt), stream=True, timeout=120)
            parts: List[str] = []
            for line in response.iter_lines():
                if line.startswith(b"data:"):
                    token = json.loads(line[5:])["token"]
                    if not token["special"]:
                        if not parts:
                            tally.first_token(i)
                        parts.append(token["text"])
            tally.ended(i, "".join(parts))

    def close(self) -> None:
        self.session.close()


CLIENTS = {client.key: client for client in (RawReader, AdapterThreads, AdapterStreamSet, MinimalParse)}
