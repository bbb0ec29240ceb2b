"""Many paced streams released together, side by side: the raw reader, tgi_adapter with a thread per stream,
tgi_adapter with one StreamSet thread, and the minimal parse; the table and the targets.

Each client runs in a process of its own (``burst.py``, see there for the sequence); this module starts them
one after another against the same imitation and turns what they report into a section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from report import Section, fmt, median
from server_proc import ImitationServer

HERE = os.path.dirname(os.path.abspath(__file__))
BURST = os.path.join(HERE, "burst.py")

#: Targets: tgi_adapter's share of ideal, relative to the raw reader's in the same run; the library's threads.
MIN_SHARE_OF_RAW = 0.85
MAX_LIBRARY_THREADS = 16
#: Below this share the raw reader says the imitation or the machine, not the clients, is the limit.
RAW_MIN_SHARE = 0.95
ORDER = ("raw", "adapter", "streamset", "minimal")
ADAPTER_KEYS = ("adapter", "streamset")


@dataclass
class Row:
    """One client's run, summarised; ``result`` is what ``burst.py`` printed (empty if it failed)."""

    key: str
    result: Dict[str, Any]
    failed: str = ""
    stderr: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return str(self.result.get("label", self.key))

    def values(self, name: str) -> List[float]:
        return [t for t in self.result.get(name, []) if t is not None]

    @property
    def completed(self) -> int:
        return len(self.values("end_s"))

    @property
    def wall_s(self) -> Optional[float]:
        ends = self.values("end_s")
        return max(ends) if ends else None

    def share(self, ideal_s: float) -> Optional[float]:
        """ideal time / time until the last stream ended, scaled by the share of streams that ended."""
        wall = self.wall_s
        if not wall:
            return None
        return ideal_s / wall * self.completed / int(self.result["streams"])

    def peak(self, probe: str) -> int:
        """The peak while the streams were open: warm-up (connections held) and burst."""
        peaks = self.result.get("peaks", {})
        return max(int(peaks.get(phase, {}).get(probe, 0)) for phase in ("warm", "burst"))

    @property
    def problems(self) -> List[str]:
        return ([self.failed] if self.failed else []) + list(self.result.get("problems", []))

    @property
    def leaks(self) -> List[str]:
        return list(self.result.get("leaks", []))

    @property
    def back_s(self) -> Optional[float]:
        """Seconds from close() until threads, fds and the server's connections were all back; None if not."""
        seconds = self.result.get("after", {}).get("seconds", {})
        if not seconds or any(s is None for s in seconds.values()):
            return None
        return float(max(seconds.values())) + float(self.result["close_s"])


def _run(server: ImitationServer, key: str, n: int, tokens: int, pace_ms: float) -> Row:
    cmd = [sys.executable, BURST, key, "--port", str(server.port), "--streams", str(n)]
    cmd += ["--tokens", str(tokens), "--pace-ms", f"{pace_ms:g}"]
    timeout = 3 * tokens * pace_ms / 1000.0 + 240
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row(key, {}, failed=f"the measuring process did not finish within {timeout:.0f} s")
    stderr = [line for line in proc.stderr.splitlines() if line.strip()]
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return Row(key, {}, f"the measuring process exited with {proc.returncode}: " + " | ".join(stderr[-6:]), stderr)
    return Row(key, json.loads(lines[-1]), stderr=stderr)


def _ms(values: List[float]) -> str:
    if not values:
        return "–"
    return f"{fmt(1000 * median(values), 0)} / {fmt(1000 * max(values), 0)}"


def _after(row: Row) -> str:
    after = row.result.get("after")
    if not after:
        return "–"
    values = after["values"]
    back = row.back_s
    when = f"in {fmt(back, 3)} s" if back is not None else "NOT back"
    return f"{values['threads']}, {values['fds']} {when}"


