"""SLURM through submitit, for everything that submits work: the task options, the executor, the queue.

One owner for how qgmil talks to SLURM; `bench.cluster` (a task per benchmark cell) and `tune.cluster`
(tuning workers sharing a study) build on it. submitit writes each task's pickled function and its stdout /
stderr under the folder given; what the tasks report back, they write as JSON into the run directory.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
"""squeue states of a task that has not ended yet."""


class SlurmError(ValueError):
    """Submitting or watching SLURM jobs failed (no submitit, no squeue, sbatch refused); says why."""


class SlurmOptions(BaseModel):
    """What each task asks SLURM for (`slurm:` in a benchmark YAML, or --partition, --time-min, ...)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="SLURM partition (default: the cluster's default)")
    time_min: int = Field(240, ge=1, description="time limit per task, minutes")
    mem_gb: float = Field(8.0, gt=0, description="memory per task")
    cpus_per_task: int = Field(2, ge=1, description="CPUs per task (its torch threads)")
    gpus_per_task: int = Field(0, ge=0)
    array_parallelism: int = Field(64, ge=1, description="tasks of an array running at once")
    sbatch: dict[str, Any] = Field(default_factory=dict, description="extra sbatch options, e.g. {account: lab, qos: low}")
    setup: list[str] = Field(default_factory=list, description="shell lines run before each task, e.g. module load")


def executor(folder: Path, options: SlurmOptions, name: str, **sbatch: Any):
    """A submitit executor for SLURM with `options` (plus extra sbatch options, e.g. dependency)."""
    try:
        import submitit
    except ImportError:
        raise SlurmError("SLURM execution needs submitit: pip install 'qgmil[cluster]'") from None
    made = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"timeout_min": options.time_min, "mem_gb": options.mem_gb,
                              "cpus_per_task": options.cpus_per_task, "name": name,
                              "slurm_array_parallelism": options.array_parallelism}
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.gpus_per_task:
        params["slurm_gpus_per_task"] = options.gpus_per_task
    if options.sbatch or sbatch:
        params["slurm_additional_parameters"] = {**options.sbatch, **sbatch}
    if options.setup:
        params["slurm_setup"] = list(options.setup)
    made.update_parameters(**params)
    return made


def submit_array(made, fn: Callable, *arg_lists) -> list[str]:
    """One array task per element of the argument lists; returns the task ids ("1234_0", ...)."""
    try:
        return [job.job_id for job in made.map_array(fn, *arg_lists)]
    except Exception as err:  # noqa: BLE001 - sbatch's refusal (bad partition, limits) in one line
        raise SlurmError(f"sbatch refused the array: {err}") from None


def submit(made, fn: Callable, *args) -> str:
    try:
        return made.submit(fn, *args).job_id
    except Exception as err:  # noqa: BLE001
        raise SlurmError(f"sbatch refused the job: {err}") from None


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """State of each listed job or array task still known to squeue (one line per array task)."""
    if not job_ids:
        return {}
    jobs = sorted({j.split("_")[0] for j in job_ids})
    try:
        text = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmError(f"squeue failed ({err}); is this a SLURM login node?") from None
    states = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
    return {j: states[j] for j in job_ids if j in states}


def wait_for(job_ids: list[str], echo: Callable[[str], None], poll: float = 5.0) -> None:
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
