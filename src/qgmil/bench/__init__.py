"""Benchmarks: a grid of cross-validated runs (model x dataset) and the paper's tables built from it.

  spec.py     what a benchmark is: the spec (YAML, presets/), its cells, and the OUT/ layout
  runner.py   execution: built-in data, training the cells (sequentially or in worker processes), failures
  report.py   the tables and figures of OUT/ (tables.py, stats.py, plots.py), from the finished cells
  demo.py     `qgmil demo`: the demo preset through the runner

Imports go one way: spec <- report <- runner <- demo.
"""

from .demo import run_demo
from .report import build_tables
from .runner import CellFailure, run_benchmark
from .spec import (
    BenchmarkError, BenchSpec, Cell, DatasetSpec, ModelSpec, builtin_spec_text, expand_models, load_spec,
    parse_shard, plan_cells, preset_text,
)
from .stats import paired_comparison
from .tables import collect_results

__all__ = [
    "BenchSpec", "BenchmarkError", "Cell", "CellFailure", "DatasetSpec", "ModelSpec", "build_tables",
    "builtin_spec_text", "collect_results", "expand_models", "load_spec", "paired_comparison", "parse_shard",
    "plan_cells", "preset_text", "run_benchmark", "run_demo",
]
