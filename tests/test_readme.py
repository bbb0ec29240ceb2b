"""README.rst stays true: its examples run and its tables match the code's tables."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import List

import pytest

from tgi_adapter.config import ENV_VARS
from tgi_adapter.mapping import ERROR_TABLE, ROUTE_TABLE, SAMPLER_PROFILES

README = (Path(__file__).resolve().parent.parent / "README.rst").read_text(encoding="utf-8")


def python_blocks(text: str) -> List[str]:
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", text, re.M):
        lines = match.group(1).splitlines()
        blocks.append("\n".join(line[4:] for line in lines) + "\n")
    return blocks


BLOCKS = python_blocks(README)


def test_the_readme_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{n}" for n in range(len(BLOCKS))])
def test_readme_examples_run(code: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.rst", "exec"), {"__name__": "readme"})


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
