"""Which cells a sweep runs: the full grid, a quick one, or one given on the command line.

Answer length is bounded so every run ends in seconds: at 20 tokens/s an answer lasts
`duration_s`; unthrottled it is 500 tokens; and no run delivers more than `budget`
chunks in all (the cells that offer more than this machine can carry then stay short,
and say how far behind they fell).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from bench.spec import Cell

MIN_TOKENS = 20
UNTHROTTLED_TOKENS = 500


@dataclass(frozen=True, slots=True)
class Grid:
    answers: tuple[int, ...]
    viewers: tuple[int, ...]
    rates: tuple[float, ...]
    duration_s: float
    budget: int
    tokens: int | None = None  # fixed answer length, overriding the rules above

    def cells(self) -> list[Cell]:
        out = []
        for rate, viewers, answers in itertools.product(self.rates, self.viewers, self.answers):
            out.append(Cell(answers, viewers, rate, self.tokens_for(answers, viewers, rate)))
        return out

    def tokens_for(self, answers: int, viewers: int, rate: float) -> int:
        if self.tokens is not None:
            return self.tokens
        natural = round(rate * self.duration_s) if rate else UNTHROTTLED_TOKENS
        return max(MIN_TOKENS, min(natural, self.budget // (answers * viewers)))


FULL = Grid(
    answers=(1, 10, 100, 1000),
    viewers=(1, 10),
    rates=(20.0, 0.0),
    duration_s=10.0,
    budget=200_000,
)

QUICK_CELLS = [
    Cell(1, 1, 20.0, 60),
    Cell(100, 1, 20.0, 60),
    Cell(1000, 1, 20.0, 60),
    Cell(10, 10, 20.0, 60),
    Cell(100, 1, 0.0, 200),
]
