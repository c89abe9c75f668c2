"""A run's report from its saved test predictions: summary tables and the reliability diagram.

`qgmil evaluate RUN_DIR` recomputes it; training writes it at the end of a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_write_text
from ..rundir import RunDir
from ..rundir.directory import write_csv, write_json
from .metrics import format_summary, summarize_predictions

MAIN_METRICS = ["macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "ece", "brier", "nll"]


def fold_arrays(predictions: pd.DataFrame, classes: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (y (n,), probs (n, C)) per (seed, fold) test part."""
    index = {c: i for i, c in enumerate(classes)}
    columns = [f"prob_{c}" for c in classes]
    return [
        (part["label"].map(index).to_numpy(dtype=np.int64), part[columns].to_numpy(dtype=np.float64))
        for _, part in predictions.groupby(["seed", "fold"], sort=True)
    ]


def write_report(run_dir: str | Path) -> dict:
    """Write predictions.csv, summary.json/.md/.csv and reliability.png (when matplotlib is installed)."""
    run = RunDir(run_dir)
    classes, config = run.classes, run.read_config()
    model = config.model.name
    predictions = run.collect_predictions()
    write_csv(run.predictions, predictions)
    folds = fold_arrays(predictions, classes)
    summary = summarize_predictions(folds, ordinal=config.eval.ordinal, n_boot=config.eval.bootstrap)
    write_csv(run.summary_csv, pd.DataFrame([{"metric": k, **v} for k, v in summary.items()]))
    header = (f"# {model}: {len(folds)} test folds, {len(predictions)} test predictions\n\n"
              f"mean ± std over folds; 95% CI: bootstrap over test bags within folds\n\n")
    table = format_summary(summary, [m for m in MAIN_METRICS + list(summary) if m in summary and m != "n"][: len(summary)])
    atomic_write_text(run.summary_md, header + table + "\n")
    try:
        from .plots import reliability_diagram

        y = np.concatenate([f[0] for f in folds])
        probs = np.concatenate([f[1] for f in folds])
        reliability_diagram(y, probs, run.reliability, title=f"{model}: test predictions, all folds")
    except ImportError:
        pass  # plots are an optional extra
    write_json(run.summary_json, summary)  # last: its presence marks the run finished
    return summary
