"""What a determinism check found, and the pure rules it compares runs by.

A *run* is the token sequence one replica produced for one prompt in one mode
("strict": greedy; "seeded": sampling with a fixed seed). This module decides
which runs are compared and how, and holds the report; it does no I/O. The
probes themselves are sent by :mod:`tgi_adapter.probes`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, TypeVar

__all__ = [
    "MODES",
    "VERDICTS",
    "WINDOW",
    "DeterminismProbe",
    "DeterminismReport",
    "RunKey",
    "Token",
    "compare_runs",
    "first_divergence",
    "identity_mismatch",
    "planned_comparisons",
    "run_label",
    "verdict_of",
    "window",
]

#: The two ways each prompt is decoded: greedy, and sampling with the check's seed.
MODES = ("strict", "seeded")
VERDICTS = ("identical", "divergent", "incomparable")
#: How many tokens before and after the first divergence a probe keeps.
WINDOW = 3

#: One generated token: its text, and the engine's token id when the event carried one.
Token = Tuple[str, Optional[int]]
#: One run: ``(replica, prompt, mode, repeat, under_load)``; repeats count from 1.
RunKey = Tuple[str, str, str, int, bool]

T = TypeVar("T", bound=Hashable)


def first_divergence(a: Sequence[T], b: Sequence[T]) -> Optional[int]:
    """The first index where ``a`` and ``b`` differ; None when they are equal.

    When one is a prefix of the other, they part where the shorter one ends,
    so the answer is its length.
    """
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    if len(a) == len(b):
        return None
    return min(len(a), len(b))


def window(texts: Sequence[str], at: int, radius: int = WINDOW) -> Tuple[str, ...]:
    """The texts from ``radius`` before ``at`` to ``radius`` after it (fewer at either end)."""
    return tuple(texts[max(0, at - radius) : at + radius + 1])


def run_label(replica: str, repeat: int, under_load: bool) -> str:
    """How a report names a run: ``"gpu-0#2"``, or ``"gpu-0#1+load"`` for a run under load."""
    return f"{replica}#{repeat}{'+load' if under_load else ''}"


@dataclasses.dataclass(frozen=True)
class DeterminismProbe:
    """One comparison of two runs of the same prompt and mode.

    :ivar a: the reference run (``"name#1"``), :ivar b: the run compared with it.
    :ivar under_load: whether ``b`` ran while other streams were in flight.
    :ivar first_divergence: the first token index where they differ (the
        shorter length when one is a prefix of the other), None when identical.
    :ivar a_tokens: the token texts of ``a`` from 3 before to 3 after that
        index (empty when identical); likewise :ivar b_tokens: for ``b``.
    """

    prompt: str
    mode: str
    under_load: bool
    a: str
    b: str
    identical: bool
    first_divergence: Optional[int]
    a_tokens: Tuple[str, ...] = ()
    b_tokens: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """The probe as a JSON-ready dict (the field names as keys)."""
        out = dataclasses.asdict(self)
        out["a_tokens"] = list(self.a_tokens)
        out["b_tokens"] = list(self.b_tokens)
        return out


def compare_runs(
    prompt: str, mode: str, under_load: bool, a: str, a_run: Sequence[Token], b: str, b_run: Sequence[Token]
) -> DeterminismProbe:
    """Compare two runs token by token (text and, where both carry one, id)."""
    # An id only one side reports says nothing about the other side's token.
    same_ids = all(x[1] is not None for x in a_run) and all(y[1] is not None for y in b_run)
    keys_a: Sequence[Hashable] = a_run if same_ids else [x[0] for x in a_run]
    keys_b: Sequence[Hashable] = b_run if same_ids else [y[0] for y in b_run]
    at = first_divergence(keys_a, keys_b)
    if at is None:
        return DeterminismProbe(prompt, mode, under_load, a, b, True, None)
    texts_a = [x[0] for x in a_run]
    texts_b = [y[0] for y in b_run]
    return DeterminismProbe(prompt, mode, under_load, a, b, False, at, window(texts_a, at), window(texts_b, at))


def planned_comparisons(
    replicas: Sequence[str], prompts: Sequence[str], repeats: int, loaded: bool
) -> List[Tuple[RunKey, RunKey]]:
    """Which runs are compared, in report order: for each prompt and mode,

    every replica's first run against the first replica's first run, every
    later repeat of a replica against that replica's first run, and (with
    load) each loaded run against the same replica's first idle run.
    """
    pairs: List[Tuple[RunKey, RunKey]] = []
    for prompt in prompts:
        for mode in MODES:
            first = (replicas[0], prompt, mode, 1, False)
            pairs += [(first, (name, prompt, mode, 1, False)) for name in replicas[1:]]
            for name in replicas:
                own = (name, prompt, mode, 1, False)
                pairs += [(own, (name, prompt, mode, k, False)) for k in range(2, repeats + 1)]
                if loaded:
                    pairs += [(own, (name, prompt, mode, k, True)) for k in range(1, repeats + 1)]
    return pairs


def verdict_of(probes: Sequence[DeterminismProbe]) -> str:
    """``"identical"`` when every probe is, else ``"divergent"``."""
    return "identical" if all(p.identical for p in probes) else "divergent"


def identity_mismatch(replicas: Mapping[str, Mapping[str, Optional[str]]]) -> Optional[str]:
    """Why the replicas cannot be compared (versions or model revisions differ), or None."""
    for field in ("engine_version", "model_sha"):
        values = {name: ident.get(field) for name, ident in replicas.items()}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"{name} {value or 'unknown'}" for name, value in values.items())
            return f"{field} differs ({shown})"
    return None


@dataclasses.dataclass(frozen=True)
class DeterminismReport:
    """The outcome of :func:`tgi_adapter.verify_determinism`.

    :ivar verdict: ``"identical"`` (every comparison matched), ``"divergent"``
        (at least one did not) or ``"incomparable"`` (the replicas run another
        engine_version or model_sha; no probe was sent).
    :ivar replicas: name → ``{"engine_version": ..., "model_sha": ...}``.
    :ivar probes: the comparisons, a :class:`DeterminismProbe` each.
    :ivar skipped: replicas left out (``AdapterHost``: those not live).
    """

    verdict: str
    replicas: Dict[str, Dict[str, Optional[str]]]
    probes: Tuple[DeterminismProbe, ...] = ()
    skipped: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")
        # Copies, so the report does not change when the caller's dicts do.
        object.__setattr__(self, "replicas", {name: dict(ident) for name, ident in self.replicas.items()})
        object.__setattr__(self, "probes", tuple(self.probes))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    @property
    def divergences(self) -> Tuple[DeterminismProbe, ...]:
        """The probes whose runs differ."""
        return tuple(p for p in self.probes if not p.identical)

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain JSON-ready data."""
        return {
            "verdict": self.verdict,
            "replicas": {name: dict(ident) for name, ident in self.replicas.items()},
            "probes": [p.to_dict() for p in self.probes],
            "skipped": list(self.skipped),
        }

    def to_text(self) -> str:
        """A readable report: each replica, each comparison by prompt, and where runs part."""
        lines = ["replicas:"]
        width = max(len(name) for name in [*self.replicas, *self.skipped, ""])
        for name, ident in self.replicas.items():
            lines.append(
                f"  {name:<{width}}  engine {ident.get('engine_version') or 'unknown'}"
                f"  model_sha {ident.get('model_sha') or 'unknown'}"
            )
        lines += [f"  {name:<{width}}  skipped: not live" for name in self.skipped]
        if self.verdict == "incomparable":
            why = identity_mismatch(self.replicas) or "the replicas differ"
            lines.append(f"verdict: incomparable: {why}; no probe was sent")
            return "\n".join(lines)
        prompt: Optional[str] = None
        for probe in self.probes:
            if probe.prompt != prompt:
                prompt = probe.prompt
                lines.append(f"prompt {_quote(_clip(prompt, 72))}")
            lines += _probe_lines(probe)
        lines.append(f"verdict: {self.verdict} ({len(self.divergences)} of {len(self.probes)} comparisons differ)")
        return "\n".join(lines)


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _probe_lines(probe: DeterminismProbe) -> List[str]:
    load = " (under load)" if probe.under_load else ""
    head = f"  {probe.mode:<6}  {probe.a} vs {probe.b}{load}"
    if probe.identical:
        return [f"{head}: same"]
    at = probe.first_divergence
    assert at is not None
    width = max(len(probe.a), len(probe.b))
    return [
        f"{head}: DIFFER from token {at}",
        *(f"          {label:<{width}}  {_around(tokens, at)}"
          for label, tokens in ((probe.a, probe.a_tokens), (probe.b, probe.b_tokens))),
    ]


def _around(tokens: Sequence[str], at: int) -> str:
    """The window's text with the token at the divergence in brackets."""
    offset = min(at, WINDOW)  # tokens before ``at`` that the window kept
    before = _quote("".join(tokens[:offset]))
    if offset >= len(tokens):
        return f"{before} [end of text]"
    return f"{before} [{_quote(tokens[offset])}] {_quote(''.join(tokens[offset + 1 :]))}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
