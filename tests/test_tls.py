"""HTTPS, certificates, proxies and connection reuse, over real sockets."""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest
import trustme

from tgi_adapter import AdapterConfig, ErrorKind, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError, WorkerHealth
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]


@pytest.fixture(name="ca", scope="module")
def _ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(name="ca_file")
def _ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(context)
    return context


@pytest.fixture(name="https")
def _https(ca: trustme.CA) -> Iterator[FakeTgiServer]:
    with FakeTgiServer(ssl_context=server_context(ca)) as server:
        yield server


def test_streaming_and_cancel_over_https_with_a_ca_bundle(
    https: FakeTgiServer, ca_file: str, make_task: MakeTask
) -> None:
    assert https.url.startswith("https://")
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=ca_file)) as adapter:
        text, end = adapter.submit(make_task(max_tokens=8)).collect()
        assert text and end["tokens_out"] == 8
        https.inject(Fault("stall", at_token=2))
        task = make_task(max_tokens=50)
        stream = adapter.submit(task)
        assert [next(stream).kind for _ in range(3)] == ["started", "token", "token"]
        t0 = time.monotonic()
        adapter.cancel(task.task_id)
        assert [e.kind for e in stream] == ["end"]
        assert https.wait_for_disconnect(timeout=5.0)
        assert https.disconnects[-1].t - t0 < 0.5


def test_control_calls_over_https(https: FakeTgiServer, ca_file: str) -> None:
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=ca_file)) as adapter:
        assert adapter.health() == WorkerHealth(live=True, ready=True)
        assert adapter.engine_version() == "3.3.6+sha.8e5a2b7"
        assert adapter.props().slots_total == 128


def test_sequential_tls_tasks_reuse_one_connection(https: FakeTgiServer, ca_file: str, make_task: MakeTask) -> None:
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=ca_file)) as adapter:
        for _ in range(4):
            adapter.submit(make_task(max_tokens=3)).collect()
        adapter.generate(make_task(max_tokens=3))
    assert https.connections_accepted == 1


def check_tls_refusal(adapter: TgiHttpAdapter, server: FakeTgiServer, make_task: MakeTask, words: str) -> None:
    events = list(adapter.submit(make_task()))
    assert [e.kind for e in events] == ["error"]
    data = events[0].data
    assert data["code"] == "POOL_UNAVAILABLE" and data["retriable"] is False
    assert "TLS" in data["message"] and words in data["message"]
    assert "verify" in data["message"]  # says what to set
    with pytest.raises(WorkerError) as info:
        adapter.engine_info()
    assert info.value.code is ErrorKind.POOL_UNAVAILABLE and not info.value.retriable
    assert adapter.health() == WorkerHealth(live=False, ready=False)
    assert [r for r in server.requests if r.method == "POST"] == []  # nothing sent before the handshake


def test_the_default_trust_store_refuses_an_untrusted_certificate(https: FakeTgiServer, make_task: MakeTask) -> None:
    with TgiHttpAdapter(https.url) as adapter:
        check_tls_refusal(adapter, https, make_task, "certificate verify failed")


def test_a_certificate_for_another_host_is_refused(ca: trustme.CA, ca_file: str, make_task: MakeTask) -> None:
    with FakeTgiServer(ssl_context=server_context(ca, "other.example")) as server:
        with TgiHttpAdapter(server.url, config=AdapterConfig(verify=ca_file)) as adapter:
            check_tls_refusal(adapter, server, make_task, "mismatch")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_verify_false_accepts_any_certificate(https: FakeTgiServer, make_task: MakeTask) -> None:
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=False)) as adapter:
        text, _end = adapter.submit(make_task(max_tokens=3)).collect()
    assert text


def test_mutual_tls_with_a_client_certificate(
    ca: trustme.CA, ca_file: str, tmp_path: Path, make_task: MakeTask
) -> None:
    context = server_context(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(context)
    client = ca.issue_cert("orchestrator.example")
    cert_file = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    with FakeTgiServer(ssl_context=context) as server:
        config = AdapterConfig(verify=ca_file, cert=str(cert_file))
        with TgiHttpAdapter(server.url, config=config) as adapter:
            assert adapter.submit(make_task(max_tokens=2)).collect()[0]
        without = AdapterConfig(verify=ca_file, retry=RetryPolicy(attempts=1))
        with TgiHttpAdapter(server.url, config=without) as adapter:
            events = list(adapter.submit(make_task()))
        assert events[-1].data["code"] == "POOL_UNAVAILABLE"


def test_a_path_prefix_is_kept_on_every_route(make_task: MakeTask) -> None:
    with FakeTgiServer() as server:
        # The fake serves the root; a prefix shows up as the path the engine sees.
        with TgiHttpAdapter(server.url + "/tgi/replica-3", config=AdapterConfig(retry=RetryPolicy(attempts=1))) as a:
            events = list(a.submit(make_task()))
            a.health()
    assert events[-1].kind == "error"  # the fake has no such route: 404
    paths = {r.path for r in server.requests}
    assert {"/tgi/replica-3/generate_stream", "/tgi/replica-3/health", "/tgi/replica-3/info"} <= paths


# -- proxies ---------------------------------------------------------------------------------


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on loopback that counts the tunnels it opens."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.tunnels: List[str] = []
        self.stop = threading.Event()
        self.threads: List[threading.Thread] = []
        self.socks: List[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(client)
            thread = threading.Thread(target=self._tunnel, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        target = head.split(b" ")[1].decode()
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.socks.append(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pair: Tuple[socket.socket, socket.socket] = (client, upstream)
        while not self.stop.is_set():
            readable, _, _ = select.select(pair, [], [], 0.1)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                (upstream if sock is client else client).sendall(data)

    def close(self) -> None:
        self.stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=5.0)
        for sock in self.socks:
            sock.close()
        self.acceptor.join(timeout=5.0)


@pytest.fixture(name="proxy")
def _proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def test_https_proxy_and_no_proxy_are_honoured(
    https: FakeTgiServer, ca_file: str, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch, make_task: MakeTask
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=ca_file)) as adapter:
        text, _end = adapter.submit(make_task(max_tokens=3)).collect()
    assert text
    assert proxy.tunnels == [f"127.0.0.1:{https.port}"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with TgiHttpAdapter(https.url, config=AdapterConfig(verify=ca_file)) as adapter:
        adapter.submit(make_task(max_tokens=3)).collect()
    assert len(proxy.tunnels) == 1
