"""An adapter over a requests.Session the user passes: its transport is used, and cancel still works."""

from __future__ import annotations

import time
from typing import Any, Callable, List

import requests
import requests.adapters

from tgi_adapter import TaskRequest, TgiHttpAdapter
from tgi_adapter.testing import FakeTgiServer, Fault

MakeTask = Callable[..., TaskRequest]


class CountingAdapter(requests.adapters.HTTPAdapter):
    """The user's transport: records each request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: List[str] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        self.sent.append(f"{request.method} {request.path_url}")
        return super().send(request, *args, **kwargs)


def user_session() -> tuple[requests.Session, CountingAdapter]:
    session = requests.Session()
    transport = CountingAdapter()
    session.mount("http://", transport)
    return session, transport


def test_streams_and_blocking_calls_go_through_the_users_session(make_task: MakeTask) -> None:
    session, transport = user_session()
    with FakeTgiServer() as server, TgiHttpAdapter(server.url, session=session) as adapter:
        text, end = adapter.submit(make_task(max_tokens=6)).collect()
        answer, _ = adapter.generate(make_task(max_tokens=6))
    assert end["tokens_out"] == 6 and text and answer
    assert "POST /generate_stream" in transport.sent and "POST /generate" in transport.sent
    session.close()


def test_cancel_shuts_the_users_socket_down_once_the_headers_came(make_task: MakeTask) -> None:
    session, _ = user_session()
    with FakeTgiServer() as server, TgiHttpAdapter(server.url, session=session) as adapter:
        server.inject(Fault("stall", at_token=1))
        task = make_task(max_tokens=50)
        stream = adapter.submit(task)
        assert [next(stream).kind, next(stream).kind] == ["started", "token"]
        t0 = time.monotonic()
        adapter.cancel(task.task_id)  # the reader is blocked in recv on the user's connection
        rest = [event.kind for event in stream]
        assert server.wait_for_disconnect(timeout=5.0)
        seen = server.disconnects[-1].t - t0
    assert rest == ["end"] and stream.cancelled
    assert seen < 0.5, f"the engine saw the disconnect after {seen:.3f}s"
    assert stream.join(timeout=2.0)
    session.close()
