"""The dataset table: one row per slide/sample with its label, patient and feature file.

A table (CSV, TSV, Parquet or Excel .xlsx) has a bag id column, a label column, and optionally a patient
column (defaults to the bag id), a split or fold column, and a path column naming the feature file
(otherwise `<features>/<bag_id>.<h5|hdf5|pt|pth|npy>` is looked up, CLAM's `h5_files/` and
`pt_files/` subfolders included). Column names are configurable through `Columns`.

Peers' tables are read as their tools write them:
  CLAM   one dataset CSV `case_id, slide_id, label`: `slide_id` is taken as the bag id and `case_id` as the
         patient when the table has no `bag_id` / `patient_id` column (`PEER_COLUMNS`); a case may hold slides
         of different labels (CLAM labels slides and votes per patient), see `aggregate_label`.
  STAMP  two tables: a clinical one (`PATIENT` + the target, one row per patient) and a slide one (`PATIENT`,
         `FILENAME` of the feature file): `read_table(clini, slide_table=slides)` joins them into one row per
         slide, its bag id the file name's stem. Either may be .xlsx, as STAMP reads them.
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


#: The names other tools give a column, used only when the table lacks this project's default name and the
#: column was not renamed (`Columns` field at its default): field -> ((tool, name), ...), in order of preference.
PEER_COLUMNS = {
    "bag_id": (("CLAM", "slide_id"),),
    "patient_id": (("CLAM", "case_id"), ("STAMP", "PATIENT")),
    "path": (("STAMP", "FILENAME"),),
}
#: How the patient's label is made from its slides' labels (run config `data.patient_label`)
PATIENT_LABEL_RULES = ("refuse", "majority", "max")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")

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
    """A CSV/TSV/Parquet/Excel (.xlsx, first sheet) file as a DataFrame of strings (nothing normalised);
    DataError names the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in EXCEL_SUFFIXES:
        return _read_excel(path)
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


def _read_excel(path: Path) -> pd.DataFrame:
    """The first sheet of an .xlsx workbook (as STAMP reads its tables), cells as strings."""
    try:
        import openpyxl  # noqa: F401  (pandas' reader for .xlsx; checked here to name the extra)
    except ImportError:
        raise DataError([f"{path}: reading Excel tables needs openpyxl: pip install 'qgmil[excel]' "
                         "(or save the sheet as CSV)"]) from None
    try:
        return pd.read_excel(path, dtype=str, keep_default_na=False, na_values=[""], engine="openpyxl")
    except Exception as err:  # noqa: BLE001 - a bad workbook raises zipfile's, openpyxl's or pandas' errors
        raise DataError([f"{path}: not a readable Excel table ({type(err).__name__}: {err})"]) from None


def detect_columns(names, columns: Columns) -> tuple[Columns, dict[str, str]]:
    """`columns` with the peers' names (`PEER_COLUMNS`) put in for the fields still at their default whose
    default name is not among `names` -> (columns, {field: "name (tool's header)"} of what was put in)."""
    defaults = Columns()
    names = set(map(str, names))
    update, detected = {}, {}
    for field, candidates in PEER_COLUMNS.items():
        current = getattr(columns, field)
        if current != getattr(defaults, field) or current in names:
            continue  # renamed by the user, or the table has this project's own name: nothing to guess
        for tool, name in candidates:
            if name in names:
                update[field], detected[field] = name, f"{name} ({tool}'s header)"
                break
    return columns.model_copy(update=update), detected


def _stem_if_file(value) -> str | None:
    """A feature file name's stem (STAMP's `FILENAME` slide_00.h5 -> bag id slide_00); other values as they are."""
    if value is None or pd.isna(value):
        return None
    text = str(value).strip()
    return Path(text).stem if Path(text).suffix.lower() in FEATURE_SUFFIXES else (text or None)


