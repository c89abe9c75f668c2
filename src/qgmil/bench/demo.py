"""The quick-start job, `qgmil demo`: the `demo` benchmark preset (presets/demo.yaml) run through the runner.

QG-MIL and gated ABMIL cross-validated on musk1, elephant and digit-bags; the outputs are a benchmark's
(see qgmil.bench.spec), the table it prints is OUT/summary.md. Interrupted? Run it again: finished cells
are skipped and unfinished ones resume fold by fold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .runner import run_benchmark
from .spec import BenchSpec, load_spec

DEMO_PRESET = "demo"


def demo_spec(datasets: list[str] | None = None, models: list[str] | None = None, folds: int = 5, epochs: int = 30,
              seed: int = 0) -> BenchSpec:
    """The demo preset with the demo's flags (None: the preset's datasets and models) as overrides."""
    return load_spec(preset=DEMO_PRESET, datasets=datasets, models=models, folds=folds, seeds=[seed],
                     train={"optim.epochs": epochs})


def run_demo(
    out: str | Path = "qgmil-demo",
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    folds: int = 5,
    epochs: int = 30,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Cross-validate `models` on `datasets` into `out`; returns run_benchmark's dict (`summary`: the table,
    one row per dataset x model; `summary_md`: its Markdown; `failures`). Progress lines and bars go to
    `echo` (default print) with `progress`, nowhere without."""
    if echo is None:
        echo = print if progress else (lambda line: None)
    spec = demo_spec(datasets, models, folds=folds, epochs=epochs, seed=seed)
    return run_benchmark(spec, out, progress=progress, echo=echo, command=["qgmil", "demo"])
