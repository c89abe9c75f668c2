"""A tuned run on SLURM: a job array of study workers sharing the run's Optuna storage, then one task that
starts when the array has ended (afterany) and retrains the chosen settings, fold by fold, and reports.

RUN_DIR/tuning/slurm/
  jobs.json     every submission: the workers' task ids and the final task's id
  logs/         submitit's folder: each task's stdout and stderr
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from .. import slurm
from ..atomic import atomic_write_text
from ..rundir import RunDir
from ..slurm import SlurmOptions


def submit_tuning(run: RunDir, workers: int, options: SlurmOptions, worker: Callable, final_task: Callable,
                  echo: Callable[[str], None]) -> list[str]:
    """Submit `workers` tasks worker(run, threads) and then final_task(run, threads); returns all their ids
    (recorded in jobs.json)."""
    folder = run.tuning / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"qgmil-tune-{run.root.name}"
    array = slurm.submit_array(slurm.executor(folder / "logs", options, name), worker,
                               [str(run.root)] * workers, [options.cpus_per_task] * workers)
    after = slurm.executor(folder / "logs", options, name, dependency=f"afterany:{array[0].split('_')[0]}")
    final = slurm.submit(after, final_task, str(run.root), options.cpus_per_task)
    path = folder / "jobs.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records.append({"workers": array, "final": final, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_text(path, json.dumps(records, indent=1))
    echo(f"submitted {workers} study worker(s) as SLURM tasks {', '.join(array)} and the retraining and report "
         f"as {final} (after them)")
    return [*array, final]
