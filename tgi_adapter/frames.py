"""Pure mapping from the data of TGI's SSE frames to contract events.

One mapper per stream and route: ``feed()`` takes the data payloads one read
produced and returns the events they make, keeping the stream's invariants
(``started`` once before the first token or the end, token ``i`` counting
from 0, special and empty tokens dropped, joined texts equal to the engine's
``generated_text``). A failure the engine reports sets ``error`` instead of
raising, so the driver can still decide to retry a stream that has not
started. No I/O, no clock: the driver passes ``now``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import WorkerError
from .events import TokenEvent, make_event
from .mapping import (
    error_for,
    error_from_frame,
    error_from_openai_frame,
    int_or_none,
    seed_from_engine,
)

__all__ = ["FrameMapper", "NativeFrames", "OpenAIFrames", "mapper_for_route"]

log = logging.getLogger(__name__)

_loads = json.loads
_TOKEN = "token"
_DONE = b"[DONE]"
_FINISH_OPENAI = {"stop": "eos_token", "eos_token": "eos_token", "length": "length", "stop_sequence": "stop_sequence"}


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class FrameMapper:
    """What every route's mapper shares: counters, ``started``, the end events."""

    def __init__(
        self,
        started: Dict[str, Any],
        *,
        t_submit: float,
        secrets: Sequence[Optional[str]] = (),
        sampled_seed: Optional[int] = None,
    ) -> None:
        #: ``data`` of the ``started`` event, emitted before the first token or the end.
        self.started_data = started
        self.started_sent = False
        self.done = False
        self.error: Optional[WorkerError] = None
        self.t_submit = t_submit
        self.t_first: Optional[float] = None
        self.tokens_in: Optional[int] = None
        self.tokens_out = 0
        self.decode_ms: Optional[int] = None
        #: The ``end`` event's ``finish_reason``, once it is made.
        self.finish_reason: Optional[str] = None
        self.texts: List[str] = []
        self._secrets = secrets
        self._i = 0  # index of the next emitted token
        self._frames = 0  # token frames seen, emitted or not
        self._sampled_seed = sampled_seed

    # -- shared helpers -----------------------------------------------------

    def _parse(self, payloads: List[bytes]) -> Tuple[List[Any], Optional[WorkerError]]:
        """Parse every payload; on the first bad one, the frames before it and the error.

        One ``json.loads`` for the whole read is the fast way; it is only
        trusted when it yields one value per payload (a payload such as
        ``{..},{..}`` would otherwise pass as two frames).
        """
        if len(payloads) > 1:
            try:
                frames: List[Any] = _loads(b"[" + b",".join(payloads) + b"]")
            except (ValueError, RecursionError):
                pass
            else:
                if len(frames) == len(payloads):
                    return frames, None
        frames = []
        for payload in payloads:
            try:
                frames.append(_loads(payload))
            except (ValueError, RecursionError):
                return frames, error_for("malformed", f"a frame is not JSON: {payload[:80]!r}")
        return frames, None

    def _fail(self, error: WorkerError) -> None:
        self.error = error
        self.done = True

    def _emit_started(self, out: List[TokenEvent]) -> None:
        self.started_sent = True
        out.append(make_event("started", self.started_data))

    def _emit_text(self, text: str, out: List[TokenEvent]) -> None:
        if not self.started_sent:
            self._emit_started(out)
        self.texts.append(text)
        out.append(make_event(_TOKEN, {"t": text, "i": self._i}))
        self._i += 1

    def _end(
        self,
        out: List[TokenEvent],
        now: float,
        *,
        finish_reason: str,
        tokens_out: Optional[int],
        seed: Optional[int],
    ) -> None:
        if not self.started_sent:
            self._emit_started(out)
        self.done = True
        self.finish_reason = finish_reason
        self.tokens_out = tokens_out if tokens_out is not None else self._frames
        first = self.t_first if self.t_first is not None else now
        decode_ms = self.decode_ms = _ms(now - first)
        out.append(
            make_event(
                "metrics",
                {
                    "latency_first_token_ms": _ms(first - self.t_submit),
                    "latency_decode_ms": decode_ms,
                    "tokens_out": self.tokens_out,
                },
            )
        )
        out.append(
            make_event(
                "end",
                {
                    "tokens_out": self.tokens_out,
                    "decode_ms": decode_ms,
                    "finish_reason": finish_reason,
                    "tokens_in": self.tokens_in,
                    "seed": seed,
                    "engine_version": self.started_data.get("engine_version"),
                },
            )
        )

    @property
    def frames_seen(self) -> int:
        """Token frames received so far, emitted or not (special and empty ones included)."""
        return self._frames

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self.texts)

    # -- per route ------------------------------------------------------------

    def feed(self, payloads: List[bytes], now: float) -> List[TokenEvent]:  # pragma: no cover - abstract
        """Map the data of the events one read completed."""
        raise NotImplementedError

    def at_eof(self, now: float) -> List[TokenEvent]:
        """The body ended; return final events, or set ``error`` if it ended early."""
        if not self.done:
            self._fail(error_for("reset", "the stream ended before its final frame"))
        return []


