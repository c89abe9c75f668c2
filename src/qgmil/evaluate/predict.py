"""Predictions on new bags with a trained run (its fold models averaged) or a single checkpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from ..checkpoint import load_model, read_metadata
from ..data import BagLimits, DataError, MILDataset, read_attrs, read_table
from ..data.bagfile import FEATURE_SUFFIXES, inspect_bag
from ..data.table import Columns
from ..rundir import RunDir, RunDirError, write_attention
from ..rundir.directory import write_csv, write_json
from ..runtime import Dist, resolve_device
from .inference import infer
from .metrics import classification_metrics


def find_checkpoints(source: str | Path, allow_missing_folds: bool = False) -> list[Path]:
    """A .safetensors checkpoint, or a run directory -> the best model of each of its folds (all of them,
    unless `allow_missing_folds`: then those finished)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such run directory or checkpoint")
    return RunDir(source).checkpoints(allow_missing=allow_missing_folds)


def check_out(out: str | Path) -> None:
    """Refuse an output folder where a run keeps its own files (the run directory itself, its folds/ or
    tuning/): predictions.csv, attention.h5 and metrics.json there would replace the run's results."""
    run = RunDir.containing(out)
    if run is not None and run.owns(out):
        raise RunDirError(f"--out {out}: inside the run directory {run.root}, whose predictions.csv, attention.h5 "
                          "and metrics.json it would replace; choose a folder outside it (or a new subfolder "
                          f"such as {run.root / 'predict'})")


def _table_for(data: Path, features: Path | None, columns: Columns | None) -> tuple[pd.DataFrame, Path]:
    """A table file (labels optional) or a folder of feature files (one bag per file, no labels)."""
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in FEATURE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise DataError([f"{data}: no feature files ({', '.join(FEATURE_SUFFIXES)})"])
        ids = [p.stem for p in files]
        table = pd.DataFrame({"row": range(2, len(ids) + 2), "bag_id": pd.Series(ids, dtype=object),
                              "patient_id": pd.Series(ids, dtype=object),
                              "label": pd.Series([None] * len(ids), dtype=object)})
        table.attrs["source"] = str(data)
        return table, data
    return read_table(data, columns, require_labels=False), features or data.parent / "features"


def _check_compatible(dataset: MILDataset, meta: dict, source: Path) -> None:
    """Refuse bags the models were not trained for: another feature dim or another recorded encoder."""
    extra = meta["extra"]
    in_dim = meta["config"]["in_dim"]
    trained = extra.get("provenance", {})
    problems = []
    for unit in dataset.units:
        for file in unit.files:
            info = inspect_bag(file, limits=dataset.limits)
            if info.num_instances == 0:
                problems.append(f"{file}: empty bag (0 instances): nothing to predict from")
                continue
            if info.dim != in_dim:
                problems.append(f"{file}: feature dim {info.dim}, but {source} was trained on dim {in_dim}")
                continue
            attrs = read_attrs(file)
            for key in ("encoder", "extractor"):
                if key in trained and key in attrs and str(attrs[key]) != str(trained[key]):
                    problems.append(f"{file}: {key} {attrs[key]!r}, but {source} was trained on {key} {trained[key]!r}")
    if problems:
        raise DataError(problems, "the bags do not fit the model")


def predict_bags(
    source: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    features: str | Path | None = None,
    columns: Columns | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    limits: BagLimits | None = None,
    progress: bool = True,
    allow_missing_folds: bool = False,
) -> pd.DataFrame:
    """Average the probabilities (and attention) of the source's models over the bags of `data`.

    Writes OUT/predictions.csv (bag_id, patient_id, label if known, pred, prob_<class>),
    OUT/attention.h5 (one dataset per bag: the mean pooling attention over its real instances; for
    multi-branch models also the group `branch_attention`: per bag the mean (K, N) branch attentions,
    attrs["names"]) and, when every bag has a known label, OUT/metrics.json. Nothing is written when a bag
    is refused (empty, another dim or encoder, NaN/Inf features, over `limits`): the error names it. A run
    directory's models are those of all its folds (a fold without its best.safetensors is an error unless
    `allow_missing_folds`); OUT may not be where a run keeps its own files (`check_out`).
    """
    check_out(out)
    checkpoints = find_checkpoints(source, allow_missing_folds)
    metas = [read_metadata(p) for p in checkpoints]
    classes = metas[0]["extra"].get("classes")
    if classes is None:
        raise DataError([f"{checkpoints[0]}: checkpoint without a class list (extra.classes)"])
    for path, meta in zip(checkpoints, metas):
        if meta["extra"].get("classes") != classes or meta["config"]["in_dim"] != metas[0]["config"]["in_dim"]:
            raise DataError([f"{path}: classes or feature dim differ from {checkpoints[0]}"])
    table, features_dir = _table_for(Path(data), Path(features) if features else None, columns)
    bag_unit = metas[0]["extra"].get("bag_unit", "slide")
    # check_values: a NaN bag would otherwise get a prediction (the first class) with NaN probabilities.
    dataset = MILDataset.from_table(table, features_dir, classes=classes, bag_unit=bag_unit, require_labels=False,
                                    limits=limits, check_values=True)
    _check_compatible(dataset, metas[0], Path(source))

    # The mean over the fold models of each bag's probabilities, attention and branch attention.
    ctx = Dist(device=resolve_device(device))
    total = None
    for path in tqdm(checkpoints, desc="models", disable=not progress or len(checkpoints) == 1):
        run = infer(load_model(path, device=str(ctx.device)), dataset, ctx, batch_size=batch_size, attention=True,
                    classes=classes, progress=progress, desc=path.parent.name)
        if total is None:
            total = run
            continue
        total.probs = total.probs + run.probs
        total.attention = [a + b for a, b in zip(total.attention, run.attention)]
        if total.branches is not None:
            total.branches = [a + b for a, b in zip(total.branches, run.branches)]
    k = len(checkpoints)
    probs = total.probs / k
    attention = [a / k for a in total.attention]
    branches = None if total.branches is None else [b / k for b in total.branches]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    y = dataset.labels
    frame = pd.DataFrame({"bag_id": dataset.bag_ids, "patient_id": dataset.patient_ids})
    if (y >= 0).any():
        frame["label"] = [classes[i] if i >= 0 else None for i in y]
    frame["pred"] = [classes[i] for i in probs.argmax(1)]
    for i, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, i]
    # Metrics first: whatever fails there must not leave predictions without them.
    metrics = classification_metrics(y, probs) if len(y) and (y >= 0).all() else None
    write_csv(out / "predictions.csv", frame)
    write_attention(out / "attention.h5", dataset.bag_ids, attention, branches=branches,
                    branch_names=total.branch_names, attrs={"models": [str(p) for p in checkpoints]})
    if metrics is not None:
        write_json(out / "metrics.json", {"models": [str(p) for p in checkpoints], "n": len(y), **metrics})
    return frame
