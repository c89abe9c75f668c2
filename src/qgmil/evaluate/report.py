"""A run's report from its saved test predictions: summary tables and the reliability diagram.

`qgmil evaluate RUN_DIR` recomputes it; training writes it at the end of a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_write, atomic_write_text
from .metrics import format_summary, summarize_predictions

MAIN_METRICS = ["macro_f1", "balanced_accuracy", "accuracy", "auroc", "kappa", "ece", "brier", "nll"]


def _run_facts(run_dir: Path) -> tuple[list[str], dict]:
    from ..train.config import load_config

    run_path = run_dir / "run.json"
    if not run_path.exists():
        raise FileNotFoundError(f"{run_dir}: not a qgmil run directory (no run.json)")
    run = json.loads(run_path.read_text())
    config = load_config(run_dir / "config.yaml")
    return run["classes"], {"ordinal": config.eval.ordinal, "n_boot": config.eval.bootstrap, "model": config.model.name}


def collect_predictions(run_dir: str | Path) -> pd.DataFrame:
    """Test predictions of every finished fold (those with metrics.json), ordered by seed and fold."""
    run_dir = Path(run_dir)
    frames = [pd.read_csv(p.parent / "predictions.csv", dtype={"bag_id": str, "patient_id": str, "label": str})
              for p in sorted((run_dir / "folds").glob("*/metrics.json"))]
    if not frames:
        raise FileNotFoundError(f"{run_dir}: no finished fold yet (no folds/*/metrics.json)")
    return pd.concat(frames, ignore_index=True).sort_values(["seed", "fold"], kind="stable").reset_index(drop=True)


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
    run_dir = Path(run_dir)
    classes, facts = _run_facts(run_dir)
    predictions = collect_predictions(run_dir)
    atomic_write(run_dir / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    folds = fold_arrays(predictions, classes)
    summary = summarize_predictions(folds, ordinal=facts["ordinal"], n_boot=facts["n_boot"])
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    rows = [{"metric": k, **v} for k, v in summary.items()]
    atomic_write(run_dir / "summary.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    header = (f"# {facts['model']}: {len(folds)} test folds, {len(predictions)} test predictions\n\n"
              f"mean ± std over folds; 95% CI: bootstrap over test bags within folds\n\n")
    table = format_summary(summary, [m for m in MAIN_METRICS + list(summary) if m in summary and m != "n"][: len(summary)])
    atomic_write_text(run_dir / "summary.md", header + table + "\n")
    try:
        from .plots import reliability_diagram

        y = np.concatenate([f[0] for f in folds])
        probs = np.concatenate([f[1] for f in folds])
        reliability_diagram(y, probs, run_dir / "reliability.png", title=f"{facts['model']}: test predictions, all folds")
    except ImportError:
        pass  # plots are an optional extra
    return summary
