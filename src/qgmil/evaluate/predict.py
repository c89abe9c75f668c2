"""Predictions on new bags with a trained run (its fold models averaged) or a single checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..checkpoint import load_model, read_metadata
from ..data import BagLimits, DataError, MILDataset, read_attrs, read_table
from ..data.bagfile import FEATURE_SUFFIXES, inspect_bag
from ..data.table import Columns, mixed_labels_allowed, read_any_table
from ..rundir import RunDir, RunDirError, write_attention
from ..rundir.directory import write_csv, write_json
from ..runtime import Dist, resolve_device
from .inference import infer
from ..rundir.config import TaskConfig
from ..tasks import Classification, Task, task_from_description


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


def _table_for(data: Path, features: Path | None, columns: Columns | None, keep: tuple[str, ...] = (), *,
               slide_table: Path | None = None, mixed_labels: bool = True) -> tuple[pd.DataFrame, Path]:
    """A table file (labels optional; of the `keep` columns, those it has kept raw; with STAMP's `slide_table`
    beside it, see `read_table`) or a folder of feature files (one bag per file, no labels)."""
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
    sources = [data] + ([slide_table] if slide_table is not None else [])
    present = {str(c) for path in sources if path.is_file() for c in read_any_table(path).columns} if keep else set()
    keep = tuple(k for k in keep if k in present)
    return (read_table(data, columns, require_labels=False, keep=keep, slide_table=slide_table,
                       mixed_labels=mixed_labels), features or data.parent / "features")


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


def _task_of(path: Path, meta: dict) -> Task:
    """The fitted task a checkpoint records (checkpoints without one are classifiers with extra.classes)."""
    extra = meta["extra"]
    if "task" in extra:
        try:
            return task_from_description(extra["task"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError([f"{path}: unreadable extra.task ({err})"]) from None
    if extra.get("classes") is None:
        raise DataError([f"{path}: checkpoint without a class list (extra.classes)"])
    return Classification(TaskConfig(kind="classification"), extra["classes"])


def _target_columns(task: Task, columns: Columns) -> Columns | None:
    """Where a table's targets are, named as in training: survival's time and event columns, regression's
    target columns, multi-label's 0/1 columns (or the label column with the labels joined). None for
    classification (the label column)."""
    if task.kind == "survival":
        return columns.model_copy(update={"time": task.names[0], "event": task.names[1]})
    if task.kind == "regression":
        return columns.model_copy(update={"targets": tuple(task.names)})
    if task.kind == "multilabel" and columns.targets is None:
        return columns  # the label column, split on label_sep; or, when the table has them, the 0/1 columns
    return columns if task.kind == "multilabel" else None


def _read_targets(table: pd.DataFrame, task: Task, columns: Columns | None) -> bool:
    """Parse the table's targets for a task other than classification when it has their columns (then the
    predictions are scored); True when the bags' targets (or, for classification, labels) are known."""
    if task.kind == "classification":
        return "label" in table
    if not all(f"raw:{n}" in table for n in task.columns(columns)):
        return False
    source = table.attrs.get("source")
    found, problems = task.parse(table, columns, task.config, trained=task.names)
    if problems:
        raise DataError(problems, f"{source}: the {task.kind} targets have problems")
    if list(found) != list(task.names):
        raise DataError([f"{source}: targets {', '.join(found)}, but the model predicts {', '.join(task.names)}"])
    return True


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
    slide_table: str | Path | None = None,
) -> pd.DataFrame:
    """Average the outputs (and attention) of the source's models over the bags of `data`.

    `slide_table`: STAMP's slide table beside the clinical table `data` (see `read_table`). Patient bags get
    their label as the run made it (its data.patient_label).

    Writes OUT/predictions.csv (bag_id, patient_id, then the task's columns: classification label if known,
    pred, prob_<class>; survival time and event if known, risk and survival_t<time> (S at the evaluation times);
    regression target_<name> if known, pred_<name>; multi-label label_<name> if known, prob_<name>),
    OUT/attention.h5 (one dataset per bag: the mean pooling attention over its real instances; for
    multi-branch models also the group `branch_attention`: per bag the mean (K, N) branch attentions,
    attrs["names"]) and, when every bag has a known label or target, OUT/metrics.json. Nothing is written when a bag
    is refused (empty, another dim or encoder, NaN/Inf features, over `limits`): the error names it. A run
    directory's models are those of all its folds (a fold without its best.safetensors is an error unless
    `allow_missing_folds`); OUT may not be where a run keeps its own files (`check_out`).
    """
    check_out(out)
    checkpoints = find_checkpoints(source, allow_missing_folds)
    metas = [read_metadata(p) for p in checkpoints]
    tasks = [_task_of(path, meta) for path, meta in zip(checkpoints, metas)]
    task = tasks[0]
    for path, meta, other in zip(checkpoints, metas, tasks):
        if (other.kind, other.names) != (task.kind, task.names) or meta["config"]["in_dim"] != metas[0]["config"]["in_dim"]:
            raise DataError([f"{path}: task, classes or feature dim differ from {checkpoints[0]}"])
    target_columns = _target_columns(task, columns or Columns())
    bag_unit = metas[0]["extra"].get("bag_unit", "slide")
    patient_label = metas[0]["extra"].get("patient_label", "refuse")  # runs before it existed: refuse
    table, features_dir = _table_for(Path(data), Path(features) if features else None, columns,
                                     task.columns(target_columns) if target_columns else (),
                                     slide_table=Path(slide_table) if slide_table else None,
                                     mixed_labels=mixed_labels_allowed(bag_unit, patient_label))
    known = _read_targets(table, task, target_columns)
    classes = task.names if task.kind == "classification" else []
    # check_values: a NaN bag would otherwise get a prediction (the first class) with NaN probabilities.
    dataset = MILDataset.from_table(table, features_dir, classes=classes, bag_unit=bag_unit, require_labels=False,
                                    patient_label=patient_label, limits=limits, check_values=True)
    _check_compatible(dataset, metas[0], Path(source))

    # The mean over the fold models of each bag's outputs (each decoded by its own fitted task: a fold's target
    # standardisation or time bins), attention and branch attention.
    ctx = Dist(device=resolve_device(device))
    total = None
    for path, fitted in tqdm(list(zip(checkpoints, tasks)), desc="models", disable=not progress or len(checkpoints) == 1):
        run = infer(load_model(path, device=str(ctx.device)), dataset, ctx, batch_size=batch_size, attention=True,
                    classes=classes, progress=progress, desc=path.parent.name, decode=fitted.decode)
        if total is None:
            total = run
            continue
        width = min(total.outputs.shape[1], run.outputs.shape[1])  # a Cox fold without a baseline: risk only
        total.outputs = total.outputs[:, :width] + run.outputs[:, :width]
        total.attention = [a + b for a, b in zip(total.attention, run.attention)]
        if total.branches is not None:
            total.branches = [a + b for a, b in zip(total.branches, run.branches)]
    k = len(checkpoints)
    outputs = total.outputs / k
    attention = [a / k for a in total.attention]
    branches = None if total.branches is None else [b / k for b in total.branches]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = task.targets_of(dataset) if known else None
    frame = pd.DataFrame({"bag_id": dataset.bag_ids, "patient_id": dataset.patient_ids})
    if targets is not None and task.kind == "classification" and not (targets >= 0).any():
        targets = None  # no label column: no label column in the output either
    for name, values in task.prediction_columns(targets, outputs).items():
        frame[name] = values
    complete = targets is not None and len(targets) and (
        (targets >= 0).all() if task.kind == "classification" else not np.isnan(targets).any())
    # Metrics first: whatever fails there must not leave predictions without them.
    metrics = task.metrics(targets, outputs) if complete else None
    write_csv(out / "predictions.csv", frame)
    write_attention(out / "attention.h5", dataset.bag_ids, attention, branches=branches,
                    branch_names=total.branch_names, attrs={"models": [str(p) for p in checkpoints]})
    if metrics is not None:
        write_json(out / "metrics.json", {"models": [str(p) for p in checkpoints], "n": len(dataset), **metrics})
    return frame