def _join_slide_table(clinical: Path, slides_path: Path, columns: Columns
                      ) -> tuple[pd.DataFrame, Columns, dict[str, str], list[str], dict[int, str]]:
    """STAMP's two tables as one raw table of slides: each row of the slide table (patient, feature file) with
    its patient's columns of the clinical table (label, targets...; on a name in both, the slide table's).

    -> (raw table, columns, detected names, problems, {row index: why its label is missing}).
    """
    if not slides_path.is_file():
        raise DataError([f"{slides_path}: slide table not found"])
    clinic, slides = read_any_table(clinical), read_any_table(slides_path)
    clinic_columns, detected = detect_columns(clinic.columns, columns)
    columns, slide_detected = detect_columns(slides.columns, columns)
    detected.update(slide_detected)
    for path, frame, name in ((clinical, clinic, clinic_columns.patient_id), (slides_path, slides, columns.patient_id)):
        if name not in frame.columns:
            raise DataError([f"{path}: no patient column {name!r} (columns: {', '.join(map(str, frame.columns))}); "
                             f"the slide table ({slides_path.name}) and the clinical table ({clinical.name}) are "
                             "joined on it (--patient-col NAME)"])
    problems, rows_of = [], {}
    for i, patient in enumerate(clinic[clinic_columns.patient_id]):
        if patient is not None and not pd.isna(patient) and str(patient).strip():
            rows_of.setdefault(str(patient).strip(), []).append(i)
    for patient, rows in rows_of.items():
        if len(rows) > 1:
            problems.append(f"{clinical} rows {', '.join(str(r + 2) for r in rows)}: patient {patient!r} has "
                            "several rows (a clinical table has one row per patient; the first is used)")
    first = {patient: rows[0] for patient, rows in rows_of.items()}
    joined = slides.copy()
    extra = [c for c in clinic.columns if c != clinic_columns.patient_id and c not in slides.columns]
    why: dict[int, str] = {}
    picks = []
    for i, patient in enumerate(slides[columns.patient_id]):
        key = None if patient is None or pd.isna(patient) else str(patient).strip()
        picks.append(first.get(key) if key else None)
        if not key:
            why[i] = f"the slide has no patient, so no row of {clinical.name}"
        elif key not in first:
            why[i] = f"patient {key!r} has no row in {clinical}"
    for name in extra:
        values = clinic[name].tolist()
        joined[name] = pd.Series([None if p is None else values[p] for p in picks], dtype=object)
    return joined, columns, detected, problems, why


def mixed_labels_allowed(bag_unit: str, patient_label: str) -> bool:
    """Whether a patient whose slides carry different labels is fine: with slide bags each slide keeps its own
    label; with patient bags a rule other than `refuse` makes the patient's."""
    return bag_unit == "slide" or patient_label != "refuse"


def aggregate_label(labels, rule: str, classes) -> str | None:
    """One label for a patient from its slides' `labels` (None entries ignored; None if none is left).

    majority: the most frequent label, ties going to the first in `classes` order (as CLAM's `maj` voting,
    scipy.stats.mode over the class indices); max: the last in `classes` order (CLAM's `max`, its default: e.g.
    tumour over normal when the classes are sorted or given in that order); refuse: as majority (the caller
    refuses mixed labels before).
    """
    if rule not in PATIENT_LABEL_RULES:
        raise ValueError(f"patient label rule must be one of {', '.join(PATIENT_LABEL_RULES)}, got {rule!r}")
    present = [label for label in labels if label is not None]
    if not present:
        return None
    order = {c: i for i, c in enumerate(classes)}
    rank = lambda label: order.get(label, len(order))  # noqa: E731 - unknown labels (refused elsewhere) last
    if rule == "max":
        return max(present, key=rank)
    counts = pd.Series(present, dtype=object).value_counts()
    tied = [label for label, n in counts.items() if n == counts.max()]
    return min(tied, key=rank)


def _objects(values: list) -> pd.Series:
    # Plain str/None cells: pandas >= 3 would otherwise turn None into NaN in a string column.
    return pd.Series(values, dtype=object)


def read_table(path: str | Path, columns: Columns | None = None, require_labels: bool = True,
               keep: tuple[str, ...] = (), *, slide_table: str | Path | None = None,
               mixed_labels: bool = False) -> pd.DataFrame:
    """Read and normalise a dataset table.

    Returns a DataFrame with columns bag_id, patient_id (str), label (str or None), and split, fold,
    path where the table has them, plus `row` (1-based line in the file, header = line 1) for messages.
    Raises DataError listing every table-level problem: missing columns, empty or duplicate bag ids,
    missing labels (when `require_labels`), unknown split names, a patient with conflicting labels (unless
    `mixed_labels`: see `mixed_labels_allowed`).
    `keep`: more columns that must exist, kept as they are written (stripped strings or None) under
    `raw:<name>` (the target columns of a task, which parses them).
    `slide_table`: STAMP's layout: `path` is the clinical table (patient + label, one row per patient) and
    `slide_table` lists the slides (patient + feature file); rows are then the slide table's (`attrs["source"]`).
    Columns named as CLAM and STAMP name them are found without renaming (`detect_columns`); what was found is
    in `attrs["detected_columns"]`.
    """
    table, problems = read_table_with_problems(path, columns, require_labels, keep, slide_table=slide_table,
                                               mixed_labels=mixed_labels)
    if problems:
        raise DataError(problems, f"{table.attrs.get('source', path)}: table problems")
    return table


