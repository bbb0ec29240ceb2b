"""Per-task log records, the metrics registry, Prometheus text, and that secrets stay secret."""

from __future__ import annotations

import logging
import re
import socket
import threading
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from tgi_adapter import AdapterConfig, MetricsRegistry, RetryPolicy, TaskRequest, TgiHttpAdapter, WorkerError
from tgi_adapter.metrics import DECODE_BUCKETS_MS, FIRST_TOKEN_BUCKETS_MS, TaskRecord
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]
TOKEN = "tok-SECRET-9f8e7d6c5b4a"


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def texts(self) -> List[str]:
        out = []
        for record in self.records:
            out.append(record.getMessage())
            out.append(repr(record.__dict__))
            if record.exc_info and record.exc_info[1] is not None:
                out.append(repr(record.exc_info[1]) + str(record.exc_info[1]))
        return out


@pytest.fixture(name="capture")
def _capture() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_the_token_appears_nowhere_but_on_the_wire(capture: Capture, make_task: MakeTask) -> None:
    seen: List[str] = []
    echo = f"rejected Authorization: Bearer {TOKEN} (token={TOKEN})"
    config = AdapterConfig(retry=RetryPolicy(attempts=1), headers={"X-API-Key": TOKEN})
    with (
        FakeTgiServer(api_key=TOKEN, pace_s=0.005) as server,
        TgiHttpAdapter(server.url, token=TOKEN, config=config) as adapter,
    ):
        seen.append(repr(adapter))
        seen.append(repr(adapter.config))
        # success
        events = list(adapter.submit(make_task(max_tokens=4)))
        # cancel
        task = make_task(max_tokens=500)
        stream = adapter.submit(task)
        next(stream)
        adapter.cancel(task.task_id)
        events += list(stream)
        # an engine error that echoes the credentials back
        server.inject(Fault("error_frame", at_token=1, error_type="generation", message=echo))
        events += list(adapter.submit(make_task(max_tokens=4)))
        # a 401 whose body echoes them
        server.inject(Fault("status", status=401, body=echo, content_type="text/plain"))
        events += list(adapter.submit(make_task(max_tokens=4)))
        try:
            server.inject(Fault("status", status=401, body=echo, content_type="text/plain"))
            adapter.generate(make_task(max_tokens=4))
        except WorkerError as error:
            seen += [str(error), repr(error), error.message, repr(error.to_envelope())]
        seen.append(repr(stream))
        received = [r.headers.get("authorization") for r in server.requests if r.path == "/generate_stream"]
    # a refused connection
    with TgiHttpAdapter(f"http://127.0.0.1:{free_port()}", token=TOKEN, config=config) as adapter:
        events += list(adapter.submit(make_task()))
        seen.append(repr(adapter))
    seen += [repr(e) for e in events]
    seen += capture.texts()
    assert received and all(value == f"Bearer {TOKEN}" for value in received)
    assert [e.data["code"] for e in events if e.kind == "error"] == ["INTERNAL", "POOL_UNAVAILABLE", "POOL_UNAVAILABLE"]
    leaks = [text for text in seen if TOKEN in text]
    assert not leaks, leaks[:3]
    assert any("redacted" in text or "sha256:" in text for text in seen)


def test_the_authorization_header_is_sent_exactly_once(make_task: MakeTask) -> None:
    with FakeTgiServer() as server, TgiHttpAdapter(server.url, token=TOKEN) as adapter:
        adapter.submit(make_task(max_tokens=2)).collect()
    request = server.requests[-1]
    assert request.headers["authorization"] == f"Bearer {TOKEN}"  # one value, not a joined list


