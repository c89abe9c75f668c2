"""A training run: data checks, patient-level splits, k-fold x seeds cross-validation, the report.

Writes the run directory that `qgmil.rundir.RunDir` describes, holding its lock (RUN_DIR/run.lock) from the
start to the report. Nothing of the run is written before the config validated (at load time), the data passed
its checks and what would fail only later was tried (`_validate`: the model built for the data, two classes,
every fold with its parts); a fresh run that fails before its config.yaml is written leaves no directory behind
(or, in a directory that existed, nothing that stops the next start).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import DataError, Fold, MILDataset, Splits, check_dataset, load_or_make_splits, prepare_dataset, read_attrs
from ..evaluate.report import write_report
from ..data.table import mixed_labels_allowed, read_table
from ..models import create_model, model_entry, run_overrides
from ..rundir import RunConfig, RunDir, RunDirError
from ..runtime import Dist, barrier, broadcast, init_distributed
from ..tasks import Task, make_task, parse_targets, target_columns
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


def provenance(data: MILDataset) -> dict:
    """Encoder and patch facts recorded in the first bag (checked again at prediction time)."""
    attrs = read_attrs(data.units[0].files[0])
    return {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}


def _data_paths(config: RunConfig, out: Path) -> tuple[Path, Path]:
    """(table, features) of the run's data; a built-in dataset's are where it is (or will be) prepared."""
    data = config.data
    if data.builtin is None:
        return data.table, data.features
    root = data.builtin_dir or out / "data" / data.builtin
    return root / "labels.csv", root / "features"


def _prepare_data(config: RunConfig, out: Path, ctx: Dist) -> tuple[Path, Path]:
    """_data_paths, with a built-in dataset prepared there first (by rank 0)."""
    table, features = _data_paths(config, out)
    data = config.data
    if data.builtin is not None:
        if ctx.is_main:
            prepare_dataset(data.builtin, table.parent, progress=config.runtime.progress, **data.builtin_options)
        barrier(ctx)
    return table, features


def _dataset(config: RunConfig, table: Path, features: Path) -> tuple[MILDataset, Task]:
    """The run's bags and its task (for classification: its classes; else the targets parsed and checked)."""
    options = dict(bag_unit=config.data.bag_unit, cache=config.data.cache, limits=config.data.limits)
    if config.task.kind == "classification":
        data = MILDataset.from_table(table, features, classes=config.data.classes, **config.data.table_options(),
                                     **options)
        return data, make_task(config, data.classes).for_run(data)
    frame = read_table(table, config.data.columns, require_labels=False, keep=target_columns(config),
                       slide_table=config.data.slide_table,
                       mixed_labels=mixed_labels_allowed(config.data.bag_unit, config.data.patient_label))
    names, problems = parse_targets(frame, config)
    if problems:
        raise DataError(problems, f"{table}: the {config.task.kind} targets have problems")
    data = MILDataset.from_table(frame, features, columns=config.data.columns, classes=[], **options)
    return data, make_task(config, names).for_run(data)


def _fill_cache_for_workers(config: RunConfig, data: MILDataset, ctx: Dist) -> None:
    """DataLoader workers work on a forked copy of the dataset, and what they cache dies with them at the end
    of each epoch; so with workers a cached dataset is filled here, once, and the workers share it."""
    if config.data.num_workers > 0 and data.cache_mode is not None:
        data.preload(progress=config.runtime.progress and ctx.is_main)


def _check_targets(config: RunConfig):
    """The target check of `check_dataset` for tasks other than classification (None for classification)."""
    if config.task.kind == "classification":
        return None
    return lambda frame: parse_targets(frame, config)[1]


def _check(config: RunConfig, table: Path, features: Path, ctx: Dist) -> None:
    problems = []
    if ctx.is_main and config.data.check:
        classification = config.task.kind == "classification"
        report = check_dataset(table, features, classes=config.data.classes,
                               cache=config.data.cache, limits=config.data.limits, progress=config.runtime.progress,
                               require_labels=classification, keep=target_columns(config),
                               check_targets=_check_targets(config), bag_unit=config.data.bag_unit,
                               **config.data.table_options())
        problems = report.problems
    problems = broadcast(problems, ctx)
    if problems:
        raise DataError(problems, f"{table}: the dataset has problems (see `qgmil data check`)")


