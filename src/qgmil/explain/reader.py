"""Reading a finished run for explanation: the one place `explain/` reads a run directory.

Every run file is read through `qgmil.rundir` (`RunDir`, `read_attention`), every feature file through
`qgmil.data`; mass.py, heatmap.py and gallery.py work on what this module returns.

  load_run(run_dir)                  -> RunAttention: the test attention of each (bag, fold, seed) row of the
                                        run's predictions.csv, the bags' instance labels (if any), its bags
  run_metrics(run_dir)               -> one row of attention-mass metrics (mass.py) per test bag and seed
  bag_units(run)                     -> {bag_id: data.Unit}: the run's bags as it built them (slide or patient)
  bag_attention(run, bag_id)         -> a bag's test attention, the mean over the seeds that tested it
  bag_branch_attention(run, bag_id)  -> its (K, N) branch attention (multi-branch models), mean over seeds
  has_branch_attention(run)          -> whether the run's attention files hold branch attention
  bag_prediction(run, bag_id)        -> BagPrediction: the bag's test prediction and known target, as numbers and text
  run_names(runs)                    -> one label per run: its model name (with its directory where two share one)
  read_instance_labels(files)        -> a bag's instance labels from its feature files, or None

`ExplainError` (also importable as `MassError` and `HeatmapError`) is a run, bag, slide or file that cannot
be explained; the message names it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .mass import BAG_COLUMNS, LOCALISATION, bag_metrics, localisation, lorenz_curve


class ExplainError(ValueError):
    """A run directory, bag, slide or file that cannot be explained; the message names it."""


MassError = ExplainError  # the names callers know it by
HeatmapError = ExplainError


def _attention_files_label(rundir) -> str:
    """The run's attention files as a glob relative to it, as `RunDir` lays them out (for messages)."""
    return rundir.fold("*").attention.relative_to(rundir.root).as_posix()


@dataclass
class RunAttention:
    """A run's test attention: one entry per (bag, fold, seed) row of its predictions.csv."""

    run_dir: Path
    model: str
    dataset: str
    rows: pd.DataFrame  # bag_id, fold, seed, label
    attention: list[np.ndarray] = field(default_factory=list)
    instance_labels: list[np.ndarray | None] = field(default_factory=list)
    units: dict = field(default_factory=dict)  # bag_id -> data.Unit (its files, slide ids), as the run built bags
    units_error: str | None = None  # why the run's dataset could not be read (then `units` is empty)
    predictions: pd.DataFrame | None = None  # every column of predictions.csv, the rows of `rows`
    task: str = "classification"
    classes: list[str] = field(default_factory=list)

    def metrics(self) -> pd.DataFrame:
        """One row per test row: model, dataset, run_dir, bag_id, fold, seed, label, the `bag_metrics`,
        and the `localisation` columns when the bags have instance labels."""
        records = []
        with_labels = any(lab is not None for lab in self.instance_labels)
        for row, a, labels in zip(self.rows.itertuples(index=False), self.attention, self.instance_labels):
            try:
                rec = {"model": self.model, "dataset": self.dataset, "run_dir": str(self.run_dir),
                       **{c: getattr(row, c) for c in BAG_COLUMNS}, **bag_metrics(a)}
                if with_labels:
                    rec.update(localisation(a, labels) if labels is not None else dict.fromkeys(LOCALISATION, np.nan))
            except ValueError as err:
                where = f"{self.run_dir}: bag {row.bag_id} (seed {row.seed}, fold {row.fold})"
                raise ExplainError(f"{where}: {err}") from None
            records.append(rec)
        return pd.DataFrame(records)

    def lorenz(self, grid: np.ndarray) -> np.ndarray:
        """(bags, len(grid)) Lorenz curves."""
        return np.stack([lorenz_curve(a, grid) for a in self.attention]) if self.attention else np.empty((0, grid.size))


def read_instance_labels(files: Iterable[Path]) -> np.ndarray | None:
    """The bag's instance labels: each feature file's `instance_labels`, concatenated in file order; None
    when a file has none. Only that dataset is read (not the features)."""
    from ..data import read_extra

    parts = []
    for path in files:
        labels = read_extra(path, "instance_labels")
        if labels is None:
            return None
        parts.append(np.asarray(labels).reshape(-1))
    return np.concatenate(parts) if parts else None


