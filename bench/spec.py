"""What one benchmark run is (a cell of the sweep, one transport) and what a client process does."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["direct", "socketio", "sse"]
MODES: tuple[Mode, ...] = ("direct", "socketio", "sse")


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of the sweep: `answers` at once, each watched by `viewers`, at `rate` tokens/s.

    `rate` 0 is unthrottled: the model sends as fast as it can. `burst`: every answer is
    asked at the same instant (no ramp), as when many users press enter together.
    """

    answers: int
    viewers: int
    rate: float
    tokens: int
    burst: bool = False

    @property
    def label(self) -> str:
        rate = f"{self.rate:g}/s" if self.rate else "unthrottled"
        at_once = ", asked at once" if self.burst else ""
        return (
            f"{self.answers} answers x {self.viewers} viewers @ {rate}, {self.tokens} tokens"
            + at_once
        )

    @property
    def key(self) -> tuple[int, int, float, bool]:
        return (self.answers, self.viewers, self.rate, self.burst)

    @property
    def deliveries(self) -> int:
        return self.answers * self.viewers * self.tokens


@dataclass(frozen=True, slots=True)
class Load:
    """One client process's share of a run. Sent to it as JSON on stdin."""

    mode: Mode
    target_url: str  # the gateway, or the mock's /v1 for `direct`
    mock_url: str  # the mock's root, for the send-time stamps
    nonces: list[str]  # one per answer this process drives
    first_index: int  # the index of nonces[0] among all the run's answers
    total_answers: int
    viewers: int
    tokens: int
    rate: float
    ramp_s: float  # answers start spread evenly over this window
    timeout_s: float
    out: str  # path prefix for this process's results

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Load:
        return cls(**data)


def question_for(nonce: str, tokens: int, rate: float) -> str:
    from tokenrelay.testing.mockllm import directive

    rule = directive(tokens=tokens, rate=rate) if rate else directive(tokens=tokens)
    return f"bench-{nonce} how fast is the relay? {rule}"
