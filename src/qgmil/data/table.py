"""The dataset table: one row per slide/sample with its label, patient and feature file.

A table (CSV, TSV or Parquet) has a bag id column, a label column, and optionally a patient
column (defaults to the bag id), a split or fold column, and a path column naming the feature file
(otherwise `<features>/<bag_id>.<h5|hdf5|pt|pth|npy>` is looked up, CLAM's `h5_files/` and
`pt_files/` subfolders included). Column names are configurable through `Columns`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

from .bagfile import FEATURE_SUFFIXES


class DataError(ValueError):
    """Bad dataset input. `problems` lists every problem found, one line each (file and row named)."""

    def __init__(self, problems: list[str], header: str = "dataset problems"):
        self.problems = list(problems)
        shown = self.problems[:20]
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{header} ({len(self.problems)}):\n  " + "\n  ".join(shown) + more)


class Columns(BaseModel):
    """Names of the table's columns. Only `bag_id` and (for training) `label` must exist."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bag_id: str = "bag_id"
    label: str = "label"
    patient_id: str = "patient_id"
    split: str = "split"
    fold: str = "fold"
    path: str = "path"
    # targets of the other tasks (run config `task`): survival time and event; regression's numeric columns or
    # multi-label's 0/1 columns (default: the label column, for multi-label split on label_sep)
    time: str = "time"
    event: str = "event"
    targets: tuple[str, ...] | None = None
    label_sep: str = ";"


# Normalised column names used everywhere after `read_table`.
STANDARD = ("bag_id", "label", "patient_id", "split", "fold", "path")
# Cells that mean "no label" in the tables people write (pandas' own NA spellings, case-insensitive).
MISSING_LABELS = {"", "na", "n/a", "nan", "null", "none", "<na>", "#n/a", "-"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def normalize_label(value) -> str | None:
    """One spelling per label: None for a missing one ("", NA, nan, ...), numbers as numbers ("1", "1.0" and
    "1.00" are all "1"; "0.50" is "0.5"), anything else stripped of surrounding spaces."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    text = str(value).strip()
    if text.lower() in MISSING_LABELS:
        return None
    if _NUMBER.fullmatch(text):
        number = float(text)
        return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
    return text


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_any_table(path: Path) -> pd.DataFrame:
    """A CSV/TSV/Parquet file as a DataFrame of strings (nothing normalised); DataError names the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        sep = "\t" if suffix in (".tsv", ".txt") else ","
        # Ids like "001" must stay strings; labels are typed later.
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except ImportError as err:
        raise DataError([f"{path}: reading Parquet needs pyarrow ({err}); `pip install pyarrow`"]) from None
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError([f"{path}: not a readable table ({err})"]) from None


def _objects(values: list) -> pd.Series:
    # Plain str/None cells: pandas >= 3 would otherwise turn None into NaN in a string column.
    return pd.Series(values, dtype=object)


def read_table(path: str | Path, columns: Columns | None = None, require_labels: bool = True,
               keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read and normalise a dataset table.

    Returns a DataFrame with columns bag_id, patient_id (str), label (str or None), and split, fold,
    path where the table has them, plus `row` (1-based line in the file, header = line 1) for messages.
    Raises DataError listing every table-level problem: missing columns, empty or duplicate bag ids,
    missing labels (when `require_labels`), unknown split names, a patient with conflicting labels.
    `keep`: more columns that must exist, kept as they are written (stripped strings or None) under
    `raw:<name>` (the target columns of a task, which parses them).
    """
    table, problems = read_table_with_problems(path, columns, require_labels, keep)
    if problems:
        raise DataError(problems, f"{path}: table problems")
    return table


def read_table_with_problems(
    path: str | Path, columns: Columns | None = None, require_labels: bool = True, keep: tuple[str, ...] = ()
) -> tuple[pd.DataFrame, list[str]]:
    """As `read_table`, but returns the table-level problems instead of raising on them
    (unreadable file and missing columns still raise: there is no table to go on with)."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: table not found"])
    columns = columns or Columns()
    raw = read_any_table(path)
    if columns.bag_id not in raw.columns:
        raise DataError([f"{path}: no bag id column {columns.bag_id!r} (columns: {', '.join(map(str, raw.columns))})"])
    if require_labels and columns.label not in raw.columns:
        raise DataError([f"{path}: no label column {columns.label!r} (columns: {', '.join(map(str, raw.columns))})"])

    absent = [name for name in keep if name not in raw.columns]
    if absent:
        raise DataError([f"{path}: no column {name!r} (columns: {', '.join(map(str, raw.columns))})" for name in absent])

    table = pd.DataFrame({"row": range(2, len(raw) + 2)})
    for name in STANDARD:
        source = getattr(columns, name)
        if source in raw.columns:
            values = [None if pd.isna(v) else str(v).strip() for v in raw[source]]
            table[name] = _objects([v if v else None for v in values])
    if "patient_id" not in table:
        table["patient_id"] = table["bag_id"]
    else:
        table["patient_id"] = _objects([p if p else b for p, b in zip(table["patient_id"], table["bag_id"])])
    if "label" not in table:
        table["label"] = _objects([None] * len(table))
    for name in keep:
        table[f"raw:{name}"] = _objects([None if pd.isna(v) or not str(v).strip() else str(v).strip() for v in raw[name]])
    raw_labels = list(table["label"])
    table["label"] = _objects([normalize_label(v) for v in raw_labels])

    problems = []
    for row, bag_id in zip(table["row"], table["bag_id"]):
        if not bag_id:
            problems.append(f"{path} row {row}: empty bag id")
    dup = table[table["bag_id"].notna() & table["bag_id"].duplicated(keep=False)]
    for bag_id, rows in dup.groupby("bag_id")["row"]:
        problems.append(f"{path} rows {', '.join(map(str, rows))}: duplicate bag id {bag_id!r}")
    if require_labels:
        for row, label, raw in zip(table["row"], table["label"], raw_labels):
            if label is None:
                problems.append(f"{path} row {row}: missing label" + (f" ({raw!r})" if raw else ""))
    if "split" in table:
        for row, split in zip(table["row"], table["split"]):
            if split is not None and split.lower() not in SPLIT_NAMES:
                problems.append(f"{path} row {row}: unknown split {split!r} (use train, val or test)")
        table["split"] = _objects([None if s is None else SPLIT_NAMES.get(s.lower(), s) for s in table["split"]])
    if "fold" in table:
        for row, fold in zip(table["row"], table["fold"]):
            if fold is not None and not fold.lstrip("-").isdigit():
                problems.append(f"{path} row {row}: fold {fold!r} is not an integer")
    labelled = table[table["label"].notna()]
    for spellings in _case_variants(labelled["label"]):
        where = "; ".join(f"{label!r} (rows {', '.join(map(str, labelled.loc[labelled['label'] == label, 'row']))})"
                          for label in spellings)
        problems.append(f"{path}: labels that differ only in case would be separate classes: {where}; "
                        "write each class one way")
    for patient, labels in labelled.groupby("patient_id")["label"]:
        if labels.nunique() > 1:
            rows = table.loc[labels.index, "row"]
            problems.append(
                f"{path} rows {', '.join(map(str, rows))}: patient {patient!r} has slides with different labels "
                f"({', '.join(sorted(labels.unique()))})"
            )
    table.attrs["source"] = str(path)
    return table, problems


