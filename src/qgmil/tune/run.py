"""Nested tuning: for each outer (seed, fold), an Optuna study on the outer training part only, then the best
trial's settings retrained on it and scored once on the outer test fold.

A trial trains on the outer fold's training part and is scored on its validation carve-out (or, with
tune.inner_folds = k, on k inner folds of training + validation), with the per-epoch validation score
reported to the pruner. The test part of the outer fold is never loaded while its study runs, so no
tuning decision can depend on it. Every trial of a fold starts from the same weights seed (common random
numbers: settings, not luck, separate the trials). The run directory is a training run's (qgmil.rundir)
plus tuning/: reports, predictions and `qgmil predict` read it like any other run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import slurm
from ..data.splits import Fold, inner_folds
from ..evaluate.report import write_report
from ..models import model_entry
from ..models.search import Space, merge_space
from ..rundir import RunConfig, RunDir
from ..rundir.directory import write_csv, write_json
from ..runtime import available_cpus
from ..slurm import SlurmOptions
from ..tasks import Task, make_task
from ..train.loop import FoldTrainer, monitored
from ..train.run import OpenRun, attach_run, open_run
from .plots import plot_study
from .settings import write_settings
from .study import (TuneError, best_of, make_sampler, mark_alive, open_storage, open_study, optuna, recover_stale,
                    spent, suggest)


def search_space(config: RunConfig) -> tuple[Space, dict[str, Any]]:
    """(searched params, fixed values) for this run: the model's default space with tune.space on top."""
    return merge_space(model_entry(config.model.name).search_space(), config.tune.space)


def check_space(config: RunConfig) -> None:
    """Every extreme of every param must make a valid config: bad ranges fail before any training."""
    space, fixed = search_space(config)
    config.with_keys(fixed)
    for key, param in space.items():
        for value in param.extremes():
            config.with_keys({**fixed, key: value})


def _metric(config: RunConfig, task: Task) -> tuple[str, str]:
    """(validation column, direction) of the tuned metric: eval.monitor, a metric of the run's task."""
    name = monitored(task, config.eval.monitor)
    return f"val_{name}", "maximize" if task.higher_is_better(name) else "minimize"


