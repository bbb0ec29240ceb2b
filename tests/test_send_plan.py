"""SendPlan prepares what ``Session.request`` would send, without redoing the session merge per task."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from tgi_adapter.testing import FakeTgiServer
from tgi_adapter.transport import SendPlan, make_session

URL = "http://tgi.test:8080/generate_stream"
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer s3cret", "User-Agent": "tgi-adapter/t"}


def test_the_prepared_post_matches_what_session_request_prepares() -> None:
    session = make_session(4)
    plan = SendPlan(session, HEADERS, True, None)
    body = b'{"inputs":"Hi"}'
    request = plan.post(URL, body, {"X-Correlation-Id": "c-1"}, ())
    prepared, settings = request.prepared, request.settings
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
    first = plan.post(URL, b"{}", {"X-Correlation-Id": "a"}, ()).prepared
    second = plan.post(URL, b'{"x":1}', {"X-Correlation-Id": "b"}, ()).prepared
    assert first.headers["X-Correlation-Id"] == "a" and first.body == b"{}"
    assert first.headers["Content-Length"] == "2"
    assert second.headers["X-Correlation-Id"] == "b" and second.headers["Content-Length"] == "7"


def test_the_proxy_environment_is_read_once_per_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    plan = SendPlan(make_session(4), HEADERS, "ca.pem", None)
    settings = plan.post(URL, b"{}", {}, ()).settings
    assert settings["proxies"]["http"] == "http://proxy.test:3128"
    assert settings["verify"] == "ca.pem" and settings["stream"] is True
    monkeypatch.delenv("HTTP_PROXY")
    again = plan.post(URL, b"{}", {}, ()).settings
    assert again["proxies"]["http"] == "http://proxy.test:3128"  # kept for this adapter's life
    other = plan.post("http://tgi.test:8080/generate", b"{}", {}, ()).settings
    assert "http" not in other["proxies"]  # a URL not asked before reads the environment now


def test_the_direct_send_puts_on_the_wire_what_session_send_does() -> None:
    # The adapter's own session skips Session.send; the engine must not be able to tell.
    with FakeTgiServer() as server:
        session = make_session(4)
        plan = SendPlan(session, HEADERS, True, None)
        body = b'{"inputs":"Hi","parameters":{"max_new_tokens":2}}'
        head = plan.post(server.url + "/generate", body, {"X-Correlation-Id": "direct"}, ()).send(5.0, 5.0)
        assert head.status_code == 200 and json.loads(head.raw.read())["generated_text"]
        head.close()
        via_session = session.post(server.url + "/generate", data=body, headers={**HEADERS, "X-Correlation-Id": "s"})
        assert via_session.status_code == 200
        session.close()
    direct, reference = server.requests[-2:]
    assert (direct.method, direct.path, direct.body) == (reference.method, reference.path, reference.body)
    assert {k: v for k, v in direct.headers.items() if k != "x-correlation-id"} == {
        k: v for k, v in reference.headers.items() if k != "x-correlation-id"
    }


def test_a_mocked_transport_is_sent_through_as_it_is() -> None:
    # responses replaces HTTPAdapter.send: the direct path must step aside for it.
    with responses.RequestsMock() as mock:
        mock.post(URL, body=b"mocked")
        plan = SendPlan(make_session(4), HEADERS, True, None)
        head = plan.post(URL, b"{}", {}, ()).send(1.0, 1.0)
        assert head.status_code == 200 and head.raw.read() == b"mocked"
        head.close()
