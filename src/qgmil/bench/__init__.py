"""Benchmarks: a grid of cross-validated runs (model x dataset) and the paper's tables built from it."""

from .runner import (
    BenchmarkError, BenchSpec, Cell, DatasetSpec, ModelSpec, build_tables, collect_results, load_spec,
    plan_cells, run_benchmark,
)

__all__ = [
    "BenchSpec", "BenchmarkError", "Cell", "DatasetSpec", "ModelSpec", "build_tables", "collect_results",
    "load_spec", "plan_cells", "run_benchmark",
]
