"""Explaining trained models from their saved outputs (e.g. the test attention of a run)."""

from .mass import (
    MassError, RunAttention, bag_metrics, format_summary, load_run, localisation, lorenz_curve, run_metrics,
    summarize,
)

__all__ = ["MassError", "RunAttention", "bag_metrics", "format_summary", "load_run", "localisation",
           "lorenz_curve", "run_metrics", "summarize"]
