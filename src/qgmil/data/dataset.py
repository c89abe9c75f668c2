"""`MILDataset`: bags from a table + feature files, read lazily, one item per slide or per patient.

Files are opened inside `__getitem__`, so each DataLoader worker opens its own HDF5 handles (h5py
handles do not survive fork). An in-memory cache (fp16 halves it; "auto": fp32 when the whole dataset fits
`auto_cache_limit()`) serves datasets that fit in RAM, so each file is read once per process;
`max_instances` draws a random subset of a large bag, reproducibly from (seed, epoch, index).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .bagfile import Bag, BagFileError, BagLimits, inspect_bag, read_bag, read_coords, read_features
from .table import (
    PATIENT_LABEL_RULES, Columns, DataError, add_patient_labels, check_labels, infer_classes, mixed_labels_allowed,
    normalize_label, read_table, resolve_files,
)

BagUnit = Literal["slide", "patient"]
CacheMode = Literal["auto", "fp16", "fp32"]
FP16_MAX = 65504.0  # the largest finite float16
AUTO_CACHE_BYTES = 4 * 2**30


def auto_cache_limit() -> int:
    """The most feature bytes `cache="auto"` keeps in memory: 4 GiB, or a quarter of the machine's memory if
    that is less, shared by the processes torchrun starts on this machine (each holds its own copy)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the fixed limit
        memory = 4 * AUTO_CACHE_BYTES
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(AUTO_CACHE_BYTES, memory // 4) // processes


@dataclass
class BagItem:
    """One bag as the loader yields it. features (N, D) float32; label: class index, -1 if unlabelled;
    target (T,) float32: the bag's targets for the other tasks (the table's `target` column), else None."""

    features: torch.Tensor
    label: int
    index: int
    bag_id: str
    coords: torch.Tensor | None = None
    target: torch.Tensor | None = None


@dataclass(frozen=True)
class Unit:
    """What one item is made of: a slide, or all slides of a patient (concatenated)."""

    bag_id: str
    patient_id: str
    label: str | None
    files: tuple[Path, ...]
    slide_ids: tuple[str, ...]
    target: tuple[float, ...] | None = None


def _units(table: pd.DataFrame, bag_unit: BagUnit) -> list[Unit]:
    targets = table["target"] if "target" in table else [None] * len(table)
    if bag_unit == "slide":
        return [
            Unit(b, p, lab, (f,), (b,), t)
            for b, p, lab, f, t in zip(table["bag_id"], table["patient_id"], table["label"], table["file"], targets)
        ]
    if bag_unit != "patient":
        raise ValueError(f"bag_unit must be 'slide' or 'patient', got {bag_unit!r}")
    units = []
    # the patient's label under data.patient_label (`add_patient_labels`), else its slides' one label
    label = "patient_label" if "patient_label" in table else "label"
    for patient, rows in table.groupby("patient_id", sort=False):
        target = rows["target"].iloc[0] if "target" in rows else None  # a patient's rows agree (the task checks)
        units.append(Unit(patient, patient, rows[label].iloc[0], tuple(rows["file"]), tuple(rows["bag_id"]), target))
    return units


class MILDataset(Dataset):
    """Bags of a table. Build with `MILDataset.from_table(table, features_dir, ...)`.

    Item i -> BagItem(features (N_i, D) float32, label, index=i, bag_id, coords (N_i, 2) if asked).
    Reading a bag whose dim differs from the first bag's, or (with `check_values`) that holds NaN/Inf, raises
    BagFileError naming the bag and its file; `limits` bound what a file may declare (`BagLimits`).
    Attributes: classes, bag_ids, patient_ids, labels (int array, -1 = unlabelled), lengths (N_i),
    in_dim, table (the normalised table with a `file` column).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        classes: list[str],
        *,
        bag_unit: BagUnit = "slide",
        max_instances: int | None = None,
        cache: CacheMode | None = None,
        with_coords: bool = False,
        seed: int = 0,
        limits: BagLimits | None = None,
        check_values: bool = False,
        _shared_cache: dict | None = None,
        _lengths: dict | None = None,
    ):
        if cache not in (None, "auto", "fp16", "fp32"):
            raise ValueError(f"cache must be None, 'auto', 'fp16' or 'fp32', got {cache!r}")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.table = table
        self.classes = list(classes)
        self.bag_unit = bag_unit
        self.max_instances = max_instances
        self._cache_setting = cache
        self.with_coords = with_coords
        self.seed = seed
        self.limits = limits
        self.check_values = check_values  # refuse NaN/Inf features as each bag is read (predict: never checked before)
        self._dim: int | None = None
        self.epoch = 0
        self.units = _units(table, bag_unit)
        self._class_index = {c: i for i, c in enumerate(self.classes)}
        # Shared with subsets: a file is read (and its length looked up) once per process.
        self._cache: dict[Path, torch.Tensor] = {} if _shared_cache is None else _shared_cache
        self._file_lengths: dict[Path, int] = {} if _lengths is None else _lengths

    @classmethod
    def from_table(
        cls,
        table: str | Path | pd.DataFrame,
        features_dir: str | Path | None,
        *,
        columns: Columns | None = None,
        classes: list[str] | None = None,
        require_labels: bool = True,
        slide_table: str | Path | None = None,
        patient_label: str = "refuse",
        **kwargs,
    ) -> "MILDataset":
        """Read `table` (path or a frame from `read_table`), find each bag's feature file, check labels.

        classes: the class order (label index = position); by default the sorted labels of the table.
        slide_table: STAMP's slide table beside the clinical `table` (see `read_table`).
        patient_label: how a patient's label is made from its slides' (`aggregate_label`: refuse, majority,
            max): the label of a patient bag (bag_unit="patient"; `refuse`: slides of different labels are an
            error) and, for slide bags, which keep their own labels, what the splits stratify on (`refuse`: the
            majority). Kept as the table's `patient_label` column.
        Raises DataError listing every missing file and unknown label at once.
        """
        if patient_label not in PATIENT_LABEL_RULES:
            raise ValueError(f"patient_label must be one of {', '.join(PATIENT_LABEL_RULES)}, got {patient_label!r}")
        bag_unit = kwargs.get("bag_unit", "slide")
        if not isinstance(table, pd.DataFrame):
            table = read_table(table, columns, require_labels=require_labels, slide_table=slide_table,
                               mixed_labels=mixed_labels_allowed(bag_unit, patient_label))
        table = table.copy()
        files, problems = resolve_files(table, features_dir)
        table["file"] = files
        # Given classes are spelled as the table's labels are ("1.0" -> "1").
        classes = [normalize_label(c) for c in classes] if classes is not None else infer_classes(table["label"])
        problems += check_labels(table, classes)
        if problems:
            raise DataError(problems, f"{table.attrs.get('source', 'table')}: cannot build the dataset")
        table = add_patient_labels(table, "majority" if patient_label == "refuse" else patient_label, classes)
        return cls(table, classes, **kwargs)

    # --- what the dataset holds -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.units)

    @property
    def bag_ids(self) -> list[str]:
        return [u.bag_id for u in self.units]

    @property
    def patient_ids(self) -> list[str]:
        return [u.patient_id for u in self.units]

    @property
    def labels(self) -> np.ndarray:
        return np.array([self._class_index.get(u.label, -1) for u in self.units], dtype=np.int64)

    @property
    def targets(self) -> np.ndarray | None:
        """(n, T) float64 targets of the other tasks (NaN where a bag has none), or None without a target column."""
        if "target" not in self.table:
            return None
        width = max((len(u.target) for u in self.units if u.target is not None), default=0)
        return np.array([u.target if u.target is not None else (np.nan,) * width for u in self.units],
                        dtype=np.float64).reshape(len(self.units), width)

    @property
    def cache_mode(self) -> Literal["fp16", "fp32"] | None:
        """The cache in use. "auto" is decided on first use, from the file headers: fp32 when all this dataset's
        features (float32, every file once) fit `auto_cache_limit()`, else none. Subsets inherit the decision."""
        if self._cache_setting == "auto":
            self._cache_setting = "fp32" if self.feature_bytes() <= auto_cache_limit() else None
        return self._cache_setting

    def feature_bytes(self) -> int:
        """Bytes the features of all the dataset's files take in float32 (from the file headers)."""
        files = {f for u in self.units for f in u.files}
        return sum(self._file_length(f) for f in files) * self.in_dim * 4 if files else 0

    def _file_length(self, file: Path) -> int:
        if file not in self._file_lengths:
            self._file_lengths[file] = inspect_bag(file, limits=self.limits).num_instances
        return self._file_lengths[file]

    def lengths_of(self, index: int) -> int:
        return sum(self._file_length(f) for f in self.units[index].files)

    @property
    def lengths(self) -> np.ndarray:
        """Instances per item as the dataset yields them (file headers, at most `max_instances`): what the
        bucketing sampler batches by."""
        lengths = np.array([self.lengths_of(i) for i in range(len(self))], dtype=np.int64)
        return lengths if self.max_instances is None else np.minimum(lengths, self.max_instances)

    @property
    def in_dim(self) -> int:
        if self._dim is None:
            self._dim = inspect_bag(self.units[0].files[0], limits=self.limits).dim
        return self._dim

    def subset(self, bag_ids: Iterable[str], **overrides) -> "MILDataset":
        """The rows whose bag id is in `bag_ids` (slide ids), e.g. one part of a split.

        Keeps classes and shares the cache; `overrides` change e.g. max_instances for the training part.
        """
        wanted = set(bag_ids)
        unknown = wanted - set(self.table["bag_id"])
        if unknown:
            raise DataError([f"bag id {b!r} is not in the table" for b in sorted(unknown)], "subset")
        options = dict(
            bag_unit=self.bag_unit, max_instances=self.max_instances, cache=self.cache_mode,
            with_coords=self.with_coords, seed=self.seed, limits=self.limits, check_values=self.check_values,
        )
        options.update(overrides)
        table = self.table[self.table["bag_id"].isin(wanted)]
        table.attrs = dict(self.table.attrs)
        return MILDataset(table, self.classes, _shared_cache=self._cache, _lengths=self._file_lengths, **options)

    def set_epoch(self, epoch: int) -> None:
        """Changes the random instance subset drawn for each bag (only with max_instances)."""
        self.epoch = epoch

    # --- reading ----------------------------------------------------------------------------------

    def _where(self, file: Path) -> str:
        bags = [b for b, f in zip(self.table["bag_id"], self.table["file"]) if f == file]
        return f"{file} (bag {bags[0]!r})" if bags else str(file)

    def _read(self, file: Path, rows: np.ndarray | None) -> np.ndarray:
        """A file's features, refused by name when they would break a batch far from here (another dim)
        or a prediction silently (NaN/Inf, with check_values)."""
        features = read_features(file, rows, limits=self.limits)
        if features.shape[1] != self.in_dim:
            raise BagFileError(f"{self._where(file)}: feature dim {features.shape[1]}, but the first bag has "
                               f"{self.in_dim} (see `qgmil data check`)")
        if self.check_values and not np.isfinite(features).all():
            bad = int((~np.isfinite(features).all(axis=1)).sum())
            raise BagFileError(f"{self._where(file)}: {bad} instance(s) have NaN/Inf features")
        return features

    def _load(self, file: Path, rows: np.ndarray | None) -> torch.Tensor:
        if self.cache_mode is None:
            return torch.from_numpy(np.ascontiguousarray(self._read(file, rows)))
        cached = self._cache.get(file)
        if cached is None:
            features = self._read(file, None)
            peak = 0.0 if self.cache_mode != "fp16" else float(np.max(np.abs(features), where=np.isfinite(features), initial=0.0))
            if peak > FP16_MAX:  # caught here, not as inf losses epochs later
                raise BagFileError(f"{self._where(file)}: features reach {peak:g}, beyond float16's {FP16_MAX:g}: "
                                   "data.cache=fp16 would make them inf (use data.cache=fp32 or none)")
            dtype = torch.float16 if self.cache_mode == "fp16" else torch.float32
            cached = torch.from_numpy(features).to(dtype)
            self._cache[file] = cached
        if rows is not None:
            return cached[torch.from_numpy(rows)]
        # fp16 items are converted (a new tensor) in __getitem__; fp32 ones must not alias the cache.
        return cached.clone() if self.cache_mode == "fp32" else cached

    def _rows(self, index: int) -> np.ndarray | None:
        """Sorted instance rows to keep, or None for all."""
        if self.max_instances is None:
            return None
        n = self.lengths_of(index)
        if n <= self.max_instances:
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return np.sort(rng.choice(n, self.max_instances, replace=False))

    def __getitem__(self, index: int) -> BagItem:
        unit = self.units[index]
        rows = self._rows(index)
        if len(unit.files) == 1:
            features = self._load(unit.files[0], rows)
        else:
            features = torch.cat([self._load(f, None) for f in unit.files])
            features = features if rows is None else features[torch.from_numpy(rows)]
        coords = None
        if self.with_coords:
            parts = [read_coords(f)[0] for f in unit.files]
            if all(p is not None for p in parts):
                coords = torch.from_numpy(np.concatenate(parts).astype(np.float32))
                coords = coords if rows is None else coords[torch.from_numpy(rows)]
        label = self._class_index.get(unit.label, -1)
        target = None if unit.target is None else torch.tensor(unit.target, dtype=torch.float32)
        return BagItem(features.float(), label, index, unit.bag_id, coords, target)

    def preload(self, progress: bool = True) -> "MILDataset":
        """Fill the cache now (e.g. before forking DataLoader workers, which then share it)."""
        from tqdm.auto import tqdm

        if self.cache_mode is None:
            raise ValueError("preload needs cache='fp16' or 'fp32' (or 'auto', when the dataset fits)")
        files = [f for u in self.units for f in u.files]
        for file in tqdm(files, desc="caching bags", disable=not progress, leave=False):
            self._load(file, None)
        return self

    def read_bag(self, index: int) -> Bag:
        """Everything stored for item `index`: features, coords, provenance attrs and extra datasets.

        A patient bag concatenates its slides; extras["slide_index"] (N,) says which slide each
        instance came from and attrs["slides"] lists the slide ids.
        """
        unit = self.units[index]
        bags = [read_bag(f) for f in unit.files]
        if len(bags) == 1:
            return bags[0]
        units = {b.coord_unit for b in bags}
        coords = np.concatenate([b.coords for b in bags]) if None not in units and len(units) == 1 else None
        extras = {"slide_index": np.concatenate([np.full(len(b), i) for i, b in enumerate(bags)])}
        for key in set.intersection(*(set(b.extras) for b in bags)):
            values = [b.extras[key] for b in bags]
            if all(len(v) == len(b) for v, b in zip(values, bags)):  # per-instance: concatenate
                extras[key] = np.concatenate(values) if isinstance(values[0], np.ndarray) else sum(values, [])
        attrs = dict(bags[0].attrs, slides=list(unit.slide_ids))
        features = np.concatenate([b.features for b in bags])
        return Bag(features, bags[0].path, bags[0].layout, coords, units.pop() if coords is not None else None, attrs, extras)
