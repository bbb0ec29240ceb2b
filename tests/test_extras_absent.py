"""The core needs neither optional extra: without prometheus_client and opentelemetry it imports and works.

These run in every environment. Whether or not the extras happen to be
installed, each test hides them (``sys.modules[name] = None`` makes any
import of them fail), so what is checked is the core on its own.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tgi_adapter import AdapterConfig

CORE_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import sys

    for hidden in ("prometheus_client", "opentelemetry"):
        sys.modules[hidden] = None  # importing it (or a submodule) now raises ImportError

    from tgi_adapter import TaskRequest, TgiHttpAdapter, tracing
    from tgi_adapter.testing import FakeTgiServer

    task = TaskRequest(task_id="t", session_id="s", workload="completion", model_ref="m", engine="tgi",
                       ctx=2048, priority="interactive", max_tokens=5, deadline_ms=10_000, prompt="Hi")
    with FakeTgiServer() as engine, TgiHttpAdapter(engine.url) as adapter:  # tracing=True by default
        text, end = adapter.submit(task).collect()
        text2, end2 = adapter.generate(task)
        headers = [r.headers for r in engine.requests if r.path.startswith("/generate")]
    assert end["tokens_out"] == end2["tokens_out"] == 5 and text == text2, (end, end2)
    assert len(headers) == 2 and not any("traceparent" in h for h in headers), headers
    assert tracing.available() is False
    loaded = sorted(name for name, module in sys.modules.items() if module is not None and name.startswith(
        ("opentelemetry", "prometheus_client")))
    assert loaded == [], loaded
    try:
        import tgi_adapter.prometheus  # noqa: F401
    except ImportError as exc:
        print("ImportError:", exc)
    else:
        raise AssertionError("tgi_adapter.prometheus imported without prometheus_client")
    print("core ok")
    """
)


def test_the_core_imports_and_works_with_neither_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CORE_WITHOUT_EXTRAS], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ImportError: tgi_adapter.prometheus needs prometheus_client: pip install tgi-adapter[prometheus]",
        "core ok",
    ]


def test_importing_the_prometheus_module_without_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == "tgi_adapter.prometheus" or name.split(".")[0] == "prometheus_client":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install tgi-adapter\[prometheus\]") as raised:
        import tgi_adapter.prometheus  # noqa: F401
    assert raised.value.name == "prometheus_client"
    assert "tgi_adapter.prometheus" not in sys.modules


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_tracing_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(ValueError, match="AdapterConfig.tracing"):
        AdapterConfig(tracing=value)


def test_tracing_is_on_by_default_and_can_be_turned_off() -> None:
    assert AdapterConfig().tracing is True
    assert AdapterConfig(tracing=False).tracing is False
