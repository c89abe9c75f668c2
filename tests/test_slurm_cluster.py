"""The single-node SLURM cluster of `.ci/slurm.sh`: sbatch arrays, submitit job arrays, cancelling one task.

Real daemons, no mocks: these skip (with the reason) unless run as root on a machine where the cluster can
run (QGMIL_REQUIRE_SLURM=1 makes that a failure, as in CI).
"""

import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from slurm import cancel, job_state, job_states, wait_for_jobs, wait_for_state

submitit = pytest.importorskip("submitit")

# The jobs unpickle the functions below in a fresh interpreter that cannot import this test module (pytest
# put tests/ on sys.path only here), so they travel by value. Functions from qgmil need nothing of the sort.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square_plus(x, y=1):
    return x * x + y


def wait_for_flag(x, flag_dir):
    """Sleep until flag_dir/go_<x> exists (at most 2 minutes), then return 10 * x."""
    flag = Path(flag_dir) / f"go_{x}"
    deadline = time.monotonic() + 120
    while not flag.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag} never appeared")
        time.sleep(0.1)
    return 10 * x


def test_sbatch_array_writes_one_file_per_task(slurm_cluster, tmp_path):
    script = tmp_path / "task.sh"
    script.write_text(
        f'#!/bin/bash\necho "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID" > {tmp_path}/out_$SLURM_ARRAY_TASK_ID\n'
    )
    proc = subprocess.run(
        ["sbatch", "--wait", "--array=0-2", f"--partition={slurm_cluster.partition}", "--cpus-per-task=1",
         "--mem=100M", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%A_%a.log", str(script)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.split()[-1]  # "Submitted batch job 12"
    for i in range(3):
        assert (tmp_path / f"out_{i}").read_text() == f"task {i} of {job_id}\n"


def test_submitit_map_array_returns_results(slurm_cluster, tmp_path):
    executor = slurm_cluster.submitit_executor(tmp_path / "submitit", timeout_min=2, mem_gb=0.5)
    jobs = executor.map_array(square_plus, [1, 2, 3], [10, 20, 30])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array job, three tasks
    assert [job.result() for job in jobs] == [11, 24, 39]
    states = wait_for_jobs(jobs[0].job_id.split("_")[0], timeout=30)
    assert set(states.values()) <= {"COMPLETED", "GONE"}, states


def test_cancel_one_array_task_then_resubmit_it(slurm_cluster, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    executor = slurm_cluster.submitit_executor(tmp_path / "submitit", timeout_min=3, mem_gb=0.5)
    jobs = executor.map_array(wait_for_flag, [0, 1, 2], [str(flags)] * 3)
    array_id = jobs[0].job_id.split("_")[0]

    wait_for_state(jobs[1].job_id, "RUNNING", timeout=30)
    if slurm_cluster.cpus >= 2:  # 1-CPU tasks share the node: as many run at once as there are CPUs
        time.sleep(0.5)
        running = [job for job, state in job_states(array_id).items() if state == "RUNNING"]
        assert len(running) >= 2, job_states(array_id)

    # scancel <array>_1 only. submitit's job ignores SIGTERM, so the task holds its CPU until slurmstepd's
    # SIGKILL and its process checks (about 7 s with proctrack/linuxproc): task 2 starts only then.
    cancel(jobs[1])
    (flags / "go_0").touch()
    (flags / "go_2").touch()
    states = wait_for_jobs(array_id, timeout=30)
    assert states[jobs[1].job_id] in {"CANCELLED", "GONE"}, states
    assert states[jobs[0].job_id] in {"COMPLETED", "GONE"} and states[jobs[2].job_id] in {"COMPLETED", "GONE"}
    assert jobs[0].result() == 0 and jobs[2].result() == 20

    if slurm_cluster.accounting:  # submitit knows a job that left no result only through sacct
        deadline = time.monotonic() + 15  # slurmctld reports the end to slurmdbd a moment later
        while not jobs[1].done(force_check=True):
            assert time.monotonic() < deadline, f"sacct never showed {jobs[1].job_id} ended: {jobs[1].state}"
            time.sleep(0.2)
        assert jobs[1].state.startswith("CANCELLED"), jobs[1].state
        jobs[1]._results_timeout_s = 0  # else result() waits 15 s for the pickle, in case of a slow shared disk
        with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
            jobs[1].result()
    else:
        assert not jobs[1].paths.result_pickle.exists()

    (flags / "go_1").touch()
    again = executor.submit(wait_for_flag, 1, str(flags))
    assert again.result() == 10
    assert job_state(again.job_id) in {"COMPLETED", "GONE"}
