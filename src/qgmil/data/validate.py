"""Checks a dataset before any training: every problem at once, each naming the file and table row."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .bagfile import BagFileError, BagLimits, inspect_bag, read_features
from .table import (
    Columns, DataError, check_labels, infer_classes, mixed_label_patients, mixed_labels_allowed, normalize_label,
    read_table_with_problems, resolve_files,
)

SCAN_ROWS = 65536  # rows per read when scanning a large HDF5 bag for NaN/Inf (bounds memory)
FP16_MAX = 65504.0  # the largest finite float16: larger values become inf in a data.cache=fp16 cache


@dataclass
class DataReport:
    """problems: one line each; notes: what is fine but worth knowing (how columns were found, patients whose
    slides carry different labels); summary: counts and shapes (see `format`)."""

    problems: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        s = self.summary
        lines = [f"table      {s.get('table')}"] + ([f"slides     {s['slide_table']}"] if "slide_table" in s else []) \
            + [f"features   {s.get('features')}"]
        if "bags" in s:
            lines.append(f"bags       {s['bags']}  (patients {s['patients']})")
        if s.get("classes"):
            lines.append("classes    " + ", ".join(f"{k}: {v}" for k, v in s["classes"].items()))
        if s.get("instances"):
            i = s["instances"]
            lines.append(f"instances  min {i['min']}  median {i['median']:g}  max {i['max']}  total {i['total']}")
        if s.get("feature_dim"):
            lines.append(f"dim        {s['feature_dim']}")
        if s.get("layouts"):
            lines.append("layout     " + ", ".join(f"{k} ({v})" for k, v in s["layouts"].items()))
        if s.get("dtypes"):
            lines.append("dtype      " + ", ".join(f"{k} ({v})" for k, v in s["dtypes"].items()))
        lines += [f"note: {n}" for n in self.notes]
        lines.append("OK: no problems found" if self.ok else f"{len(self.problems)} problem(s):")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _scan(path: Path, n: int, limits: BagLimits | None) -> tuple[int, int, float]:
    """(count of instances with NaN/Inf, first such instance, largest finite |value|), reading big HDF5 bags
    in blocks. Only called after `inspect_bag` accepted the file's header."""
    bad, first, peak = 0, -1, 0.0

    def block(values: np.ndarray, start: int) -> None:
        nonlocal bad, first, peak
        finite = np.isfinite(values)
        rows = ~finite.all(axis=1)
        if rows.any() and first < 0:
            first = start + int(np.argmax(rows))
        bad += int(rows.sum())
        if finite.any():
            peak = max(peak, float(np.abs(values[finite]).max()))

    if path.suffix.lower() in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            ds = f["features"] if "features" in f else f["feats"]
            data = ds[0] if ds.ndim == 3 else ds
            for start in range(0, n, SCAN_ROWS):
                block(data[start : start + SCAN_ROWS], start)
    else:
        block(read_features(path, limits=limits), 0)
    return bad, first, peak


