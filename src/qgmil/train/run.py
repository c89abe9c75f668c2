"""A training run: data checks, patient-level splits, k-fold x seeds cross-validation, the report.

RUN_DIR/
  config.yaml          the resolved configuration (paths absolute): rerun or resume from it
  run.json             command line, versions, classes, feature provenance, start/resume times
  splits.json          the folds (reused on resume and by later runs)
  folds/<seed>-<fold>/ best.safetensors, epochs.csv, predictions.csv, attention.h5, metrics.json
                       (state.safetensors while the fold is unfinished)
  predictions.csv      all test predictions; summary.json / .md / .csv; reliability.png
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_write_text
from ..data import (
    DataError, MILDataset, Splits, check_dataset, load_or_make_splits, prepare_dataset, read_attrs,
)
from .config import ConfigError, RunConfig, load_config
from .distributed import Dist, barrier, broadcast, init_distributed
from .loop import FoldParts, FoldTrainer

PROVENANCE_KEYS = ("encoder", "extractor", "encoder_version", "patch_size_px", "patch_size_um", "tile_size_um",
                   "tile_size_px", "mpp", "patch_size_level0", "feat_type")


def _versions() -> dict:
    import h5py
    import numpy
    import pandas
    import sklearn

    return {"qgmil": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "pandas": pandas.__version__, "scikit-learn": sklearn.__version__,
            "h5py": h5py.__version__, "platform": platform.platform()}


def _absolute(config: RunConfig) -> RunConfig:
    """Paths relative to the working directory -> absolute, so the saved config works from anywhere."""
    data = config.data
    updates = {k: Path(v).resolve() for k in ("table", "features", "builtin_dir") if (v := getattr(data, k)) is not None}
    config = config.model_copy(update={"data": data.model_copy(update=updates)})
    if config.eval.splits is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"splits": config.eval.splits.resolve()})})
    return config


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def provenance(data: MILDataset) -> dict:
    """Encoder and patch facts recorded in the first bag (checked again at prediction time)."""
    attrs = read_attrs(data.units[0].files[0])
    return {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}


def resolve_run_config(config: RunConfig | None, out: Path, resume: bool) -> RunConfig:
    """The config to run: a new one, or on resume the one saved in the run directory."""
    saved = out / "config.yaml"
    if resume:
        if not saved.exists():
            raise ConfigError(f"{out}: nothing to resume (no config.yaml); start the run without --resume")
        stored = load_config(saved)
        if config is not None and _absolute(config).model_dump(exclude={"runtime"}) != stored.model_dump(exclude={"runtime"}):
            raise ConfigError(f"{out}: the given config differs from the run's config.yaml; "
                              "resume with `--resume --out RUN_DIR` alone, or start a new run")
        return stored if config is None else stored.model_copy(update={"runtime": config.runtime})
    if saved.exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    if config is None:
        raise ConfigError("no config: give a CONFIG.yaml or --table/--features (or --dataset)")
    return _absolute(config)


def _prepare_data(config: RunConfig, out: Path, ctx: Dist) -> tuple[Path, Path]:
    data = config.data
    if data.builtin is None:
        return data.table, data.features
    root = data.builtin_dir or out / "data" / data.builtin
    if ctx.is_main:
        prepare_dataset(data.builtin, root, progress=config.runtime.progress, **data.builtin_options)
    barrier(ctx)
    return root / "labels.csv", root / "features"


def _check(config: RunConfig, table: Path, features: Path, ctx: Dist) -> None:
    problems = []
    if ctx.is_main and config.data.check:
        report = check_dataset(table, features, columns=config.data.columns, classes=config.data.classes,
                               progress=config.runtime.progress)
        problems = report.problems
    problems = broadcast(problems, ctx)
    if problems:
        raise DataError(problems, f"{table}: the dataset has problems (see `qgmil data check`)")


def train_run(config: RunConfig | None, out_dir: str | Path, *, resume: bool = False, command: list[str] | None = None) -> dict:
    """Run (or resume) cross-validation; returns the summary (metric -> mean, std, ci_low, ci_high, n)."""
    from ..evaluate.report import write_report

    out = Path(out_dir).resolve()
    config = resolve_run_config(config, out, resume)
    ctx = init_distributed(config.runtime.device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    progress = config.runtime.progress and ctx.is_main
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # splits of a start that failed before config.yaml was written: not this run's
            (out / "splits.json").unlink(missing_ok=True)
    barrier(ctx)

    table, features = _prepare_data(config, out, ctx)
    _check(config, table, features, ctx)
    data = MILDataset.from_table(table, features, columns=config.data.columns, classes=config.data.classes,
                                 bag_unit=config.data.bag_unit, cache=config.data.cache)
    splits_path = out / "splits.json"
    if ctx.is_main:
        if config.eval.splits is not None and not splits_path.exists():
            shutil.copyfile(config.eval.splits, splits_path)
        load_or_make_splits(data.table, splits_path, config.eval.folds, config.eval.seeds, config.eval.val_fraction)
    barrier(ctx)
    splits = Splits.load(splits_path)

    in_dim = data.in_dim
    facts = {"classes": data.classes, "in_dim": in_dim, "provenance": provenance(data), "bag_unit": config.data.bag_unit}
    if ctx.is_main:
        atomic_write_text(out / "config.yaml", config.to_yaml())
        run_path = out / "run.json"
        run = json.loads(run_path.read_text()) if run_path.exists() else {
            "command": command or sys.argv, "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": ctx.world, "versions": _versions(), **facts, "n_bags": len(data)}
        if resume:
            run.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command or sys.argv})
        _write_json(run_path, run)

    extra = {**facts, "model": config.model.name, "run": str(out)}
    trainer = FoldTrainer(config, ctx, data.classes, in_dim, extra)
    folds = tqdm(splits.folds, desc=f"{config.model.name} cross-validation", unit="fold", disable=not progress)
    for fold in folds:
        fold_dir = out / "folds" / fold.name
        if (fold_dir / "metrics.json").exists():
            continue  # finished in an earlier session
        parts = FoldParts(
            train=data.subset(fold.train, max_instances=config.data.max_instances),
            val=data.subset(fold.val) if fold.val else None,
            test=data.subset(fold.test),
        )
        metrics = trainer.run(fold, parts, fold_dir, progress=progress)
        folds.set_postfix({config.eval.monitor: f"{metrics['test'].get(config.eval.monitor, float('nan')):.3f}"}
                          if config.eval.monitor in metrics["test"] else {})
    summary = write_report(out) if ctx.is_main else None
    summary = broadcast(summary, ctx)
    return summary
