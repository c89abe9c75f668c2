"""The benchmark runner: cross-validate every model on every dataset, then build the paper's tables.

A benchmark is a grid of cells (model, dataset), in a fixed order (datasets outer, models inner).
Each cell is one `train_run` (folds x seeds) into OUT/runs/<dataset>/<model>/; a built-in dataset is
prepared once in OUT/data/<dataset> (before any cell runs) and shared by all models, so every model
sees the same bags and, with the same seeds, the same splits.

OUT/
  benchmark.yaml   the resolved benchmark spec
  data/<dataset>/  prepared built-in datasets
  runs/<dataset>/<model>/   one run directory per cell (see qgmil.train.run)
  results.csv      one row per model x dataset: macro-F1, AUROC, balanced accuracy, ECE, Brier (mean, std),
                   folds, training seconds
  results.md/.tex  macro-F1 mean ± std, a row per model, a column per dataset (+ mean), best in bold; the
                   Markdown one ends with the gains
  auroc.md, calibration.md   the same grid for AUROC, and for ECE and Brier (lowest in bold)
  gains.csv        best QG-MIL variant vs best baseline per dataset, and their mean
  ablation.md      with full qgmil and at least one one-off variant: each variant's macro-F1 and its change
  significance.md/.csv   best QG-MIL variant vs each baseline, paired per (seed, fold): Wilcoxon, t-test
  attention_mass.md/.csv  concentration (and localisation) of each cell's test attention
  results.png, ranks.png  macro-F1 bars per dataset; average rank of each model (matplotlib)
  failures.txt     the cells that failed in the last session and their tracebacks (absent when none did)

Rerun the same command to continue: finished cells (RUN/summary.json) are skipped, unfinished ones
resume fold by fold. `workers` runs cells in that many processes at once; `shard=(i, n)` runs only the
cells whose index % n == i, so the grid can be split over machines sharing OUT; `report_only` rebuilds
the tables from whatever cells have finished.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..atomic import atomic_write, atomic_write_text
from ..rundir.config import ConfigError, RunConfig, format_validation_error, load_config
from .tables import (
    attention_mass, collect_results, compute_gains, format_ablation, format_attention_mass, format_metric_tables,
    format_results, format_results_latex,
)

MODEL_GROUPS = ("ablation", "baselines")
BUILTIN_SPEC = "builtin.yaml"  # the `--builtin` preset, shipped inside this package


class BenchmarkError(ValueError):
    """A benchmark that cannot run as given (unknown model or dataset, bad spec); raised before training."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    name: str = Field(description="built-in dataset name, or a directory holding labels.csv and features/")
    options: dict[str, Any] = Field(default_factory=dict, description="built-in dataset options, e.g. bags: 200")
    label: str | None = Field(None, description="name in tables and OUT/runs (default: name, or the directory name)")


class ModelSpec(_Strict):
    name: str = Field(description="registered model name, or a group: ablation, baselines")
    overrides: dict[str, Any] = Field(default_factory=dict, description="model config fields, e.g. dropout: 0.1")
    label: str | None = Field(None, description="name in tables and OUT/runs (default: name)")


def _named(value):
    return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class BenchSpec(_Strict):
    """The benchmark YAML file: datasets, models, folds, seeds and training keys shared by every cell."""

    datasets: list[DatasetSpec] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    folds: int = Field(5, ge=2)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    workers: int = Field(1, ge=1, description="cells run at once, each in its own process")
    train: dict[str, Any] = Field(default_factory=dict, description="dotted run-config keys, e.g. optim.epochs: 20")

    @field_validator("datasets", "models", mode="before")
    @classmethod
    def _as_dicts(cls, value):
        return _named(value)


@dataclass(frozen=True)
class Cell:
    """One (model, dataset) run of the grid."""

    index: int
    dataset: str  # label
    model: str  # label
    model_name: str
    config: RunConfig
    run_dir: Path

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()


# ------------------------------------------------------------------------------------------ the spec

def builtin_spec_text() -> str:
    """The YAML text of the built-in benchmark (qgmil/bench/builtin.yaml)."""
    return resources.files(__package__).joinpath(BUILTIN_SPEC).read_text()


