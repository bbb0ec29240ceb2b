"""Retry and timeout policy: exact delays from an injected random source, and value validation."""

from __future__ import annotations

import datetime
import email.utils
import math
from typing import Any, Callable, Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict

from tgi_adapter.retry import RetryPolicy, Timeouts, parse_retry_after, retry_after_ms_from_headers

NOW_EPOCH = 1_750_000_000.0  # a fixed wall clock for HTTP dates


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def delay(
    policy: RetryPolicy,
    failed_tries: int,
    *,
    retriable: bool = True,
    retry_after_s: Optional[float] = None,
    now: float = 0.0,
    deadline: Optional[float] = None,
    rng: Callable[[], float] = fixed(0.5),
) -> Optional[float]:
    return policy.next_delay(
        failed_tries, retriable=retriable, retry_after_s=retry_after_s, now=now, deadline=deadline, rng=rng
    )


def test_defaults_are_the_design_values() -> None:
    assert RetryPolicy() == RetryPolicy(attempts=4, base=0.1, multiplier=2.0, cap=2.0, retry_after_cap=30.0)
    assert Timeouts() == Timeouts(connect=5.0, control=10.0, first_token=120.0, token_idle=30.0)


@pytest.mark.parametrize(("failed_tries", "ceiling"), [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 2.0),
                                                        (6, 2.0), (60, 2.0)])
def test_backoff_ceiling_is_capped_exponential(failed_tries: int, ceiling: float) -> None:
    assert RetryPolicy().backoff_ceiling(failed_tries) == pytest.approx(ceiling)


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999])
@pytest.mark.parametrize("failed_tries", [0, 1, 2, 3, 4, 5, 9])
def test_delay_is_full_jitter_under_the_ceiling(r: float, failed_tries: int) -> None:
    policy = RetryPolicy(attempts=20, base=0.1, multiplier=2.0, cap=2.0)
    assert delay(policy, failed_tries, rng=fixed(r)) == pytest.approx(r * min(2.0, 0.1 * 2.0**failed_tries))


def test_delay_with_other_parameters() -> None:
    policy = RetryPolicy(attempts=10, base=0.5, multiplier=3.0, cap=10.0)
    assert [delay(policy, n, rng=fixed(0.5)) for n in range(5)] == pytest.approx([0.25, 0.75, 2.25, 5.0, 5.0])
    flat = RetryPolicy(attempts=10, base=1.0, multiplier=1.0, cap=5.0)
    assert [delay(flat, n, rng=fixed(1.0)) for n in range(4)] == [1.0, 1.0, 1.0, 1.0]
    none = RetryPolicy(attempts=10, base=0.0)
    assert delay(none, 3, rng=fixed(0.9)) == 0.0


def test_huge_failure_counts_do_not_overflow() -> None:
    policy = RetryPolicy(attempts=10**6)
    assert delay(policy, 5000, rng=fixed(0.5)) == 1.0
    assert policy.backoff_ceiling(10**5) == 2.0


def test_zero_base_stays_zero_for_huge_failure_counts() -> None:
    assert RetryPolicy(attempts=10**6, base=0.0).backoff_ceiling(5000) == 0.0


def test_rng_is_called_once_per_jittered_delay() -> None:
    calls: List[int] = []

    def rng() -> float:
        calls.append(1)
        return 0.5

    policy = RetryPolicy()
    delay(policy, 0, rng=rng)
    assert len(calls) == 1
    delay(policy, 0, rng=rng, retry_after_s=1.0)  # Retry-After replaces the jitter
    delay(policy, 0, rng=rng, retriable=False)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("attempts", "retried_after"),
    [(1, []), (2, [0]), (3, [0, 1]), (4, [0, 1, 2]), (6, [0, 1, 2, 3, 4])],
)
def test_attempts_count_every_try(attempts: int, retried_after: List[int]) -> None:
    policy = RetryPolicy(attempts=attempts)
    decisions = [delay(policy, n) is not None for n in range(attempts + 3)]
    assert [n for n, retry in enumerate(decisions) if retry] == retried_after


def test_a_full_retry_loop_makes_exactly_attempts_tries() -> None:
    for attempts in (1, 2, 4, 7):
        policy = RetryPolicy(attempts=attempts)
        tries = 0
        failed = 0
        while True:
            tries += 1  # a try that fails
            wait = delay(policy, failed)
            if wait is None:
                break
            failed += 1
        assert tries == attempts


