"""The search space and its command-line syntax, free of TensorFlow and KerasTuner.

`tuning.task` and `deploy.vertex tune` check their flags with these before anything heavy is imported;
`tuning.hypermodel` declares the space to KerasTuner through `SearchSpace.values(hp)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Optional, Tuple

# Hyperparameter names are the trainer's flag names, so best values can be passed straight back.
MAX_GRID = 1000  # rates on a --dropout-range grid: enough for any real search, small enough to list at once
FILTERS, DROPOUT, DENSE_UNITS, LEARNING_RATE = "filters", "dropout", "dense_units", "learning_rate"


@dataclasses.dataclass(frozen=True)
class DropoutRange:
    """Dropout rates from `low` to `high`: on a grid of `step`, or continuous when `step` is None."""

    low: float
    high: float
    step: Optional[float] = None

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}" + (f":{self.step:g}" if self.step else "")

    def grid(self) -> Tuple[float, ...]:
        """Every rate on the grid, MIN first (MAX included when the steps land on it)."""
        if self.step is None:
            raise ValueError(f"{self} is a continuous range: it has no grid")
        count = _grid_count(self.low, self.high, self.step)
        return tuple(round(self.low + index * self.step, 6) for index in range(count))


def _grid_count(low: float, high: float, step: float) -> int:
    """Rates on the grid MIN, MIN + STEP, ... up to MAX (MAX counted when a step lands on it, to rounding)."""
    return int((high - low) / step + 1e-9) + 1


def dropout_range(text: str) -> DropoutRange:
    """argparse type for `--dropout-range MIN:MAX[:STEP]` (tuning.task and deploy.vertex tune)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or MIN:MAX:STEP such as 0.1:0.6:0.1, got {text!r}")
    numbers = []
    for name, part in zip(("MIN", "MAX", "STEP"), parts, strict=False):
        try:
            numbers.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {part!r} is not a number (in {text!r})") from None
        if not math.isfinite(numbers[-1]):
            raise argparse.ArgumentTypeError(f"{name} {part!r} is not a finite number (in {text!r})")
    low, high, step = numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None
    for name, value in (("MIN", low), ("MAX", high)):
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{name} {value:g} is not a dropout rate: it must be in [0, 1)")
    if low > high:
        raise argparse.ArgumentTypeError(f"MIN {low:g} is above MAX {high:g}")
    if low == high:
        raise argparse.ArgumentTypeError(f"MIN and MAX are both {low:g}: a range needs MIN below MAX")
    if step is not None and step <= 0:
        raise argparse.ArgumentTypeError(f"STEP {step:g} must be positive")
    if step is not None and step > high - low + 1e-9:
        raise argparse.ArgumentTypeError(f"STEP {step:g} is larger than MAX - MIN ({high - low:g}): "
                                         "the grid would hold MIN alone")
    if step is not None and _grid_count(low, high, step) > MAX_GRID:
        raise argparse.ArgumentTypeError(f"STEP {step:g} makes a grid of {_grid_count(low, high, step):,} rates, "
                                         f"more than {MAX_GRID:,}: use a larger STEP, or MIN:MAX for a continuous "
                                         "range")
    return DropoutRange(low, high, step)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Filters per conv block chosen from `filter_choices`; dropout in a range; optional extras."""

    blocks: int = 2
    filter_choices: Tuple[int, ...] = (16, 32, 64)
    dropout: DropoutRange = DropoutRange(0.1, 0.6, 0.1)
    dense_units_choices: Tuple[int, ...] = ()  # empty: not searched
    learning_rate_choices: Tuple[float, ...] = ()  # empty: not searched

    def values(self, hp) -> dict:
        """Declare (on first use) and read this space's values for one trial (a KerasTuner
        HyperParameters), as trainer settings."""
        filters = tuple(hp.Choice(f"filters_{block}", list(self.filter_choices)) for block in range(1, self.blocks + 1))
        rate = hp.Float(DROPOUT, self.dropout.low, self.dropout.high, step=self.dropout.step)
        values = {FILTERS: filters, DROPOUT: round(rate, 4)}
        if self.dense_units_choices:
            values[DENSE_UNITS] = hp.Choice(DENSE_UNITS, list(self.dense_units_choices))
        if self.learning_rate_choices:
            values[LEARNING_RATE] = hp.Choice(LEARNING_RATE, list(self.learning_rate_choices))
        return values


def as_flags(values: dict, base) -> dict:
    """A trial's full model settings as trainer flag values (JSON-friendly; filters as `--filters` takes them)."""
    flags = {"batch_size": base.batch_size, "learning_rate": base.learning_rate, "dense_units": base.dense_units,
             **values}
    flags[FILTERS] = ",".join(map(str, values[FILTERS]))
    return flags


def trial_number(trial_id: str) -> int:
    """KerasTuner's trial id ("00", "0003": 0-based, padded) as the 1-based number it prints ("Trial #1")."""
    return int(trial_id) + 1
