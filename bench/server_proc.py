"""Run the TGI imitation as a child process and read its counters."""

from __future__ import annotations

import http.client
import json
import os
import select
import ssl
import subprocess
import sys
import time
from types import TracebackType
from typing import Any, Dict, List, Optional, Tuple, Type
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tgi_imitation.py")


class ImitationServer:
    """``with ImitationServer(tokens=20000) as server:`` → ``server.url``; always stopped on exit.

    :param tls: ``(cert chain path, key path)`` to serve HTTPS; then ``cafile``
        is what the control connection trusts.
    """

    def __init__(
        self,
        tokens: int,
        *,
        tls: Optional[Tuple[str, str]] = None,
        cafile: Optional[str] = None,
        lifetime_s: float = 1800.0,
    ) -> None:
        self.tokens = tokens
        self.tls = tls
        self.cafile = cafile
        self.lifetime_s = lifetime_s
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self._control: Optional[http.client.HTTPConnection] = None

    @classmethod
    def attach(cls, port: int) -> ImitationServer:
        """A control handle on a plain-HTTP imitation another process started (it does not stop it)."""
        server = cls(tokens=0)
        server.port = port
        return server

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        # TLS certificates name "localhost"; plain HTTP uses the address itself.
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        cmd: List[str] = [sys.executable, SCRIPT, "--port", "0", "--tokens", str(self.tokens)]
        cmd += ["--parent-watch", "--lifetime", str(self.lifetime_s)]
        if self.tls:
            cmd += ["--tls", self.tls[0], self.tls[1]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60.0
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                raise RuntimeError("the TGI imitation did not say READY within 60 s")
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"the TGI imitation exited early (code {self.proc.wait()})")
            line += byte
        words = line.decode().split()
        if words[:1] != ["READY"]:
            raise RuntimeError(f"unexpected first line from the TGI imitation: {line!r}")
        self.port = int(words[1])

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

    def __enter__(self) -> ImitationServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.stop()

    # -- control endpoints ---------------------------------------------------------

    def _request(self, method: str, path: str) -> Dict[str, Any]:
        for attempt in (0, 1):
            if self._control is None:
                if self.tls:
                    context = ssl.create_default_context(cafile=self.cafile)
                    self._control = http.client.HTTPSConnection("localhost", self.port, context=context, timeout=10)
                else:
                    self._control = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._control.request(method, path, body=b"" if method == "POST" else None)
                response = self._control.getresponse()
                result: Dict[str, Any] = json.loads(response.read())
                return result
            except (OSError, http.client.HTTPException):
                self._control.close()
                self._control = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def stats(self) -> Dict[str, Any]:
        """The server's counters (see ``tgi_imitation.Stats.snapshot``)."""
        return self._request("GET", "/_bench/stats")

    def stream_state(self, sid: str) -> Dict[str, Any]:
        """``{"state": "active" | "done" | "gone" | "unknown", "disconnect_ns": …}`` for one stream."""
        return self._request("GET", "/_bench/stream?id=" + quote(sid))

    def reset(self) -> None:
        """Zero the pacing counters."""
        self._request("POST", "/_bench/reset")

    def open_gate(self) -> None:
        """Release every stream the imitation holds (prompt ``GATE``)."""
        self._request("POST", "/_bench/open-gate")

    def wait_state(self, sid: str, states: Tuple[str, ...], timeout: float) -> Dict[str, Any]:
        """Poll until stream ``sid`` is in one of ``states``; its last state either way."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.stream_state(sid)
            if state["state"] in states or time.monotonic() > deadline:
                return state
            time.sleep(0.0005)
