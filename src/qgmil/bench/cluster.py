"""Benchmark cells as SLURM job-array tasks, submitted through submitit: one array task per unfinished cell.

The driver (`run_benchmark(..., executor="slurm")`) plans and validates the grid and prepares the built-in
data here, then submits one array with a task per cell that is neither finished nor queued by an earlier
submission; it returns at once with the job ids, or with `wait` polls the queue and builds the report.
Each task re-plans the grid from the spec as submitted and trains its cell exactly as a local worker would
(the same `train_cell`, runtime.threads = its CPUs), so a cell's results do not depend on where it ran.
Everything is resumable: a cancelled or timed-out task leaves a run directory that the next submission
resumes fold by fold (or trial by trial).

OUT/slurm/
  jobs.json              every submission: job id of each cell's task, its spec copy, when
  benchmark-<when>.yaml  the spec as submitted (what the queued tasks plan their cell from)
  results/<cell>.json    what a task reports (training summary and seconds, or its error and traceback);
                         JSON, so the driver never unpickles anything
  logs/                  submitit's folder: each task's stdout/stderr (%j_%t_log.out / .err)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .. import slurm
from ..atomic import atomic_write_text
from ..slurm import SlurmOptions
from .spec import Cell


def slurm_dir(out: Path) -> Path:
    return out / "slurm"


def read_jobs(out: Path) -> list[dict]:
    path = slurm_dir(out) / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


def queued_cells(out: Path) -> dict[int, list[str]]:
    """Cells with a task of an earlier submission still pending or running: cell index -> those task ids."""
    latest: dict[tuple[int, int], str] = {}
    for record in read_jobs(out):
        latest[record["cell"], record.get("role", 0)] = record["job_id"]
    states = slurm.queue_states(list(latest.values()))
    queued: dict[int, list[str]] = {}
    for (cell, _), job in latest.items():
        if states.get(job) in slurm.ACTIVE:
            queued.setdefault(cell, []).append(job)
    return queued


def submit_cells(todo: list[Cell], out: Path, options: SlurmOptions, task: Callable[..., Any],
                 tune_workers: int = 1) -> dict[int, list[str]]:
    """Array tasks task(out, spec file, cell index, threads, role) for the cells of `todo`: role 0 trains the
    cell; a tuned cell also gets roles 1 .. tune_workers - 1, helpers that share its studies. Returns cell
    index -> its task ids (e.g. "1234_0"), recorded in jobs.json. The tasks read a copy of OUT/benchmark.yaml
    made now, so a later command with other flags cannot change what queued tasks train."""
    folder = slurm_dir(out)
    (folder / "results").mkdir(parents=True, exist_ok=True)
    for cell in todo:  # a result from an earlier task must not be taken for this one's
        (folder / "results" / f"{cell.index}.json").unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    spec = folder / f"benchmark-{stamp}.yaml"
    atomic_write_text(spec, (out / "benchmark.yaml").read_text())
    made = slurm.executor(folder / "logs", options, name=f"qgmil-{out.name}")
    tasks = [(cell, role) for cell in todo for role in range(tune_workers if cell.tuned else 1)]
    n = len(tasks)
    ids = slurm.submit_array(made, task, [str(out)] * n, [str(spec)] * n, [c.index for c, _ in tasks],
                             [options.cpus_per_task] * n, [role for _, role in tasks])
    records = read_jobs(out) + [{"job_id": job, "cell": cell.index, "role": role, "model": cell.model,
                                 "dataset": cell.dataset, "spec": spec.name, "submitted": stamp}
                                for job, (cell, role) in zip(ids, tasks)]
    atomic_write_text(folder / "jobs.json", json.dumps(records, indent=1))
    submitted: dict[int, list[str]] = {}
    for job, (cell, _) in zip(ids, tasks):
        submitted.setdefault(cell.index, []).append(job)
    return submitted


def task_result(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = slurm_dir(out) / "results" / f"{cell.index}.json"
    return json.loads(path.read_text()) if path.exists() else None
