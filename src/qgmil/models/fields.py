"""Validated field types shared by the model configs.

A value out of range is a pydantic error that names the key, e.g.
`dim: Input should be greater than or equal to 1`. Configs keep a model validator only for rules
that involve several fields (e.g. QG-MIL's dim divisible by heads).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]
"""An integer >= 1: widths, depths, head and branch counts."""

NonNegativeInt = Annotated[int, Field(ge=0)]
"""An integer >= 0, where 0 switches something off (residual blocks, STKIM's K)."""

Fraction = Annotated[float, Field(ge=0, lt=1)]
"""A ratio in [0, 1) (e.g. the share of instances STKIM masks)."""

DropoutRate = Fraction
"""A dropout probability, in [0, 1)."""

LossWeight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""The weight of an auxiliary loss term: a finite number >= 0 (0 turns the term off)."""
