"""The quick-start job: cross-validate QG-MIL and gated ABMIL on the built-in datasets, print the table.

`qgmil demo` prepares musk1, elephant and digit-bags, runs 5-fold patient-level cross-validation of
each model on each dataset through the training engine (`qgmil train`), and writes

  OUT/results.md, OUT/results.csv   macro-F1, AUROC, calibration (mean ± std over folds) per dataset x model
  OUT/results.png                   the same as bars with error bars
  OUT/<dataset>/<model>/            one full run directory each (summary, predictions, attention, checkpoints)

Interrupted? Run it again: finished runs and folds are kept.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .atomic import atomic_write, atomic_write_text
from .rundir.config import load_config
from .train.run import train_run

DEMO_DATASETS: dict[str, dict] = {"musk1": {}, "elephant": {}, "digit-bags": {"bags": 200}}
DEMO_MODELS = ["qgmil", "abmil_gated"]
TABLE_METRICS = ["macro_f1", "auroc", "balanced_accuracy", "ece", "brier"]


def attention_on_witnesses(run_dir: Path, data_dir: Path) -> float:
    """Mean share of pooling attention on the true positive instances of positive test bags."""
    predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"bag_id": str})
    shares = []
    for fold_dir in sorted((run_dir / "folds").iterdir()):
        with h5py.File(fold_dir / "attention.h5") as att:
            for bag_id in predictions.loc[(predictions["label"] == "positive"), "bag_id"]:
                if bag_id in att:
                    with h5py.File(data_dir / "features" / f"{bag_id}.h5") as bag:
                        witnesses = bag["instance_labels"][()] == 1
                    shares.append(float(att[bag_id][()][witnesses].sum()))
    return float(np.mean(shares)) if shares else float("nan")


def run_demo(
    out: str | Path = "qgmil-demo",
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    folds: int = 5,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Cross-validate `models` on `datasets`; returns (and writes) the results table."""
    out = Path(out).resolve()
    rows = []
    for dataset in datasets or list(DEMO_DATASETS):
        data_dir = out / "data" / dataset
        for model in models or DEMO_MODELS:
            run_dir = out / dataset / model
            config = load_config(None, [], {
                "data.builtin": dataset, "data.builtin_options": DEMO_DATASETS.get(dataset, {}),
                "data.builtin_dir": data_dir, "model.name": model, "eval.folds": folds, "eval.seeds": [seed],
                "optim.epochs": epochs, "optim.batch_size": 16, "optim.lr": 2e-4, "eval.patience": 10, "eval.min_epochs": 10,
                "runtime.progress": progress, "runtime.tensorboard": False,
            })
            if progress:
                print(f"== {model} on {dataset} ({folds}-fold cross-validation) -> {run_dir}", flush=True)
            summary = train_run(config, run_dir, resume=(run_dir / "config.yaml").exists(), command=["qgmil", "demo"])
            row = {"dataset": dataset, "model": model, "folds": summary["macro_f1"]["n"]}
            for metric in TABLE_METRICS:
                row[f"{metric}_mean"] = summary[metric]["mean"]
                row[f"{metric}_std"] = summary[metric]["std"]
            if dataset == "digit-bags":
                row["attention_on_witnesses"] = attention_on_witnesses(run_dir, data_dir)
            rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(out / "results.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(out / "results.md", format_results(table) + "\n")
    try:
        from .evaluate.plots import metric_bars

        by_run = {f"{r['model']} / {r['dataset']}": {m: {"mean": r[f"{m}_mean"], "std": r[f"{m}_std"]}
                                                    for m in ("macro_f1", "auroc")} for r in rows}
        metric_bars(by_run, out / "results.png")
    except ImportError:
        pass  # plots are an optional extra
    return table


def format_results(table: pd.DataFrame) -> str:
    """Markdown: one row per dataset x model, mean ± std over folds; the best macro-F1 per dataset in bold."""
    names = {"macro_f1": "macro-F1", "auroc": "AUROC", "balanced_accuracy": "bal. acc.", "ece": "ECE", "brier": "Brier"}
    header = ["dataset", "model"] + [names[m] for m in TABLE_METRICS]
    with_witness = "attention_on_witnesses" in table
    if with_witness:
        header.append("attention on witnesses")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = table.groupby("dataset")["macro_f1_mean"].transform("max")
    for (_, row), top in zip(table.iterrows(), best):
        cells = [row["dataset"], row["model"]]
        for metric in TABLE_METRICS:
            cell = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f}"
            cells.append(f"**{cell}**" if metric == "macro_f1" and row["macro_f1_mean"] == top else cell)
        if with_witness:
            value = row.get("attention_on_witnesses")
            cells.append("" if pd.isna(value) else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
