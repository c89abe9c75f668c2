"""A run's report from its saved test predictions: summary tables and the reliability diagram.

`qgmil evaluate RUN_DIR` recomputes it; training writes it at the end of a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..rundir import RunDir
from ..rundir.directory import write_keeping_previous
from ..tasks import Task, make_task
from .metrics import format_summary


def run_task(run: RunDir) -> Task:
    """The task of a finished or running run directory (unfitted: enough to read and score predictions)."""
    facts = run.read_facts()
    config = run.read_config()
    return make_task(config, facts.get("targets") or facts["classes"], facts.get("task_state"))


def fold_arrays(predictions: pd.DataFrame, task: Task) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (targets, outputs) per (seed, fold) test part (classification: y (n,), probs (n, C))."""
    return [task.from_predictions(part) for _, part in predictions.groupby(["seed", "fold"], sort=True)]


def evaluate_run(run_dir: str | Path, *, allow_missing_folds: bool = False) -> dict:
    """`qgmil evaluate`: the report written again from the folds' saved predictions, holding the run's lock."""
    run = RunDir(run_dir)
    run.require_run()
    with run.lock():
        return write_report(run.root, allow_missing_folds=allow_missing_folds)


def write_report(run_dir: str | Path, *, allow_missing_folds: bool = False) -> dict:
    """Write predictions.csv, summary.json/.md/.csv and reliability.png (when matplotlib is installed).

    Every fold of splits.json must be finished, unless `allow_missing_folds` (then the report says which
    are left out). Files that change keep their previous version as *.prev.* (RunDir: write_keeping_previous).
    """
    run = RunDir(run_dir)
    config, task = run.read_config(), run_task(run)
    model = config.model.name
    predictions = run.collect_predictions(allow_missing=allow_missing_folds)
    missing = run.missing_folds()
    write_keeping_previous(run.predictions, predictions.to_csv(index=False))
    folds = fold_arrays(predictions, task)
    summary = task.summarize(folds, n_boot=config.eval.bootstrap)
    write_keeping_previous(run.summary_csv, pd.DataFrame([{"metric": k, **v} for k, v in summary.items()]).to_csv(index=False))
    header = (f"# {model}{'' if task.kind == 'classification' else f' ({task.kind})'}: {len(folds)} test folds, {len(predictions)} test predictions\n\n"
              + (f"**{len(missing)} folds left out (not finished): {', '.join(missing)}**\n\n" if missing else "")
              + "mean ± std over folds; 95% CI: bootstrap over test bags within folds\n\n")
    table = format_summary(summary, list(summary))
    write_keeping_previous(run.summary_md, header + table + "\n")
    try:
        task.plot(folds, run, title=f"{model}: test predictions, all folds")
    except ImportError:
        pass  # plots are an optional extra
    # last: its presence marks the run finished
    write_keeping_previous(run.summary_json, json.dumps(summary, indent=1, default=str))
    return summary
