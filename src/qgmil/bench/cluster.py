"""Benchmark cells as SLURM job-array tasks, submitted through submitit: one array task per unfinished cell.

The driver (`run_benchmark(..., executor="slurm")`) plans and validates the grid and prepares the built-in
data here, then submits one array with a task per cell that is neither finished nor queued by an earlier
submission; it returns at once with the job ids, or with `wait` polls the queue and builds the report.
Each task re-plans the grid from OUT/benchmark.yaml and trains its cell exactly as a local worker would
(the same `train_cell`, runtime.threads = its CPUs), so a cell's results do not depend on where it ran.
Everything is resumable: a cancelled or timed-out task leaves a run directory that the next submission
resumes fold by fold (or trial by trial).

OUT/slurm/
  jobs.json              every submission: job id of each cell's task, when
  results/<cell>.json    what a task reports (training summary and seconds, or its error and traceback);
                         JSON, so the driver never unpickles anything
  logs/                  submitit's folder: each task's stdout/stderr (%j_%t_log.out / .err)
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write_text
from .spec import BenchmarkError, Cell, SlurmOptions

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


def slurm_dir(out: Path) -> Path:
    return out / "slurm"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise BenchmarkError("--executor slurm needs submitit: pip install 'qgmil[cluster]'") from None
    return submitit


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """State of each listed job or array task still known to squeue (one line per array task)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        text = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i %T"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BenchmarkError(f"squeue failed ({err}); is this a SLURM login node?") from None
    states = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
    return {j: states[j] for j in job_ids if j in states}


def read_jobs(out: Path) -> list[dict]:
    path = slurm_dir(out) / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


def queued_cells(out: Path) -> dict[int, str]:
    """Cells whose task from an earlier submission is still pending or running: cell index -> job id."""
    latest = {}
    for record in read_jobs(out):
        latest[record["cell"]] = record["job_id"]
    states = queue_states(list(latest.values()))
    return {cell: job for cell, job in latest.items() if states.get(job) in ACTIVE}


def run_cell_task(out: str, index: int, threads: int) -> dict[str, Any]:
    """The body of one array task: train cell `index` of OUT/benchmark.yaml; the result goes to
    OUT/slurm/results/<index>.json (and is returned)."""
    from .runner import train_cell
    from .spec import load_spec, plan_cells

    root = Path(out)
    cell = plan_cells(load_spec(root / "benchmark.yaml"), root)[index]
    result = train_cell(cell, ["qgmil", "benchmark", "(slurm task)"], threads=threads)
    results = slurm_dir(root) / "results"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{index}.json", json.dumps(result, default=str))
    return {k: v for k, v in result.items() if k != "traceback"}


def submit_cells(todo: list[Cell], out: Path, options: SlurmOptions) -> list[str]:
    """One array task per cell of `todo`; returns the task ids (e.g. "1234_0"), recorded in jobs.json."""
    submitit = _submitit()
    folder = slurm_dir(out)
    (folder / "results").mkdir(parents=True, exist_ok=True)
    for cell in todo:  # a result from an earlier task must not be taken for this one's
        (folder / "results" / f"{cell.index}.json").unlink(missing_ok=True)
    executor = submitit.AutoExecutor(folder=folder / "logs", cluster="slurm")
    params: dict[str, Any] = {"timeout_min": options.time_min, "mem_gb": options.mem_gb,
                              "cpus_per_task": options.cpus_per_task, "name": f"qgmil-{out.name}",
                              "slurm_array_parallelism": options.array_parallelism}
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.gpus_per_task:
        params["slurm_gpus_per_task"] = options.gpus_per_task
    if options.sbatch:
        params["slurm_additional_parameters"] = dict(options.sbatch)
    if options.setup:
        params["slurm_setup"] = list(options.setup)
    executor.update_parameters(**params)
    n = len(todo)
    try:
        jobs = executor.map_array(run_cell_task, [str(out)] * n, [c.index for c in todo],
                                  [options.cpus_per_task] * n)
    except Exception as err:  # noqa: BLE001 - sbatch's refusal (bad partition, limits) in one line
        raise BenchmarkError(f"sbatch refused the array: {err}") from None
    records = read_jobs(out) + [{"job_id": job.job_id, "cell": cell.index, "model": cell.model,
                                 "dataset": cell.dataset, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                                for job, cell in zip(jobs, todo)]
    atomic_write_text(folder / "jobs.json", json.dumps(records, indent=1))
    return [job.job_id for job in jobs]


def wait_for_cells(out: Path, job_ids: list[str], echo: Callable[[str], None], poll: float = 5.0) -> None:
    """Until none of `job_ids` is pending or running; echo a line when the count changes."""
    last = None
    while True:
        active = [j for j, state in queue_states(job_ids).items() if state in ACTIVE]
        if not active:
            return
        if len(active) != last:
            echo(f"waiting for {len(active)} SLURM task(s) of {len(job_ids)}")
            last = len(active)
        time.sleep(poll)


def task_result(out: Path, cell: Cell) -> dict[str, Any] | None:
    path = slurm_dir(out) / "results" / f"{cell.index}.json"
    return json.loads(path.read_text()) if path.exists() else None
