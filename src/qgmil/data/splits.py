"""Patient-level splits: stratified k-fold (repeated over seeds) with a validation part, or the table's own.

No patient ever sits in two parts of a fold. Splits are lists of bag ids (table rows), saved as
`splits.json` so that later runs (resume, other models of a benchmark) use exactly the same folds.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from .table import DataError, aggregate_label, infer_classes

SPLITS_FORMAT = "qgmil-splits"
PARTS = ("train", "val", "test")


@dataclass
class Fold:
    """One train/val/test assignment of bag ids. name: e.g. "seed0-fold3"."""

    name: str
    seed: int
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class Splits:
    folds: list[Fold]
    method: str  # "kfold", "table-split" or "table-fold"
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.folds)

    def __iter__(self):
        return iter(self.folds)

    def to_json(self) -> dict:
        return {"format": SPLITS_FORMAT, "format_version": 1, "method": self.method, "params": self.params,
                "folds": [asdict(f) for f in self.folds]}

    def save(self, path: str | Path) -> Path:
        from ..atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Splits":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError([f"{path}: splits file not found"]) from None
        except (OSError, json.JSONDecodeError) as err:
            raise DataError([f"{path}: not a readable splits file ({err})"]) from None
        if not isinstance(data, dict) or data.get("format") != SPLITS_FORMAT:
            raise DataError([f"{path}: not a qgmil splits file (no \"format\": \"{SPLITS_FORMAT}\")"])
        try:
            folds = [Fold(**f) for f in data["folds"]]
        except (KeyError, TypeError) as err:
            raise DataError([f"{path}: malformed fold entry ({err})"]) from None
        return cls(folds, data.get("method", "unknown"), data.get("params", {}))

    def check(self, table: pd.DataFrame) -> list[str]:
        """Problems of these splits against a table: unknown bag ids, a bag or patient in two parts."""
        patient_of = dict(zip(table["bag_id"], table["patient_id"]))
        problems = []
        for fold in self.folds:
            seen_bag: dict[str, str] = {}
            seen_patient: dict[str, str] = {}
            for part in PARTS:
                for bag_id in getattr(fold, part):
                    if bag_id not in patient_of:
                        problems.append(f"{fold.name}: bag {bag_id!r} ({part}) is not in the table")
                        continue
                    if bag_id in seen_bag:
                        problems.append(f"{fold.name}: bag {bag_id!r} is in both {seen_bag[bag_id]} and {part}")
                    seen_bag[bag_id] = part
                    patient = patient_of[bag_id]
                    if seen_patient.setdefault(patient, part) != part:
                        problems.append(
                            f"{fold.name}: patient {patient!r} is in both {seen_patient[patient]} and {part}"
                        )
        return problems


def _strata(table: pd.DataFrame) -> str:
    """The column splits stratify on: the label, or for tasks other than classification the `stratum` their
    targets give (survival: event and time quantile; regression: target quantile; multi-label: the tuple of
    0/1 label indicators, split by iterative stratification)."""
    return "stratum" if "stratum" in table else "label"


def _indicators(patients: pd.Series) -> np.ndarray | None:
    """The (patients, labels) 0/1 matrix when the strata are multi-label indicator tuples, else None."""
    first = patients.iloc[0] if len(patients) else None
    return np.array(patients.tolist(), dtype=np.int64) if isinstance(first, tuple) else None


_ITERSTRAT = "pip install 'qgmil[multilabel]' (iterative-stratification)"


def _iterstrat():
    """iterative-stratification's module, or None (with a warning) without it."""
    try:
        from iterstrat import ml_stratifiers
    except ModuleNotFoundError:
        warnings.warn(f"multi-label splits stratify on each bag's label set without iterative stratification: "
                      f"{_ITERSTRAT}", stacklevel=3)
        return None
    return ml_stratifiers


def _label_sets(patients: pd.Series, folds: int) -> pd.Series:
    """Indicator tuples as label-set strata (rare sets pooled): the fallback without iterative-stratification."""
    return _merge_rare(patients.map(lambda t: "".join(map(str, t))), folds)


