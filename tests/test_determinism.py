"""Determinism you can verify: the comparison rules, the fake's two failures, the check, the host form, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tgi_adapter import (
    AdapterConfig,
    AdapterHost,
    DeadlineUnmetError,
    DeterminismReport,
    InternalError,
    PoolUnavailableError,
    RetryPolicy,
    TaskRequest,
    TgiHttpAdapter,
    TokenStream,
    verify_determinism,
)
from tgi_adapter.determinism import (
    DeterminismProbe,
    compare_runs,
    first_divergence,
    planned_comparisons,
    verdict_of,
    window,
)
from tgi_adapter.probes import DEFAULT_PROMPTS
from tgi_adapter.testing import FakeTgiServer, Fault, MockAdapter

CLI = [sys.executable, "-m", "tgi_adapter"]
ONCE = AdapterConfig(retry=RetryPolicy(attempts=1))

texts = st.lists(st.sampled_from(["a", " b", "c", "é", "", " the"]), max_size=12)


# -- the pure comparison ------------------------------------------------------------------------


@given(texts)
def test_a_sequence_does_not_diverge_from_itself(a: List[str]) -> None:
    assert first_divergence(a, list(a)) is None


@given(texts, st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=5))
def test_a_prefix_parts_where_it_ends(a: List[str], tail: List[str]) -> None:
    assert first_divergence(a, a + tail) == len(a)
    assert first_divergence(a + tail, a) == len(a)


@given(texts, st.sampled_from(["x", "y", "z"]), st.sampled_from(["p", "q"]), texts, texts)
def test_the_first_differing_index_is_found(prefix: List[str], x: str, y: str, rest_a: List[str],
                                           rest_b: List[str]) -> None:
    assert first_divergence(prefix + [x] + rest_a, prefix + [y] + rest_b) == len(prefix)


@given(st.lists(st.text(max_size=3), max_size=20), st.integers(min_value=0, max_value=25))
def test_the_window_is_three_tokens_either_side(tokens: List[str], at: int) -> None:
    got = window(tokens, at)
    assert got == tuple(tokens[max(0, at - 3) : at + 4])
    assert len(got) <= 7
    if at < len(tokens):
        assert got[min(at, 3)] == tokens[at]


def test_compare_runs_reports_where_and_the_tokens_around() -> None:
    a = [(w, None) for w in ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]]
    b = a[:6] + [("X", None)] + a[7:]
    probe = compare_runs("p", "strict", False, "r#1", a, "s#1", b)
    assert not probe.identical and probe.first_divergence == 6
    assert probe.a_tokens == ("3", "4", "5", "6", "7", "8", "9")
    assert probe.b_tokens == ("3", "4", "5", "X", "7", "8", "9")
    same = compare_runs("p", "seeded", True, "r#1", a, "r#1+load", list(a))
    assert same.identical and same.first_divergence is None and same.a_tokens == same.b_tokens == ()


def test_ids_count_only_when_both_runs_carry_them() -> None:
    a = [("x", 1), ("y", 2)]
    assert compare_runs("p", "strict", False, "a", a, "b", [("x", 1), ("y", 3)]).first_divergence == 1
    # One side without ids: the texts decide.
    assert compare_runs("p", "strict", False, "a", a, "b", [("x", None), ("y", None)]).identical


@pytest.mark.parametrize(("replicas", "repeats", "loaded"), [(1, 2, False), (2, 1, False), (3, 2, True), (2, 3, True)])
def test_the_planned_comparisons(replicas: int, repeats: int, loaded: bool) -> None:
    names = [f"r{n}" for n in range(replicas)]
    pairs = planned_comparisons(names, ["p", "q"], repeats, loaded)
    per_mode = (replicas - 1) + replicas * (repeats - 1) + (replicas * repeats if loaded else 0)
    assert len(pairs) == 2 * 2 * per_mode
    for a, b in pairs:
        assert a[1:3] == b[1:3] and a[3] == 1 and not a[4]  # same prompt and mode; against a first idle run
        assert a[0] == b[0] or a[0] == "r0"
    assert len(set(pairs)) == len(pairs)


def test_the_report_is_json_ready_and_readable() -> None:
    probes = (
        DeterminismProbe("p", "strict", False, "a#1", "b#1", True, None),
        DeterminismProbe("p", "seeded", True, "a#1", "a#1+load", False, 2, ("x", "y", "z"), ("x", "y", "w")),
    )
    report = DeterminismReport(verdict_of(probes), {"a": {"engine_version": "3.3.6", "model_sha": None}}, probes)
    assert report.verdict == "divergent" and report.divergences == probes[1:]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["probes"][1] == {
        "prompt": "p", "mode": "seeded", "under_load": True, "a": "a#1", "b": "a#1+load", "identical": False,
        "first_divergence": 2, "a_tokens": ["x", "y", "z"], "b_tokens": ["x", "y", "w"],
    }
    assert data["replicas"] == {"a": {"engine_version": "3.3.6", "model_sha": None}} and data["skipped"] == []
    text = report.to_text()
    assert 'a#1 vs a#1+load (under load): DIFFER from token 2' in text
    assert '"xy" ["z"] ""' in text and '"xy" ["w"] ""' in text
    with pytest.raises(ValueError, match="verdict"):
        DeterminismReport("same", {})


# -- the fake's two failures --------------------------------------------------------------------


def tokens_from(url: str, prompt: str, *, mode: str = "strict", max_tokens: int = 12) -> List[str]:
    task = TaskRequest(task_id=f"t-{time.monotonic_ns()}", session_id="s", workload="completion", model_ref="m",
                       engine="tgi", ctx=2048, priority="batch", max_tokens=max_tokens, deadline_ms=10_000,
                       prompt=prompt, seed=7, determinism=mode)
    with TgiHttpAdapter(url, config=ONCE) as adapter:
        return [e.data["t"] for e in adapter.submit(task) if e.kind == "token"]


def test_the_diverge_fault_changes_the_text_from_its_token_for_times_requests() -> None:
    with FakeTgiServer(faults=[Fault("diverge", at_token=4, times=2)]) as engine:
        first = tokens_from(engine.url, "Hello")
        second = tokens_from(engine.url, "Hello")
        clean = tokens_from(engine.url, "Hello")
    assert first == second  # the diverged text is the same for the same request
    assert first[:4] == clean[:4] and first[4] != clean[4] and len(first) == len(clean) == 12
    assert first_divergence(first, clean) == 4
    # Not streamed, and on the OpenAI routes, alike.
    with FakeTgiServer(faults=[Fault("diverge", at_token=4, times=2)]) as engine:
        task = TaskRequest(task_id="g", session_id="s", workload="completion", model_ref="m", engine="tgi", ctx=2048,
                           priority="batch", max_tokens=12, deadline_ms=10_000, prompt="Hello", seed=7,
                           determinism="strict")
        with TgiHttpAdapter(engine.url, config=ONCE) as native:
            assert native.generate(task)[0] == "".join(first)
        with TgiHttpAdapter(engine.url, config=AdapterConfig(route="openai-completions")) as openai:
            diverged = openai.generate(task)[0]
            assert diverged != openai.generate(task)[0]
    with pytest.raises(ValueError, match="does not take status"):
        Fault("diverge", status=500)


def test_a_batch_sensitive_fake_parts_at_the_number_of_streams_in_flight() -> None:
    with FakeTgiServer(batch_sensitive=True, pace_s=0.005) as engine:
        idle = tokens_from(engine.url, "Hello")
        with TgiHttpAdapter(engine.url, config=ONCE) as adapter:
            loads = [adapter.submit(TaskRequest(task_id=f"load-{n}", session_id="s", workload="completion",
                                                model_ref="m", engine="tgi", ctx=4096, priority="batch",
                                                max_tokens=2000, deadline_ms=20_000, prompt="Load"))
                     for n in range(2)]
            for load in loads:
                assert next(load).kind == "started"
            loaded = tokens_from(engine.url, "Hello")
            for load in loads:
                load.close()
        assert engine.wait_for_disconnect(timeout=10.0, count=2)
        again = tokens_from(engine.url, "Hello")
    assert idle == again
    assert first_divergence(idle, loaded) == 2


# -- the check against fake replicas ------------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(name="pair")
def _pair() -> Iterator[Tuple[FakeTgiServer, FakeTgiServer]]:
    with FakeTgiServer() as a, FakeTgiServer() as b:
        yield a, b


def adapters(*engines: FakeTgiServer) -> Dict[str, TgiHttpAdapter]:
    return {f"gpu-{n}": TgiHttpAdapter(e.url, config=ONCE) for n, e in enumerate(engines)}


def close_all(named: Dict[str, TgiHttpAdapter]) -> None:
    for adapter in named.values():
        adapter.close()


def generation_bodies(engine: FakeTgiServer) -> List[Dict[str, Any]]:
    return [r.json for r in engine.requests if r.path == "/generate_stream"]


def test_an_identical_pair(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    named = adapters(*pair)
    try:
        report = verify_determinism(named, prompts=["Hello", "Bonjour à tous"], max_tokens=8, seed=99)
    finally:
        close_all(named)
    assert report.verdict == "identical" and report.skipped == ()
    assert report.replicas == {
        name: {"engine_version": "3.3.6+sha.8e5a2b7", "model_sha": "0e9e39f249a16976918f6564b8830bc894c89659"}
        for name in ("gpu-0", "gpu-1")
    }
    assert len(report.probes) == 2 * 2 * (1 + 2) and all(p.identical for p in report.probes)
    assert {(p.a, p.b) for p in report.probes} == {("gpu-0#1", "gpu-1#1"), ("gpu-0#1", "gpu-0#2"),
                                                   ("gpu-1#1", "gpu-1#2")}
    for engine in pair:
        bodies = generation_bodies(engine)
        assert len(bodies) == 2 * 2 * 2  # prompts × modes × repeats
        params = [b["parameters"] for b in bodies]
        assert all(p["seed"] == 99 and p["max_new_tokens"] == 8 for p in params)
        assert sorted(p["do_sample"] for p in params) == [False] * 4 + [True] * 4


@pytest.mark.parametrize("other", [{"version": "3.3.5"}, {"model_sha": "ffffffffffffffffffffffffffffffffffffffff"}])
def test_another_version_or_model_is_incomparable_and_nothing_is_generated(other: Dict[str, str]) -> None:
    with FakeTgiServer() as a, FakeTgiServer(**other) as b:  # type: ignore[arg-type]
        named = adapters(a, b)
        try:
            report = verify_determinism(named)
        finally:
            close_all(named)
        assert report.verdict == "incomparable" and report.probes == ()
        assert report.replicas["gpu-0"] != report.replicas["gpu-1"]
        for engine in (a, b):
            assert {r.path for r in engine.requests} == {"/info"}
    assert "incomparable" in report.to_text() and "no probe was sent" in report.to_text()


def test_a_diverging_replica_is_found_at_its_token_with_the_tokens_around(
    pair: Tuple[FakeTgiServer, FakeTgiServer]
) -> None:
    pair[1].inject(Fault("diverge", at_token=5, times=1000))
    named = adapters(*pair)
    try:
        report = verify_determinism(named, prompts=["Hello"], max_tokens=12)
    finally:
        close_all(named)
    assert report.verdict == "divergent"
    across = [p for p in report.probes if p.a == "gpu-0#1" and p.b == "gpu-1#1"]
    assert len(across) == 2 and all(p.first_divergence == 5 for p in across)
    strict = next(p for p in across if p.mode == "strict")
    clean = tokens_from(pair[0].url, "Hello")
    diverged = tokens_from(pair[1].url, "Hello")
    assert strict.a_tokens == tuple(clean[2:9]) and strict.b_tokens == tuple(diverged[2:9])
    assert strict.a_tokens[3] != strict.b_tokens[3] and strict.a_tokens[:3] == strict.b_tokens[:3]
    # Each replica agrees with itself: the fault diverges the same way every time.
    assert all(p.identical for p in report.probes if p not in across)


def test_a_replica_that_diverges_from_itself_across_repeats() -> None:
    # Repeats run outermost: the first generation request is run #1 of the strict probe.
    with FakeTgiServer(faults=[Fault("diverge", at_token=3, times=1)]) as engine:
        named = adapters(engine)
        try:
            report = verify_determinism(named, prompts=["Hello"], max_tokens=10, repeats=3)
        finally:
            close_all(named)
    assert report.verdict == "divergent"
    differ = [(p.mode, p.a, p.b, p.first_divergence) for p in report.divergences]
    assert differ == [("strict", "gpu-0#1", "gpu-0#2", 3), ("strict", "gpu-0#1", "gpu-0#3", 3)]


def test_batch_sensitive_replicas_are_identical_idle_and_divergent_under_load() -> None:
    with FakeTgiServer(batch_sensitive=True, pace_s=0.002) as a, FakeTgiServer(batch_sensitive=True,
                                                                                pace_s=0.002) as b:
        named = adapters(a, b)
        try:
            idle = verify_determinism(named, prompts=["Hello"], max_tokens=8)
            loaded = verify_determinism(named, prompts=["Hello"], max_tokens=8, under_load=2)
        finally:
            close_all(named)
        assert idle.verdict == "identical"
        assert loaded.verdict == "divergent"
        assert all(p.identical for p in loaded.probes if not p.under_load)
        under = [p for p in loaded.probes if p.under_load]
        assert len(under) == 2 * 2 * 2  # replicas × modes × repeats
        # Two load streams, and perhaps the last run's, not yet dropped by the engine.
        assert all(not p.identical and p.first_divergence is not None and p.first_divergence >= 2 for p in under)
        for engine in (a, b):
            loads = [r for r in engine.requests if r.json and r.json.get("parameters", {}).get("max_new_tokens", 0) > 8]
            assert len(loads) >= 2 * 2 * 2
            # Every load stream was cancelled before it finished: it outlasted its probe.
            assert engine.wait_for_disconnect(timeout=10.0, count=len(loads))
            assert all(d.tokens_sent < 256 for d in engine.disconnects)


class KeepingMock(MockAdapter):
    """A MockAdapter that keeps every stream it hands out."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.streams: List[TokenStream] = []

    def submit(self, task: Any, correlation_id: Optional[str] = None) -> TokenStream:
        stream = super().submit(task, correlation_id)
        self.streams.append(stream)
        return stream


