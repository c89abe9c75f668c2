"""Hyperparameter search spaces as plain data: what `qgmil tune` may vary, declared next to each model's config.

A space maps dotted run-config keys (`optim.lr`, `model.overrides.dropout`) to a `Float`, `Int` or
`Choice`. Each architecture declares its own knobs as `search_space` (keys are its config fields); the
tuner adds TRAINING_SPACE and the user's YAML (`tune.space`) on top. No optuna here: the tuner turns
these into `trial.suggest_*` calls, so the models layer stays free of the optional dependency.

YAML forms of one entry (`parse_space`):
  optim.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   a float range (log-uniform with log: true)
  model.overrides.depth: {low: 1, high: 3, type: int} an integer range (step: 2 for every other)
  model.overrides.dim: [256, 512]                     a choice (any YAML scalars, null included)
  optim.weight_decay: null                            leave this key out of the default space
  optim.epochs: 40                                    a scalar: fixed, not searched
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def __post_init__(self):
        if not self.low <= self.high or (self.log and self.low <= 0):
            raise ValueError(f"need {'0 < ' if self.log else ''}low <= high, got low {self.low}, high {self.high}")

    def extremes(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self):
        if not self.low <= self.high or self.step < 1 or (self.log and (self.low <= 0 or self.step != 1)):
            raise ValueError(f"need low <= high and step >= 1 (log: low > 0, step 1), got {self}")

    def extremes(self) -> list[int]:
        return [self.low, self.low + (self.high - self.low) // self.step * self.step]


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def __post_init__(self):
        if not self.choices:
            raise ValueError("a choice needs at least one value")

    def extremes(self) -> list:
        return list(self.choices)


Param = Float | Int | Choice
Space = dict[str, Param]

#: What every model's tuning varies besides its own knobs: the optimizer's learning rate and weight decay.
TRAINING_SPACE: Space = {
    "optim.lr": Float(1e-5, 1e-3, log=True),
    "optim.weight_decay": Float(1e-5, 1e-1, log=True),
}

DROPOUT = Float(0.0, 0.5)


def parse_param(key: str, value: Any) -> Param | Any:
    """One YAML entry -> a Param; a scalar stays a fixed value. ValueError names the key."""
    try:
        if isinstance(value, list):
            return Choice(tuple(value))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"low", "high", "log", "step", "type"})
            if unknown or not {"low", "high"} <= set(value):
                raise ValueError("expected {low, high} with optional log, step, type: int|float"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
            kind = value.get("type", "float")
            if kind == "int":
                return Int(int(value["low"]), int(value["high"]), int(value.get("step", 1)), bool(value.get("log", False)))
            if kind != "float" or "step" in value:
                raise ValueError(f"type {kind!r}: use int or float (step is for int ranges)")
            return Float(float(value["low"]), float(value["high"]), bool(value.get("log", False)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"tune.space.{key}: {err}") from None
    return value


def merge_space(defaults: Space, overrides: Mapping[str, Any]) -> tuple[Space, dict[str, Any]]:
    """The default space with the YAML's entries on top: (searched params, fixed values).

    A null entry removes a default key; a scalar fixes the key (not searched) at that value.
    """
    space, fixed = dict(defaults), {}
    for key, value in overrides.items():
        space.pop(key, None)
        if value is None:
            continue
        param = parse_param(key, value)
        if isinstance(param, (Float, Int, Choice)):
            space[key] = param
        else:
            fixed[key] = param
    return space, fixed


def describe(param: Param) -> str:
    """A short text of one param for tables and `qgmil models --space`."""
    if isinstance(param, Choice):
        return "one of " + ", ".join("null" if c is None else str(c) for c in param.choices)
    scale = ", log" if param.log else ""
    step = f", step {param.step}" if isinstance(param, Int) and param.step != 1 else ""
    return f"{param.low:g} .. {param.high:g}{scale}{step}"
