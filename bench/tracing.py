"""What OpenTelemetry tracing costs per token and per task: tracing off vs on, in interleaved rounds.

Three tgi_adapter clients read the same streams from the TGI imitation:

- tracing off: ``AdapterConfig(tracing=False)``, no span, no ``traceparent``;
- tracing on, API only: ``opentelemetry-api`` importable but no SDK configured
  (the global no-op provider), what an application gets when the API comes
  in as someone else's dependency;
- tracing on, SDK: an SDK ``TracerProvider`` with an in-memory exporter
  behind a ``SimpleSpanProcessor``, so each span is exported synchronously
  in the thread that ends it (the dearest processor there is).

Long streams show the per-token cost (the per-token path is the same with
tracing on: span work happens at submit, at retries and at the end); a
round of short streams shows the per-task cost. Every run's text is checked,
and the SDK client must have exported exactly one span per task.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from clients import make_task
from report import Section, fmt, median
from server_proc import ImitationServer
from tgi_imitation import expected_text

from tgi_adapter import AdapterConfig, TgiHttpAdapter

# Tracing on may cost at most a few percent more per token than tracing off (long streams):
# the per-token path is the same either way, so what shows is the per-task cost spread over the stream, and noise.
MAX_RATIO = 1.05

OFF, API, SDK = "off", "api", "sdk"
NAMES = {
    OFF: "tracing off",
    API: "tracing on, API only (no SDK configured)",
    SDK: "tracing on, SDK + in-memory exporter",
}


class _TracedClient:
    """``submit(task).collect()`` on one adapter; counts the tasks it ran."""

    def __init__(self, url: str, tracing: bool, provider: Any = None) -> None:
        self.adapter = TgiHttpAdapter(url, config=AdapterConfig(tracing=tracing), tracer_provider=provider)
        self.tasks = 0

    def run(self, n: int) -> str:
        text, end = self.adapter.submit(make_task(n)).collect()
        if end.get("tokens_out") != n:
            raise AssertionError(f"unexpected end data {end!r}")
        self.tasks += 1
        return text

    def close(self) -> None:
        self.adapter.close()


def _sdk() -> Optional[Tuple[Any, Any]]:
    """``(provider, exporter)``, or None without opentelemetry-sdk."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def run(
    server: ImitationServer,
    *,
    tokens: int,
    rounds: int,
    short_tokens: int = 100,
    short_tasks: int = 100,
    log: Callable[[str], None] = print,
) -> Section:
    section = Section(
        f"Tracing: one {tokens:,}-token stream, then {short_tasks} streams of {short_tokens} tokens, "
        "per client per round",
        ["client", "µs/token (median)", "min–max", "CPU µs/token", "× tracing off", "µs/task, short streams",
         "Δ µs/task", "check"],
    )
    sdk = _sdk()
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        section.notes.append("Skipped: opentelemetry-api is not installed (pip install tgi-adapter[otel]).")
        return section
    clients: Dict[str, _TracedClient] = {OFF: _TracedClient(server.url, False), API: _TracedClient(server.url, True)}
    if sdk is not None:
        clients[SDK] = _TracedClient(server.url, True, sdk[0])
    else:
        section.notes.append("The SDK client is left out: opentelemetry-sdk is not installed.")
    status = {key: "ok" for key in clients}
    wall: Dict[str, List[float]] = {key: [] for key in clients}
    cpu: Dict[str, List[float]] = {key: [] for key in clients}
    per_task: Dict[str, List[float]] = {key: [] for key in clients}
    long_text, short_text = expected_text(tokens), expected_text(short_tokens)
    try:
        for key, client in clients.items():  # warm-up, not timed: /info, connections, imports
            _check(client.run(tokens), long_text, key, status)
            _check(client.run(short_tokens), short_text, key, status)
        order = list(clients)
        for r in range(rounds):
            shift = r % len(order)
            for key in order[shift:] + order[:shift]:
                client = clients[key]
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                text = client.run(tokens)
                t1, c1 = time.perf_counter(), time.process_time()
                _check(text, long_text, key, status)
                wall[key].append((t1 - t0) / tokens * 1e6)
                cpu[key].append((c1 - c0) / tokens * 1e6)
                gc.collect()
                t0 = time.perf_counter()
                for _ in range(short_tasks):
                    _check(client.run(short_tokens), short_text, key, status)
                per_task[key].append((time.perf_counter() - t0) / short_tasks * 1e6)
                if key == SDK and sdk is not None:
                    exported = len(sdk[1].get_finished_spans())
                    if exported != client.tasks:
                        status[key] = f"FAILED: {exported} spans exported for {client.tasks} tasks"
                    sdk[1].clear()
                    client.tasks = 0
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {fmt(wall[k][-1])}" for k in order))
    finally:
        for client in clients.values():
            client.close()
        if sdk is not None:
            sdk[0].shutdown()

    base = median(wall[OFF])
    base_task = median(per_task[OFF])
    for key in clients:
        mid = median(wall[key])
        task = median(per_task[key])
        section.rows.append(
            [
                NAMES[key],
                fmt(mid, 3),
                f"{fmt(min(wall[key]), 3)}–{fmt(max(wall[key]), 3)}",
                fmt(median(cpu[key]), 3),
                fmt(mid / base, 3),
                fmt(task, 0),
                "–" if key == OFF else f"{task - base_task:+,.0f}",
                status[key],
            ]
        )
        if status[key] != "ok":
            section.failures.append(f"{NAMES[key]}: {status[key]}")
    section.notes.append(
        f"Median of {rounds} interleaved rounds (order rotated each round) after an untimed warm-up. µs/token: wall "
        f"time of reading one {tokens:,}-token stream / tokens; CPU µs/token: this process's CPU time over the same "
        f"run. µs/task: wall time of {short_tasks} sequential {short_tokens}-token streams / streams, i.e. "
        "submit to end data, span included. Δ µs/task is against tracing off."
    )
    for key in (API, SDK):
        if key in clients:
            ratio = median(wall[key]) / base
            section.check(
                f"{NAMES[key]}: per-token cost ≤ {MAX_RATIO}× tracing off",
                ratio <= MAX_RATIO,
                f"{fmt(ratio, 3)}×: {fmt(median(wall[key]), 3)} vs {fmt(base, 3)} µs/token",
            )
    return section


def _check(text: str, expected: str, key: str, status: Dict[str, str]) -> None:
    if text != expected and status[key] == "ok":
        status[key] = f"FAILED: text mismatch ({len(text):,} chars, expected {len(expected):,})"