def test_load_streams_start_before_the_probe_and_are_cancelled_after_it() -> None:
    mock = KeepingMock(text=" ".join(f"w{n}" for n in range(600)), pace_s=0.002)
    report = verify_determinism([mock], prompts=["Hi"], max_tokens=4, repeats=1, under_load=3)
    assert report.verdict == "identical" and list(report.replicas) == ["0"]
    assert report.replicas["0"] == {"engine_version": "mock-1.0.0", "model_sha": None}
    sent = [(t.prompt, t.max_tokens) for t in mock.submitted]
    # Two idle probes, then for each mode three long load streams and the probe.
    assert [n for _, n in sent] == [4, 4, 256, 256, 256, 4, 256, 256, 256, 4]
    assert sent[5] == sent[9] == ("Hi", 4) and len({p for p, n in sent if n == 256}) == 3
    loads = [s for s, t in zip(mock.streams, mock.submitted) if t.max_tokens == 256]
    # 256 tokens at 2 ms would take half a second: each was cancelled once its probe was done.
    assert all(s.cancelled and s.finished for s in loads)


def test_load_streams_that_end_first_do_not_count() -> None:
    # The mock's text is shorter than any load stream: they all end at once.
    mock = MockAdapter(text="four words only here")
    with pytest.raises(InternalError, match="finished its load streams before a 4-token probe, 3 times"):
        verify_determinism([mock], prompts=["Hi"], max_tokens=4, repeats=1, under_load=1)