def check_dataset(
    table: str | Path,
    features_dir: str | Path | None,
    *,
    columns: Columns | None = None,
    classes: list[str] | None = None,
    in_dim: int | None = None,
    require_labels: bool = True,
    scan_values: bool = True,
    cache: str | None = None,
    limits: BagLimits | None = None,
    progress: bool = True,
    keep: tuple[str, ...] = (),
    check_targets: Callable[[pd.DataFrame], list[str]] | None = None,
    slide_table: str | Path | None = None,
    bag_unit: str = "slide",
    patient_label: str = "refuse",
) -> DataReport:
    """Check a table and its feature files; never raises for bad data, returns a report instead.

    Problems found: unreadable table or missing columns, duplicate/empty bag ids, missing or unknown
    labels (unknown = not in `classes` when given), a patient whose slides carry different labels,
    missing or unreadable feature files, empty bags, NaN/Inf features (when `scan_values`), and a
    feature dimension that differs between bags or from `in_dim` (the model's), values a `cache="fp16"`
    would turn into inf, a file that declares more than `limits` (or has a bad dtype or coords), and, when
    labels are required, a table with no bags or fewer than two classes.
    A task other than classification names its target columns (`keep`, see `read_table`) and checks them
    (`check_targets(table) -> problems`, each naming the file and row).
    `slide_table`: STAMP's slide table beside the clinical `table` (see `read_table`). A patient whose slides
    carry different labels is a problem only for patient bags (`bag_unit`) with `patient_label` "refuse"; else a
    note, as are the columns found under CLAM's or STAMP's names.
    """
    summary = {"table": str(table), "features": str(features_dir)}
    if slide_table is not None:
        summary["slide_table"] = str(slide_table)
    report = DataReport(summary=summary)
    classes = None if classes is None else [normalize_label(c) for c in classes]
    mixed = mixed_labels_allowed(bag_unit, patient_label)
    try:
        frame, problems = read_table_with_problems(table, columns, require_labels, keep, slide_table=slide_table,
                                                   mixed_labels=mixed)
    except DataError as err:
        report.problems += err.problems
        return report
    report.problems += problems
    detected = frame.attrs.get("detected_columns", {})
    if detected:
        report.notes.append("columns found by their peers' names: " +
                            ", ".join(f"{field} = {name}" for field, name in detected.items()))
    patients = mixed_label_patients(frame) if mixed else {}
    if patients:
        shown = "; ".join(f"{p} ({', '.join(labels)})" for p, labels in list(patients.items())[:5])
        more = f" and {len(patients) - 5} more" if len(patients) > 5 else ""
        how = ("each slide keeps its own label (slide bags); splits keep a patient's slides together, stratified "
               f"on its {'majority' if patient_label == 'refuse' else patient_label} label") if bag_unit == "slide" \
            else f"each patient bag takes its slides' {patient_label} label (data.patient_label)"
        report.notes.append(f"{len(patients)} patient(s) with slides of different labels: {shown}{more}: {how}")
    if check_targets is not None:
        report.problems += check_targets(frame)
    files, problems = resolve_files(frame, features_dir)
    report.problems += problems
    if classes is not None:
        report.problems += check_labels(frame, classes)

    infos: dict[int, object] = {}
    for i, (row, bag_id, file) in enumerate(
        tqdm(list(zip(frame["row"], frame["bag_id"], files)), desc="checking bags", disable=not progress, leave=False)
    ):
        if file is None:
            continue
        where = f"{file} (row {row}, bag {bag_id!r})"
        try:
            info = inspect_bag(file, limits=limits)
            if info.num_instances == 0:
                report.problems.append(f"{where}: empty bag (0 instances)")
                continue
            if scan_values:
                bad, first, peak = _scan(file, info.num_instances, limits)
                if bad:
                    report.problems.append(f"{where}: {bad} instance(s) have NaN/Inf features (first: instance {first})")
                if cache == "fp16" and peak > FP16_MAX:
                    report.problems.append(f"{where}: features reach {peak:g}, beyond float16's {FP16_MAX:g}: "
                                           "data.cache=fp16 would make them inf (use data.cache=fp32 or none)")
        except BagFileError as err:
            report.problems.append(f"{err} (row {row}, bag {bag_id!r})")
            continue
        except OSError as err:
            report.problems.append(f"{where}: unreadable ({err})")
            continue
        infos[i] = info

    dims = Counter(info.dim for info in infos.values())
    expected = in_dim if in_dim is not None else (dims.most_common(1)[0][0] if dims else None)
    for i, info in infos.items():
        if info.dim != expected:
            against = "the model's in_dim" if in_dim is not None else "most bags"
            report.problems.append(
                f"{info.path} (row {frame['row'].iloc[i]}, bag {frame['bag_id'].iloc[i]!r}): "
                f"feature dim {info.dim}, but {against} have {expected}"
            )

    lengths = np.array([info.num_instances for info in infos.values()])
    labels = [label for label in frame["label"] if label is not None]
    if require_labels:  # nothing to learn from: say so instead of "OK"
        if not len(frame):
            report.problems.append(f"{table}: no bags (the table has a header but no rows)")
        elif len(set(labels)) == 1:
            report.problems.append(f"{table}: every labelled bag has class {labels[0]!r}: training needs at least two classes")
    report.summary.update(
        bags=len(frame),
        patients=int(frame["patient_id"].nunique()),
        classes={c: labels.count(c) for c in (classes or infer_classes(labels))},
        feature_dim=expected,
        layouts=dict(Counter(info.layout for info in infos.values())),
        dtypes=dict(Counter(info.dtype for info in infos.values())),
    )
    if len(lengths):
        report.summary["instances"] = {
            "min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max()),
            "total": int(lengths.sum()),
        }
    return report


__all__ = ["DataReport", "check_dataset"]
