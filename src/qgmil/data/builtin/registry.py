"""The built-in dataset registry and `prepare_dataset`.

Owns the one list of generators (`_registry`: digits, pbcseq, synthetic_wsi and the classic benchmarks),
`list_datasets`, `dataset_info`, option coercion and validation (`_coerce`, `_resolve_options`) and
`prepare_dataset`, which writes DIR/features/<bag_id>.h5, DIR/dataset.json and DIR/labels.csv (last).
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from ..bagfile import write_bag
from . import classic, digits, pbcseq, synthetic_wsi
from .base import BuiltinDataset, _Entry


@cache
def _registry() -> dict[str, _Entry]:
    entries = [digits.ENTRY, *digits.TASK_ENTRIES, pbcseq.ENTRY, synthetic_wsi.ENTRY, *classic.entries()]
    return {e.info.name: e for e in sorted(entries, key=lambda e: e.info.name)}


def list_datasets() -> list[str]:
    """Names of the built-in datasets, sorted."""
    return sorted(_registry())


def _entry(name: str) -> _Entry:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def dataset_info(name: str) -> BuiltinDataset:
    """Description, classes and option defaults of one built-in dataset."""
    return _entry(name).info


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _coerce(dataset: str, key: str, value: Any, default: Any) -> Any:
    """`value` as the type of `default`; strings (e.g. from a command line) are parsed."""
    bad = ValueError(f"{dataset}: option {key} must be a {type(default).__name__}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if isinstance(value, (bool, np.bool_)):
            raise bad
        if isinstance(value, (int, np.integer)):
            return int(value)
        try:
            number = float(value)  # "8", "8.0" and 8.0 are all 8
            if number == int(number):
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
        raise bad
    if isinstance(default, float):
        if isinstance(value, (bool, np.bool_)):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    return str(value)


def _resolve_options(entry: _Entry, options: dict[str, Any]) -> dict[str, Any]:
    defaults = entry.info.defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ValueError(f"{entry.info.name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    opts = {k: _coerce(entry.info.name, k, options.get(k, v), v) for k, v in defaults.items()}
    if entry.check is not None:
        entry.check(opts)
    return opts


# -------------------------------------------------------------------------------------------- prepare


def _read_json(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _old_bag_ids(labels_path: Path) -> list[str]:
    try:
        return pd.read_csv(labels_path, dtype=str)["bag_id"].dropna().tolist()
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return []


def _written_by_us(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "builtin_dataset" in f.attrs
    except OSError:
        return False


def prepare_dataset(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Write built-in dataset `name` to `out_dir` (features/<bag_id>.h5, dataset.json, labels.csv); -> out_dir.

    A directory already prepared with the same name, options and seed is returned as is; one holding
    anything else raises ValueError unless `overwrite` (which also regenerates an identical one).
    labels.csv is written last, so an interrupted prepare never looks complete. Bags the new dataset
    does not hold but an earlier prepare wrote are removed.
    """
    from tqdm.auto import tqdm

    from ... import __version__
    from ...atomic import atomic_write, atomic_write_text

    entry = _entry(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    opts = _resolve_options(entry, options)
    out = Path(out_dir)
    labels_path, meta_path, features_dir = out / "labels.csv", out / "dataset.json", out / "features"

    meta = _read_json(meta_path) if meta_path.exists() else None
    if labels_path.exists():
        same = meta is not None and (meta.get("name"), meta.get("options"), meta.get("seed")) == (name, opts, seed)
        if same and not overwrite:
            return out
        if not overwrite:
            if meta is None:
                held = "a dataset without a readable dataset.json (not prepared by qgmil?)"
            else:
                held = f"{meta.get('name')!r} with options {meta.get('options')} and seed {meta.get('seed')}"
            raise ValueError(
                f"{out} already holds {held}; asked for {name!r} with options {opts} and seed {seed}. "
                "Pass overwrite=True to replace it, or choose another directory."
            )
    old_ids = _old_bag_ids(labels_path) if labels_path.exists() else []
    labels_path.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)

    plan = entry.build(opts, seed)
    rows, num_instances, dim, dtype = [], 0, None, None
    for rec in tqdm(plan.records, total=plan.num_bags, desc=f"preparing {name}", unit="bag", disable=not progress):
        extras = {"instance_labels": rec.instance_labels} if rec.instance_labels is not None else None
        attrs = {"builtin_dataset": name, **rec.attrs}
        path = features_dir / f"{rec.bag_id}.h5"
        write_bag(path, rec.features, rec.coords, coord_unit="px", attrs=attrs, extras=extras)
        rows.append({"bag_id": rec.bag_id, "label": rec.label, "patient_id": rec.patient_id, **rec.columns})
        num_instances += len(rec.features)
        dim, dtype = int(rec.features.shape[1]), str(rec.features.dtype)

    new_ids = {r["bag_id"] for r in rows}
    stale = {features_dir / f"{b}.h5" for b in old_ids if b not in new_ids}
    stale |= {p for p in features_dir.glob("*.h5") if p.stem not in new_ids and _written_by_us(p)}
    for path in stale:
        path.unlink(missing_ok=True)

    labels = pd.DataFrame(rows)
    classes = entry.info.classes or (sorted(set(labels["label"])) if entry.info.task == "classification" else [])
    info = {
        "name": name,
        "description": entry.info.description,
        "options": opts,
        "seed": seed,
        "classes": classes,
        "num_bags": len(rows),
        "num_patients": int(labels["patient_id"].nunique()),
        "num_instances": num_instances,
        "feature_dim": dim,
        "feature_dtype": dtype,
        "task": entry.info.task,
        "label_counts": {c: int((labels["label"] == c).sum()) for c in classes},
        "source": plan.source,
        "qgmil_version": __version__,
    }
    atomic_write_text(meta_path, json.dumps(info, indent=2) + "\n")
    atomic_write(labels_path, lambda tmp: labels.to_csv(tmp, index=False))
    return out