def test_non_retriable_errors_are_never_retried() -> None:
    policy = RetryPolicy(attempts=10)
    assert all(delay(policy, n, retriable=False) is None for n in range(10))
    assert delay(policy, 0, retriable=False, retry_after_s=0.5) is None


@pytest.mark.parametrize("retry_after", [0.0, 0.5, 3.0, 29.999, 30.0])
def test_retry_after_replaces_the_jitter(retry_after: float) -> None:
    assert delay(RetryPolicy(), 0, retry_after_s=retry_after, rng=fixed(0.0)) == retry_after


def test_negative_retry_after_waits_nothing() -> None:
    assert delay(RetryPolicy(), 0, retry_after_s=-5.0) == 0.0


@pytest.mark.parametrize(("cap", "retry_after"), [(30.0, 30.001), (30.0, 120.0), (5.0, 6.0), (0.0, 0.5)])
def test_retry_after_over_the_cap_means_no_retry(cap: float, retry_after: float) -> None:
    assert delay(RetryPolicy(retry_after_cap=cap), 0, retry_after_s=retry_after) is None


@pytest.mark.parametrize(
    ("now", "deadline", "retry_after", "r", "expected"),
    [
        (100.0, 100.06, None, 0.5, 0.05),  # ends before the deadline
        (100.0, 100.05, None, 0.5, None),  # would end exactly at it
        (100.0, 100.04, None, 0.5, None),  # would end past it
        (100.0, 102.0, 1.5, 0.5, 1.5),
        (100.0, 101.0, 1.5, 0.5, None),  # Retry-After would overrun the deadline
        (100.0, 99.0, None, 0.0, None),  # already past
        (100.0, None, 20.0, 0.5, 20.0),  # no deadline
    ],
)
def test_never_past_the_deadline(
    now: float, deadline: Optional[float], retry_after: Optional[float], r: float, expected: Optional[float]
) -> None:
    got = delay(RetryPolicy(), 0, now=now, deadline=deadline, retry_after_s=retry_after, rng=fixed(r))
    assert got == (None if expected is None else pytest.approx(expected))


@settings(max_examples=200)
@given(
    failed=st.integers(0, 50),
    r=st.floats(0.0, 1.0, exclude_max=True),
    retry_after=st.none() | st.floats(-10, 100, allow_nan=False),
    now=st.floats(0, 1e6, allow_nan=False),
    budget=st.none() | st.floats(0, 100, allow_nan=False),
    attempts=st.integers(1, 10),
)
def test_delays_are_bounded(
    failed: int, r: float, retry_after: Optional[float], now: float, budget: Optional[float], attempts: int
) -> None:
    policy = RetryPolicy(attempts=attempts)
    deadline = None if budget is None else now + budget
    got = delay(policy, failed, retry_after_s=retry_after, now=now, deadline=deadline, rng=fixed(r))
    if got is None:
        return
    assert failed + 1 < attempts
    assert 0.0 <= got
    if retry_after is None:
        assert got <= policy.backoff_ceiling(failed) <= policy.cap
    else:
        assert got <= policy.retry_after_cap
    if deadline is not None:
        assert now + got < deadline


# --------------------------------------------------------------------------
# Validation

BAD_NUMBERS = [-1.0, 0, 0.0, True, False, math.nan, math.inf, -math.inf, "5", None]


@pytest.mark.parametrize("name", ["connect", "control", "first_token", "token_idle"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_timeouts_refuse_non_positive_or_non_numbers(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        Timeouts(**{name: value})


def test_timeouts_accept_ints_and_store_floats() -> None:
    timeouts = Timeouts(connect=1, control=2, first_token=3.5, token_idle=0.001)
    assert timeouts.connect == 1.0 and isinstance(timeouts.connect, float)
    with pytest.raises(AttributeError):
        timeouts.connect = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, 2.5, math.nan, "4", None])
def test_retry_attempts_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=value)