def _table_row(row: Row, n: int, tokens: int, ideal_s: float, raw_share: Optional[float]) -> List[str]:
    result = row.result
    if not result:
        return [str(n), row.key] + ["failed"] + ["–"] * 10
    share = row.share(ideal_s)
    total = row.completed * tokens
    wall = row.wall_s
    user, system = result["cpu_user_s"], result["cpu_sys_s"]

    def per_token(seconds: float) -> str:
        return fmt(seconds / total * 1e6, 1) if total else "–"

    base = result["base"]
    peaks = result["peaks"]
    held, burst = ((peaks.get(phase, {}).get("rss_kib", 0) - result["rss_base_kib"]) / n for phase in ("warm", "burst"))
    library = row.peak("library_threads") if row.key in ADAPTER_KEYS else None
    return [
        str(n),
        row.label,
        fmt(total / wall, 0) if wall else "–",
        fmt(100 * share, 1) if share is not None else "–",
        fmt(100 * share / raw_share, 1) if share is not None and raw_share else "–",
        f"{per_token(user + system)} ({per_token(user)}+{per_token(system)})",
        _ms(row.values("first_s")),
        str(library) if library is not None else "–",
        f"{row.peak('threads')} ({base['threads']})",
        f"{row.peak('fds')} ({base['fds']})",
        f"{fmt(held, 1)} / {fmt(burst, 1)}",
        _after(row),
    ]


def _note(row: Row, n: int, ideal_s: float) -> str:
    result = row.result
    if not result:
        return f"{n} streams, {row.key}: {row.failed}."
    server = result["server"]
    ends = row.values("end_s")
    warm = result["peaks"].get("warm", {})
    burst = result["peaks"].get("burst", {})
    parts = [
        f"{n} streams, {row.label}: {row.completed}/{n} ended; last end {fmt(row.wall_s, 3)} s vs ideal "
        f"{fmt(ideal_s, 3)} s (stream end p50 {fmt(median(ends), 3)} s); {result['consumer_threads']} consumer "
        f"thread(s); opening the {n} connections first took {fmt(result['warm_s'], 3)} s",
        f"peak library threads warm-up/burst {warm.get('library_threads', 0)}/{burst.get('library_threads', 0)}",
        f"RSS baseline {fmt(result['rss_base_kib'] / 1024, 1)} MiB",
        f"close() took {fmt(1000 * result['close_s'], 1)} ms",
        f"server: {int(server.get('peak_active_scheduled', 0))} streams paced at once, "
        f"{int(server.get('late_over_5ms', 0))} of {int(server.get('writes_paced', 0))} writes > 5 ms late "
        f"(mean {fmt(server.get('late_mean_ms'))} ms, max {fmt(server.get('late_max_ms'), 1)} ms)",
    ]
    if row.leaks:
        parts.append("LEAKS: " + "; ".join(row.leaks))
    if row.stderr:
        parts.append(f"{len(row.stderr)} line(s) on stderr, first: `{row.stderr[0][:200]}`")
    return "; ".join(parts) + "."