def _validate(config: RunConfig, run: RunDir, data: MILDataset, task: Task, splits: Splits) -> None:
    """Try what would otherwise fail only once the run has started (after a fold of training, or with its
    config.yaml written, so that neither a fresh start nor --resume would get past it)."""
    problems = []
    present = sorted({data.classes[i] for i in data.labels if i >= 0})
    if task.kind == "classification" and len(present) < 2:
        problems.append(f"{data.table.attrs.get('source', 'the table')}: {len(present)} class among the labels "
                        f"({', '.join(present) or 'none'}); a classifier needs at least 2")
    for fold in splits.folds:
        empty = [part for part in ("train", "val", "test")
                 if not getattr(fold, part) and (part != "val" or config.eval.val_fraction > 0)]
        if empty:
            problems.append(f"{run.splits}: fold {fold.name} has no {' and no '.join(empty)} bags "
                            "(a table's split column needs train and test rows)")
    try:
        create_model(config.model.name, in_dim=data.in_dim, num_classes=task.out_dim,
                     **run_overrides(config.model.name, config.model.overrides, class_labels=task.needs_class_labels))
    except Exception as err:  # whatever the architecture raises for these settings
        problems.append(f"model.name {config.model.name} with model.overrides {config.model.overrides}: cannot be "
                        f"built for {data.in_dim}-dim features and {task.out_dim} outputs ({err})")
    if problems:
        raise DataError(problems, f"{run.root}: the run cannot start")


def task_notes(config: RunConfig) -> list[str]:
    """What the task changes about the model's training (class-label auxiliary losses off), for run.json."""
    arch = model_entry(config.model.name).arch
    if config.task.kind == "classification" or not arch.class_label_losses:
        return []
    notes = [f"{config.model.name}: auxiliary loss(es) {', '.join(arch.class_label_losses)} need class labels and "
             f"are off for task {config.task.kind} (the model trains on the task's loss alone)"]
    changed = {k: v for k, v in arch.without_class_labels.items() if k not in config.model.overrides}
    if changed:
        notes.append(f"{config.model.name}: without class labels it trains with "
                     f"{', '.join(f'{k}={v}' for k, v in changed.items())}")
    return notes


def _take_lock(run: RunDir, ctx: Dist, hold: contextlib.ExitStack) -> None:
    """RUN_DIR/run.lock, taken by rank 0 for all ranks: either all go on or all stop, naming the holder."""
    error = None
    if ctx.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        try:
            hold.enter_context(run.lock())
        except RunDirError as err:
            error = str(err)
    error = broadcast(error, ctx)
    if error:
        raise RunDirError(error)


@dataclass
class OpenRun:
    """A run directory whose config and data passed their checks, with its data and splits loaded; opened by
    `open_run` it holds the run's lock until closed (a context manager)."""

    run: RunDir
    config: RunConfig
    ctx: Dist
    data: MILDataset
    task: Task
    splits: Splits
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def close(self) -> None:
        self.hold.close()

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def checkpoint_extra(self) -> dict:
        """What every checkpoint of the run records besides the model (checked at prediction time)."""
        extra = {"in_dim": self.data.in_dim, "provenance": provenance(self.data), "bag_unit": self.config.data.bag_unit,
                 "patient_label": self.config.data.patient_label,
                 "model": self.config.model.name, "run": str(self.run.root), "task": self.task.describe()}
        if self.task.kind == "classification":
            extra["classes"] = self.data.classes
        return extra

    def parts(self, fold: Fold, config: RunConfig | None = None) -> FoldParts:
        max_instances = (config or self.config).data.max_instances
        return FoldParts(train=self.data.subset(fold.train, max_instances=max_instances),
                         val=self.data.subset(fold.val) if fold.val else None,
                         test=self.data.subset(fold.test) if fold.test else None)


def open_run(given: RunConfig | None, out_dir: str | Path, resume: bool, command: list[str] | None) -> OpenRun:
    """Resolve the config (a new one, or the saved one on resume), start torch.distributed when launched by
    torchrun, take the run's lock, prepare and check the data, make the splits, write config.yaml and run.json.
    A fresh run that fails before its config.yaml is written leaves no directory behind. Close the result
    (or use it as a context manager) to release the lock."""
    run = RunDir(Path(out_dir).resolve())
    config = run.resolve_config(given, resume)
    ctx = init_distributed(config.runtime.device)
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    created = ctx.is_main and not run.root.exists()
    hold = contextlib.ExitStack()
    _take_lock(run, ctx, hold)  # refused: the folder belongs to the process holding it, left alone
    try:
        run.resolve_config(given, resume)  # again under the lock: another process may have started a run here
        data, task, splits = _start(config, run, ctx, resume, command)
    except BaseException:
        if created and not run.holds_run:  # nothing of a run to keep: leave no directory behind
            hold.close()
            shutil.rmtree(run.root, ignore_errors=True)
        elif ctx.is_main and not resume and not run.holds_run:  # a folder that existed: no splits of a non-run
            run.splits.unlink(missing_ok=True)
        hold.close()
        raise
    return OpenRun(run, config, ctx, data, task, splits, hold)


