"""README.rst stays true: its examples run and its tables match the code's tables.

An example that needs an optional extra is preceded by the comment
``.. extra: NAME`` (it renders as nothing). Such examples are marked
``integrations`` (so the environments without the extras deselect them) and
run in a fresh interpreter: they may set process-wide state, such as
OpenTelemetry's global ``TracerProvider``, which can be set only once.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

from tgi_adapter.config import ENV_VARS
from tgi_adapter.mapping import ERROR_TABLE, ROUTE_TABLE, SAMPLER_PROFILES

README = (Path(__file__).resolve().parent.parent / "README.rst").read_text(encoding="utf-8")


EXTRAS = ("prometheus", "otel")


def python_blocks(text: str) -> List[Tuple[Optional[str], str]]:
    """``(extra or None, code)`` for every Python example."""
    blocks = []
    pattern = r"^(?:\.\. extra: (\S+)\n\n)?\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)"
    for match in re.finditer(pattern, text, re.M):
        lines = match.group(2).splitlines()
        blocks.append((match.group(1), "\n".join(line[4:] for line in lines) + "\n"))
    return blocks


BLOCKS = python_blocks(README)


def _params() -> List[Any]:
    params = []
    for n, (extra, code) in enumerate(BLOCKS):
        if extra is None:
            params.append(pytest.param(code, id=f"block{n}"))
        else:
            params.append(pytest.param(code, id=f"block{n}-{extra}", marks=pytest.mark.integrations))
    return params


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5
    assert sorted(extra for extra, _code in BLOCKS if extra is not None) == sorted(EXTRAS)
    assert len(re.findall(r"^\.\. extra:", README, re.M)) == len(EXTRAS)  # no marker the pattern missed


@pytest.mark.parametrize("code", [p for p in _params() if not p.marks])
def test_readme_examples_run(code: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.rst", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("code", [p for p in _params() if p.marks])
def test_readme_examples_with_an_extra_run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def normalise(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def test_the_error_table_matches_the_code() -> None:
    flat = normalise(README)
    for rule in ERROR_TABLE:
        row = normalise(
            f"* - {rule.what} - ``{rule.code.value}`` - {'yes' if rule.retriable else 'no'} - {rule.advice}"
        )
        assert row in flat, f"README's error table lacks or differs on: {rule.key}"


def test_the_endpoint_table_matches_the_code() -> None:
    flat = normalise(README.replace("\\-", "-"))
    for spec in ROUTE_TABLE:
        row = normalise(
            f"* - {spec.route} - {spec.operation} - {spec.method} - {spec.path} - {spec.body} - {spec.answer}"
        )
        assert row in flat, f"README's endpoint table lacks {spec.route} {spec.operation}"


def test_the_profiles_and_environment_are_documented() -> None:
    flat = normalise(README)
    for name, values in SAMPLER_PROFILES.items():
        row = normalise(f"* - {name} - " + ", ".join(f"{k}={v}" for k, v in values.items()))
        assert row in flat, name
    for variable in ENV_VARS:
        assert variable in README


def test_the_two_commands_are_there() -> None:
    assert "$ python -m pip install . && tgi-adapter demo" in README
    assert "$ python -m pip install tox && python -m tox" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "\npython -m pip install tox && python -m tox\n" in ci