def _kfold(patients: pd.Series, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, held-out) positions of `patients` for k folds, stratified on their strata: scikit-learn's
    StratifiedKFold, or for multi-label indicators Sechidis et al.'s iterative stratification (every label's
    positives spread evenly over the folds, which label-set strata cannot do once sets are many)."""
    labels = _indicators(patients)
    if labels is not None:
        module = _iterstrat()
        if module is not None:
            return list(module.MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
                        .split(np.zeros(len(labels)), labels))
        patients = _label_sets(patients, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # too few patients of a class: make_splits warns once
        return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(patients.index, patients.values))


def _patients(table: pd.DataFrame) -> pd.Series:
    """patient_id -> label or stratum (one row per patient, table order).

    A patient whose slides carry different labels (slide bags, as CLAM's datasets have them) is stratified on
    its `patient_label` (`MILDataset.from_table` adds it: data.patient_label, the majority by default), or
    without that column on the majority of its slides' labels (ties: the first in class order)."""
    column = _strata(table)
    labelled = table[table[column].notna()]
    if len(labelled) < len(table):
        rows = table.loc[table[column].isna(), "row"].tolist()
        raise DataError([f"rows {rows[:10]}: splits need a {'target' if column == 'stratum' else 'label'} for every bag"])
    if column == "label" and "patient_label" in table:
        return labelled.groupby("patient_id", sort=False)["patient_label"].first()
    grouped = labelled.groupby("patient_id", sort=False)[column]
    if column == "label":
        classes = infer_classes(labelled["label"])
        return grouped.agg(lambda labels: aggregate_label(labels.tolist(), "majority", classes))
    return grouped.first()


def _merge_rare(patients: pd.Series, folds: int) -> pd.Series:
    """Strata with fewer than `folds` patients pooled into one, so that stratification stays possible (a
    label is never pooled: a class is kept apart, with a warning, as the user named it)."""
    counts = patients.value_counts()
    rare = set(counts[counts < folds].index)
    return patients.map(lambda s: "(rare strata)" if s in rare else s) if rare else patients


def _carve_val(patients: pd.Series, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split patients into (train, val), stratified when every class has >= 2 patients."""
    ids = patients.index.to_list()
    if val_fraction <= 0 or len(ids) < 2:
        return ids, []
    n_val = max(1, round(val_fraction * len(ids)))
    labels = _indicators(patients)
    module = _iterstrat() if labels is not None else None
    if module is not None:
        split = module.MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
        train, val = next(split.split(np.zeros(len(labels)), labels))
        return [ids[i] for i in train], [ids[i] for i in val]
    if labels is not None:
        patients = _label_sets(patients, 2)
    stratify = patients.values if patients.value_counts().min() >= 2 and n_val >= patients.nunique() else None
    train, val = train_test_split(ids, test_size=n_val, stratify=stratify, random_state=seed)
    return list(train), list(val)


def _bags_of(table: pd.DataFrame, patients: Sequence[str]) -> list[str]:
    wanted = set(patients)
    return [b for b, p in zip(table["bag_id"], table["patient_id"]) if p in wanted]


def make_splits(
    table: pd.DataFrame, folds: int = 5, seeds: Sequence[int] = (0,), val_fraction: float = 0.2
) -> Splits:
    """Patient-level stratified k-fold, repeated for each seed.

    Each fold tests on 1/folds of the patients; `val_fraction` of the remaining patients (stratified)
    form the validation part used for model selection.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    patients = _patients(table)
    if _strata(table) == "stratum" and _indicators(patients) is None:
        patients = _merge_rare(patients, folds)
    if len(patients) < folds:
        raise DataError([f"{len(patients)} patients cannot make {folds} folds"])
    counts = patients.value_counts()
    if counts.min() < folds and _strata(table) == "label":
        warnings.warn(
            f"class {counts.idxmin()!r} has only {counts.min()} patients, fewer than {folds} folds: "
            "some test parts will lack it", stacklevel=2,
        )
    result = []
    ids = patients.index.to_numpy()
    for seed in seeds:
        for k, (rest, test) in enumerate(_kfold(patients, folds, seed)):
            train, val = _carve_val(patients.iloc[rest], val_fraction, seed=seed * 1000 + k)
            result.append(Fold(f"seed{seed}-fold{k}", int(seed), k, _bags_of(table, train), _bags_of(table, val),
                               _bags_of(table, ids[test])))
    params = {"folds": folds, "seeds": [int(s) for s in seeds], "val_fraction": val_fraction}
    return Splits(result, "kfold", params)


def inner_folds(table: pd.DataFrame, fold: Fold, k: int, seed: int = 0) -> list[Fold]:
    """Patient-level stratified k-fold over an outer fold's training and validation bags (never its test
    bags), for tuning inside cross-validation: inner fold j trains on k-1 parts and validates on the j-th."""
    if k < 2:
        raise ValueError(f"inner folds must be >= 2, got {k}")
    rest = table[table["bag_id"].isin(set(fold.train) | set(fold.val))]
    patients = _patients(rest)
    if len(patients) < k:
        raise DataError([f"{fold.name}: {len(patients)} training patients cannot make {k} inner folds"])
    if _indicators(patients) is None and patients.value_counts().min() < k:
        patients = pd.Series(0, index=patients.index)  # a stratum too small for k parts: plain k-fold
    ids = patients.index.to_numpy()
    return [Fold(f"{fold.name}-inner{j}", fold.seed, j, _bags_of(rest, ids[train]), _bags_of(rest, ids[val]), [])
            for j, (train, val) in enumerate(_kfold(patients, k, seed))]


def splits_from_table(table: pd.DataFrame, seeds: Sequence[int] = (0,), val_fraction: float = 0.2) -> Splits | None:
    """The table's own split (`split` column: train/val/test) or folds (`fold` column), else None.

    With a split column and no val rows, validation patients are carved from train. With a fold
    column, fold k is tested on the rows of the k-th fold value and validated on patients carved from
    the others. Rows with an empty split/fold are left out. Patients crossing parts are an error.
    """
    column = "split" if "split" in table and table["split"].notna().any() else "fold"
    if column in table and table[column].notna().any():
        crossing = [
            f"{table.attrs.get('source', 'table')} rows {', '.join(map(str, rows['row']))}: patient {patient!r} has "
            f"slides in different {column}s ({', '.join(sorted(map(str, rows[column].dropna().unique())))})"
            for patient, rows in table.groupby("patient_id", sort=False)
            if rows[column].nunique(dropna=False) > 1
        ]
        if crossing:
            raise DataError(crossing, f"{table.attrs.get('source', 'table')}: the table's {column} column mixes patients")
    if "split" in table and table["split"].notna().any():
        result = []
        for seed in seeds:
            part = {p: table.loc[table["split"] == p] for p in PARTS}
            train_ids, val_ids = part["train"]["bag_id"].tolist(), part["val"]["bag_id"].tolist()
            if not val_ids and val_fraction > 0:
                train_p, val_p = _carve_val(_patients(part["train"]), val_fraction, seed)
                train_ids, val_ids = _bags_of(part["train"], train_p), _bags_of(part["train"], val_p)
            result.append(Fold(f"seed{seed}-split", int(seed), 0, train_ids, val_ids, part["test"]["bag_id"].tolist()))
        splits = Splits(result, "table-split", {"seeds": [int(s) for s in seeds], "val_fraction": val_fraction})
    elif "fold" in table and table["fold"].notna().any():
        fold_values = sorted({int(f) for f in table["fold"].dropna()})
        fold_of = table["fold"].map(lambda f: None if f is None else int(f))
        result = []
        for seed in seeds:
            for k, value in enumerate(fold_values):
                test = table[fold_of == value]
                rest = table[fold_of.notna() & (fold_of != value)]
                train_p, val_p = _carve_val(_patients(rest), val_fraction, seed * 1000 + k)
                result.append(Fold(f"seed{seed}-fold{k}", int(seed), k, _bags_of(rest, train_p), _bags_of(rest, val_p),
                                   test["bag_id"].tolist()))
        splits = Splits(result, "table-fold", {"seeds": [int(s) for s in seeds], "val_fraction": val_fraction})
    else:
        return None
    source = table.attrs.get("source", "table")
    for fold in splits.folds:  # a fold that cannot train or cannot report is no fold
        for part in ("train", "test"):
            if not getattr(fold, part):
                raise DataError(
                    [f"{source}: the table's {column} column leaves fold {fold.name} with no {part} bags "
                     f"(values: {', '.join(sorted(map(str, table[column].dropna().unique())))})"],
                    f"{source}: cannot use the table's {column} column (give it {part} rows, or drop the column for "
                    "k-fold; `qgmil data split --ignore-table-split`)")
    problems = splits.check(table)
    if problems:
        raise DataError(problems, f"{table.attrs.get('source', 'table')}: the table's split mixes patients")
    return splits


def load_or_make_splits(
    table: pd.DataFrame,
    path: str | Path | None = None,
    folds: int = 5,
    seeds: Sequence[int] = (0,),
    val_fraction: float = 0.2,
) -> Splits:
    """Reuse `path` when it exists (checked against the table), else the table's own split, else k-fold;
    a newly made split is written to `path`."""
    if path is not None and Path(path).exists():
        splits = Splits.load(path)
        problems = splits.check(table)
        if problems:
            raise DataError(problems, f"{path}: splits do not fit the table")
        return splits
    splits = splits_from_table(table, seeds, val_fraction) or make_splits(table, folds, seeds, val_fraction)
    if path is not None:
        splits.save(path)
    return splits


def fold_summary(splits: Splits, table: pd.DataFrame) -> pd.DataFrame:
    """Bags and class counts per part of every fold (for printing)."""
    label_of = dict(zip(table["bag_id"], table[_strata(table)]))
    rows = []
    for fold in splits:
        for part in PARTS:
            ids = getattr(fold, part)
            counts = pd.Series([label_of[i] for i in ids], dtype=object).value_counts().to_dict()
            rows.append({"fold": fold.name, "part": part, "bags": len(ids),
                         **{f"n_{k}": v for k, v in sorted(counts.items())}})
    return pd.DataFrame(rows).fillna(0)


__all__ = ["Fold", "Splits", "make_splits", "splits_from_table", "load_or_make_splits", "fold_summary"]