def test_a_list_of_adapters_and_a_generic_adapter() -> None:
    same = verify_determinism([MockAdapter(), MockAdapter()], prompts=["Hi"], max_tokens=5)
    assert same.verdict == "identical" and list(same.replicas) == ["0", "1"]
    other = verify_determinism([MockAdapter(), MockAdapter(text="Hello from another engine entirely.")],
                               prompts=["Hi"], max_tokens=5)
    assert other.verdict == "divergent" and {p.first_divergence for p in other.divergences} == {2}


def test_the_host_form_skips_replicas_that_are_not_live(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    with AdapterHost() as host:
        host.bind("llama", "gpu-0", TgiHttpAdapter(pair[0].url, config=ONCE))
        host.bind("llama", "gpu-1", TgiHttpAdapter(closed_port_url(), config=ONCE))
        host.bind("llama", "gpu-2", TgiHttpAdapter(pair[1].url, config=ONCE))
        report = host.verify_determinism("llama", prompts=["Hello"], max_tokens=6)
        assert report.verdict == "identical" and report.skipped == ("gpu-1",)
        assert list(report.replicas) == ["gpu-0", "gpu-2"]
        assert {(p.a, p.b) for p in report.probes} >= {("gpu-0#1", "gpu-2#1")}
        assert report.to_dict()["skipped"] == ["gpu-1"] and "gpu-1  skipped: not live" in report.to_text()
        host.bind("empty", "gpu-9", TgiHttpAdapter(closed_port_url(), config=ONCE))
        with pytest.raises(PoolUnavailableError, match="no replica of pool 'empty' is live"):
            host.verify_determinism("empty")


def test_an_unreachable_replica_raises_its_error_and_nothing_is_generated(
    pair: Tuple[FakeTgiServer, FakeTgiServer]
) -> None:
    named = {"up": TgiHttpAdapter(pair[0].url, config=ONCE), "down": TgiHttpAdapter(closed_port_url(), config=ONCE)}
    try:
        with pytest.raises(PoolUnavailableError, match="replica 'down'"):
            verify_determinism(named)
    finally:
        close_all(named)
    assert generation_bodies(pair[0]) == []


def test_a_probe_that_ends_in_error_raises_it_and_stops_the_other_replicas() -> None:
    boom = Fault("error_frame", at_token=2, message="Request failed during generation: Server error: boom")
    with FakeTgiServer(pace_s=0.01) as a, FakeTgiServer(faults=[boom]) as b:
        named = adapters(a, b)
        try:
            with pytest.raises(InternalError, match="replica 'gpu-1'") as caught:
                verify_determinism(named, max_tokens=16)
        finally:
            close_all(named)
        assert not caught.value.retriable
        # gpu-0 was stopped, not run to the end: 16 probes of 16 tokens at 10 ms would take 2.5 s.
        assert len(generation_bodies(a)) < 4 * 2 * 2


def test_the_check_is_bounded_by_timeout_s() -> None:
    with FakeTgiServer(pace_s=0.05) as a, FakeTgiServer(pace_s=0.05) as b:
        named = adapters(a, b)
        started = time.monotonic()
        try:
            with pytest.raises(DeadlineUnmetError, match="timeout_s=0.5"):
                verify_determinism(named, timeout_s=0.5)
        finally:
            close_all(named)
        assert time.monotonic() - started < 5.0
        assert a.wait_for_disconnect(timeout=5.0) and b.wait_for_disconnect(timeout=5.0)


def test_the_default_check_of_two_idle_replicas_is_quick(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    named = adapters(*pair)
    started = time.monotonic()
    try:
        report = verify_determinism(named)
    finally:
        close_all(named)
    assert time.monotonic() - started < 20.0
    assert report.verdict == "identical" and {p.prompt for p in report.probes} == set(DEFAULT_PROMPTS)
    assert len(report.probes) == len(DEFAULT_PROMPTS) * 2 * 3


@pytest.mark.parametrize(
    ("replicas", "kw", "message"),
    [
        ({}, {}, "replicas is empty"),
        ("http://x", {}, "replicas must be a mapping"),
        ({"a": object()}, {}, "replica 'a' must be a WorkerAdapter"),
        ({"": MockAdapter()}, {}, "non-empty strings"),
        (None, {"prompts": "Hello"}, "prompts must be a list"),
        (None, {"prompts": []}, "prompts is empty"),
        (None, {"prompts": ["ok", ""]}, r"prompts\[1\]"),
        (None, {"max_tokens": 0}, "max_tokens must be >= 1"),
        (None, {"seed": -1}, "seed must be between"),
        (None, {"repeats": True}, "repeats must be an integer"),
        (None, {"under_load": -1}, "under_load must be >= 0"),
        (None, {"timeout_s": 0}, "timeout_s"),
        ([MockAdapter()], {"repeats": 1}, "nothing to compare"),
    ],
)
def test_bad_arguments_are_named(replicas: Any, kw: Dict[str, Any], message: str) -> None:
    if replicas is None:
        replicas = [MockAdapter(), MockAdapter()]
    with pytest.raises(ValueError, match=message):
        verify_determinism(replicas, **kw)


def test_the_same_adapter_twice_is_refused() -> None:
    mock = MockAdapter()
    with pytest.raises(ValueError, match="'a' and 'b' are the same adapter"):
        verify_determinism({"a": mock, "b": mock})


# -- the command line ---------------------------------------------------------------------------


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_ADAPTER_")}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)


def urls(*engines: FakeTgiServer) -> List[str]:
    return [arg for engine in engines for arg in ("--url", engine.url)]


def test_cli_identical_is_exit_0_and_json(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    result = run("verify", *urls(*pair), "--prompt", "Hi", "--prompt", "Ciao", "--max-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = [e.url.split("://", 1)[1] for e in pair]
    assert data["verdict"] == "identical" and list(data["replicas"]) == names
    assert len(data["probes"]) == 2 * 2 * 3 and {p["prompt"] for p in data["probes"]} == {"Hi", "Ciao"}


def test_cli_divergent_is_exit_1_and_shows_where(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    pair[1].inject(Fault("diverge", at_token=5, times=1000))
    result = run("verify", *urls(*pair), "--prompt", "Hello", "--max-tokens", "10", "--repeats", "1")
    assert result.returncode == 1 and result.stderr == ""
    assert "DIFFER from token 5" in result.stdout and "[" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "verdict: divergent (2 of 2 comparisons differ)"


def test_cli_incomparable_is_exit_1() -> None:
    with FakeTgiServer() as a, FakeTgiServer(version="2.4.1") as b:
        result = run("verify", *urls(a, b), "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["verdict"] == "incomparable"
        assert generation_bodies(a) == generation_bodies(b) == []


@pytest.mark.parametrize(
    "args",
    [[], ["--repeats", "0"], ["--under-load", "-1"], ["--max-tokens", "x"], ["--url", "http://a:1", "--url", "http://a:1"],
     ["--url", "http://a:1", "--seed", "-5"]],
)
def test_cli_usage_errors_exit_2(args: List[str]) -> None:
    result = run("verify", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_an_unreachable_replica_is_one_line(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    down = closed_port_url()
    result = run("verify", "--url", pair[0].url, "--url", down)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: POOL_UNAVAILABLE")
    assert f"replica '{down.split('://', 1)[1]}'" in lines[0]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # not SIGINT: a process started in the background may ignore it
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - only if the server hangs
        proc.kill()
        proc.communicate()


def test_cli_against_a_standalone_diverging_fake_server(pair: Tuple[FakeTgiServer, FakeTgiServer]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with ExitStack() as stack:
        proc = subprocess.Popen(CLI + ["fake-server", "--port", str(port), "--fault", "diverge", "--batch-sensitive"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stack.callback(stop, proc)
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"127.0.0.1:{port}, fault diverge, batch-sensitive" in banner
        result = run("verify", "--url", pair[0].url, "--url", f"http://127.0.0.1:{port}", "--prompt", "Hi",
                     "--max-tokens", "8", "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    across = [p for p in data["probes"] if p["a"].split("#")[0] != p["b"].split("#")[0]]
    assert across and all(p["first_divergence"] == 5 for p in across)
    assert all(p["identical"] for p in data["probes"] if p not in across)


def test_cli_help_lists_verify() -> None:
    result = run("verify", "--help")
    assert result.returncode == 0
    for option in ("--url", "--prompt", "--max-tokens", "--repeats", "--under-load", "--json"):
        assert option in result.stdout