class NativeFrames(FrameMapper):
    """``/generate_stream`` frames: ``{index?, token, generated_text, details}``."""

    def feed(self, payloads: List[bytes], now: float) -> List[TokenEvent]:
        out: List[TokenEvent] = []
        if self.done:
            return out
        frames, parse_error = self._parse(payloads)
        if self.t_first is None and frames:
            self.t_first = now
        texts_append = self.texts.append
        out_append = out.append
        i = self._i
        try:
            for frame in frames:
                token = frame.get("token")
                if token is None or frame.get("generated_text") is not None:
                    self._i = i
                    self._special_frame(frame, out, now)
                    i = self._i
                    if self.done:
                        break
                    continue
                self._frames += 1
                text = token["text"]
                if text.__class__ is not str:
                    raise TypeError("token text is not a string")
                if text and not token.get("special"):
                    if not self.started_sent:
                        self._emit_started(out)
                    texts_append(text)
                    out_append(make_event(_TOKEN, {"t": text, "i": i}))
                    i += 1
        except (AttributeError, KeyError, TypeError) as exc:
            self._fail(error_for("malformed", f"unexpected frame shape ({exc})"))
        self._i = i
        if parse_error is not None and not self.done:
            self._fail(parse_error)
        return out

    def _special_frame(self, frame: Dict[str, Any], out: List[TokenEvent], now: float) -> None:
        if "error" in frame:
            self._fail(error_from_frame(frame.get("error"), frame.get("error_type"), self._secrets))
            return
        generated = frame.get("generated_text")
        token = frame.get("token")
        if generated is None or not isinstance(generated, str) or not isinstance(token, dict):
            raise TypeError("neither a token nor an error")
        self._frames += 1
        text = token.get("text")
        special = bool(token.get("special"))
        joined = "".join(self.texts)
        if generated.startswith(joined):
            # The final frame's token may be EOS, or carry held-back characters:
            # generated_text says exactly what is still missing.
            rest = generated[len(joined) :]
        else:
            log.debug("engine text differs from its tokens; the tokens stand")
            rest = text if isinstance(text, str) and not special else ""
        if rest:
            self._emit_text(rest, out)
        details = frame.get("details")
        if not isinstance(details, dict):
            details = {}
        self.tokens_in = int_or_none(details.get("input_length"))
        reason = details.get("finish_reason")
        if reason not in ("length", "eos_token", "stop_sequence"):
            reason = "eos_token" if special else "length"
        self._end(
            out,
            now,
            finish_reason=reason,
            tokens_out=int_or_none(details.get("generated_tokens")),
            seed=seed_from_engine(details.get("seed")),
        )


class OpenAIFrames(FrameMapper):
    """``/v1/completions`` and ``/v1/chat/completions`` chunks, ending with ``[DONE]``."""

    def __init__(self, *args: Any, chat: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chat = chat
        self._finish: Optional[str] = None
        self._usage_out: Optional[int] = None

    def feed(self, payloads: List[bytes], now: float) -> List[TokenEvent]:
        out: List[TokenEvent] = []
        if self.done:
            return out
        finished = _DONE in payloads
        if finished:
            payloads = [p for p in payloads if p != _DONE]
        frames, parse_error = self._parse(payloads)
        if self.t_first is None and frames:
            self.t_first = now
        try:
            for frame in frames:
                self._frame(frame, out)
                if self.done:
                    return out
        except (AttributeError, KeyError, TypeError, IndexError) as exc:
            self._fail(error_for("malformed", f"unexpected chunk shape ({exc})"))
            return out
        if parse_error is not None:
            self._fail(parse_error)
        elif finished:
            self._finish_stream(out, now)
        return out

    def _frame(self, frame: Dict[str, Any], out: List[TokenEvent]) -> None:
        if "error" in frame:
            error = frame["error"]
            if isinstance(error, str):  # TGI < 2.4.1 used the native shape here
                self._fail(error_from_frame(error, frame.get("error_type"), self._secrets))
            else:
                self._fail(error_from_openai_frame(error, self._secrets))
            return
        usage = frame.get("usage")
        if isinstance(usage, dict):
            self.tokens_in = int_or_none(usage.get("prompt_tokens"))
            completion = int_or_none(usage.get("completion_tokens"))
            if completion is not None:
                self._usage_out = completion
        choices = frame["choices"]
        if not choices:
            return
        choice = choices[0]
        if self._chat:
            delta = choice.get("delta") or {}
            text = delta.get("content")
        else:
            text = choice.get("text")
        self._frames += 1
        reason = choice.get("finish_reason")
        if reason:
            self._finish = _FINISH_OPENAI.get(reason, "eos_token")
            if self._finish == "eos_token":
                # The chunk that ends on EOS carries the EOS token itself: TGI's
                # completions stream sends its text ("</s>"), which the engine's
                # generated_text leaves out.
                text = None
        if text:
            if text.__class__ is not str:
                raise TypeError("content is not a string")
            self._emit_text(text, out)

    def _finish_stream(self, out: List[TokenEvent], now: float) -> None:
        self._end(
            out,
            now,
            finish_reason=self._finish or "eos_token",
            tokens_out=self._usage_out,
            seed=self._sampled_seed,
        )

    def at_eof(self, now: float) -> List[TokenEvent]:
        out: List[TokenEvent] = []
        if not self.done and self._finish is not None:
            # TGI before 2.2 ends these streams without [DONE].
            self._finish_stream(out, now)
            return out
        return super().at_eof(now)


def mapper_for_route(
    route: str,
    started: Dict[str, Any],
    *,
    t_submit: float,
    secrets: Sequence[Optional[str]] = (),
    sampled_seed: Optional[int] = None,
) -> FrameMapper:
    """The frame mapper for a stream on ``route``."""
    if route == "native":
        return NativeFrames(started, t_submit=t_submit, secrets=secrets, sampled_seed=sampled_seed)
    return OpenAIFrames(
        started, t_submit=t_submit, secrets=secrets, sampled_seed=sampled_seed, chat=route == "openai-chat"
    )