def test_one_info_record_per_task_with_the_standard_fields(capture: Capture, make_task: MakeTask) -> None:
    config = AdapterConfig(pool_id="pool-a", replica_id="r-1", retry=RetryPolicy(attempts=2, base=0.0))
    with (
        FakeTgiServer(faults=[Fault("status", status=503)]) as server,
        TgiHttpAdapter(server.url, config=config) as adapter,
    ):
        task = make_task(max_tokens=5, session_id="sess-9")
        adapter.submit(task).collect()
    records = [r for r in capture.records if r.name == "tgi_adapter.metrics"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    fields: Dict[str, Any] = records[0].task  # type: ignore[attr-defined]
    assert fields["job_id"] == task.task_id and fields["session_id"] == "sess-9"
    assert (fields["engine"], fields["pool_id"], fields["replica_id"]) == ("tgi", "pool-a", "r-1")
    assert fields["engine_version"] == "3.3.6+sha.8e5a2b7"
    assert fields["tokens_out"] == 5 and fields["tokens_in"] is not None
    assert fields["outcome"] == "end" and fields["retries"] == 1
    assert isinstance(fields["latency_first_token_ms"], int) and isinstance(fields["decode_time_ms"], int)
    above_debug = [r for r in capture.records if r.name.startswith("tgi_adapter") and r.levelno > logging.DEBUG]
    assert above_debug == records  # nothing per token (or per anything) above DEBUG


def test_outcomes_in_records_are_end_cancelled_or_the_code(capture: Capture, make_task: MakeTask) -> None:
    with (
        FakeTgiServer(pace_s=0.002) as server,
        TgiHttpAdapter(server.url, config=AdapterConfig(retry=RetryPolicy(attempts=1))) as adapter,
    ):
        adapter.submit(make_task(max_tokens=2)).collect()
        task = make_task(max_tokens=100)
        with adapter.submit(task) as stream:
            next(stream)
        server.inject(Fault("status", status=429))
        list(adapter.submit(make_task()))
    outcomes = [r.task["outcome"] for r in capture.records if r.name == "tgi_adapter.metrics"]  # type: ignore[attr-defined]
    assert outcomes == ["end", "cancelled", "ADMISSION_REJECT"]


def parse_exposition(text: str) -> Tuple[Dict[str, str], Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]]:
    """A strict reader of Prometheus text: every line must parse."""
    types: Dict[str, str] = {}
    samples: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram")
            types[name] = kind
            continue
        match = sample.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = tuple(label.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return types, samples


def test_render_prometheus_after_scripted_tasks(make_task: MakeTask) -> None:
    registry = MetricsRegistry()
    config = AdapterConfig(pool_id='pool "a"\\b', replica_id="r\n1", retry=RetryPolicy(attempts=2, base=0.0))
    with (
        FakeTgiServer(faults=[Fault("status", status=503)]) as server,
        TgiHttpAdapter(server.url, config=config, metrics=registry) as adapter,
    ):
        adapter.submit(make_task(max_tokens=3)).collect()  # one retry, then success
        server.inject(Fault("status", status=422))
        list(adapter.submit(make_task()))
        for _ in range(2):
            adapter.submit(make_task(max_tokens=4)).collect()
        server.inject(Fault("stall", at_token=3))
        with adapter.submit(make_task(max_tokens=1000)) as stream:
            assert [next(stream).kind for _ in range(4)] == ["started", "token", "token", "token"]
        adapter.health()
    types, samples = parse_exposition(registry.render_prometheus())
    assert types["tasks_started_total"] == "counter" and types["latency_first_token_ms"] == "histogram"
    base = (
        ("engine", "tgi"),
        ("engine_version", "3.3.6+sha.8e5a2b7"),
        ("pool_id", 'pool \\"a\\"\\\\b'),
        ("replica_id", "r\\n1"),
    )
    assert samples[("tasks_started_total", base)] == 5
    assert samples[("tasks_canceled_total", base)] == 1
    assert samples[("tasks_failed_total", base + (("code", "INVALID_PARAMS"),))] == 1
    # What the wire carried: the cancelled task's 3 streamed tokens count too.
    assert samples[("tokens_out_total", base)] == 3 + 4 + 4 + 3
    assert samples[("retries_total", base)] == 1
    gauge = tuple(p for p in base if p[0] != "engine_version")
    assert samples[("streams_in_flight", gauge)] == 0
    assert samples[("engine_live", gauge)] == 1 and samples[("engine_ready", gauge)] == 1
    # Every task that received a first token, the cancelled one included.
    assert samples[("latency_first_token_ms_count", base)] == 4
    assert samples[("latency_first_token_ms_bucket", base + (("le", "+Inf"),))] == 4
    counts = [samples[("latency_first_token_ms_bucket", base + (("le", str(b)),))] for b in FIRST_TOKEN_BUCKETS_MS]
    assert counts == sorted(counts)  # cumulative
    assert samples[("latency_decode_ms_count", base)] == 3
    assert len(DECODE_BUCKETS_MS) + 1 == len([k for k in samples if k[0] == "latency_decode_ms_bucket"])
    allowed = {"engine", "engine_version", "pool_id", "replica_id", "code", "le"}
    assert all({k for k, _ in pairs} <= allowed for _, pairs in samples), "bounded label names"
    assert not [v for _, pairs in samples for _, v in pairs if v.startswith("t-")], "no task ids in labels"


def test_snapshot_is_plain_data_and_hooks_see_every_observation() -> None:
    registry = MetricsRegistry()
    seen: List[Tuple[str, Any]] = []
    registry.add_hook(lambda name, labels, value: seen.append((name, value)))
    registry.add_hook(lambda name, labels, value: 1 / 0)  # a broken hook changes nothing
    labels = {"engine": "tgi", "engine_version": "v", "pool_id": "", "replica_id": ""}
    registry.task_started(labels)
    record = TaskRecord("j", "s", "tgi", "v", None, None, 3, 7, 12, 40, "end", 0)
    registry.task_finished(labels, record)
    snap = registry.snapshot()
    assert snap["tokens_out_total"][0]["value"] == 7
    assert snap["latency_first_token_ms"][0]["count"] == 1
    assert ("task_finished", record) in seen and ("tasks_started_total", 1.0) in seen
    import json

    json.dumps(snap, default=str)
