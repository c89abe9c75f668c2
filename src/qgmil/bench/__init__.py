"""Benchmarks: a grid of cross-validated runs (model x dataset) and the paper's tables built from it."""

from .runner import (
    BenchmarkError, BenchSpec, Cell, CellFailure, DatasetSpec, ModelSpec, build_tables, load_spec, plan_cells,
    run_benchmark,
)
from .stats import paired_comparison
from .tables import collect_results

__all__ = [
    "BenchSpec", "BenchmarkError", "Cell", "CellFailure", "DatasetSpec", "ModelSpec", "build_tables",
    "collect_results", "load_spec", "paired_comparison", "plan_cells", "run_benchmark",
]
