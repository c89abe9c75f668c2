"""The benchmark runner: cross-validate every model on every dataset, then build the paper's tables.

A benchmark is a grid of cells (model, dataset), in a fixed order (datasets outer, models inner).
Each cell is one `train_run` (folds x seeds) into OUT/runs/<dataset>/<model>/; a built-in dataset is
prepared once in OUT/data/<dataset> and shared by all models, so every model sees the same bags and,
with the same seeds, the same splits.

OUT/
  benchmark.yaml   the resolved benchmark spec
  data/<dataset>/  prepared built-in datasets
  runs/<dataset>/<model>/   one run directory per cell (see qgmil.train.run)
  results.csv      one row per model x dataset: macro-F1, AUROC, balanced accuracy, ECE, Brier (mean, std), folds
  results.md       macro-F1 mean ± std, a row per model, a column per dataset (+ mean), best in bold, the gains
  gains.csv        best QG-MIL variant vs best baseline per dataset, and their mean
  ablation.md      with full qgmil and at least one one-off variant: each variant's macro-F1 and its change

Rerun the same command to continue: finished cells (RUN/summary.json) are skipped, unfinished ones
resume fold by fold. `shard=(i, n)` runs only the cells whose index % n == i, so the grid can be split
over machines sharing OUT; `report_only` rebuilds the tables from whatever cells have finished.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..checkpoint import atomic_write
from ..train.config import ConfigError, RunConfig, format_validation_error, load_config

TABLE_METRICS = ["macro_f1", "auroc", "balanced_accuracy", "ece", "brier"]
MODEL_GROUPS = ("ablation", "baselines")


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

def load_spec(
    path: str | Path | None = None,
    *,
    datasets: list[str] | None = None,
    models: list[str] | None = None,
    folds: int | None = None,
    seeds: list[int] | None = None,
    train: dict[str, Any] | None = None,
) -> BenchSpec:
    """The YAML file (optional), with the given values (command-line flags) overriding it.

    `datasets` given by name keep the options of the file's entry of that name; `train` keys are
    added to (and override) the file's.
    """
    tree: dict = {}
    source = str(path) if path is not None else "command line"
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise BenchmarkError(f"{path}: benchmark file not found") from None
        except yaml.YAMLError as err:
            raise BenchmarkError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise BenchmarkError(f"{path}: expected a mapping with datasets, models, folds, seeds, train")
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
            names = [n for n in known if not n.startswith("qgmil")]
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
    """Run the cells of `spec` (this shard's; none with `report_only`) into `out`, then build the tables.

    Returns build_tables' dict (results, gains, results_md, ablation_md).
    """
    from ..train.run import train_run

    out = Path(out).resolve()
    cells = plan_cells(spec, out, progress=progress)
    if not report_only:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "benchmark.yaml",
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)))
        mine = [c for c in cells if shard is None or c.index % shard[1] == shard[0]]
        for cell in mine:
            head = f"[{cell.index + 1}/{len(cells)}] {cell.model} on {cell.dataset}"
            if cell.finished:
                echo(f"{head}: finished earlier, skipped")
                continue
            resume = (cell.run_dir / "config.yaml").exists()
            echo(f"{head}: {'resuming' if resume else 'running'} -> {cell.run_dir}")
            start = time.time()
            summary = train_run(cell.config, cell.run_dir, resume=resume, command=command or ["qgmil", "benchmark"])
            f1 = summary.get("macro_f1", {})
            echo(f"{head}: macro-F1 {f1.get('mean', math.nan):.3f} ± {f1.get('std', math.nan):.3f} "
                 f"({f1.get('n', 0)} folds, {time.time() - start:.0f} s)")
    return build_tables(out, cells)


# ------------------------------------------------------------------------------------------ tables

def collect_results(cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: model, model_name, dataset, folds, <metric>_mean / _std."""
    rows = []
    for cell in cells:
        if not cell.finished:
            continue
        summary = json.loads((cell.run_dir / "summary.json").read_text())
        row = {"model": cell.model, "model_name": cell.model_name, "dataset": cell.dataset,
               "folds": summary.get("macro_f1", {}).get("n", 0)}
        for metric in TABLE_METRICS:
            row[f"{metric}_mean"] = summary.get(metric, {}).get("mean", math.nan)
            row[f"{metric}_std"] = summary.get(metric, {}).get("std", math.nan)
        rows.append(row)
    columns = ["model", "model_name", "dataset", "folds"] + [f"{m}_{s}" for m in TABLE_METRICS for s in ("mean", "std")]
    return pd.DataFrame(rows, columns=columns)


def _f1(results: pd.DataFrame) -> pd.DataFrame:
    return results.pivot(index="model", columns="dataset", values="macro_f1_mean")


def compute_gains(results: pd.DataFrame, datasets: list[str]) -> pd.DataFrame:
    """Per dataset: the best QG-MIL variant (model names starting with qgmil), the best baseline, and
    the macro-F1 gain; a last row `mean` averages the datasets where both exist."""
    rows = []
    for dataset in datasets:
        part = results[results["dataset"] == dataset]
        ours = part[part["model_name"].str.startswith("qgmil")]
        theirs = part[~part["model_name"].str.startswith("qgmil")]
        if ours.empty or theirs.empty:
            continue
        best_ours = ours.loc[ours["macro_f1_mean"].idxmax()]
        best_theirs = theirs.loc[theirs["macro_f1_mean"].idxmax()]
        rows.append({"dataset": dataset, "best_qgmil": best_ours["model"], "qgmil_macro_f1": best_ours["macro_f1_mean"],
                     "best_baseline": best_theirs["model"], "baseline_macro_f1": best_theirs["macro_f1_mean"],
                     "gain": best_ours["macro_f1_mean"] - best_theirs["macro_f1_mean"]})
    gains = pd.DataFrame(rows, columns=["dataset", "best_qgmil", "qgmil_macro_f1", "best_baseline",
                                        "baseline_macro_f1", "gain"])
    if not gains.empty:
        mean = {"dataset": "mean", "best_qgmil": "", "best_baseline": "",
                **{k: gains[k].mean() for k in ("qgmil_macro_f1", "baseline_macro_f1", "gain")}}
        gains = pd.concat([gains, pd.DataFrame([mean])], ignore_index=True)
    return gains


def format_results(results: pd.DataFrame, models: list[str], datasets: list[str], gains: pd.DataFrame) -> str:
    """Markdown: macro-F1 mean ± std, a row per model, a column per dataset and the mean over datasets
    (only for models finished on all of them); the best per column in bold; then the gains."""
    if results.empty:
        return "No finished cells yet."
    f1 = _f1(results)
    std = results.pivot(index="model", columns="dataset", values="macro_f1_std")
    datasets = [d for d in datasets if d in f1.columns]
    models = [m for m in models if m in f1.index]
    f1, std = f1.reindex(index=models, columns=datasets), std.reindex(index=models, columns=datasets)
    mean = f1.mean(axis=1).where(f1.notna().all(axis=1))
    lines = ["| model | " + " | ".join(datasets) + " | mean |", "|---|" + "---|" * (len(datasets) + 1)]
    for model in models:
        cells = []
        for dataset in datasets:
            value = f1.loc[model, dataset]
            text = "–" if pd.isna(value) else f"{value:.3f} ± {std.loc[model, dataset]:.3f}"
            cells.append(f"**{text}**" if not pd.isna(value) and value == f1[dataset].max() else text)
        m = mean[model]
        text = "–" if pd.isna(m) else f"{m:.3f}"
        cells.append(f"**{text}**" if not pd.isna(m) and m == mean.max() else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Macro-F1, mean ± std over folds x seeds; best per dataset in bold.")
    if not gains.empty:
        per = [f"{r.dataset} {r.gain:+.3f} ({r.best_qgmil} vs {r.best_baseline})"
               for r in gains.itertuples() if r.dataset != "mean"]
        lines += ["", f"Gain of the best QG-MIL variant over the best baseline (macro-F1): {'; '.join(per)}; "
                      f"mean {gains['gain'].iloc[-1]:+.3f}."]
    return "\n".join(lines)


def format_ablation(results: pd.DataFrame, datasets: list[str]) -> str | None:
    """Markdown: full qgmil and each one-off variant of ABLATION_SET present (by label); a variant's cell
    is its macro-F1 and the difference from full qgmil. None without qgmil and at least one variant."""
    from ..models import ABLATION_SET

    if results.empty:
        return None
    f1 = _f1(results)
    variants = [m for m in ABLATION_SET[1:] if m in f1.index]
    if ABLATION_SET[0] not in f1.index or not variants:
        return None
    full = f1.loc[ABLATION_SET[0]]
    datasets = [d for d in datasets if d in f1.columns]
    lines = ["| variant | " + " | ".join(datasets) + " | mean |", "|---|" + "---|" * (len(datasets) + 1)]
    complete = full[datasets].notna().all()
    full_cells = ["–" if pd.isna(full[d]) else f"{full[d]:.3f}" for d in datasets]
    full_cells.append(f"{full[datasets].mean():.3f}" if complete else "–")
    lines.append(f"| {ABLATION_SET[0]} (full) | " + " | ".join(full_cells) + " |")
    for variant in variants:
        row, cells = f1.loc[variant], []
        for d in datasets:
            cells.append("–" if pd.isna(row[d]) or pd.isna(full[d]) else f"{row[d]:.3f} ({row[d] - full[d]:+.3f})")
        both = complete and row[datasets].notna().all()
        m = row[datasets].mean()
        cells.append(f"{m:.3f} ({m - full[datasets].mean():+.3f})" if both else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"Macro-F1 (mean over folds x seeds); in brackets the difference from full {ABLATION_SET[0]}."]
    return "\n".join(lines)


def build_tables(out: str | Path, cells: list[Cell]) -> dict[str, Any]:
    """Write results.csv, results.md, gains.csv and (when it applies) ablation.md from the finished cells."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(c.model for c in cells))
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    results = collect_results(cells)
    gains = compute_gains(results, datasets)
    results_md = format_results(results, models, datasets, gains)
    ablation_md = format_ablation(results, datasets)
    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    atomic_write(out / "gains.csv", lambda tmp: gains.to_csv(tmp, index=False))
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(results_md + "\n"))
    if ablation_md is not None:
        atomic_write(out / "ablation.md", lambda tmp: Path(tmp).write_text(ablation_md + "\n"))
    return {"results": results, "gains": gains, "results_md": results_md, "ablation_md": ablation_md,
            "finished": len(results), "cells": len(cells)}