def run_concurrency(
    server: ImitationServer,
    *,
    counts: List[int],
    tokens: int,
    pace_ms: float,
    log: Callable[[str], None] = print,
) -> Section:
    section = Section(
        f"Concurrency: paced streams ({tokens} tokens at {pace_ms:g} ms/token) released together",
        [
            "streams",
            "client",
            "tokens/s",
            "% of ideal",
            "% of raw",
            "CPU µs/token (user+sys)",
            "first token p50 / max ms",
            "library threads peak",
            "threads peak (base)",
            "fds peak (base)",
            "RSS KiB per open stream: held / burst",
            "threads, fds after close",
        ],
    )
    ideal_s = tokens * pace_ms / 1000.0
    where = f"{{n}} streams × {tokens} tokens × {pace_ms:g} ms"
    for n in counts:
        rows = {}
        for key in ORDER:
            row = rows[key] = _run(server, key, n, tokens, pace_ms)
            share = row.share(ideal_s)
            log(f"  {n} streams, {row.label}: " + (row.failed or f"{fmt(100 * share, 1) if share else '–'}% of ideal"))
        raw_share = rows["raw"].share(ideal_s)
        for row in rows.values():
            section.rows.append(_table_row(row, n, tokens, ideal_s, raw_share))
            section.notes.append(_note(row, n, ideal_s))
            section.failures += [f"concurrency {n}, {row.label}: {p}" for p in row.problems[:3]]
        at = where.format(n=n)
        section.check(
            f"{at}: the raw reader reaches ≥ {RAW_MIN_SHARE:.0%} of ideal (the imitation and the machine are not "
            "the limit)",
            raw_share is not None and raw_share >= RAW_MIN_SHARE,
            f"{fmt(100 * raw_share, 1) if raw_share else '–'}% of ideal; "
            f"{int(rows['raw'].result.get('server', {}).get('late_over_5ms', 0))} server writes > 5 ms late",
        )
        for key, model in (("adapter", "one consumer thread per stream"), ("streamset", "one StreamSet thread")):
            row = rows[key]
            share = row.share(ideal_s)
            ratio = share / raw_share if share is not None and raw_share else None
            section.check(
                f"{at}, tgi_adapter with {model}: ≥ {MIN_SHARE_OF_RAW:.0%} of the raw reader's share of ideal",
                ratio is not None and ratio >= MIN_SHARE_OF_RAW and not row.problems,
                f"{fmt(100 * ratio, 1) if ratio else '–'}% of raw ({fmt(100 * share, 1) if share else '–'}% vs "
                f"{fmt(100 * raw_share, 1) if raw_share else '–'}% of ideal), {row.completed}/{n} streams ended"
                + (", texts checked" if not row.problems else f", {len(row.problems)} problem(s)"),
            )
        peaks = {key: rows[key].peak("library_threads") for key in ADAPTER_KEYS}
        section.check(
            f"{at}: tgi_adapter runs ≤ {MAX_LIBRARY_THREADS} threads with {n} streams open",
            all(rows[key].result for key in ADAPTER_KEYS) and max(peaks.values()) <= MAX_LIBRARY_THREADS,
            ", ".join(f"{rows[key].label}: {peaks[key]}" for key in ADAPTER_KEYS),
        )
        section.check(
            f"{at}: tgi_adapter's threads, fds and connections back to baseline after close()",
            all(rows[key].result and rows[key].back_s is not None and not rows[key].leaks for key in ADAPTER_KEYS),
            "; ".join(
                f"{rows[key].label}: "
                + (f"in {fmt(rows[key].back_s, 3)} s" if rows[key].back_s is not None else "not back")
                + (f" ({'; '.join(rows[key].leaks)})" if rows[key].leaks else "")
                for key in ADAPTER_KEYS
            ),
        )
    section.notes.append(
        "Each client runs in a fresh process of its own (`bench/burst.py`), one after another in the order of the "
        "table, against one imitation. It reads one short stream first (imports, /info, starting the shared "
        "threads), then opens the <streams> connections (streams the imitation holds until all are in), so the "
        "run measures the steady state, not connection set-up. Consumer threads are started and released together "
        "by a barrier; a thread-per-stream consumer submits one stream and reads it to its end; the StreamSet "
        "consumer submits every stream itself, adds each to one `StreamSet` and iterates the set until all ended; "
        "every stream's joined text is checked (the raw reader does not parse). tgi_adapter: one adapter with "
        "`AdapterConfig(pool_maxsize=<streams>)`; minimal parse: one `requests.Session` with `HTTPAdapter("
        "pool_maxsize=<streams>)`; raw reader: one selector thread sends every request and discards the bytes."
    )
    section.notes.append(
        "% of ideal = ideal time (tokens × pace) / time from the release until the last stream ended (× the share "
        "of streams that ended), so a slow start counts; % of raw = that share / the raw reader's in the same run; "
        "tokens/s = tokens of the ended streams / that time. CPU: the measuring process's user and system time "
        "from release to the last end / tokens. First token: from the release to each stream's first token. "
        "Library threads: threads named `tgi-adapter-…` or `tgi-stream-…`; threads, fds and RSS: sampled every "
        "20 ms while the connections were open (warm-up and burst); the base counts the main and sampler threads. "
        "RSS per open stream = (peak VmRSS − VmRSS after the first short stream) / streams: \"held\" while the "
        "imitation holds every stream's body (warm-up: connections, streams, consumers), \"burst\" while they run "
        "(also what is in flight and the consumer's list of each stream's token strings); both include the "
        "consumer threads' stacks where there is one per stream. Threads, fds after close: the process's, polled "
        "(at most 10 s) until they, the library's threads and the server's open connections were back at their "
        "baselines; the time counts from the call to close()."
    )
    return section
