"""The ``tgi-adapter`` command: a demo on the embedded fake engine, and tools for a real TGI.

Exit codes: 0 ok; 1 the engine or the adapter reported an error (one line on
stderr names the code and what to do); 2 usage; 130 interrupted (Ctrl-C
cancels the stream first, so the engine frees the slot); 141 the reader of
the output went away (``… | head -1``): the stream is cancelled and the
command ends quietly, as a tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO
from urllib.parse import urlsplit

from .__about__ import __version__
from .adapter import TgiHttpAdapter
from .config import ROUTES, AdapterConfig
from .contract import TaskRequest, TokenEvent
from .errors import WorkerError
from .mapping import parse_prometheus
from .probes import verify_determinism
from .retry import RetryPolicy, Timeouts

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141

#: ``--fault`` names of ``demo`` and ``fake-server``, and what each shows.
DEMO_FAULTS: Dict[str, str] = {
    "overloaded": "the engine answers 429 to every try: ADMISSION_REJECT after the retries",
    "unready": "the engine answers 503: POOL_UNREADY after the retries",
    "validation": "an in-stream validation error before any token: INVALID_PARAMS",
    "generation": "the engine fails after 3 tokens: INTERNAL, ending the stream",
    "oom": "CUDA out of memory from the engine: POOL_UNAVAILABLE, not retriable",
    "stall": "the engine goes silent after 5 tokens: DECODE_TIMEOUT after Timeouts.token_idle",
    "reset": "the connection is reset after 5 tokens: WORKER_RESET",
    "truncate": "the body ends after 5 tokens without the final frame: WORKER_RESET",
    "malformed": "a frame that is not JSON after 3 tokens: INTERNAL",
    "diverge": "from token 5 on, every generation says something other than a fault-free engine would "
    "(fake-server only: `tgi-adapter verify` shows where)",
    "refused": "nothing listens at the URL: POOL_UNAVAILABLE after the retries",
}


def _faults(name: Optional[str]) -> List[Any]:
    from .testing import Fault

    many = 100
    table: Dict[str, List[Any]] = {
        "overloaded": [Fault("status", status=429, times=many)],
        "unready": [Fault("status", status=503, times=many)],
        "validation": [
            Fault("error_frame", at_token=0, error_type="validation",
                  message="Input validation error: `top_k` must be strictly positive", times=many)
        ],
        "generation": [Fault("error_frame", at_token=3, error_type="generation", times=many)],
        "oom": [
            Fault("error_frame", at_token=0, error_type="generation",
                  message="Request failed during generation: Server error: CUDA out of memory.", times=many)
        ],
        "stall": [Fault("stall", at_token=5, times=many)],
        "reset": [Fault("reset", at_token=5, times=many)],
        "truncate": [Fault("truncate", at_token=5, times=many)],
        "malformed": [Fault("malformed", at_token=3, times=many)],
        # A replica on another model revision stays different: the fault must not wear off.
        "diverge": [Fault("diverge", at_token=5, times=1 << 30)],
        "refused": [],
    }
    return table[name] if name else []


# -- output helpers ----------------------------------------------------------------------


def _error_line(error: WorkerError) -> str:
    retry = "retriable" if error.retriable else "not retriable"
    after = f", retry after {error.retry_after_ms} ms" if error.retry_after_ms is not None else ""
    return f"error: {error.code.value} ({retry}{after}): {error.full_message}"


def _event_error(data: Dict[str, Any]) -> WorkerError:
    return WorkerError.from_event_data(data)


class _Printer:
    """Prints a stream as text (tokens as they arrive) or as JSON lines."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.t0 = time.monotonic()
        self.t_first: Optional[float] = None
        self.tokens = 0
        self.end: Optional[Dict[str, Any]] = None
        self.error: Optional[Dict[str, Any]] = None
        self.engine_version: Optional[str] = None

    def event(self, event: TokenEvent) -> None:
        if self.as_json:
            self.out.write(json.dumps(event.to_dict()) + "\n")
            self.out.flush()
        kind = event.kind
        if kind == "started":
            self.engine_version = event.data.get("engine_version")
        elif kind == "token":
            if self.t_first is None:
                self.t_first = time.monotonic()
            self.tokens += 1
            if not self.as_json:
                self.out.write(event.data["t"])
                self.out.flush()
        elif kind == "end":
            self.end = event.data
        elif kind == "error":
            self.error = event.data

    def summary(self) -> str:
        elapsed = time.monotonic() - self.t0
        first_ms = (self.t_first - self.t0) * 1000 if self.t_first is not None else float("nan")
        decode_s = elapsed - (self.t_first - self.t0) if self.t_first is not None else 0.0
        rate = (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else float("nan")
        reason = (self.end or {}).get("finish_reason", "-")
        return (
            f"tokens {self.tokens} | first token {first_ms:.1f} ms | {rate:.1f} tokens/s | "
            f"finish {reason} | engine {self.engine_version or 'unknown'}"
        )


def _task(args: argparse.Namespace, prompt: str) -> TaskRequest:
    return TaskRequest(
        task_id=f"cli-{uuid.uuid4().hex[:12]}",
        session_id="cli",
        workload="completion",
        model_ref="tgi:default",
        engine="tgi",
        ctx=max(args.max_tokens + 1, 2048),
        priority="interactive",
        max_tokens=args.max_tokens,
        deadline_ms=int(args.timeout * 1000),
        prompt=prompt,
        seed=args.seed,
        determinism="strict" if getattr(args, "strict", False) else "best_effort",
    )


def _stream(adapter: TgiHttpAdapter, task: TaskRequest, printer: _Printer, out: TextIO) -> int:
    with adapter.submit(task) as stream:  # leaving early (Ctrl-C, a closed pipe) cancels it
        try:
            for event in stream:
                printer.event(event)
        except KeyboardInterrupt:
            stream.close()
            if not printer.as_json:
                out.write("\n")
            sys.stderr.write("interrupted: the stream was cancelled\n")
            return EXIT_INTERRUPTED
    if not printer.as_json:
        out.write("\n")
    if printer.error is not None:
        sys.stderr.write(_error_line(_event_error(printer.error)) + "\n")
        return EXIT_ERROR
    return EXIT_OK


# -- subcommands ---------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from .testing import FakeTgiServer

    out = sys.stdout
    faults = _faults(args.fault)
    server = FakeTgiServer(version=args.tgi_version, pace_s=args.pace_ms / 1000.0, faults=faults)
    with server:
        url = "http://127.0.0.1:9" if args.fault == "refused" else server.url
        timeouts = Timeouts(connect=2.0, token_idle=1.0 if args.fault == "stall" else 30.0)
        config = AdapterConfig(timeouts=timeouts, retry=RetryPolicy(attempts=3))
        if not args.json:
            out.write(f"fake TGI {args.tgi_version} at {server.url}; prompt: {args.prompt!r}\n")
            if args.fault:
                out.write(f"fault {args.fault}: {DEMO_FAULTS[args.fault]}\n")
            out.flush()
        with TgiHttpAdapter(url, config=config) as adapter:
            printer = _Printer(out, args.json)
            code = _stream(adapter, _task(args, args.prompt), printer, out)
        if not args.json and code != EXIT_INTERRUPTED:
            out.write(printer.summary() + "\n")
    return code


def _adapter(args: argparse.Namespace) -> TgiHttpAdapter:
    url = args.url or os.environ.get("TGI_ADAPTER_URL")
    if not url:
        raise _UsageError("no engine URL: pass --url or set TGI_ADAPTER_URL")
    timeouts = Timeouts(control=min(args.timeout, 600.0), first_token=args.timeout)
    config = AdapterConfig(
        route=getattr(args, "route", "native"), verify=_tls_verify(args.verify), timeouts=timeouts,
        record=args.record,
    )
    token = args.token or os.environ.get("TGI_ADAPTER_TOKEN") or None
    return TgiHttpAdapter(url, token=token, config=config)


def _tls_verify(option: Optional[str]) -> Any:
    """``--verify``: True by default, False for 'false'/'no'/'0', else a CA bundle path."""
    if option is None:
        return True
    return False if option.lower() in ("false", "no", "0") else option


def _cmd_generate(args: argparse.Namespace) -> int:
    with _adapter(args) as adapter:
        return _stream(adapter, _task(args, args.prompt), _Printer(sys.stdout, args.json), sys.stdout)


def _cmd_health(args: argparse.Namespace) -> int:
    version: Optional[str] = None
    with _adapter(args) as adapter:
        health = adapter.health()
        if health.live:
            try:
                version = adapter.engine_version()
            except WorkerError as error:  # an engine without /info is still worth reporting on
                logging.getLogger(__name__).debug("no engine version: %s", error.message)
    if args.json:
        print(json.dumps({"live": health.live, "ready": health.ready, "engine_version": version}))
    else:
        print(
            f"live: {'yes' if health.live else 'no'}, ready: {'yes' if health.ready else 'no'}, "
            f"engine_version: {version or 'unknown'}"
        )
    return EXIT_OK if health.ready else EXIT_ERROR


def _cmd_info(args: argparse.Namespace) -> int:
    with _adapter(args) as adapter:
        info = adapter.engine_info()
    data = {k: v for k, v in vars(info).items() if k != "extra"}
    data.update(info.extra)
    data["engine_version"] = info.engine_version
    return _print_fields(data, as_json=args.json)


def _cmd_props(args: argparse.Namespace) -> int:
    with _adapter(args) as adapter:
        props = adapter.props()
    return _print_fields(dict(vars(props)), as_json=args.json)


def _print_fields(data: Dict[str, Any], *, as_json: bool) -> int:
    """One JSON object, or one ``key: value`` line per field, sorted by key."""
    if as_json:
        print(json.dumps(data, sort_keys=True))
    else:
        for key in sorted(data):
            print(f"{key}: {data[key]}")
    return EXIT_OK


def _cmd_metrics(args: argparse.Namespace) -> int:
    with _adapter(args) as adapter:
        text = adapter.metrics_text()
    if args.json:
        print(json.dumps(parse_prometheus(text), sort_keys=True))
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _cmd_fake_server(args: argparse.Namespace) -> int:
    from .testing import FakeTgiServer

    server = FakeTgiServer(
        version=args.tgi_version,
        port=args.port,
        host=args.host,
        pace_s=args.pace_ms / 1000.0,
        api_key=args.api_key,
        faults=_faults(args.fault),
        batch_sensitive=args.batch_sensitive,
        replay=args.replay,
        speed=args.speed,
    )
    stop = threading.Event()
    with server:
        traits = f", fault {args.fault}" if args.fault else ""
        traits += ", batch-sensitive" if args.batch_sensitive else ""
        what = f" replaying {args.replay} at speed {args.speed:g}," if args.replay else ""
        print(f"fake TGI {args.tgi_version}{what} listening at {server.url}{traits} (Ctrl-C to stop)", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    urls = args.url or ([os.environ["TGI_ADAPTER_URL"]] if os.environ.get("TGI_ADAPTER_URL") else [])
    if not urls:
        raise _UsageError("no engine URL: pass --url (once per replica) or set TGI_ADAPTER_URL")
    names = [_replica_name(url) for url in urls]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise _UsageError(f"--url {twice[0]} is given twice")
    config = AdapterConfig(verify=_tls_verify(args.verify), timeouts=Timeouts(control=min(args.timeout, 10.0)))
    token = args.token or os.environ.get("TGI_ADAPTER_TOKEN") or None
    adapters: Dict[str, TgiHttpAdapter] = {}
    try:
        for name, url in zip(names, urls):
            adapters[name] = TgiHttpAdapter(url, token=token, config=config)
        report = verify_determinism(
            adapters, prompts=args.prompt, max_tokens=args.max_tokens, seed=args.seed, repeats=args.repeats,
            under_load=args.under_load, timeout_s=args.timeout,
        )
    finally:
        for adapter in adapters.values():
            adapter.close()
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if args.json else report.to_text())
    return EXIT_OK if report.verdict == "identical" else EXIT_ERROR


def _replica_name(url: str) -> str:
    """A replica's name in the report: its URL without the scheme and any ``user:password@``."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return (netloc + parts.path.rstrip("/")) or url


# -- parsing -----------------------------------------------------------------------------------


class _UsageError(Exception):
    pass


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    """The command line, for ``--help`` and the tests."""
    parser = argparse.ArgumentParser(
        prog="tgi-adapter",
        description="Drive Hugging Face TGI through the worker contract. "
        "Exit codes: 0 ok, 1 engine/adapter error, 2 usage, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log the library's DEBUG records to stderr")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="stream a completion from the embedded fake TGI engine (no GPU)")
    demo.add_argument("--prompt", default="Tell me about text generation inference.")
    demo.add_argument("--max-tokens", type=_positive_int, default=48)
    demo.add_argument("--pace-ms", type=float, default=15.0, help="delay between tokens (default 15)")
    demo.add_argument("--fault", choices=sorted(set(DEMO_FAULTS) - {"diverge"}), help="show what a fault looks like")
    demo.add_argument("--tgi-version", default="3.3.6", help="the TGI version the fake engine imitates")
    demo.add_argument("--json", action="store_true", help="one event per line as JSON")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--timeout", type=_positive_float, default=60.0, help="task deadline in seconds")
    demo.set_defaults(func=_cmd_demo)

    def engine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="the engine's base URL (default: $TGI_ADAPTER_URL)")
        p.add_argument("--token", help="bearer token (default: $TGI_ADAPTER_TOKEN)")
        p.add_argument("--verify", help="a CA bundle path, or 'false' to skip certificate checks")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds (default 120)")
        p.add_argument(
            "--record", metavar="FILE", default=os.environ.get("TGI_ADAPTER_RECORD") or None,
            help="append every exchange with the engine to this cassette (default: $TGI_ADAPTER_RECORD)",
        )

    gen = sub.add_parser("generate", help="stream a completion from a TGI server to stdout")
    gen.add_argument("prompt")
    engine_options(gen)
    gen.add_argument("--max-tokens", type=_positive_int, default=64)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--strict", action="store_true", help="greedy, reproducible decoding")
    gen.add_argument("--route", choices=ROUTES, default="native")
    gen.set_defaults(func=_cmd_generate)

    for name, func, text in (
        ("health", _cmd_health, "live/ready of a TGI server (exit 1 when not ready)"),
        ("info", _cmd_info, "the server's /info"),
        ("props", _cmd_props, "slots and limits as the orchestrator sees them"),
        ("metrics", _cmd_metrics, "the server's /metrics"),
    ):
        p = sub.add_parser(name, help=text)
        engine_options(p)
        p.set_defaults(func=func)

    fake = sub.add_parser("fake-server", help="run the fake TGI engine standalone, for orchestrator tests")
    fake.add_argument("--port", type=int, default=3000)
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--tgi-version", default="3.3.6")
    fake.add_argument("--pace-ms", type=float, default=0.0)
    fake.add_argument("--api-key", default=None, help="require this bearer token on generation routes")
    fake.add_argument("--fault", choices=sorted(set(DEMO_FAULTS) - {"refused"}), help="inject this fault")
    fake.add_argument("--batch-sensitive", action="store_true",
                      help="the text of a request depends on how many others are in flight when it arrives")
    fake.add_argument("--replay", metavar="FILE", help="serve the exchanges recorded in this cassette")
    fake.add_argument(
        "--speed", type=_speed, default=1.0, help="replay pace: recorded times divided by this (0: no waits)"
    )
    fake.set_defaults(func=_cmd_fake_server)

    check = sub.add_parser("verify", help="check that TGI replicas give the same tokens (determinism)")
    check.add_argument("--url", action="append", help="a replica's base URL; once per replica "
                       "(default: $TGI_ADAPTER_URL)")
    check.add_argument("--prompt", action="append", help="a prompt to probe; repeatable (default: built-in ones)")
    check.add_argument("--max-tokens", type=_positive_int, default=32, help="tokens per probe (default 32)")
    check.add_argument("--repeats", type=_positive_int, default=2, help="runs per prompt and mode (default 2)")
    check.add_argument("--under-load", type=_non_negative_int, default=0, metavar="K",
                       help="also probe while K other streams are in flight on the replica (default 0)")
    check.add_argument("--seed", type=int, default=1234, help="seed of the sampling probes (default 1234)")
    check.add_argument("--timeout", type=_positive_float, default=60.0, help="for the whole check (default 60 s)")
    check.add_argument("--token", help="bearer token (default: $TGI_ADAPTER_TOKEN)")
    check.add_argument("--verify", help="a CA bundle path, or 'false' to skip certificate checks")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=_cmd_verify)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``tgi-adapter`` and ``python -m tgi_adapter``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger = logging.getLogger("tgi_adapter")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _UsageError as exc:
        parser.error(str(exc))
    except WorkerError as error:
        if args.debug:
            raise
        sys.stderr.write(_error_line(error) + "\n")
        return EXIT_ERROR
    except ValueError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return EXIT_ERROR  # pragma: no cover - parser.error exits


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
