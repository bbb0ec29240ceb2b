"""Keeping credentials out of logs, reprs, events and error messages.

A token is only ever shown as a fingerprint: the first 6 hex digits of its
SHA-256, enough to tell two credentials apart and useless to an attacker.
Free text from an engine or a proxy goes through :func:`redact_text` before it
reaches a message, because a misconfigured gateway may echo request headers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Mapping, Optional

__all__ = ["short_hash", "redact_text", "redact_headers", "SENSITIVE_HEADERS", "clip"]

#: Header names whose values are never shown (compared case-insensitively).
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)

_PATTERNS = (
    # "Authorization: Bearer abc", "authorization=abc", '"X-API-Key": "abc"'
    re.compile(
        r"(?i)(?<![A-Za-z0-9])(?P<label>[\"']?(?:proxy-)?(?:authorization|x-api-key|api-key)[\"']?)"
        r"(?P<sep>\s*[:=]\s*[\"']?)(?:(?P<scheme>bearer|basic|token|digest)\s+)?(?P<value>[^\s,;\"'&}]+)"
    ),
    # "Cookie: a=b; session=c" (every pair, to the end of the line or the quote)
    re.compile(
        r"(?i)(?<![A-Za-z0-9])(?P<label>[\"']?(?:set-)?cookie[\"']?)(?P<sep>\s*[:=]\s*[\"']?)"
        r"(?P<value>[^\r\n\"']+)"
    ),
    # "token=abc", "api_key: abc", "auth_token=abc", "client_secret=abc", "HF_API_TOKEN=abc"
    re.compile(
        r"(?i)(?<![A-Za-z0-9])(?P<label>(?:[A-Za-z0-9]+[_-])*(?:token|api[_-]?key|secret|password|passwd))"
        r"(?P<sep>[\"']?\s*[:=]\s*[\"']?)(?P<value>[^\s,;\"'&}]+)"
    ),
    # a bare "Bearer abc" anywhere
    re.compile(r"(?i)(?<![A-Za-z0-9])(?P<label>bearer)(?P<sep>\s+)(?P<value>[A-Za-z0-9._~+/=-]+)"),
)
# Hugging Face tokens have a recognisable shape even without a label.
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


def short_hash(secret: Optional[str]) -> str:
    """``"sha256:1a2b3c"`` for a secret, ``"none"`` when there is none."""
    if not secret:
        return "none"
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:6]


def _mask(match: re.Match[str]) -> str:
    scheme = match.groupdict().get("scheme")
    return f"{match['label']}{match['sep']}{scheme + ' ' if scheme else ''}[redacted]"


def redact_text(text: str, secrets: Iterable[Optional[str]] = ()) -> str:
    """``text`` with credentials replaced.

    Known ``secrets`` are replaced by their fingerprint wherever they occur;
    anything that looks like a credential by its label (``Authorization:``,
    ``token=``, ``api_key=``, ``Bearer …``) or its shape (``hf_…``) is masked.
    """
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, f"[{short_hash(secret)}]")
    for pattern in _PATTERNS:
        text = pattern.sub(_mask, text)
    return _HF_TOKEN.sub("[redacted]", text)


def redact_headers(headers: Mapping[str, str]) -> dict:  # type: ignore[type-arg]
    """A copy of ``headers`` with sensitive values shown as fingerprints."""
    return {
        name: (f"[{short_hash(value)}]" if name.lower() in SENSITIVE_HEADERS else value)
        for name, value in headers.items()
    }


def clip(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters, for quoting an engine's body."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
