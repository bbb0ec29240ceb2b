"""Credentials never leave the library except as fingerprints."""

from __future__ import annotations

import hashlib
from typing import Dict, List, Optional

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tgi_adapter.redact import SENSITIVE_HEADERS, clip, redact_headers, redact_text, short_hash

TOKEN = "tgi-api-key-5d41402abc4b2a76b9719d911017c592"


def test_fingerprint_is_six_hex_digits_of_sha256() -> None:
    assert short_hash(TOKEN) == "sha256:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:6]
    assert short_hash("abc") == "sha256:ba7816"
    assert short_hash("é") == "sha256:" + hashlib.sha256("é".encode()).hexdigest()[:6]


@pytest.mark.parametrize("secret", [None, ""])
def test_fingerprint_of_nothing(secret: Optional[str]) -> None:
    assert short_hash(secret) == "none"


def test_fingerprints_tell_tokens_apart() -> None:
    assert short_hash("token-a") != short_hash("token-b")
    assert short_hash("token-a") == short_hash("token-a")


def test_known_secret_becomes_its_fingerprint_everywhere() -> None:
    text = f"key {TOKEN} and again {TOKEN}, inside{TOKEN}word"
    out = redact_text(text, [TOKEN])
    assert TOKEN not in out
    assert out.count(f"[{short_hash(TOKEN)}]") == 3


def test_several_secrets_and_none_are_accepted() -> None:
    other = "proxy-pass-998877"
    out = redact_text(f"a {TOKEN} b {other} c", [None, "", TOKEN, other])
    assert TOKEN not in out and other not in out
    assert f"[{short_hash(other)}]" in out


def test_very_short_secrets_are_not_replaced() -> None:
    # Replacing "ab" everywhere would shred the message and still reveal nothing.
    assert redact_text("tab stab", ["ab"]) == "tab stab"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer [redacted]"),
        ("authorization: bearer abc", "authorization: bearer [redacted]"),
        ("Proxy-Authorization: Basic dXNlcjpwYXNz", "Proxy-Authorization: Basic [redacted]"),
        ("authorization=abc123", "authorization=[redacted]"),
        ("X-API-Key: k-123", "X-API-Key: [redacted]"),
        ("api-key=k-123, next", "api-key=[redacted], next"),
        ("Cookie: session=abc", "Cookie: [redacted]"),
        ("token=abc", "token=[redacted]"),
        ("?access_token=abc&x=1", "?access_token=[redacted]&x=1"),
        ("refresh_token: abc", "refresh_token: [redacted]"),
        ("api_key=abc; path=/", "api_key=[redacted]; path=/"),
        ("apikey: abc", "apikey: [redacted]"),
        ('{"password": "hunter2"}', '{"password": "[redacted]"}'),
        ('{"secret":"s3"}', '{"secret":"[redacted]"}'),
        ("sent Bearer abc.def_ghi~jkl+/= to", "sent Bearer [redacted] to"),
        ("hf_abcdefghijklmnopqrstuvwxyz0123456789", "[redacted]"),
        ("user hf_AbCdEfGhIjKlMnOpQr done", "user [redacted] done"),
    ],
)
def test_credentials_are_masked_by_label_or_shape(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Input validation error: `top_p` must be > 0.0 and < 1.0",
        "`inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
        "Model is overloaded",
        "the max_new_tokens limit",
        "hf_short",  # too short to be a Hugging Face token
        "tokens are fine",
        "Request failed during generation: Server error: CUDA out of memory",
    ],
)
def test_ordinary_messages_are_left_alone(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "auth_token=abc123secret",
        "client_secret=abc123secret",
        "db_password=abc123secret",
        "HF_API_TOKEN=abc123secret",
        "x-auth-token: abc123secret",
        "session-token=abc123secret",
        "id_token=abc123secret",
    ],
)
def test_labels_with_a_prefix_are_masked(text: str) -> None:
    # "_" is a word character: a \b-anchored label would miss "auth_token=" and "HF_API_TOKEN=".
    assert "abc123secret" not in redact_text(text)


@pytest.mark.parametrize(
    "text",
    [
        "Cookie: a=b; session=abc123secret",
        '{"Authorization": "Basic abc123secret"}',
        "{'Cookie': 'session=abc123secret'}",
        '{"Authorization": "Bearer abc123secret"}',  # the bare-Bearer pattern catches this one
        '{"x-api-key": "abc123secret"}',
    ],
)
def test_echoed_headers_are_masked(text: str) -> None:
    assert "abc123secret" not in redact_text(text)


@settings(max_examples=200)
@given(
    secret=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=4, max_size=40),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_a_known_secret_never_survives(secret: str, before: str, after: str) -> None:
    # (a "secret" that is part of the replacement text itself, like "sha2" or "dact", proves nothing)
    assume("[" not in secret and "]" not in secret)
    assume(secret not in short_hash(secret) and secret not in "[redacted]")
    out = redact_text(before + secret + after, [secret])
    assert secret not in out


@settings(max_examples=200)
@given(
    token=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~", min_size=8,
                  max_size=40),
    label=st.sampled_from(["Authorization: Bearer ", "authorization: Bearer ", "Bearer ", "token=", "api_key: ",
                           "X-API-Key: ", "access_token=", "password="]),
    before=st.sampled_from(["", "echo: ", "headers {", "…\n"]),
)
def test_labelled_tokens_never_survive(token: str, label: str, before: str) -> None:
    assume(token not in "[redacted]")
    out = redact_text(before + label + token + " end")
    assert token not in out
    assert out.endswith(" end")


def test_headers_show_sensitive_values_as_fingerprints() -> None:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "X-API-Key": "k-1",
        "cookie": "a=b",
        "Content-Type": "application/json",
        "X-Correlation-Id": "abc",
    }
    shown = redact_headers(headers)
    assert shown == {
        "Authorization": f"[{short_hash('Bearer ' + TOKEN)}]",
        "X-API-Key": f"[{short_hash('k-1')}]",
        "cookie": f"[{short_hash('a=b')}]",
        "Content-Type": "application/json",
        "X-Correlation-Id": "abc",
    }
    assert headers["Authorization"] == f"Bearer {TOKEN}"  # a copy: the original is untouched
    assert TOKEN not in repr(shown)


@pytest.mark.parametrize("name", sorted(SENSITIVE_HEADERS))
def test_every_sensitive_header_any_case(name: str) -> None:
    for spelled in (name, name.upper(), name.title()):
        assert redact_headers({spelled: "v-secret"}) == {spelled: f"[{short_hash('v-secret')}]"}


def test_redact_headers_of_nothing() -> None:
    empty: Dict[str, str] = {}
    assert redact_headers(empty) == {}


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 200, "short"),
        ("a\n b\t\tc  ", 200, "a b c"),
        ("x" * 10, 10, "x" * 10),
        ("x" * 11, 10, "x" * 9 + "…"),
        ("word " * 100, 20, "word word word word…"),
    ],
)
def test_clip(text: str, limit: int, expected: str) -> None:
    assert clip(text, limit) == expected


@settings(max_examples=100)
@given(text=st.text(max_size=500), limit=st.integers(2, 300))
def test_clip_is_one_short_line(text: str, limit: int) -> None:
    out = clip(text, limit)
    assert len(out) <= limit
    assert not any(c in out for c in "\n\r\t")
    words: List[str] = text.split()
    if len(" ".join(words)) <= limit:
        assert out == " ".join(words)