def _case_variants(labels) -> list[list[str]]:
    """Groups of labels that differ only in case ("Positive", "positive"), each sorted."""
    groups: dict[str, set[str]] = {}
    for label in labels:
        groups.setdefault(label.casefold(), set()).add(label)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def infer_classes(labels) -> list[str]:
    """Sorted class names; numerically when every label is a number ("2" after "10" would surprise)."""
    values = sorted({str(v) for v in labels if v is not None})
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def check_labels(table: pd.DataFrame, classes: list[str]) -> list[str]:
    """Problems for labels outside `classes` (e.g. a typo, or a class the model was not trained on)."""
    known = {normalize_label(c) for c in classes}
    source = table.attrs.get("source", "table")
    return [
        f"{source} row {row}: unknown label {label!r} (classes: {', '.join(classes)})"
        for row, label in zip(table["row"], table["label"])
        if label is not None and label not in known
    ]


def _index_features_dir(features_dir: Path) -> dict[str, Path]:
    """stem -> file for every feature file in the folder (and CLAM's h5_files/, pt_files/).

    One directory listing instead of one stat per candidate: fast on network filesystems with
    100k files. Preference when a stem has several files: h5 > hdf5 > pt > pth > npy.
    """
    index: dict[str, Path] = {}
    rank = {s: i for i, s in enumerate(FEATURE_SUFFIXES)}
    for folder in (features_dir / "pt_files", features_dir / "h5_files", features_dir):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda p: -rank.get(p.suffix.lower(), -1)):
            if entry.suffix.lower() in rank and not entry.name.startswith("."):
                index[entry.stem] = entry
    return index


def resolve_files(table: pd.DataFrame, features_dir: str | Path | None) -> tuple[list[Path | None], list[str]]:
    """The feature file of every row -> (files, problems). A missing file is a problem naming the row."""
    source = table.attrs.get("source", "table")
    base = Path(source).parent
    features_dir = Path(features_dir) if features_dir is not None else None
    if features_dir is not None and not features_dir.is_dir():
        return [None] * len(table), [f"{features_dir}: features directory not found"]
    index = _index_features_dir(features_dir) if features_dir is not None else {}
    files, problems = [], []
    paths = table["path"] if "path" in table else [None] * len(table)
    for row, bag_id, given in zip(table["row"], table["bag_id"], paths):
        if given:
            candidate = Path(given)
            if not candidate.is_absolute():
                candidate = (features_dir or base) / candidate
            found = candidate if candidate.is_file() else None
        else:
            found = index.get(bag_id)
            if found is None and Path(bag_id).suffix.lower() in FEATURE_SUFFIXES:  # ids given as file names
                found = index.get(Path(bag_id).stem)
        if found is None:
            where = given or f"{features_dir}/{bag_id}.{{h5,hdf5,pt,pth,npy}}"
            problems.append(f"{source} row {row}: feature file for bag {bag_id!r} not found ({where})")
        files.append(found)
    return files, problems
