"""The Optuna side of tuning: storage, sampler, pruner and the trial budget of one outer fold's study.

One study per outer (seed, fold), named after it, in one storage per run: by default a journal file
(RUN_DIR/tuning/studies.journal; several processes or cluster jobs may share it on a shared filesystem),
or any RDB URL. The budget counts finished trials (complete, pruned, or failed by an error of their
settings) and trials other workers are running; a trial whose process died (same host, pid gone, or no
heartbeat for STALE_AFTER seconds) is marked failed and does not count, so its budget is spent again.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from ..models.search import Choice, Float, Int, Space
from ..rundir import RunDir
from ..rundir.config import TuneConfig

STALE_AFTER = 3600.0  # seconds without a heartbeat (one per epoch) before another host's trial counts as dead


class TuneError(ValueError):
    """Tuning cannot start or finish (no optuna, a bad storage, every trial failed); the message says why."""


def optuna():
    """The optuna module, or a TuneError saying how to install it."""
    try:
        import optuna as module
    except ImportError:
        raise TuneError("tuning needs optuna: pip install 'qgmil[tune]'") from None
    module.logging.set_verbosity(module.logging.WARNING)
    return module


def open_storage(run: RunDir, tune: TuneConfig):
    """tune.storage as an Optuna storage: a journal file (default RUN_DIR/tuning/studies.journal) or an RDB URL."""
    opt = optuna()
    from optuna.storages.journal import JournalFileBackend

    if tune.storage is not None and "://" in tune.storage:
        try:
            return opt.storages.RDBStorage(tune.storage)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; the message is what matters
            raise TuneError(f"tune.storage {tune.storage}: cannot open ({err})") from None
    path = Path(tune.storage).expanduser() if tune.storage else run.study_journal
    path.parent.mkdir(parents=True, exist_ok=True)
    return opt.storages.JournalStorage(JournalFileBackend(str(path)))


def make_sampler(tune: TuneConfig, trial_number: int, study_seed: int = 0):
    """A sampler seeded per trial: a resumed or shared study draws what an uninterrupted one would have.
    `study_seed` (the outer fold's) gives each fold its own draws."""
    opt = optuna()
    seed = (tune.seed * 100_003 + study_seed * 1_009 + trial_number) % 2**32
    if tune.sampler == "random":
        return opt.samplers.RandomSampler(seed=seed)
    return opt.samplers.TPESampler(n_startup_trials=tune.startup_trials, seed=seed)


def make_pruner(tune: TuneConfig, max_steps: int):
    opt = optuna()
    if tune.pruner == "median":
        return opt.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.prune_after)
    if tune.pruner == "hyperband":
        return opt.pruners.HyperbandPruner(min_resource=max(1, tune.prune_after), max_resource=max_steps)
    if tune.pruner == "asha":
        return opt.pruners.SuccessiveHalvingPruner(min_resource=max(1, tune.prune_after), reduction_factor=3)
    return opt.pruners.NopPruner()


def open_study(storage, name: str, tune: TuneConfig, direction: str, max_steps: int):
    opt = optuna()
    return opt.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                            sampler=make_sampler(tune, 0), pruner=make_pruner(tune, max_steps))


def suggest(trial, space: Space) -> dict[str, Any]:
    """One value per searched key, in the space's order."""
    values = {}
    for key, param in space.items():
        if isinstance(param, Float):
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
        elif isinstance(param, Int):
            values[key] = trial.suggest_int(key, param.low, param.high, step=param.step, log=param.log)
        elif isinstance(param, Choice):
            values[key] = trial.suggest_categorical(key, list(param.choices))
    return values


def mark_alive(trial) -> None:
    """The trial's owner and heartbeat, so another worker can tell a running trial from a dead one."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("alive_at", time.time())


def _dead(frozen) -> bool:
    attrs = frozen.user_attrs
    if attrs.get("host") == socket.gethostname() and "pid" in attrs:
        if attrs["pid"] == os.getpid():
            return True  # left by an interrupted call in this very process: no trial of ours runs while we look
        try:
            os.kill(int(attrs["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    # another host's trial, or one whose owner has not written its attributes yet: judged by its heartbeat
    started = frozen.datetime_start.timestamp() if frozen.datetime_start else time.time()
    return time.time() - float(attrs.get("alive_at", started)) > STALE_AFTER


def recover_stale(study) -> int:
    """Mark trials left running by dead processes as failed; returns how many."""
    state = optuna().trial.TrialState
    stale = [t for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)) if _dead(t)]
    for frozen in stale:
        # Optuna has no public call for this without a heartbeat storage; the storage API itself is stable.
        study._storage.set_trial_state_values(frozen._trial_id, state=state.FAIL)
    return len(stale)


def spent(study) -> list:
    """The trials that count against the budget, by number: finished ones (a failure only when its settings
    raised an error) and those running in live workers."""
    state = optuna().trial.TrialState
    counted = []
    for frozen in study.get_trials(deepcopy=False):
        if frozen.state in (state.COMPLETE, state.PRUNED, state.RUNNING) or (
                frozen.state == state.FAIL and "error" in frozen.user_attrs):
            counted.append(frozen)
    return sorted(counted, key=lambda t: t.number)


def best_of(counted: list, direction):
    """The best complete trial of `counted` (the budget's trials, from `spent`); ties: the earlier trial."""
    state = optuna().trial.TrialState
    eligible = [t for t in counted if t.state == state.COMPLETE]
    if not eligible:
        return None
    sign = 1 if direction == optuna().study.StudyDirection.MAXIMIZE else -1
    return max(eligible, key=lambda t: (sign * t.value, -t.number))
