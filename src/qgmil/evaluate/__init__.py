"""Evaluation: bag-level metrics, bootstrap summaries over folds, and figures (matplotlib optional)."""

from .metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    ORDINAL_METRICS,
    calibration_bins,
    classification_metrics,
    confusion,
    format_summary,
    metric_names,
    summarize_predictions,
)
from .plots import metric_bars, reliability_diagram

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "ORDINAL_METRICS",
    "calibration_bins",
    "classification_metrics",
    "confusion",
    "format_summary",
    "metric_bars",
    "metric_names",
    "reliability_diagram",
    "summarize_predictions",
]