def attach_run(out_dir: str | Path) -> OpenRun:
    """An opened run for a helper process of the run in `out_dir` (e.g. a tuning worker): its saved config,
    data and splits, with nothing checked again and nothing written."""
    run = RunDir(Path(out_dir).resolve())
    run.require_run()
    config = run.read_config()
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    ctx = init_distributed(config.runtime.device)
    data, task = _dataset(config, *_data_paths(config, run.root))
    _fill_cache_for_workers(config, data, ctx)
    return OpenRun(run, config, ctx, data, task, Splits.load(run.splits))


def train_run(config: RunConfig | None, out_dir: str | Path, *, resume: bool = False, command: list[str] | None = None) -> dict:
    """Run (or resume) cross-validation; returns the summary (metric -> mean, std, ci_low, ci_high, n)."""
    with open_run(config, out_dir, resume, command) as opened:
        return _cross_validate(opened)


def _cross_validate(opened: OpenRun) -> dict:
    run, config, ctx, data, splits = opened.run, opened.config, opened.ctx, opened.data, opened.splits
    progress = config.runtime.progress and ctx.is_main
    trainer = FoldTrainer(config, ctx, opened.task, data.in_dim, opened.checkpoint_extra())
    folds = tqdm(splits.folds, desc=f"{config.model.name} cross-validation", unit="fold", disable=not progress)
    for fold in folds:
        fold_dir = run.fold(fold.name)
        if fold_dir.finished:
            continue  # finished in an earlier session
        metrics = trainer.run(fold, opened.parts(fold), fold_dir, progress=progress)
        folds.set_postfix({config.eval.monitor: f"{metrics['test'].get(config.eval.monitor, float('nan')):.3f}"}
                          if config.eval.monitor in metrics["test"] else {})
    summary = write_report(run.root) if ctx.is_main else None
    return broadcast(summary, ctx)


def _start(config: RunConfig, run: RunDir, ctx: Dist, resume: bool, command: list[str] | None
           ) -> tuple[MILDataset, Task, Splits]:
    """Prepare and check the data, make (or reuse) the splits, then write config.yaml and run.json."""
    if ctx.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        if not resume:  # splits of a start that failed before config.yaml was written: not this run's
            run.splits.unlink(missing_ok=True)
    barrier(ctx)
    table, features = _prepare_data(config, run.root, ctx)
    _check(config, table, features, ctx)
    data, task = _dataset(config, table, features)
    data.lengths  # every file's header read and checked (data.limits) before anything is written, data.check or not
    if ctx.is_main:
        if config.eval.splits is not None and not run.splits.exists():
            shutil.copyfile(config.eval.splits, run.splits)
        load_or_make_splits(data.table, run.splits, config.eval.folds, config.eval.seeds, config.eval.val_fraction)
    barrier(ctx)
    splits = Splits.load(run.splits)
    _validate(config, run, data, task, splits)
    _fill_cache_for_workers(config, data, ctx)
    if ctx.is_main:
        run.write_config(config)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        facts = run.read_facts() if run.run_json.exists() else {
            "command": command or sys.argv, "cwd": os.getcwd(), "started": now, "world_size": ctx.world,
            "versions": _versions(), "classes": data.classes, "in_dim": data.in_dim, "provenance": provenance(data),
            "bag_unit": config.data.bag_unit, "n_bags": len(data), "task": task.kind, "targets": task.names,
            "task_state": task.state, "notes": task_notes(config)}
        if not resume:
            for note in facts.get("notes", []):
                print(f"note: {note}", file=sys.stderr)
        if resume:
            facts.setdefault("resumed", []).append({"at": now, "command": command or sys.argv})
        run.write_facts(facts)
    barrier(ctx)
    return data, task, splits
