"""Shared types of the built-in datasets: what a generator hands to `prepare_dataset`, and the registry entry.

    CLASSES        the two bag classes every built-in dataset uses (negative, positive)
    BagDataset     bags in memory (`digit_bags`)
    BuiltinDataset a dataset's name, description, classes and option defaults (`dataset_info`)
    _Record        one bag to write; _Plan: the bags a generator will yield, and their source
    _Entry         a registry entry: the info, the build function and an optional option check

Generators (classic, digits, synthetic_wsi) import these; nothing here imports a generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

CLASSES = ["negative", "positive"]


@dataclass
class BagDataset:
    """Bags in memory. bags[i]: (N_i, D) float32; labels[i]: int; instance_labels[i]: (N_i,) or None."""

    name: str
    bags: list[torch.Tensor]
    labels: np.ndarray
    classes: list[str]
    instance_labels: list[np.ndarray] | None = None

    @property
    def in_dim(self) -> int:
        return int(self.bags[0].shape[1])


@dataclass(frozen=True)
class BuiltinDataset:
    """What `prepare_dataset` can write: classes (None when they depend on options) and option defaults."""

    name: str
    description: str
    classes: list[str] | None
    defaults: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    """The run config's task.kind its targets are for (its labels.csv has that task's default columns)."""


@dataclass
class _Record:
    """One bag to write. features (N, D); coords (N, 2) level-0 px or None; instance_labels (N,) or None."""

    bag_id: str
    label: str
    patient_id: str
    features: np.ndarray
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)  # more labels.csv columns (e.g. survival's time, event)


@dataclass
class _Plan:
    num_bags: int
    records: Iterator[_Record]
    source: str


@dataclass(frozen=True)
class _Entry:
    info: BuiltinDataset
    build: Callable[[dict[str, Any], int], _Plan]
    check: Callable[[dict[str, Any]], None] | None = None