def read_table_with_problems(
    path: str | Path, columns: Columns | None = None, require_labels: bool = True, keep: tuple[str, ...] = (), *,
    slide_table: str | Path | None = None, mixed_labels: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """As `read_table`, but returns the table-level problems instead of raising on them
    (unreadable file and missing columns still raise: there is no table to go on with)."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: table not found"])
    columns = columns or Columns()
    problems: list[str] = []
    why_unlabelled: dict[int, str] = {}
    if slide_table is not None:
        clinical, path = path, Path(slide_table)
        raw, columns, detected, problems, why_unlabelled = _join_slide_table(clinical, path, columns)
        label_source = clinical
    else:
        raw = read_any_table(path)
        columns, detected = detect_columns(raw.columns, columns)
        label_source = path
    if columns.bag_id == Columns().bag_id and columns.bag_id not in raw.columns and columns.path in raw.columns:
        # a table of feature files (STAMP's slide table): each bag is named by its file, as in a features folder
        raw = raw.assign(**{columns.bag_id: pd.Series([_stem_if_file(v) for v in raw[columns.path]], dtype=object)})
        detected["bag_id"] = f"the file names of {columns.path!r} without extension"
    if columns.bag_id not in raw.columns:
        raise DataError([f"{path}: no bag id column {columns.bag_id!r} (columns: {', '.join(map(str, raw.columns))}); "
                         "name it with --bag-id-col (data.columns.bag_id)"])
    if require_labels and columns.label not in raw.columns:
        names = read_any_table(label_source).columns if slide_table is not None else raw.columns
        raise DataError([f"{label_source}: no label column {columns.label!r} (columns: {', '.join(map(str, names))}); "
                         "name it with --label-col (data.columns.label)"])

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

    for row, bag_id in zip(table["row"], table["bag_id"]):
        if not bag_id:
            problems.append(f"{path} row {row}: empty bag id")
    dup = table[table["bag_id"].notna() & table["bag_id"].duplicated(keep=False)]
    for bag_id, rows in dup.groupby("bag_id")["row"]:
        problems.append(f"{path} rows {', '.join(map(str, rows))}: duplicate bag id {bag_id!r}")
    if require_labels:
        for i, (row, label, raw_label) in enumerate(zip(table["row"], table["label"], raw_labels)):
            if label is None:
                problems.append(f"{path} row {row}: missing label" + (f" ({raw_label!r})" if raw_label else "")
                                + (f": {why_unlabelled[i]}" if i in why_unlabelled else ""))
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
    if not mixed_labels:
        for patient, labels in labelled.groupby("patient_id")["label"]:
            if labels.nunique() > 1:
                rows = table.loc[labels.index, "row"]
                problems.append(
                    f"{path} rows {', '.join(map(str, rows))}: patient {patient!r} has slides with different labels "
                    f"({', '.join(sorted(labels.unique()))}); one bag per patient needs one label: "
                    "data.patient_label majority or max (--patient-label) makes it from the slides' labels, "
                    "or train on slide bags (data.bag_unit: slide), where each slide keeps its own"
                )
    table.attrs["source"] = str(path)
    if slide_table is not None:
        table.attrs["clinical_table"] = str(label_source)
    table.attrs["detected_columns"] = detected
    return table, problems


def mixed_label_patients(table: pd.DataFrame) -> dict[str, list[str]]:
    """{patient: its slides' distinct labels, sorted} for the patients whose slides carry different labels."""
    labelled = table[table["label"].notna()]
    return {str(p): sorted(labels.unique()) for p, labels in labelled.groupby("patient_id", sort=False)["label"]
            if labels.nunique() > 1}


def add_patient_labels(table: pd.DataFrame, rule: str, classes) -> pd.DataFrame:
    """`table` with a `patient_label` column: each row's patient's label under `rule` (`aggregate_label`), the
    label of a patient bag, and what splits stratify on (slide bags keep their own labels in `label`)."""
    labels = {p: aggregate_label(rows.tolist(), rule, classes)
              for p, rows in table.groupby("patient_id", sort=False)["label"]}
    out = table.copy()
    out.attrs = dict(table.attrs)
    out["patient_label"] = _objects([labels[p] for p in table["patient_id"]])
    return out


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
            if found is None and candidate.suffix.lower() not in FEATURE_SUFFIXES:
                # a slide's name instead of its feature file's (older STAMP slide tables), maybe with its extension
                found = index.get(candidate.name) or index.get(candidate.stem)
        else:
            found = index.get(bag_id)
            if found is None and Path(bag_id).suffix.lower() in FEATURE_SUFFIXES:  # ids given as file names
                found = index.get(Path(bag_id).stem)
        if found is None:
            where = given or f"{features_dir}/{bag_id}.{{h5,hdf5,pt,pth,npy}}"
            problems.append(f"{source} row {row}: feature file for bag {bag_id!r} not found ({where})")
        files.append(found)
    return files, problems