@pytest.mark.parametrize("name", ["base", "cap", "retry_after_cap"])
@pytest.mark.parametrize("value", [-0.1, -1, True, math.nan, math.inf, "1", None])
def test_retry_seconds_must_be_finite_and_not_negative(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        RetryPolicy(**{name: value})


@pytest.mark.parametrize("name", ["base", "cap", "retry_after_cap"])
def test_retry_seconds_may_be_zero(name: str) -> None:
    policy = RetryPolicy(**{name: 0})
    assert getattr(policy, name) == 0.0 and isinstance(getattr(policy, name), float)


@pytest.mark.parametrize("value", [0, 0.5, -2.0, True, math.nan, math.inf, "2"])
def test_retry_multiplier_must_be_at_least_one(value: Any) -> None:
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=value)


def test_retry_policy_is_immutable() -> None:
    with pytest.raises(AttributeError):
        RetryPolicy().attempts = 9  # type: ignore[misc]


# --------------------------------------------------------------------------
# Retry-After


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("5", 5.0),
        ("  120 ", 120.0),
        ("007", 7.0),
        ("1.5", 1.5),
        ("86400", 86400.0),
    ],
)
def test_parse_retry_after_delta_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW_EPOCH) == seconds


def test_parse_retry_after_http_date() -> None:
    future = email.utils.formatdate(NOW_EPOCH + 90, usegmt=True)  # "Sun, 15 Jun 2025 15:08:10 GMT"
    assert parse_retry_after(future, NOW_EPOCH) == pytest.approx(90.0)
    past = email.utils.formatdate(NOW_EPOCH - 3600, usegmt=True)
    assert parse_retry_after(past, NOW_EPOCH) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW_EPOCH) == 0.0  # the RFC's example, long past
    zone = datetime.timezone(datetime.timedelta(hours=2))
    offset = email.utils.format_datetime(datetime.datetime.fromtimestamp(NOW_EPOCH + 30, zone))  # "+0200" form
    assert offset.endswith("+0200")
    assert parse_retry_after(offset, NOW_EPOCH) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "value",
    ["", "   ", "soon", "-5", "-0.5", "nan", "inf", "1e999", "Wed, 99 Foo 2015 07:28:00 GMT", "Wed, 21 Oct 2015",
     "12 apples", "0x10", "Wed, 21 Oct 2015 07:28:00 -0000"],
)
def test_parse_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW_EPOCH) is None


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b3", "\u00b9\u00b9"])
def test_parse_retry_after_superscript_digits_are_garbage(value: str) -> None:
    assert parse_retry_after(value, NOW_EPOCH) is None


@settings(max_examples=300)
@given(value=st.text(alphabet=st.characters(max_codepoint=255, blacklist_categories=("Cs",)), max_size=40))
def test_parse_retry_after_never_raises(value: str) -> None:
    seconds = parse_retry_after(value, NOW_EPOCH)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "2"}, 2000),
        ({"retry-after": "0.0015"}, 2),  # rounded up to whole milliseconds
        ({"retry-after-ms": "250"}, 250),
        ({"retry-after-ms": "250.2"}, 251),
        ({"retry-after-ms": "250", "retry-after": "9"}, 250),  # the precise header wins
        ({"retry-after-ms": "0", "retry-after": "9"}, 0),
        ({"retry-after-ms": "bogus", "retry-after": "9"}, 9000),  # an unusable one is skipped
        ({"retry-after-ms": "-5", "retry-after": "9"}, 9000),
        ({"retry-after-ms": "nan", "retry-after": "9"}, 9000),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after": "later"}, None),
        ({"retry-after": email.utils.formatdate(NOW_EPOCH + 12, usegmt=True)}, 12000),
        ({"retry-after": email.utils.formatdate(NOW_EPOCH - 12, usegmt=True)}, 0),
    ],
)
def test_retry_after_ms_from_headers(headers: Dict[str, str], expected: Optional[int]) -> None:
    assert retry_after_ms_from_headers(headers, NOW_EPOCH) == expected


def test_retry_after_headers_are_read_case_insensitively_from_a_response() -> None:
    assert retry_after_ms_from_headers(CaseInsensitiveDict({"Retry-After": "3"}), NOW_EPOCH) == 3000
    both = CaseInsensitiveDict({"Retry-After": "3", "Retry-After-Ms": "1200"})
    assert retry_after_ms_from_headers(both, NOW_EPOCH) == 1200
