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
from bench.targets import AT_TARGET, BURST, ONE, SCALE, TARGET_CELLS, UNTHROTTLED, Need

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

# The quick sweep's answer lengths: as short as each target's figure allows.
QUICK_TOKENS = {ONE: 40, AT_TARGET: 60, BURST: 20, UNTHROTTLED: 200, SCALE: 40}


def target_cells(quick: bool) -> list[Cell]:
    """Every cell a target is judged on (bench/targets.py), quick or at full length."""
    return [_cell(need, QUICK_TOKENS[need] if quick else None) for need in TARGET_CELLS]


def _cell(need: Need, tokens: int | None) -> Cell:
    tokens = tokens or FULL.tokens_for(need.answers, need.viewers, need.rate)
    return Cell(need.answers, need.viewers, need.rate, tokens, need.burst)


def with_targets(cells: list[Cell], quick: bool = False) -> list[Cell]:
    """`cells`, then the target cells they do not have yet."""
    have = {c.key for c in cells}
    return [*cells, *(c for c in target_cells(quick) if c.key not in have)]


QUICK_CELLS = [*target_cells(quick=True), Cell(10, 10, 20.0, 60)]
