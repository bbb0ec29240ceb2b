"""Run the tgi_adapter benchmarks; write and print the results.

    python bench/run.py                      # everything (a few minutes)
    python bench/run.py --quick              # a short smoke run
    python bench/run.py --parts throughput,tls
    python bench/run.py --parts tracing      # tracing off vs on (needs tgi-adapter[otel], opentelemetry-sdk)

Results go to ``bench/results/<YYYY-MM-DD>-py<X.Y>.md`` (``-quick`` or
``-partial`` added for short or partial runs) and to standard output;
progress goes to standard error. The exit status is 1 when a client's text
(or another correctness) check failed or a part crashed; targets missed are
reported as FAIL lines and do not change it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import traceback
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Benchmark the working tree's tgi_adapter, even when another copy is installed.
sys.path.insert(1, REPO)

import concurrency  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import throughput  # noqa: E402
import tracing  # noqa: E402
from clients import CLIENTS  # noqa: E402
from report import Section, document, environment, load_average  # noqa: E402
from server_proc import ImitationServer  # noqa: E402

PARTS = ("throughput", "tls", "ttft", "cancel", "concurrency", "memory", "tracing")
FULL = {
    "tokens": 20000,
    "rounds": 5,
    "ttft_samples": 200,
    "cancel_samples": 100,
    "streams": "256,512",
    "paced": "10:500,50:100",
    "memory_streams": 200,
    "tracing_rounds": 15,
}
QUICK = {
    "tokens": 2000,
    "rounds": 2,
    "ttft_samples": 30,
    "cancel_samples": 20,
    "streams": "32,64",
    "paced": "10:100",
    "memory_streams": 50,
    "tracing_rounds": 3,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tls_files(directory: str) -> Optional[Tuple[str, str, str]]:
    """``(certificate chain, key, CA bundle)`` made now with trustme, or None without it."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key, bundle = (os.path.join(directory, name) for name in ("chain.pem", "key.pem", "ca.pem"))
    with open(chain, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    cert.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(bundle)
    return chain, key, bundle


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (fewer tokens, rounds and samples)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="throughput clients (peers are skipped if absent)")
    parser.add_argument("--tokens", type=int, help="tokens per throughput stream (20000; quick 2000)")
    parser.add_argument("--rounds", type=int, help="interleaved throughput rounds (5; quick 2)")
    parser.add_argument("--ttft-samples", type=int, help="time-to-first-token samples per client (200)")
    parser.add_argument("--cancel-samples", type=int, help="cancel samples per kind (100)")
    parser.add_argument("--streams", help="concurrent stream counts (256,512; quick 32,64)")
    parser.add_argument(
        "--paced",
        help="concurrent streams' PACE_MS:TOKENS, comma-separated (10:500,50:100, i.e. 5 s each; quick 10:100)",
    )
    parser.add_argument("--memory-streams", type=int, help="stalled streams for memory per stream (200)")
    parser.add_argument("--tracing-rounds", type=int, help="interleaved rounds of the tracing part (15; quick 3)")
    parser.add_argument("--output", help="results file (default bench/results/<date>-py<X.Y>[-quick|-partial].md)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if set(args.clients) - set(CLIENTS) or "minimal" not in args.clients:
        parser.error(f"--clients takes names from {', '.join(CLIENTS)} and must include minimal")
    args.streams = [int(n) for n in args.streams.split(",")]
    try:
        args.paced = [(float(p), int(t)) for p, t in (item.split(":") for item in args.paced.split(","))]
    except ValueError:
        parser.error("--paced takes PACE_MS:TOKENS pairs, e.g. 10:500,50:100")
    return args


def default_output(args: argparse.Namespace, started: datetime.datetime) -> str:
    suffix = "-quick" if args.quick else ""
    if set(args.parts) != set(PARTS):
        suffix += "-partial"
    name = f"{started:%Y-%m-%d}-py{sys.version_info[0]}.{sys.version_info[1]}{suffix}.md"
    return os.path.join(HERE, "results", name)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    command = " ".join(shlex.quote(a) for a in ["python", "bench/run.py"] + (sys.argv[1:] if argv is None else argv))
    sections: List[Section] = []

    def plain(label: str, run: Callable[[ImitationServer], Section], tokens: int = args.tokens) -> None:
        log(f"[{label}] starting the TGI imitation")
        with ImitationServer(tokens) as server:
            sections.append(run(server))

    def run_tls() -> None:
        with tempfile.TemporaryDirectory(prefix="tgi-bench-tls-") as directory:
            files = tls_files(directory)
            if files is None:
                sections.append(Section("Throughput over HTTPS", notes=["Skipped: trustme is not installed."]))
                return
            chain, key, bundle = files
            with ImitationServer(args.tokens, tls=(chain, key), cafile=bundle) as server:
                sections.append(
                    throughput.run(
                        server,
                        label="HTTPS (TLS)",
                        keys=["minimal", "adapter"],
                        tokens=args.tokens,
                        rounds=args.rounds,
                        verify=bundle,
                        log=log,
                    )
                )

    def run_concurrency() -> None:
        for pace_ms, tokens in args.paced:
            log(f"[concurrency, {tokens} tokens at {pace_ms:g} ms/token] starting the TGI imitation")
            with ImitationServer(tokens) as server:
                sections.append(
                    concurrency.run_concurrency(server, counts=args.streams, tokens=tokens, pace_ms=pace_ms, log=log)
                )

    steps: Dict[str, Callable[[], None]] = {
        "throughput": lambda: plain(
            "throughput",
            lambda s: throughput.run(
                s, label="plain HTTP", keys=args.clients, tokens=args.tokens, rounds=args.rounds, log=log
            ),
        ),
        "tls": run_tls,
        "ttft": lambda: plain("ttft", lambda s: latency.run_ttft(s, samples=args.ttft_samples)),
        "cancel": lambda: plain("cancel", lambda s: latency.run_cancel(s, samples=args.cancel_samples)),
        "concurrency": run_concurrency,
        "memory": lambda: plain("memory", lambda s: memory.run_memory(s, streams=args.memory_streams)),
        "tracing": lambda: plain(
            "tracing", lambda s: tracing.run(s, tokens=args.tokens, rounds=args.tracing_rounds, log=log)
        ),
    }
    for part in PARTS:
        if part not in args.parts:
            continue
        log(f"== {part} ==")
        try:
            steps[part]()
        except Exception:
            detail = traceback.format_exc()
            log(detail)
            failed = Section(f"{part}: crashed")
            failed.notes.append("```\n" + detail.rstrip() + "\n```")
            failed.failures.append(f"the {part} benchmark crashed")
            sections.append(failed)
    title = f"tgi_adapter benchmarks, {started:%Y-%m-%d}, Python {sys.version_info[0]}.{sys.version_info[1]}"
    text = document(title, environment(command, REPO, started, load_before), sections, REPO)
    output = args.output or default_output(args, started)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(output + ".tmp", output)
    print(text)
    log(f"results written to {os.path.relpath(output)}")
    return 1 if any(section.failures for section in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
