"""A real single-node SLURM cluster for the tests: the `slurm_cluster` fixture and job helpers.

The fixture runs `.ci/slurm.sh` (as root; about a second when the cluster is already up) and skips, with
the reason, when that is not possible: not root, no `sbatch` (install with `sudo .ci/slurm.sh`), or the
script failed. With QGMIL_REQUIRE_SLURM=1 (CI) those skips are failures; QGMIL_SLURM=0 skips on purpose.

The helpers ask slurmctld (`squeue`, `scontrol`), not accounting, so they also work on a cluster without
slurmdbd; finished jobs leave squeue after MinJobAge (2 s here), so a job that is no longer listed counts
as ended, with its last state seen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "slurm.sh"

# Job states after which a job (or array task) will not run again.
TERMINAL = frozenset(
    {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
        "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
    }
)
GONE = "GONE"  # never seen, or no longer listed before a terminal state was seen


@dataclass(frozen=True)
class SlurmCluster:
    """The cluster that `.ci/slurm.sh` started: what a submission needs to name."""

    partition: str
    node: str
    cpus: int
    accounting: bool  # slurmdbd is up, so `sacct` (and submitit's job states) work

    def submitit_executor(self, folder, **params):
        """A `submitit.AutoExecutor` on this cluster: 1 CPU, 1 GB, 5 minutes unless `params` say otherwise."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        defaults = {"slurm_partition": self.partition, "timeout_min": 5, "cpus_per_task": 1, "mem_gb": 1}
        executor.update_parameters(**{**defaults, **params})
        return executor


def _unavailable(reason: str):
    if os.environ.get("QGMIL_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM cluster required (QGMIL_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no SLURM cluster: {reason}")


def start_cluster(timeout: float = 900) -> SlurmCluster:
    """Run `.ci/slurm.sh` and describe the cluster; raises RuntimeError with the script's output if it fails."""
    try:
        proc = subprocess.run(["bash", str(SCRIPT)], check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{SCRIPT} ran past {timeout} s") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{SCRIPT} exited with {proc.returncode}:\n{tail}")
    partition, cpus, node = _run(["sinfo", "-h", "-o", "%R|%c|%N"]).splitlines()[0].split("|")
    acct = _scontrol_value(["show", "config"], "AccountingStorageType")
    return SlurmCluster(partition=partition, node=node, cpus=int(cpus), accounting=acct.endswith("slurmdbd"))


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The single-node cluster (started if needed), or a skip that says why there is none."""
    if os.environ.get("QGMIL_SLURM") == "0":
        pytest.skip("SLURM tests switched off (QGMIL_SLURM=0)")
    if os.geteuid() != 0:
        _unavailable("not running as root (.ci/slurm.sh starts the daemons as root)")
    if shutil.which("sbatch") is None:
        _unavailable("sbatch not found (install and start a cluster with: sudo .ci/slurm.sh)")
    try:
        return start_cluster()
    except RuntimeError as e:
        _unavailable(str(e))


def _run(cmd: list[str], check: bool = True) -> str:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _scontrol_value(args: list[str], key: str) -> str:
    for line in _run(["scontrol", *args]).splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    raise KeyError(key)


def sbatch(*args: str) -> str:
    """Submit with `sbatch --parsable ARGS...`; returns the job id."""
    return _run(["sbatch", "--parsable", *args]).split(";")[0]


def job_states(job_ids) -> dict[str, str]:
    """State of each listed job or array task, as slurmctld has it now; ids it no longer knows are absent.

    An array job id ("12") stands for all its tasks, listed one by one ("12_0", "12_1", ...)."""
    ids = [str(j) for j in ([job_ids] if isinstance(job_ids, (str, int)) else job_ids)]
    if not ids:
        return {}
    # --states=all: also the jobs that ended less than MinJobAge ago; -r: one line per array task.
    proc = subprocess.run(
        ["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(ids)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # all of them have left slurmctld (or never existed)
            return {}
        raise RuntimeError(f"squeue failed: {proc.stderr.strip()}")
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.partition("|")
        states[job.strip()] = state.strip()
    return states


def job_state(job_id) -> str:
    """The state of one job or array task ("12_1"), from `scontrol show job`; GONE when slurmctld has let it go."""
    cmd = ["scontrol", "-o", "show", "job", str(job_id)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return GONE
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return GONE


def wait_for_jobs(job_ids, timeout: float = 60, poll: float = 0.25) -> dict[str, str]:
    """Wait until every job (and every task of an array job) has ended; returns {id: last state seen}.

    The keys are the ids squeue lists ("12" for a job, "12_0", "12_1", ... for the tasks of array job 12).
    A job no longer listed has ended: it keeps its last state seen, or GONE if that was not a final one
    (or if it was never listed). Raises TimeoutError, with the states, if some are still pending or running."""
    ids = [str(j) for j in ([job_ids] if isinstance(job_ids, (str, int)) else job_ids)]
    last: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        now = job_states(ids)
        for job in last.keys() - now.keys():
            if last[job] not in TERMINAL:
                last[job] = GONE
        last.update(now)
        for job in ids:
            if not any(k == job or k.startswith(job + "_") for k in last):
                last[job] = GONE
        if all(state in TERMINAL or state == GONE for state in last.values()):
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM jobs not finished after {timeout} s: {last}")
        time.sleep(poll)


def wait_for_state(job_id, states, timeout: float = 30, poll: float = 0.1) -> str:
    """Wait until one job or array task is in one of `states` (e.g. {"RUNNING"}); returns that state."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} is {state}, not {sorted(wanted)}, after {timeout} s")
        time.sleep(poll)


def cancel(job_id, signal: str | None = None) -> None:
    """`scancel` a job, an array job, or one array task ("12_1"; also a submitit job: its `.job_id`)."""
    job_id = getattr(job_id, "job_id", job_id)
    _run(["scancel", *(["--signal", signal] if signal else []), str(job_id)])
