"""Results: sections of Markdown tables, target checks, statistics and the machine's description."""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from clients import version_of

PACKAGES = (
    "requests",
    "urllib3",
    "text-generation",
    "huggingface_hub",
    "sseclient-py",
    "pydantic",
    "trustme",
    "opentelemetry-api",
    "opentelemetry-sdk",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def fmt(value: Optional[float], digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


@dataclass
class Check:
    """One target: PASS/FAIL lines, never the exit code."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"- {'PASS' if self.passed else 'FAIL'}: {self.name} ({self.detail})"


@dataclass
class Section:
    title: str
    headers: List[str] = field(default_factory=list)
    rows: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    checks: List[Check] = field(default_factory=list)
    #: Clients whose text (or other correctness) check failed: these make the run exit non-zero.
    failures: List[str] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, passed, detail))

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.rows:
            out.append("| " + " | ".join(self.headers) + " |")
            out.append("|" + "|".join("---" if i == 0 else "--:" for i in range(len(self.headers))) + "|")
            out += ["| " + " | ".join(row) + " |" for row in self.rows]
            out.append("")
        if self.notes:
            out += self.notes + [""]
        if self.checks:
            out += [check.line() for check in self.checks] + [""]
        if self.failures:
            out += [f"- **CORRECTNESS FAILURE**: {failure}" for failure in self.failures] + [""]
        return "\n".join(out)


def load_average() -> Tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (math.nan, math.nan, math.nan)


def git_revision(path: str) -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty else ''}" if rev else "unknown"


def source_digest(package_dir: str) -> str:
    """A short digest of the package's .py files: tells which code a run measured, committed or not."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                digest.update(os.path.relpath(path, package_dir).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:12]


def _proc_field(path: str, key: str) -> Optional[str]:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU model"


def memory_total() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "<n> kB"
    if not total:
        return "unknown"
    return f"{fmt(int(total.split()[0]) / 2**20, 1)} GiB"


def scrub_paths(text: str, repo: str) -> str:
    """``text`` without the absolute paths of the checkout, the interpreter or the home directory.

    A results file says which code and which Python ran (versions, revision,
    digest), never where they sat on the machine that ran them; tracebacks and
    error messages quoted in it would otherwise carry those paths.
    """
    places = [(os.path.abspath(repo), ".")]
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable)}:
        places.append((prefix, "<python>"))
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        places.append((home, "~"))
    # Longest first: the checkout may sit under the home directory, a venv under the checkout.
    for path, name in sorted(places, key=lambda place: len(place[0]), reverse=True):
        if len(path) > 1:
            text = text.replace(path, name)
    return text


def environment(command: str, repo: str, started: datetime.datetime, load_before: Tuple[float, ...]) -> str:
    import tgi_adapter

    lines = [
        f"- Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (local), "
        f"{datetime.datetime.now(started.tzinfo).replace(microsecond=0) - started.replace(microsecond=0)} to run",
        f"- Command: `{command}`",
        f"- Python: {platform.python_implementation()} {platform.python_version()} "
        f"({platform.python_build()[1]}, {platform.python_compiler()})",
        f"- Platform: {platform.platform()}",
        f"- CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))}), {cpu_model()}"
        if hasattr(os, "sched_getaffinity")
        else f"- CPUs: {os.cpu_count()}, {cpu_model()}",
        f"- Memory: {memory_total()}",
        "- Load average (1, 5, 15 min): before "
        + ", ".join(fmt(v) for v in load_before)
        + "; after "
        + ", ".join(fmt(v) for v in load_average()),
        f"- tgi_adapter: {tgi_adapter.__version__}, git {git_revision(repo)}, "
        f"sources sha256 {source_digest(os.path.dirname(tgi_adapter.__file__))}",
        "- Packages: " + ", ".join(f"{name} {version_of(name)}" for name in PACKAGES),
    ]
    return "\n".join(lines)


def document(title: str, env: str, sections: Sequence[Section], repo: str) -> str:
    checks = [check for section in sections for check in section.checks]
    failures = [failure for section in sections for failure in section.failures]
    summary = ["## Targets", ""] + [check.line() for check in checks]
    if failures:
        summary += ["", f"**{len(failures)} correctness failure(s)**: " + "; ".join(failures)]
    parts = [f"# {title}", "", env, ""] + [section.markdown() for section in sections] + ["\n".join(summary), ""]
    return scrub_paths("\n".join(parts), repo)
