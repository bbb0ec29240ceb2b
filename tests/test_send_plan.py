"""SendPlan prepares what ``Session.request`` would send, without redoing the session merge per task."""

from __future__ import annotations

import pytest
import requests

from tgi_adapter.transport import SendPlan, make_session

URL = "http://tgi.test:8080/generate_stream"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer s3cret", "User-Agent": "tgi-adapter/t"}


def test_the_prepared_post_matches_what_session_request_prepares() -> None:
    session = make_session(4)
    plan = SendPlan(session, HEADERS, True, None)
    body = b'{"inputs":"Hi"}'
    prepared, settings = plan.post(URL, body, {"X-Correlation-Id": "c-1"})
    reference = session.prepare_request(
        requests.Request("POST", URL, data=body, headers={**HEADERS, "X-Correlation-Id": "c-1"})
    )
    assert prepared.method == reference.method == "POST"
    assert prepared.url == reference.url
    assert prepared.body == reference.body == body
    assert dict(prepared.headers) == dict(reference.headers)
    assert settings == session.merge_environment_settings(URL, {}, True, True, None)


def test_each_task_gets_its_own_copy() -> None:
    plan = SendPlan(make_session(4), HEADERS, True, None)
    first, _ = plan.post(URL, b"{}", {"X-Correlation-Id": "a"})
    second, _ = plan.post(URL, b'{"x":1}', {"X-Correlation-Id": "b"})
    assert first.headers["X-Correlation-Id"] == "a" and first.body == b"{}"
    assert first.headers["Content-Length"] == "2"
    assert second.headers["X-Correlation-Id"] == "b" and second.headers["Content-Length"] == "7"


def test_the_proxy_environment_is_read_once_per_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    plan = SendPlan(make_session(4), HEADERS, "ca.pem", None)
    _, settings = plan.post(URL, b"{}", {})
    assert settings["proxies"]["http"] == "http://proxy.test:3128"
    assert settings["verify"] == "ca.pem" and settings["stream"] is True
    monkeypatch.delenv("HTTP_PROXY")
    _, again = plan.post(URL, b"{}", {})
    assert again["proxies"]["http"] == "http://proxy.test:3128"  # kept for this adapter's life
    _, other = plan.post("http://tgi.test:8080/generate", b"{}", {})
    assert "http" not in other["proxies"]  # a URL not asked before reads the environment now
