"""What a task is to the engine: its targets, the model's output width, the loss, the outputs and the metrics.

Models only make a bag embedding and `logits` (B, out_dim); everything that depends on what is predicted lives
in a `Task`, chosen by the run config's `task.kind`. The engine (training loop, report, predict, tuning) talks
to tasks through this interface only, so every registered model serves every task with no code of its own.

A task is built for a run from its config and the names of its targets (`make_task`), given what every fold of
the run shares (`for_run`: survival's evaluation times), fitted on a fold's training part (`fit`: class weights,
target standardisation, time bins) and calibrated on the validation outputs of the weights kept (`calibrate`:
the Cox model's baseline hazard); that state travels in the checkpoint (`describe` / `task_from_description`)
so that predictions decode as they were trained.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from ..task_specs import HIGHER_IS_BETTER


class Task:
    """Base class. Subclasses set `kind` (a `task_specs.KINDS` entry, whose metrics and default monitor are listed
    there) and implement the methods below.

    Shapes: n bags; targets (n, T) float64 as `targets_of` gives them (classification: (n,) int class
    indices); logits (n, out_dim); outputs (n, O) float64 as `decode` gives them.
    """

    kind: ClassVar[str]
    loss_metric: ClassVar[str] = "loss"
    """The metric that is the validation loss (lower is better): early stopping's tie-break."""

    needs_class_labels: ClassVar[bool] = False
    """True when batches carry class labels (only classification): models' class-specific auxiliary losses
    (CLAM's instance clustering, DSMIL's max-instance, ...) are trained only then."""

    def __init__(self, config, names: list[str], state: dict | None = None):
        self.config = config  # rundir.config.TaskConfig
        self.names = list(names)  # classes, target names or label names
        self.state: dict = dict(state or {})

    # --- targets ---------------------------------------------------------------------------------------

    @staticmethod
    def columns(columns) -> tuple[str, ...]:
        """The table columns (besides the standard ones) the targets are read from."""
        return ()

    @classmethod
    def parse(cls, table: pd.DataFrame, columns, config, trained: list[str] | None = None
              ) -> tuple[list[str], list[str]]:
        """Read the targets from a `read_table` frame (with `keep=columns(...)`): adds its `target` (a tuple of
        floats per row, None when missing) and `stratum` (what splits stratify on) columns, sets `label` to
        None. Returns (names of the targets, problems naming the file and row).

        `trained`: the target names of a trained model whose predictions these targets will score; then the
        checks that matter only for training (a target with one value) are skipped, and label names are
        read against the model's."""
        return [], []

    def targets_of(self, data) -> np.ndarray:
        """The targets of a dataset's bags, as `metrics` takes them."""
        return data.targets

    # --- model and loss --------------------------------------------------------------------------------

    @property
    def out_dim(self) -> int:
        """Model outputs: one per name (class, target or label) unless the task says otherwise."""
        return len(self.names)

    def with_state(self, state: dict) -> "Task":
        """A copy of this task (same config and options) holding `state`."""
        task = copy.copy(self)
        task.state = dict(state)
        return task

    def for_run(self, data) -> "Task":
        """This task given all the bags of a run, before any split (state every fold shares; run.json keeps it)."""
        return self

    def fit(self, data) -> "Task":
        """This task fitted on a training part (a copy; the run's state plus the fitted state)."""
        return self.with_state({**self.state, **self._fitted_state(data)})

    def _fitted_state(self, data) -> dict:
        return {}

    def calibrate(self, targets: np.ndarray, outputs: np.ndarray) -> "Task":
        """This fitted task given the validation targets and outputs of the weights being kept (what the
        checkpoint then records); by default nothing changes."""
        return self

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """The batch's loss summed over its bags (the mean loss times len(batch); a batch-level loss such as
        Cox's partial likelihood: its mean times len(batch)), so that the engine's scaling gives the mean."""
        raise NotImplementedError

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (n, out_dim) -> outputs (n, O) (probabilities, risks, values in the targets' units)."""
        raise NotImplementedError

    # --- results -------------------------------------------------------------------------------------

    def metric_names(self) -> tuple[str, ...]:
        return tuple(HIGHER_IS_BETTER[self.kind])

    def higher_is_better(self, metric: str) -> bool:
        return HIGHER_IS_BETTER[self.kind][metric]

    def metrics(self, targets: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def prediction_columns(self, targets: np.ndarray | None, outputs: np.ndarray) -> dict[str, Any]:
        """The columns of predictions.csv for these bags (targets None: unknown, as in `qgmil predict`)."""
        raise NotImplementedError

    def from_predictions(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(targets, outputs) read back from the columns `prediction_columns` wrote."""
        raise NotImplementedError

    bootstrap_metrics: ClassVar[tuple[str, ...]] = ()
    """The metrics that get a bootstrap CI (each replicate recomputes them through the libraries: the main
    ones only, so that a report takes seconds); the others report mean and std over folds."""

    def summarize(self, folds: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int = 0) -> dict:
        """metric -> {mean, std, ci_low, ci_high, n} over the test folds (see `bootstrap_summary`)."""
        return bootstrap_summary(self.metrics, folds, self.metric_names(), n_boot, seed, boot=self.bootstrap_metrics)

    def plot(self, folds: list[tuple[np.ndarray, np.ndarray]], run, title: str) -> None:
        """The report's plots of all test folds into the run directory `run` (a RunDir); ImportError without
        matplotlib (the plots extra)."""

    def describe(self) -> dict:
        """What a checkpoint records to rebuild this fitted task (`task_from_description`)."""
        return {"kind": self.kind, "config": self.config.model_dump(mode="json"), "names": self.names,
                "state": self.state}


def bootstrap_summary(metrics, folds: list[tuple[np.ndarray, np.ndarray]], names: tuple[str, ...], n_boot: int,
                      seed: int = 0, confidence: float = 0.95, boot: tuple[str, ...] | None = None
                      ) -> dict[str, dict[str, float]]:
    """mean and std (ddof 1) over folds of each metric, with a percentile bootstrap CI of the mean for those in
    `boot` (None: all; the others get NaN bounds): each replicate resamples the bags of every fold with
    replacement and averages the folds' metrics (NaN values left out, as `evaluate.metrics.summarize_predictions`
    does for classification). `metrics(targets, outputs, only=names)` computes a subset."""
    point = np.array([[metrics(y, out).get(k, math.nan) for k in names] for y, out in folds], dtype=np.float64)
    booted = tuple(names if boot is None else (k for k in names if k in boot))
    rng = np.random.default_rng(seed)
    boot_values = np.full((n_boot, len(folds), len(names)), np.nan)
    columns = [names.index(k) for k in booted]
    for b in range(n_boot if booted else 0):
        for f, (y, out) in enumerate(folds):
            pick = rng.integers(0, len(y), len(y))
            values = metrics(y[pick], out[pick], only=booted)
            boot_values[b, f, columns] = [values.get(k, math.nan) for k in booted]
    boot = boot_values
    alpha = 1 - confidence
    summary = {}
    for j, name in enumerate(names):
        values = point[:, j][~np.isnan(point[:, j])]
        with np.errstate(invalid="ignore"), _quiet():
            means = np.nanmean(boot[:, :, j], axis=1) if n_boot else np.array([])
        means = means[~np.isnan(means)]
        lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if means.size else (math.nan,) * 2
        summary[name] = {"mean": float(values.mean()) if values.size else math.nan,
                         "std": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan),
                         "ci_low": float(lo), "ci_high": float(hi), "n": int(values.size)}
    return summary


class _quiet:
    """Silences numpy's 'mean of empty slice' warnings (a replicate where every fold is undefined)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def number_problems(table: pd.DataFrame, column: str, *, source: str, allow=None) -> tuple[np.ndarray, list[str]]:
    """The raw column `raw:<column>` as floats (NaN when empty) and a problem per cell that is not a finite
    number (or fails `allow(value) -> message | None`)."""
    values = np.full(len(table), np.nan)
    problems = []
    for i, (row, text) in enumerate(zip(table["row"], table[f"raw:{column}"])):
        if text is None:
            continue
        try:
            value = float(text)
        except ValueError:
            problems.append(f"{source} row {row}: {column} {text!r} is not a number")
            continue
        if not math.isfinite(value):
            problems.append(f"{source} row {row}: {column} {text!r} is not a finite number")
            continue
        message = allow(value) if allow is not None else None
        if message:
            problems.append(f"{source} row {row}: {column} {text!r} {message}")
            continue
        values[i] = value
    return values, problems


def store_targets(table: pd.DataFrame, targets: list, strata: list, what: str, source: str) -> list[str]:
    """Puts a task's parsed targets in `table` (`target`: a tuple of floats per row, None where missing;
    `stratum`: what splits stratify on, None where the target is missing; `label`: None, these are not classes)
    and returns the problems of patients whose rows carry different targets (`what` names them)."""
    table["target"] = pd.Series(list(targets), dtype=object)
    table["stratum"] = pd.Series(list(strata), dtype=object)
    table["label"] = pd.Series([None] * len(table), dtype=object)
    return patient_conflicts(table, what, source)


def patient_conflicts(table: pd.DataFrame, what: str, source: str) -> list[str]:
    """A patient whose rows carry different targets (a patient has one outcome)."""
    problems = []
    known = table[table["target"].notna()]
    for patient, rows in known.groupby("patient_id", sort=False):
        if len(set(rows["target"])) > 1:
            problems.append(f"{source} rows {', '.join(map(str, rows['row']))}: patient {patient!r} has slides with "
                            f"different {what}")
    return problems


def quantile_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Index 0..bins-1 of each value's quantile bin (ties share a bin)."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")