def load_spec(
    path: str | Path | None = None,
    *,
    builtin: bool = False,
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    folds: int | None = None,
    seeds: list[int] | None = None,
    workers: int | None = None,
    train: dict[str, Any] | None = None,
) -> BenchSpec:
    """The YAML file (optional; `builtin`: the packaged preset instead), with the given values
    (command-line flags) overriding it.

    `datasets` given by name keep the options of the file's entry of that name; `train` keys are
    added to (and override) the file's.
    """
    if builtin and path is not None:
        raise BenchmarkError(f"give a benchmark file ({path}) or the built-in benchmark, not both")
    tree: dict = {}
    source = f"built-in benchmark ({__package__}/{BUILTIN_SPEC})" if builtin else str(path or "command line")
    if builtin or path is not None:
        try:
            tree = yaml.safe_load(builtin_spec_text() if builtin else Path(path).read_text()) or {}
        except FileNotFoundError:
            raise BenchmarkError(f"{source}: benchmark file not found") from None
        except yaml.YAMLError as err:
            raise BenchmarkError(f"{source}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise BenchmarkError(f"{source}: expected a mapping with datasets, models, folds, seeds, train")
    try:
        spec = BenchSpec.model_validate(tree)
        update: dict[str, Any] = {}
        if datasets is not None:
            known = {d.name: d for d in spec.datasets}
            update["datasets"] = [known.get(n, DatasetSpec(name=n)) for n in datasets]
        if models is not None:
            update["models"] = [ModelSpec(name=n) for n in models]
        if folds is not None:
            update["folds"] = folds
        if seeds is not None:
            update["seeds"] = seeds
        if workers is not None:
            update["workers"] = workers
        if train:
            update["train"] = {**spec.train, **train}
        return BenchSpec.model_validate({**spec.model_dump(), **update}) if update else spec
    except ValidationError as err:
        message = format_validation_error(err, source).replace("invalid config", "invalid benchmark")
        raise BenchmarkError(message) from None


def expand_models(models: list[ModelSpec]) -> list[ModelSpec]:
    """Groups -> their models: `ablation` (qgmil and its one-off variants), `baselines` (every non-QG-MIL
    model), shell patterns such as `qgmil*`. Unknown names raise BenchmarkError."""
    from ..models import ABLATION_SET, list_models

    known = list_models()
    out: list[ModelSpec] = []
    for spec in models:
        if spec.name == "ablation":
            names = list(ABLATION_SET)
        elif spec.name == "baselines":
            names = list_models(tags="baseline")
        elif any(ch in spec.name for ch in "*?["):
            names = list_models(spec.name)
        else:
            names = [spec.name] if spec.name in known else []
        if not names:
            raise BenchmarkError(f"unknown model {spec.name!r}; models: {', '.join(known)} "
                                 f"(groups: {', '.join(MODEL_GROUPS)}; see `qgmil models`)")
        if len(names) > 1 and (spec.overrides or spec.label):
            raise BenchmarkError(f"model group {spec.name!r} cannot take overrides or a label; list its models")
        out += [ModelSpec(name=n, overrides=spec.overrides, label=spec.label) for n in names]
    return out


def _dataset_source(spec: DatasetSpec, out: Path) -> tuple[str, dict[str, Any]]:
    """(label, data.* config keys) of one dataset."""
    from ..data.builtin import dataset_info, list_datasets

    builtins = list_datasets()
    if spec.name in builtins:
        defaults = dataset_info(spec.name).defaults
        unknown = sorted(set(spec.options) - set(defaults))
        if unknown:
            raise BenchmarkError(f"dataset {spec.name}: unknown option(s) {', '.join(unknown)} "
                                 f"(options: {', '.join(defaults) or 'none'})")
        label = spec.label or spec.name
        return label, {"data.builtin": spec.name, "data.builtin_options": dict(spec.options),
                       "data.builtin_dir": out / "data" / label}
    root = Path(spec.name).expanduser()
    if root.is_dir() and (root / "labels.csv").is_file() and (root / "features").is_dir():
        if spec.options:
            raise BenchmarkError(f"dataset {spec.name}: options are for built-in datasets only")
        return spec.label or root.resolve().name, {"data.table": root / "labels.csv", "data.features": root / "features"}
    raise BenchmarkError(f"unknown dataset {spec.name!r}: neither a built-in dataset ({', '.join(builtins)}) "
                         "nor a directory holding labels.csv and features/")


def plan_cells(spec: BenchSpec, out: str | Path, *, progress: bool = False) -> list[Cell]:
    """Every cell of the grid with its validated run config, datasets outer and models inner.

    All names, dataset options and training keys are checked here, before anything runs.
    """
    out = Path(out).resolve()
    if not spec.datasets:
        raise BenchmarkError("no datasets: give --datasets or `datasets:` in the benchmark file")
    if not spec.models:
        raise BenchmarkError("no models: give --models or `models:` in the benchmark file")
    models = expand_models(spec.models)
    sources = [_dataset_source(d, out) for d in spec.datasets]
    for kind, labels in (("dataset", [s[0] for s in sources]), ("model", [m.label or m.name for m in models])):
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise BenchmarkError(f"{kind} {', '.join(repeated)} appears twice; give each entry its own label")
    cells = []
    for dataset, data_keys in sources:
        for model in models:
            label = model.label or model.name
            base: dict[str, Any] = {"runtime.progress": progress, "runtime.tensorboard": False}
            base.update(spec.train)
            base.update(data_keys)
            base.update({"model.name": model.name, "eval.folds": spec.folds, "eval.seeds": list(spec.seeds)})
            base.update({f"model.overrides.{k}": v for k, v in model.overrides.items()})
            try:
                config = load_config(None, [], base)
            except ConfigError as err:
                raise BenchmarkError(f"{label} on {dataset}: {err}".replace("command line: ", "")) from None
            cells.append(Cell(len(cells), dataset, label, model.name, config, out / "runs" / dataset / label))
    return cells


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"i/n" -> (i, n), with 0 <= i < n."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BenchmarkError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise BenchmarkError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


# ------------------------------------------------------------------------------------------ running

@dataclass(frozen=True)
class CellFailure:
    """A cell whose training raised: the error in one line, and its traceback for failures.txt."""

    cell: Cell
    error: str
    traceback: str


def _cpus() -> int:
    """CPUs this process may use (the affinity mask where there is one: containers, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_builtin_data(cells: list[Cell], echo: Callable[[str], None] = print) -> None:
    """Prepare each built-in dataset of `cells` once, before any cell runs, so parallel workers never
    race to write the same OUT/data/<dataset>."""
    from ..data.builtin import prepare_dataset

    done: set[Path] = set()
    for cell in cells:
        data = cell.config.data
        if data.builtin is None or data.builtin_dir in done:
            continue
        done.add(data.builtin_dir)
        if not (data.builtin_dir / "labels.csv").exists():
            echo(f"preparing {data.builtin} -> {data.builtin_dir}")
        try:
            prepare_dataset(data.builtin, data.builtin_dir, progress=False, **data.builtin_options)
        except (ValueError, OSError) as err:
            raise BenchmarkError(f"dataset {cell.dataset}: cannot prepare {data.builtin_dir}: {err}") from None


def train_cell(cell: Cell, command: list[str], threads: int | None = None) -> dict[str, Any]:
    """Train (or resume) one cell; runs in the benchmark's process or in a worker process.

    `threads` (workers only) caps torch's intra-op threads, unless the cell's config sets runtime.threads,
    and turns progress bars off (they would interleave). Returns {"summary", "seconds"}, or {"error",
    "traceback"} instead of raising, so that one cell's failure reaches the caller intact (some
    exceptions do not pickle) and the other cells go on.
    """
    from ..train.run import train_run

    config = cell.config
    if threads is not None:
        runtime = {"threads": config.runtime.threads or threads, "progress": False}
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update=runtime)})
    start = time.time()
    try:
        summary = train_run(config, cell.run_dir, resume=(cell.run_dir / "config.yaml").exists(), command=command)
    except Exception as err:  # noqa: BLE001 - any error of one cell is reported and the others go on
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    return {"summary": summary, "seconds": time.time() - start}


def _cell_process(cell: Cell, command: list[str], threads: int, results) -> None:
    """A worker process: train one cell and put (its index, train_cell's result) on `results`."""
    results.put((cell.index, train_cell(cell, command, threads)))


def _run_cells(todo: list[Cell], heads: dict[int, str], workers: int, command: list[str],
               echo: Callable[[str], None]) -> list[CellFailure]:
    """Train `todo` one after another (workers == 1), or each in its own process, `workers` at a time;
    echo a line as each cell starts and ends. Returns the failures."""
    failures = []

    def start(cell: Cell) -> None:
        state = "resuming" if (cell.run_dir / "config.yaml").exists() else "running"
        echo(f"{heads[cell.index]}: {state} -> {cell.run_dir}")

    def finish(cell: Cell, result: dict[str, Any]) -> None:
        if "error" in result:
            echo(f"{heads[cell.index]}: FAILED: {result['error']}")
            failures.append(CellFailure(cell, result["error"], result["traceback"]))
            return
        f1 = result["summary"].get("macro_f1", {})
        echo(f"{heads[cell.index]}: macro-F1 {f1.get('mean', math.nan):.3f} ± {f1.get('std', math.nan):.3f} "
             f"({f1.get('n', 0)} folds, {result['seconds']:.0f} s)")

    if workers == 1:
        for cell in todo:
            start(cell)
            finish(cell, train_cell(cell, command))
        return failures

    threads = max(1, _cpus() // workers)  # workers x threads <= CPUs: no oversubscription
    used = sorted({c.config.runtime.threads or threads for c in todo})  # runtime.threads, where set, wins
    echo(f"running {len(todo)} cells in {workers} worker processes, {'/'.join(map(str, used))} torch thread(s) each")
    # spawn, not fork: a forked child would inherit torch's thread pools and locks from this process.
    # A process per cell (not a pool) so that Ctrl-C or a crash stops exactly the running cells.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    waiting, running = list(todo), {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                cell = waiting.pop(0)
                start(cell)
                process = context.Process(target=_cell_process, args=(cell, command, threads, results))
                process.start()
                running[cell.index] = (cell, process)
            try:
                index, result = results.get(timeout=1.0)
            except queue.Empty:
                # a process that exited with an error and no result was killed (out of memory, a signal)
                for index, (cell, process) in list(running.items()):
                    if process.exitcode not in (None, 0):
                        del running[index]
                        error = f"the worker process died (exit code {process.exitcode})"
                        finish(cell, {"error": error, "traceback": error + "\n"})
                continue
            cell, process = running.pop(index)
            process.join()
            finish(cell, result)
    finally:  # on Ctrl-C or an error here: stop the running cells (they resume on the next run)
        for _, process in running.values():
            process.terminate()
            process.join()
        results.close()
    return failures


def _write_failures(out: Path, failures: list[CellFailure]) -> None:
    path = out / "failures.txt"
    if not failures:
        path.unlink(missing_ok=True)
        return
    text = "\n".join(f"== {f.cell.model} on {f.cell.dataset} ({f.cell.run_dir})\n{f.traceback}" for f in failures)
    atomic_write_text(path, text)


def run_benchmark(
    spec: BenchSpec,
    out: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    report_only: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the cells of `spec` (this shard's; none with `report_only`) into `out`, in `spec.workers`
    processes, then build the tables.

    A cell that fails does not stop the others; the failures are returned (and written to
    OUT/failures.txt). Returns build_tables' dict plus failures (a list of CellFailure) and seconds.
    """
    out = Path(out).resolve()
    cells = plan_cells(spec, out, progress=progress)
    failures: list[CellFailure] = []
    start = time.time()
    if not report_only:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "benchmark.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        heads = {c.index: f"[{c.index + 1}/{len(cells)}] {c.model} on {c.dataset}" for c in cells}
        mine = [c for c in cells if shard is None or c.index % shard[1] == shard[0]]
        for cell in mine:
            if cell.finished:
                echo(f"{heads[cell.index]}: finished earlier, skipped")
        todo = [c for c in mine if not c.finished]
        prepare_builtin_data(todo, echo)
        workers = max(1, min(spec.workers, len(todo)))
        failures = _run_cells(todo, heads, workers, command or ["qgmil", "benchmark"], echo)
        _write_failures(out, failures)
    tables = build_tables(out, cells, echo=echo)
    return {**tables, "failures": failures, "seconds": time.time() - start}


# ------------------------------------------------------------------------------------------ tables

def build_tables(out: str | Path, cells: list[Cell], echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Write every table and figure (see the module docstring) from the finished cells."""
    from .stats import format_significance, significance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(c.model for c in cells))
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    results = collect_results(cells)
    gains = compute_gains(results, datasets)
    results_md = format_results(results, models, datasets, gains)
    ablation_md = format_ablation(results, datasets)
    tests = significance(cells, results, gains)
    mass, skipped = attention_mass(cells)

    def text(name: str, content: str) -> None:
        atomic_write_text(out / name, content + "\n")

    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    atomic_write(out / "gains.csv", lambda tmp: gains.to_csv(tmp, index=False))
    atomic_write(out / "significance.csv", lambda tmp: tests.to_csv(tmp, index=False))
    atomic_write(out / "attention_mass.csv", lambda tmp: mass.to_csv(tmp, index=False))
    text("results.md", results_md)
    text("results.tex", format_results_latex(results, models, datasets))
    text("auroc.md", format_metric_tables(results, models, datasets, ["auroc"]))
    text("calibration.md", format_metric_tables(results, models, datasets, ["ece", "brier"]))
    text("significance.md", format_significance(tests))
    text("attention_mass.md", format_attention_mass(mass, skipped))
    if ablation_md is not None:
        text("ablation.md", ablation_md)
    figures = _figures(out, results, models, datasets, echo) if not results.empty else []
    return {"results": results, "gains": gains, "significance": tests, "attention_mass": mass,
            "results_md": results_md, "ablation_md": ablation_md, "figures": figures,
            "finished": len(results), "cells": len(cells)}


def _figures(out: Path, results, models: list[str], datasets: list[str], echo: Callable[[str], None]) -> list[Path]:
    """results.png and ranks.png (no ranks.png while no model has finished every dataset); none, with a
    note, without matplotlib (an optional extra)."""
    from .plots import average_ranks, rank_plot, results_bars

    try:
        written = [results_bars(results, models, datasets, out / "results.png")]
        ranks = average_ranks(results, models, datasets)
        if not ranks.empty:
            written.append(rank_plot(ranks, out / "ranks.png"))
    except ImportError as err:
        echo(f"no figures: {err}")
        return []
    return written
