"""Runs on a real single-node SLURM cluster (see tests/slurm.py): `qgmil benchmark --executor slurm` (a tuned
grid submitted as an array, one task killed mid-run, the rerun resubmitting only that cell, the merged results
equal to a local run of the same cells) and `qgmil tune --executor slurm --parallel 2`."""

import json
import time

import pandas as pd
import pytest
from click.testing import CliRunner
from slurm import cancel, wait_for_jobs

from qgmil.cli import main
from qgmil.data import prepare_dataset
from qgmil.rundir import RunDir

pytest.importorskip("submitit", reason="the SLURM executor needs submitit (pip install 'qgmil[cluster]')")
pytest.importorskip("optuna", reason="the tuned grid needs optuna (pip install 'qgmil[tune]')")


def bench_yaml(data, partition):
    return f"""datasets: [{data}]
models: [mean_pool, qgmil_light]
folds: 2
seeds: [0]
tune: 3
slurm: {{partition: {partition}, cpus_per_task: 1, mem_gb: 1, time_min: 10}}
train:
  optim.epochs: 4
  optim.batch_size: 8
  eval.bootstrap: 20
  runtime.threads: 1          # local and SLURM cells alike: float sums depend on the thread count
  tune.startup_trials: 1
"""


def invoke(*args):
    return CliRunner().invoke(main, ["benchmark", *map(str, args)], catch_exceptions=False)


def test_a_tuned_grid_on_slurm_equals_the_local_run(slurm_cluster, tmp_path):
    data = prepare_dataset("digit-bags", tmp_path / "digits", bags=40, progress=False)
    spec = tmp_path / "bench.yaml"
    spec.write_text(bench_yaml(data, slurm_cluster.partition))

    local = tmp_path / "local"
    assert invoke(spec, "--out", local).exit_code == 0

    remote = tmp_path / "remote"
    first = invoke(spec, "--executor", "slurm", "--out", remote)
    assert first.exit_code == 0, first.output
    assert "submitted 2 SLURM task(s)" in first.output
    jobs = {r["model"]: r["job_id"] for r in json.loads((remote / "slurm" / "jobs.json").read_text())}

    # kill qgmil_light's task once its run has started (its config.yaml is written after the data checks)
    victim = RunDir(remote / "runs" / data.name / "qgmil_light")
    deadline = time.monotonic() + 120
    while not victim.holds_run:
        assert time.monotonic() < deadline, "the qgmil_light task never started"
        time.sleep(0.2)
    cancel(jobs["qgmil_light"])
    wait_for_jobs([jobs["mean_pool"], jobs["qgmil_light"]], timeout=120)
    assert not victim.finished, "the cell finished before it could be cancelled: give it more work"
    assert RunDir(remote / "runs" / data.name / "mean_pool").finished

    # a rerun while nothing is queued resubmits only the unfinished cell, waits, and reports
    second = invoke(spec, "--executor", "slurm", "--wait", "--out", remote)
    assert second.exit_code == 0, second.output
    assert "mean_pool on" in second.output and "finished earlier, skipped" in second.output
    assert second.output.count("submitted as SLURM task") == 1 and "qgmil_light on" in second.output
    assert victim.finished

    columns = lambda frame: frame.drop(columns=["seconds"])  # noqa: E731
    pd.testing.assert_frame_equal(columns(pd.read_csv(local / "results.csv")),
                                  columns(pd.read_csv(remote / "results.csv")), rtol=0, atol=1e-6)
    for model in ("mean_pool", "qgmil_light"):
        here, there = (RunDir(root / "runs" / data.name / model) for root in (local, remote))
        pd.testing.assert_frame_equal(here.read_predictions(), there.read_predictions(), rtol=0, atol=1e-6)
        assert here.read_chosen() == there.read_chosen()
    assert (remote / "tuning.md").read_text() == (local / "tuning.md").read_text()


def test_tune_on_slurm_workers_share_the_studies(slurm_cluster, tmp_path):
    """`qgmil tune --executor slurm --parallel 2 --wait`: two array tasks share each study's budget, a task
    after them retrains and reports; the run reads like a local one."""
    data = prepare_dataset("digit-bags", tmp_path / "digits", bags=40, progress=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "tune", "--table", str(data / "labels.csv"), "--features", str(data / "features"), "--model", "mean_pool",
        "--folds", "2", "--epochs", "2", "--trials", "4", "--out", str(out), "--quiet", "--set", "eval.bootstrap=20",
        "--executor", "slurm", "--parallel", "2", "--partition", slurm_cluster.partition, "--cpus-per-task", "1",
        "--mem-gb", "1", "--time-min", "10", "--wait"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "submitted 2 study worker(s)" in result.output and "macro_f1" in result.output
    run = RunDir(out)
    assert run.finished and len(run.finished_folds()) == 2
    records = json.loads((run.tuning / "slurm" / "jobs.json").read_text())
    assert len(records) == 1 and len(records[0]["workers"]) == 2
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run.study_journal)))
    pids = set()
    for fold in ("seed0-fold0", "seed0-fold1"):
        trials = optuna.load_study(study_name=fold, storage=storage).trials
        done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(done) == 4
        pids |= {t.user_attrs["pid"] for t in done}
    assert len(pids) >= 2


def test_a_tuned_cell_with_helper_tasks_shares_its_studies(slurm_cluster, tmp_path):
    """`tune_workers: 2`: a tuned cell gets a second array task that runs trials of its studies; the budget per
    outer fold is still tune.trials."""
    data = prepare_dataset("digit-bags", tmp_path / "digits", bags=40, progress=False)
    spec = tmp_path / "bench.yaml"
    spec.write_text(bench_yaml(data, slurm_cluster.partition).replace("models: [mean_pool, qgmil_light]",
                                                                      "models: [mean_pool]\ntune_workers: 2")
                    .replace("tune: 3", "tune: 6")
                    .replace("optim.epochs: 4", "optim.epochs: 100\n  eval.patience: null\n  tune.pruner: none"))
    # Unpruned trials of 100 epochs (~1 s each) leave the helper task time to start (SLURM, imports, a 2 s poll)
    # before role 0 has spent the budget alone (with the bags read once, 4-epoch trials took 0.1 s).
    out = tmp_path / "out"
    result = invoke(spec, "--executor", "slurm", "--wait", "--out", out)
    assert result.exit_code == 0, result.output
    assert "(+ 1 tuning helper(s))" in result.output
    run = RunDir(out / "runs" / data.name / "mean_pool")
    assert run.finished
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run.study_journal)))
    pids = set()
    for fold in ("seed0-fold0", "seed0-fold1"):
        done = [t for t in optuna.load_study(study_name=fold, storage=storage).trials
                if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(done) == 6
        pids |= {t.user_attrs["pid"] for t in done}
    assert len(pids) == 2
