"""Reading optional numbers out of files' metadata (slide properties, HDF5 attributes, peer tables).

It imports nothing of qgmil and no torch, so the slide readers, the feature-file readers and the heatmaps share one rule.
"""

from __future__ import annotations

import math

import numpy as np


def positive_number(value) -> float | None:
    """`value` as a float when it is a finite number > 0 (or the text of one: slide metadata is text), else
    None: absent, other text, a list, 0, NaN, inf, or a bool (True is no resolution or tile size, though
    float(True) == 1)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