def load_run(run_dir: str | Path) -> RunAttention:
    """Read a training run's test attention (its attention files) and its bags' instance labels, if any."""
    from ..data import MILDataset, read_table
    from ..rundir import RunDir, RunDirError, read_attention

    run_dir = Path(run_dir)
    rundir = RunDir(run_dir)
    try:
        rundir.require_run()
        predictions = rundir.read_predictions()
    except RunDirError as err:
        raise ExplainError(str(err)) from None
    files = rundir.attention_files()
    if not files:
        raise ExplainError(f"{run_dir}: no {_attention_files_label(rundir)} "
                           "(was the run trained with eval.save_attention=false?)")
    config = rundir.read_config()
    classes = rundir.classes or None
    dataset, table, features = rundir.dataset_source(config)
    if "label" not in predictions:  # survival, regression, multi-label: the attention is the same object
        predictions = predictions.assign(label=None)

    attention: dict[tuple[str, int, int], np.ndarray] = {}
    for path in files:
        found = read_attention(path)
        fold, seed = int(found.attrs["fold"]), int(found.attrs["seed"])
        attention.update({(bag_id, fold, seed): a for bag_id, a in found.pooled.items()})
    keys = list(zip(predictions["bag_id"], predictions["fold"].astype(int), predictions["seed"].astype(int)))
    keep = [k in attention for k in keys]
    kept = predictions.loc[keep].reset_index(drop=True)
    rows = kept[list(BAG_COLUMNS)]
    if rows.empty:
        raise ExplainError(f"{run_dir}: no test bag of predictions.csv has attention in "
                           f"{_attention_files_label(rundir)}")

    run = RunAttention(run_dir, config.model.name, dataset, rows, predictions=kept, task=config.task.kind,
                       classes=list(classes or []))
    try:
        if config.task.kind != "classification":  # the bags only: the targets (and labels) are not needed here
            table, classes = read_table(table, config.data.columns, require_labels=False,
                                        slide_table=config.data.slide_table, mixed_labels=True).assign(label=None), []
        data = MILDataset.from_table(table, features, classes=classes, bag_unit=config.data.bag_unit,
                                     **config.data.table_options())
        run.units = {u.bag_id: u for u in data.units}
    except (ValueError, OSError) as err:  # DataError is a ValueError
        run.units_error = str(err)
        warnings.warn(f"{run_dir}: cannot read the dataset ({err}); no localisation metrics", stacklevel=2)
    unit_files = {bag_id: u.files for bag_id, u in run.units.items()}
    label_cache: dict[str, np.ndarray | None] = {}
    for k, ok in zip(keys, keep):
        if not ok:
            continue
        a = attention[k]
        if k[0] not in label_cache:
            label_cache[k[0]] = read_instance_labels(unit_files[k[0]]) if k[0] in unit_files else None
        labels = label_cache[k[0]]
        if labels is not None and labels.size != a.size:
            raise ExplainError(f"{run_dir}: bag {k[0]}: attention over {a.size} instances, "
                               f"but its feature files hold {labels.size} instance labels")
        run.attention.append(a)
        run.instance_labels.append(labels)
    return run


def run_metrics(run_dir: str | Path) -> pd.DataFrame:
    """One row per test bag (and seed): model, dataset, run_dir, bag_id, fold, seed, label, the
    `bag_metrics`, and the `localisation` columns when the bags have instance labels."""
    return load_run(run_dir).metrics()


def bag_units(run: RunAttention) -> dict:
    """{bag_id: Unit (files, slide_ids)} of the run's dataset, bags as the run built them (slide or patient)."""
    if run.units_error is not None:
        raise ExplainError(f"{run.run_dir}: cannot read the dataset ({run.units_error})")
    return run.units


