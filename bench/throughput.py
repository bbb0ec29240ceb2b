"""Per-token cost of reading one long unpaced stream, for every client, in interleaved rounds."""

from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional, Sequence, Type

from clients import CLIENTS, Client, RawSocketClient, Verify, available
from report import Section, fmt, median
from server_proc import ImitationServer
from tgi_imitation import expected_text, response_size

RAW = "raw"
NAMES = {key: factory.name for key, factory in CLIENTS.items()}
NAMES[RAW] = RawSocketClient.name

# Targets (ratios to the minimal parse's median in the same run).
ADAPTER_MAX_RATIO = 0.80
PEER_MIN_SPEEDUP = {"text-generation": 1.7, "huggingface_hub": 7.0}
# The server check: the raw socket client must take at most this share of the fastest client's time.
SERVER_MAX_SHARE = 0.25


def run(
    server: ImitationServer,
    *,
    label: str,
    keys: Sequence[str],
    tokens: int,
    rounds: int,
    verify: Verify = True,
    log: Callable[[str], None] = print,
) -> Section:
    section = Section(
        f"Throughput over {label}: one {tokens:,}-token stream per client per round",
        ["client", "µs/token (median)", "min–max", "CPU µs/token", "tokens/s", "× minimal parse", "text check"],
    )
    expected = expected_text(tokens)
    wire_bytes = response_size(tokens)
    clients: Dict[str, Client] = {}
    status: Dict[str, str] = {}
    wall: Dict[str, List[float]] = {}
    cpu: Dict[str, List[float]] = {}
    factories: Dict[str, Type[Client]] = {**CLIENTS, RAW: RawSocketClient}
    try:
        for key in list(keys) + [RAW]:
            if not available(key):
                status[key] = "not installed"
                continue
            client = factories[key](server.url, verify)
            clients[key] = client
            if _checked_run(client, key, tokens, expected, wire_bytes, status):  # warm-up, not timed
                wall[key], cpu[key] = [], []
        order = [key for key in clients if key in wall]
        for r in range(rounds):
            shift = r % len(order)
            for key in order[shift:] + order[:shift]:
                if key not in wall:
                    continue  # failed in an earlier round
                gc.collect()
                t0, c0 = time.perf_counter(), time.process_time()
                ok = _checked_run(clients[key], key, tokens, expected, wire_bytes, status)
                t1, c1 = time.perf_counter(), time.process_time()
                if not ok:
                    del wall[key]
                    continue
                wall[key].append((t1 - t0) / tokens * 1e6)
                cpu[key].append((c1 - c0) / tokens * 1e6)
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {fmt(wall[k][-1])}" for k in order if k in wall))
    finally:
        for client in clients.values():
            client.close()

    base = median(wall["minimal"]) if "minimal" in wall else None
    for key in list(keys) + [RAW]:
        name = NAMES[key]
        if key not in wall:
            section.rows.append([name, "–", "–", "–", "–", "–", status.get(key, "–")])
            continue
        mid = median(wall[key])
        ratio = mid / base if base else None
        section.rows.append(
            [
                name,
                fmt(mid),
                f"{fmt(min(wall[key]))}–{fmt(max(wall[key]))}",
                fmt(median(cpu[key])),
                fmt(1e6 / mid, 0),
                fmt(ratio, 3),
                status[key],
            ]
        )
    for key, state in status.items():
        if state not in ("ok", "not installed"):
            section.failures.append(f"{NAMES[key]} over {label}: {state}")
    section.notes.append(
        f"Median of {rounds} interleaved rounds (order rotated each round) after one untimed warm-up run; "
        "wall time of reading the whole stream / tokens. CPU µs/token is this process's CPU time "
        "(all its threads) over the same run. Every run's joined text is compared with the expected text."
    )
    if RAW in wall:
        raw = median(wall[RAW])
        mb_s = wire_bytes / (raw * tokens / 1e6) / 1e6
        section.notes.append(
            f"Server check: the raw socket client receives the same {wire_bytes:,} bytes at {fmt(mb_s, 0)} MB/s "
            f"({fmt(raw, 3)} µs/token)."
        )
        parsing = [median(wall[k]) for k in wall if k != RAW]
        if parsing:
            fastest = min(parsing)
            section.check(
                f"server is not the bottleneck over {label}",
                raw <= SERVER_MAX_SHARE * fastest,
                f"raw {fmt(raw, 3)} µs/token ≤ {SERVER_MAX_SHARE}× the fastest client's {fmt(fastest)}",
            )
    _targets(section, wall, label)
    return section


def _targets(section: Section, wall: Dict[str, List[float]], label: str) -> None:
    if "minimal" not in wall or "adapter" not in wall:
        return
    base = median(wall["minimal"])
    adapter = median(wall["adapter"])
    section.check(
        f"tgi_adapter per-token cost ≤ {ADAPTER_MAX_RATIO}× the minimal parse over {label}",
        adapter <= ADAPTER_MAX_RATIO * base,
        f"{fmt(adapter / base, 3)}×: {fmt(adapter)} vs {fmt(base)} µs/token",
    )
    for key, speedup in PEER_MIN_SPEEDUP.items():
        if key in wall:
            peer = median(wall[key])
            section.check(
                f"tgi_adapter ≥ {speedup}× faster than {NAMES[key]} over {label}",
                peer >= speedup * adapter,
                f"{fmt(peer / adapter)}× ({fmt(peer)} vs {fmt(adapter)} µs/token)",
            )


def _checked_run(
    client: Client, key: str, tokens: int, expected: str, wire_bytes: int, status: Dict[str, str]
) -> bool:
    """One run; records "ok" or what went wrong in ``status[key]``."""
    try:
        text = client.run(tokens)
    except Exception as exc:
        status[key] = f"FAILED: {type(exc).__name__}: {str(exc)[:120]}"
        return False
    problem: Optional[str] = None
    if isinstance(client, RawSocketClient):
        if client.received != wire_bytes:
            problem = f"received {client.received:,} bytes, expected {wire_bytes:,}"
    elif text != expected:
        at = next((i for i, (a, b) in enumerate(zip(text, expected)) if a != b), min(len(text), len(expected)))
        problem = (
            f"text mismatch ({len(text):,} chars, expected {len(expected):,}; from char {at:,}: "
            f"{text[at : at + 20]!r} instead of {expected[at : at + 20]!r})"
        )
    if problem is not None:
        status[key] = "FAILED: " + problem
        return False
    status[key] = "ok"
    return True