class FoldStudy:
    """The study of one outer fold: runs trials until the budget is spent, then names the chosen settings."""

    def __init__(self, opened: OpenRun, fold: Fold, storage):
        self.opened, self.fold = opened, fold
        self.config = opened.config
        self.tune = self.config.tune
        self.space, self.fixed = search_space(self.config)
        self.column, direction = _metric(self.config, opened.task)
        self.loss_sign = -1.0 if direction == "maximize" else 1.0
        if self.tune.inner_folds:
            self.inner = inner_folds(opened.data.table, fold, self.tune.inner_folds, seed=fold.seed * 1000 + fold.fold)
        else:
            if not fold.val:
                raise TuneError(f"{fold.name}: no validation part to score trials on; set eval.val_fraction > 0 "
                                "or tune.inner_folds")
            self.inner = [Fold(fold.name, fold.seed, fold.fold, fold.train, fold.val, [])]
        self.steps = len(self.inner) * self.config.optim.epochs
        self.study = open_study(storage, fold.name, self.tune, direction, self.steps)

    def objective(self, trial) -> float:
        params = suggest(trial, self.space)
        try:
            config = self.config.with_keys({**self.fixed, **params})
        except ValueError as err:  # settings that do not fit together: a failed trial, counted
            trial.set_user_attr("error", str(err))
            raise
        # the task again from the trial's settings (optim.label_smoothing, optim.class_weights may be tuned)
        task = make_task(config, self.opened.task.names, self.opened.task.state)  # the run-level state (for_run)
        trainer = FoldTrainer(config, self.opened.ctx, task, self.opened.data.in_dim, {})
        loss_column = f"val_{task.loss_metric}"  # the task's validation loss: nll (classification), loss (others)
        scores, epochs = [], 0
        for j, inner in enumerate(self.inner):

            def on_epoch(epoch: int, row: dict, j=j) -> None:
                nonlocal epochs
                epochs += 1
                trial.set_user_attr("epochs", epochs)
                trial.set_user_attr("alive_at", time.time())
                value = row.get(self.column)
                if value is None or math.isnan(value):
                    return
                # ties broken by the validation loss, as early stopping breaks them: on small validation parts
                # macro-F1 (or a C-index) moves in steps, and a curve flat at chance level must rank below a
                # learning one; an undefined loss breaks no tie
                loss = float(row.get(loss_column, 0.0))
                loss = 0.0 if math.isnan(loss) else min(loss, 100.0)
                trial.report(value + self.loss_sign * 1e-4 * loss, j * config.optim.epochs + epoch)
                if trial.should_prune():
                    raise optuna().TrialPruned()

            try:
                info = trainer.fit(inner, self.opened.parts(inner, config), None, progress=False, on_epoch=on_epoch)
            except optuna().TrialPruned:
                raise
            except Exception as err:  # noqa: BLE001 - recorded so the trial counts; the study goes on
                trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                raise
            scores.append(info["history"][info["best_epoch"]].get(self.column, math.nan))
        score = statistics.fmean(scores)
        if math.isnan(score):  # e.g. AUROC of a one-class validation part: a failure of the data, counted
            trial.set_user_attr("error", f"validation {self.column[4:]} is undefined (NaN) on this split")
        return score

    def run(self, progress: bool) -> None:
        """Trials until tune.trials count, other workers' included; resumable at trial granularity.

        Each trial first claims its place in the budget (ask), so workers sharing the study never run more
        than tune.trials between them; a claim that lost the race for the last place is dropped unrun.
        """
        opt = optuna()
        state = opt.trial.TrialState
        bar = tqdm(total=self.tune.trials, desc=f"{self.fold.name} tuning", unit="trial", leave=False,
                   disable=not progress)
        while True:
            recover_stale(self.study)
            used = spent(self.study)
            bar.n = min(len(used), self.tune.trials)
            bar.refresh()
            if len(used) >= self.tune.trials:
                break
            # seeded by the budget position, so a trial redone after a crash draws what the lost one drew
            self.study.sampler = make_sampler(self.tune, len(used), self.fold.seed * 1000 + self.fold.fold)
            trial = self.study.ask()
            mark_alive(trial)
            if [t.number for t in spent(self.study)].index(trial.number) >= self.tune.trials:
                self.study.tell(trial, state=state.FAIL)  # no "error": not counted
                break
            try:
                self.study.tell(trial, self.objective(trial))
            except opt.TrialPruned:
                self.study.tell(trial, state=state.PRUNED)
            except Exception:  # noqa: BLE001 - recorded on the trial ("error"), counted; the study goes on
                self.study.tell(trial, state=state.FAIL)
        bar.close()
        while any(t.state == state.RUNNING for t in spent(self.study)[: self.tune.trials]):
            time.sleep(2)  # trials of other workers: the choice waits for them
            recover_stale(self.study)

    def chosen(self) -> dict:
        """chosen.json: the best trial's settings and what the study spent."""
        state = optuna().trial.TrialState
        counted = spent(self.study)[: self.tune.trials]
        best = best_of(counted, self.study.direction)
        if best is None:
            errors = sorted({t.user_attrs.get("error", "") for t in counted} - {""})
            raise TuneError(f"{self.fold.name}: no trial completed ({'; '.join(errors[:3]) or 'all pruned'})")
        return {
            "fold": self.fold.name, "params": {k: best.params[k] for k in self.space}, "fixed": self.fixed,
            "value": best.value, "metric": self.column[4:],
            # its place in the budget, not Optuna's number (a trial run again after a crash gets a new one)
            "best_trial": [t.number for t in counted].index(best.number),
            "trials": len(counted),
            "complete": sum(t.state == state.COMPLETE for t in counted),
            "pruned": sum(t.state == state.PRUNED for t in counted),
            "failed": sum(t.state == state.FAIL for t in counted),
            "trial_epochs": sum(int(t.user_attrs.get("epochs", 0)) for t in counted),
            "inner_folds": len(self.inner),
        }

    def write(self, run: RunDir) -> dict:
        folder = run.tuning_dir(self.fold.name)
        folder.mkdir(parents=True, exist_ok=True)
        chosen = self.chosen()
        frame = self.study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
        write_csv(folder / "trials.csv", frame)
        plot_study(self.study, folder, self.column[4:])
        write_json(run.chosen(self.fold.name), chosen)  # last: the fold retrains from it
        return chosen


def tune_run(config: RunConfig | None, out_dir: str | Path, *, resume: bool = False,
             command: list[str] | None = None, workers: int = 1, executor: str = "local",
             slurm_options: SlurmOptions | None = None, wait: bool = False,
             echo: Callable[[str], None] = print) -> dict:
    """Nested tuning over every outer fold of the run in `out_dir`; returns the summary of the test folds
    (as train_run).

    `workers` processes share each study (the trial budget stays tune.trials): local ones are spawned here
    (this process is one of them), with executor "slurm" they are the tasks of a job array, followed by one
    task (after the array ends) that retrains the chosen settings and writes the report; that returns at
    once with an empty summary unless `wait`.
    """
    if config is not None:
        check_space(config)
    optuna()  # a clear error before any directory is made
    with open_run(config, out_dir, resume, command) as opened:
        return _tune(opened, workers, executor, slurm_options, wait, echo)