def run_names(runs: Sequence[RunAttention], *, with_dataset: bool = False) -> list[str]:
    """Each run's model name ("model / dataset" with `with_dataset`), with its directory name where two
    runs share one."""
    names = [f"{r.model} / {r.dataset}" if with_dataset else r.model for r in runs]
    return [f"{n} ({r.run_dir.name})" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def bag_attention(run: RunAttention, bag_id: str) -> tuple[np.ndarray, int]:
    """(attention, number of test rows averaged): the mean over the seeds that tested the bag."""
    found = [a for b, a in zip(run.rows["bag_id"], run.attention) if b == bag_id]
    if not found:
        raise ExplainError(f"{run.run_dir}: bag {bag_id!r} has no test attention")
    if len({a.size for a in found}) != 1:
        raise ExplainError(f"{run.run_dir}: bag {bag_id!r}: attention of different lengths across seeds")
    return np.mean(np.stack(found).astype(np.float64), axis=0), len(found)


def bag_branch_attention(run: RunAttention, bag_id: str) -> tuple[np.ndarray, list[str], int]:
    """((K, N) branch attention, K branch names, seeds averaged): the mean over the seeds that tested the bag,
    from the branch attention of the run's attention files (multi-branch models only)."""
    from ..rundir import RunDir, read_attention

    rundir = RunDir(run.run_dir)
    found, names, any_group = [], None, False
    for path in rundir.attention_files():
        stored = read_attention(path, bags=[bag_id], branches=True)
        if not stored.has_branches:
            continue
        any_group = True
        if bag_id in stored.branches:
            found.append(stored.branches[bag_id])
            names = stored.branch_names
    if not any_group:
        from ..models import list_models

        raise ExplainError(f"{run.run_dir}: no branch attention in {_attention_files_label(rundir)} ({run.model} "
                           f"is not a multi-branch model ({', '.join(list_models(tags='multi_branch'))}), "
                           "or the run predates --branches)")
    if not found:
        raise ExplainError(f"{run.run_dir}: bag {bag_id!r} has no test branch attention")
    if len({a.shape for a in found}) != 1:
        raise ExplainError(f"{run.run_dir}: bag {bag_id!r}: branch attention of different shapes across seeds")
    mean = np.mean(np.stack(found).astype(np.float64), axis=0)
    if len(names or []) != mean.shape[0]:
        names = [f"branch {i}" for i in range(mean.shape[0])]
    return mean, names, len(found)


def has_branch_attention(run: RunAttention) -> bool:
    """Whether the run's attention files hold branch attention (multi-branch models trained with it)."""
    from ..rundir import RunDir, read_attention

    return any(read_attention(path, bags=[]).has_branches for path in RunDir(run.run_dir).attention_files())


#: predictions.csv columns that hold a model output (the rest, beside BAG_COLUMNS, are known targets)
_OUTPUT_PREFIXES = ("prob_", "pred_", "survival_t")


@dataclass
class BagPrediction:
    """A bag's test prediction, the mean over the seeds that tested it, and its known target."""

    text: str  # "positive (p = 0.87)", "risk 0.42", "a, c" (multi-label), "pred_y 3.1"
    predicted: str | None  # the predicted class (classification) or None
    label: str | None  # the known target as text ("negative"; "time 12, event 1"), None when unknown
    values: dict  # output column -> mean over seeds (prob_<class>, risk, pred_<name>, ...)
    seeds: int


def bag_prediction(run: RunAttention, bag_id: str) -> BagPrediction:
    """The bag's test prediction, averaged over the seeds that tested it (classification: the class of the
    largest mean probability; multi-label: the labels of mean probability >= 0.5)."""
    frame = run.predictions
    if frame is None:
        raise ExplainError(f"{run.run_dir}: no predictions read")
    found = frame[frame["bag_id"].astype(str) == str(bag_id)]
    if found.empty:
        raise ExplainError(f"{run.run_dir}: bag {bag_id!r} has no test prediction")
    outputs = [c for c in found.columns if c == "risk" or c.startswith(_OUTPUT_PREFIXES)]
    values = {c: float(pd.to_numeric(found[c], errors="coerce").mean()) for c in outputs}
    known = [c for c in found.columns if c not in outputs and c not in BAG_COLUMNS and c != "pred"]
    first = found.iloc[0]
    label = first["label"] if "label" in found and pd.notna(first["label"]) else None
    if label is None:
        parts = [f"{c} {first[c]:g}" if isinstance(first[c], (int, float, np.number)) else f"{c} {first[c]}"
                 for c in known if pd.notna(first[c])]
        label = ", ".join(parts) or None
    probs = {c[len("prob_"):]: v for c, v in values.items() if c.startswith("prob_")}
    predicted = None
    if run.task == "classification" and probs:
        predicted = max(probs, key=probs.get)
        text = f"{predicted} (p = {probs[predicted]:.2f})"
    elif run.task == "multilabel":
        text = ", ".join(n for n, p in probs.items() if p >= 0.5) or "none"
    else:
        shown = {c: v for c, v in values.items() if not c.startswith("survival_t")}
        text = ", ".join(f"{c} {v:.3g}" for c, v in shown.items())
    return BagPrediction(text, predicted, None if label is None else str(label), values, len(found))
