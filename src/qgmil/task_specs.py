"""What each task kind is, as the run config knows it: its losses, metrics (and which way is better), default
early-stopping monitor and the libraries it needs. The implementations are in `qgmil.tasks`; this module
imports nothing of the package, so the config schema (rundir.config) can validate against it."""

from __future__ import annotations

import importlib.util

KINDS = ("classification", "survival", "regression", "multilabel")

#: the losses of each kind; the first is the default
LOSSES = {"classification": ("ce",), "survival": ("cox", "nll"), "regression": ("mse", "huber"), "multilabel": ("bce",)}

#: metric -> higher is better, per kind, in report order
HIGHER_IS_BETTER = {
    "classification": {"macro_f1": True, "balanced_accuracy": True, "accuracy": True, "auroc": True, "kappa": True,
                       "kappa_quadratic": True, "ece": False, "brier": False, "nll": False},
    "survival": {"c_index": True, "c_index_uno": True, "td_auc": True, "ibs": False, "logrank_p": False,
                 "loss": False},
    "regression": {"mae": False, "rmse": False, "r2": True, "pearson": True, "spearman": True, "loss": False},
    "multilabel": {"macro_auroc": True, "micro_auroc": True, "macro_f1": True, "micro_f1": True, "loss": False},
}
#: multi-label also reports (and may monitor) one metric per label: auroc_<label>, f1_<label>
PER_LABEL = ("auroc_", "f1_")

#: the metrics a benchmark tabulates per kind, the main one (what gains, ranks and tests compare) first
TABLE_METRICS = {
    "classification": ("macro_f1", "auroc", "balanced_accuracy", "ece", "brier"),
    "survival": ("c_index", "c_index_uno", "td_auc", "ibs"),
    "regression": ("r2", "mae", "rmse", "spearman"),
    "multilabel": ("macro_auroc", "micro_auroc", "macro_f1", "micro_f1"),
}

#: how tables and plots name a metric
METRIC_LABELS = {
    "macro_f1": "Macro-F1", "auroc": "AUROC", "balanced_accuracy": "Balanced accuracy", "accuracy": "Accuracy",
    "kappa": "Cohen's kappa", "kappa_quadratic": "Quadratic kappa", "ece": "ECE", "brier": "Brier score",
    "nll": "NLL", "c_index": "C-index (Harrell)", "c_index_uno": "C-index (Uno)", "td_auc": "Time-dependent AUC",
    "ibs": "Integrated Brier score", "logrank_p": "Log-rank p", "mae": "MAE", "rmse": "RMSE", "r2": "R²",
    "pearson": "Pearson r", "spearman": "Spearman ρ", "macro_auroc": "Macro AUROC", "micro_auroc": "Micro AUROC",
    "micro_f1": "Micro-F1", "loss": "Loss",
}

DEFAULT_MONITOR = {"classification": "macro_f1", "survival": "c_index", "regression": "r2", "multilabel": "macro_auroc"}

#: libraries a kind needs beyond the core, and the extra that installs them
NEEDS = {"survival": (("sksurv", "lifelines"), "pip install 'qgmil[survival]' (scikit-survival and lifelines)")}


def missing_libraries(kind: str) -> str | None:
    """A message naming what to install when a kind's libraries are missing, else None."""
    modules, extra = NEEDS.get(kind, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"task {kind} needs {', '.join(missing)}: {extra}" if missing else None


def monitor_names(kind: str) -> tuple[str, ...]:
    """The metrics eval.monitor may name for a kind (and "loss", its validation loss)."""
    names = [m for m in HIGHER_IS_BETTER[kind] if kind != "classification" or m not in ("ece", "brier")]
    return tuple(dict.fromkeys(names + ["loss"]))