def _tune(opened: OpenRun, workers: int, executor: str, slurm_options: SlurmOptions | None, wait: bool,
          echo: Callable[[str], None]) -> dict:
    if opened.ctx.enabled:
        raise TuneError("qgmil tune runs one process per study; under torchrun, run `qgmil train` with the chosen "
                        "settings instead")
    check_space(opened.config)
    if executor == "slurm":
        from .cluster import submit_tuning

        if opened.run.finished:
            return opened.run.read_summary()
        jobs = submit_tuning(opened.run, workers, slurm_options or SlurmOptions(), study_worker, finish_run, echo)
        if not wait:
            return {}
        slurm.wait_for(jobs, echo)
        if not opened.run.finished:
            raise TuneError(f"{opened.run.root}: the SLURM tasks ended before the run finished (logs in "
                            f"{opened.run.tuning / 'slurm'}); rerun to resume")
        return opened.run.read_summary()
    helpers = _spawn_workers(opened.run.root, workers - 1)
    try:
        run_studies(opened, opened.config.runtime.progress)
    except BaseException:  # Ctrl-C or an error here: stop the helpers too (their trials are run again later)
        for process in helpers:
            process.terminate()
        raise
    finally:
        for process in helpers:
            process.join()
    return retrain(opened, opened.config.runtime.progress)


def run_studies(opened: OpenRun, progress: bool) -> None:
    """This process's share of every unfinished outer fold's study, until its budget is spent; chosen.json."""
    run = opened.run
    storage = open_storage(run, opened.config.tune)
    folds = tqdm(opened.splits.folds, desc=f"{opened.config.model.name} nested tuning", unit="fold",
                 disable=not progress)
    for fold in folds:
        if run.fold(fold.name).finished or run.chosen(fold.name).exists():
            continue
        study = FoldStudy(opened, fold, storage)
        study.run(progress)
        study.write(run)


def retrain(opened: OpenRun, progress: bool) -> dict:
    """Each outer fold trained with its chosen settings and tested once; then the report."""
    run, config = opened.run, opened.config
    for fold in tqdm(opened.splits.folds, desc=f"{config.model.name} tuned folds", unit="fold", disable=not progress):
        fold_dir = run.fold(fold.name)
        if fold_dir.finished:
            continue
        chosen = json.loads(run.chosen(fold.name).read_text())
        tuned = config.with_keys({**chosen["fixed"], **chosen["params"]})
        trainer = FoldTrainer(tuned, opened.ctx, make_task(tuned, opened.task.names, opened.task.state), opened.data.in_dim,
                              {**opened.checkpoint_extra(), "tuned": chosen["params"]})
        trainer.run(fold, opened.parts(fold, tuned), fold_dir, progress=progress)
    write_settings(run, search_space(config)[0])
    return write_report(run.root)


def study_worker(out_dir: str, threads: int | None = None, ready=None) -> None:
    """A helper process of a tuned run (local or a SLURM task): trials of its studies, no retraining.
    `ready` (a local helper's Event) is set once the run is loaded, so that all workers start together."""
    if threads:
        torch.set_num_threads(threads)
    opened = attach_run(out_dir)
    if ready is not None:
        ready.set()
    run_studies(opened, progress=False)


def finish_run(out_dir: str, threads: int | None = None) -> dict:
    """The last SLURM task of a tuned run: what remains of the studies, the retraining and the report."""
    if threads:
        torch.set_num_threads(threads)
    opened = attach_run(out_dir)
    run_studies(opened, progress=False)
    return retrain(opened, progress=False)


def _spawn_workers(out: Path, count: int) -> list:
    """`count` local helper processes sharing the studies (spawned: no inherited torch thread pools), each
    with an equal share of the CPUs; this process takes the same share."""
    if count <= 0:
        return []
    threads = max(1, available_cpus() // (count + 1))
    torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    events = [context.Event() for _ in range(count)]
    processes = [context.Process(target=study_worker, args=(str(out), threads, event)) for event in events]
    for process in processes:
        process.start()
    for event, process in zip(events, processes):  # start together (importing torch takes seconds)
        while not event.wait(timeout=1.0) and process.is_alive():
            pass
    return processes
