"""The ``tgi-adapter`` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import tgi_adapter
from tgi_adapter.testing import FakeTgiServer, Fault

CLI = [sys.executable, "-m", "tgi_adapter"]


def run(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_ADAPTER_")}
    full_env.update(env or {})
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=full_env, check=False)


@pytest.fixture(name="server")
def _server() -> Iterator[FakeTgiServer]:
    with FakeTgiServer() as server:
        yield server


def test_the_console_script_is_installed() -> None:
    package_dir = Path(tgi_adapter.__file__).resolve().parent
    if "site-packages" not in str(package_dir):
        pytest.skip("running from a source checkout: the console script exists only once installed")
    script = Path(sys.executable).parent / "tgi-adapter"
    assert script.exists()
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0 and tgi_adapter.__version__ in result.stdout


def test_demo_streams_and_summarises() -> None:
    result = run("demo", "--max-tokens", "12", "--pace-ms", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("fake TGI 3.3.6 at http://127.0.0.1:")
    summary = lines[-1]
    assert summary.startswith("tokens 12 | first token ") and "finish length" in summary
    assert "engine 3.3.6+sha.8e5a2b7" in summary and "tokens/s" in summary
    assert result.stderr == ""


def test_demo_json_prints_one_event_per_line() -> None:
    result = run("demo", "--max-tokens", "5", "--pace-ms", "0", "--json", "--tgi-version", "2.0.4")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["kind"] for e in events] == ["started"] + ["token"] * 5 + ["metrics", "end"]
    assert events[0]["data"]["engine_version"].startswith("2.0.4")


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("overloaded", "ADMISSION_REJECT"),
        ("reset", "WORKER_RESET"),
        ("validation", "INVALID_PARAMS"),
        ("stall", "DECODE_TIMEOUT"),
        ("refused", "POOL_UNAVAILABLE"),
        ("oom", "POOL_UNAVAILABLE"),
    ],
)
def test_demo_faults_end_with_one_error_line_and_exit_1(fault: str, code: str) -> None:
    result = run("demo", "--max-tokens", "10", "--pace-ms", "0", "--fault", fault)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {code} (")
    assert "Traceback" not in result.stderr


def test_generate_streams_from_a_url(server: FakeTgiServer) -> None:
    result = run("generate", "--url", server.url, "--max-tokens", "7", "--seed", "3", "--strict", "Hello there")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 0
    body = server.requests[-1].json
    assert body["parameters"]["max_new_tokens"] == 7 and body["parameters"]["do_sample"] is False
    assert body["parameters"]["seed"] == 3


def test_generate_json_with_the_url_from_the_environment(server: FakeTgiServer) -> None:
    result = run(
        "generate", "--json", "--route", "openai-chat", "--max-tokens", "3", "Hi", env={"TGI_ADAPTER_URL": server.url}
    )
    assert result.returncode == 0, result.stderr
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines()]
    assert kinds == ["started", "token", "token", "token", "metrics", "end"]
    assert server.requests[-1].path == "/v1/chat/completions"


@pytest.mark.parametrize("command", ["health", "info", "props", "metrics"])
def test_control_commands_text_and_json(server: FakeTgiServer, command: str) -> None:
    text = run(command, "--url", server.url)
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip()
    as_json = run(command, "--url", server.url, "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    expected = {"health": "ready", "info": "engine_version", "props": "slots_free", "metrics": "tgi_queue_size"}
    if command == "metrics":
        run("generate", "--url", server.url, "--max-tokens", "1", "x")  # metrics appear once recorded
        data = json.loads(run(command, "--url", server.url, "--json").stdout)
    assert expected[command] in data


def test_health_of_an_unready_engine_exits_1(server: FakeTgiServer) -> None:
    server.healthy = False
    result = run("health", "--url", server.url, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"live": True, "ready": False, "engine_version": "3.3.6+sha.8e5a2b7"}


def test_health_names_the_engine_version_that_answered() -> None:
    with FakeTgiServer(version="2.0.4") as server:
        text = run("health", "--url", server.url)
        as_json = run("health", "--url", server.url, "--json")
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert text.stdout.strip().startswith("live: yes, ready: yes, engine_version: 2.0.4")
    assert json.loads(as_json.stdout)["engine_version"].startswith("2.0.4")


def test_health_of_a_dead_engine_has_no_version() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run("health", "--url", f"http://127.0.0.1:{port}", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout) == {"live": False, "ready": False, "engine_version": None}


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # ``tgi-adapter generate --json … | head -1``: read one line, then close the pipe.
    with FakeTgiServer(pace_s=0.005) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_ADAPTER_")}
        proc = subprocess.Popen(
            CLI + ["generate", "--url", server.url, "--json", "--max-tokens", "400", "Hello"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline())
        proc.stdout.close()
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert server.wait_for_disconnect(timeout=10.0)  # the stream was cancelled, not run to its end
    assert first["kind"] == "started"
    assert "Traceback" not in stderr and stderr == ""
    assert code == 141


def test_usage_errors_exit_2() -> None:
    assert run("generate", "Hi").returncode == 2  # no URL anywhere
    assert run("demo", "--max-tokens", "0").returncode == 2
    assert run("no-such-command").returncode == 2


def test_engine_errors_are_one_line_and_debug_shows_the_traceback(server: FakeTgiServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    plain = run("info", "--url", url, "--timeout", "2")
    assert plain.returncode == 1
    assert plain.stderr.startswith("error: POOL_UNAVAILABLE") and len(plain.stderr.strip().splitlines()) == 1
    debug = run("--debug", "info", "--url", url, "--timeout", "2")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_verbose_logs_the_library_to_stderr(server: FakeTgiServer) -> None:
    result = run("--verbose", "generate", "--url", server.url, "--max-tokens", "2", "Hi")
    assert result.returncode == 0
    assert "tgi_adapter" in result.stderr and "DEBUG" in result.stderr


def read_until(proc: subprocess.Popen[str], marker: str) -> List[str]:
    assert proc.stdout is not None
    seen: List[str] = []
    while True:
        line = proc.stdout.readline()
        assert line, f"the process ended before printing {marker!r}: {seen}"
        seen.append(line)
        if marker in line:
            return seen


def test_ctrl_c_cancels_the_stream_and_exits_130() -> None:
    with FakeTgiServer(pace_s=0.01) as server:
        proc = subprocess.Popen(
            CLI + ["generate", "--url", server.url, "--max-tokens", "2000", "--json", "Hello"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            read_until(proc, '"kind": "token"')
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130
        assert "cancelled" in err
        assert server.wait_for_disconnect(timeout=5.0)
        assert server.disconnects[-1].tokens_sent < 2000


def test_fake_server_runs_standalone_until_interrupted() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        CLI + ["fake-server", "--port", str(port), "--tgi-version", "2.0.4", "--fault", "overloaded"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until(proc, f"127.0.0.1:{port}")
        info = run("info", "--url", f"http://127.0.0.1:{port}", "--json")
        assert json.loads(info.stdout)["version"] == "2.0.4"
        gen = run("generate", "--url", f"http://127.0.0.1:{port}", "--timeout", "5", "x")
        assert gen.returncode == 1 and "ADMISSION_REJECT" in gen.stderr
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


def test_fault_names_match_the_fake_engine() -> None:
    from tgi_adapter.cli import DEMO_FAULTS, _faults

    for name in DEMO_FAULTS:
        for fault in _faults(name):
            assert isinstance(fault, Fault)
