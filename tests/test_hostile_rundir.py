"""Run directories under hostile or broken inputs (issue 15): missing folds, --out inside a run, concurrent
runs, late failures, full and read-only disks, truncated attention files.

One tiny finished run (2 folds, 1 epoch) is trained once per module; each test works on its own copy.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from qgmil.cli import main
from qgmil.data import prepare_dataset
from qgmil.rundir import RunDir
from qgmil.rundir.config import load_config
from qgmil.train.run import train_run

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")  # subprocesses import this tree
HOST = socket.gethostname()
TINY = {"optim.epochs": 1, "optim.batch_size": 16, "eval.folds": 2, "eval.bootstrap": 20, "eval.patience": None,
        "runtime.progress": False, "runtime.tensorboard": False, "model.name": "qgmil_light"}
TINY_FLAGS = ["--model", "qgmil_light", "--folds", "2", "--epochs", "1", "--quiet", "--set", "eval.bootstrap=20",
              "--set", "runtime.tensorboard=false"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return prepare_dataset("digit-bags", tmp_path_factory.mktemp("digits"), bags=24, progress=False)


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    config = load_config(None, [], dict(TINY, **{"data.table": digits / "labels.csv", "data.features": digits / "features"}))
    train_run(config, out)
    return out


@pytest.fixture
def run(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- 1. evaluate with a fold missing ----------------------------------------------------------------------


def test_evaluate_refuses_a_missing_fold_unless_told_and_keeps_the_previous_report(run):
    before = {name: (run / name).read_text() for name in ("predictions.csv", "summary.json", "summary.md")}
    shutil.rmtree(run / "folds" / "seed0-fold1")
    result = cli("evaluate", run)
    assert result.exit_code == 2
    assert "1 of the run's 2 folds are not finished (seed0-fold1" in result.output
    assert "--allow-missing-folds" in result.output
    assert {name: (run / name).read_text() for name in before} == before  # nothing rewritten

    result = cli("evaluate", run, "--allow-missing-folds")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(run / "predictions.csv")) < len(pd.read_csv(run / "predictions.prev.csv"))
    for name, text in before.items():  # the full report is kept beside the partial one
        stem, suffix = name.rsplit(".", 1)
        assert (run / f"{stem}.prev.{suffix}").read_text() == text
    assert "folds left out (not finished): seed0-fold1" in (run / "summary.md").read_text()
    assert not (run / "run.lock").exists()  # released


def test_evaluate_names_an_empty_fold_predictions_file(run):
    broken = run / "folds" / "seed0-fold0" / "predictions.csv"
    broken.write_text("")
    result = cli("evaluate", run)
    assert result.exit_code == 2 and f"{broken}: empty file" in result.output
    broken.write_text("bag_id,patient_id,fold,seed,label,pred,prob_negative,prob_positive\n")
    result = cli("evaluate", run)
    assert result.exit_code == 2 and f"{broken}: no predictions (header only)" in result.output


# --- 2 and 3. predict: --out inside the run, a fold's model missing ----------------------------------------


def test_predict_refuses_to_write_over_the_runs_own_files(run, digits):
    before = (run / "predictions.csv").read_text()
    for out in (run, run / "folds" / "seed0-fold0", run / "folds"):
        result = cli("predict", run, digits / "labels.csv", "--out", out)
        assert result.exit_code == 2, result.output
        assert f"inside the run directory {run}" in result.output
    assert (run / "predictions.csv").read_text() == before
    assert not (run / "attention.h5").exists() and not (run / "metrics.json").exists()
    # a folder of its own inside the run is fine
    result = cli("predict", run, digits / "labels.csv", "--out", run / "predict")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(run / "predict" / "predictions.csv")) == 24


def test_predict_refuses_when_a_folds_model_is_missing(run, digits, tmp_path):
    best = run / "folds" / "seed0-fold1" / "best.safetensors"
    best.unlink()
    result = cli("predict", run, digits / "labels.csv", "--out", tmp_path / "p")
    assert result.exit_code == 2 and f"{best}: missing" in result.output
    shutil.rmtree(best.parent)
    result = cli("predict", run, digits / "labels.csv", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "seed0-fold1" in result.output and "--allow-missing-folds" in result.output
    assert not (tmp_path / "p").exists()
    result = cli("predict", run, digits / "labels.csv", "--out", tmp_path / "p", "--allow-missing-folds")
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "p" / "metrics.json").read_text())["models"]) == 1


# --- 4. one writer per run directory ----------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys
    from qgmil.rundir import RunDir
    with RunDir(sys.argv[1]).lock():
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["evaluate", run], ["train", "--out", run, "--resume", "--quiet"]):
            result = cli(*args)
            assert result.exit_code == 2, result.output
            assert f"{run}: in use by {HOST}:{holder.pid}" in result.output
        assert json.loads((run / "run.lock").read_text())["pid"] == holder.pid  # left to its holder
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock names a dead process of this host, and the next writer takes it over.
    result = cli("evaluate", run)
    assert result.exit_code == 0, result.output
    assert f"took over the stale lock {run / 'run.lock'} ({HOST}:{holder.pid}: process not running)" in result.output
    assert not (run / "run.lock").exists()


def test_two_fresh_starts_on_one_directory_cannot_both_run(digits, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("train", "--table", digits / "labels.csv", "--features", digits / "features", "--out", out,
                     *TINY_FLAGS)
        assert result.exit_code == 2 and f"in use by {HOST}:{holder.pid}" in result.output
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing of a run written
    finally:
        holder.kill()
        holder.wait()


# --- 5. failures that used to come late ---------------------------------------------------------------------


def _table(tmp_path, digits, name, **columns):
    table = pd.read_csv(digits / "labels.csv").assign(**columns)
    path = tmp_path / name
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", ["single_class", "train_only_split", "unknown_model", "bad_override"])
def test_a_run_that_cannot_start_fails_before_writing_and_leaves_the_folder_reusable(case, digits, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # a folder that existed: kept, but holding nothing of the failed start
    table, extra, expect = digits / "labels.csv", [], None
    if case == "single_class":
        table = _table(tmp_path, digits, "one.csv", label="positive")
        expect = "every labelled bag has class 'positive': training needs at least two classes"
    elif case == "train_only_split":
        table = _table(tmp_path, digits, "split.csv", split="train")
        expect = "leaves fold seed0-split with no test bags"
    elif case == "unknown_model":
        extra, expect = ["--model", "qgmil_lite"], "model.name: unknown model 'qgmil_lite'"
    else:
        extra, expect = ["--set", "model.overrides.dropuot=0.1"], "model.overrides.dropuot: not a field of qgmil_light"
    args = ["train", "--table", table, "--features", digits / "features", "--out", out, *TINY_FLAGS, *extra]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert expect in result.output
    assert list(out.iterdir()) == []  # no config.yaml, run.json, splits.json or lock
    if case == "single_class":  # the same --out then takes a good run
        result = cli("train", "--table", digits / "labels.csv", "--features", digits / "features", "--out", out,
                     *TINY_FLAGS)
        assert result.exit_code == 0, result.output
        assert RunDir(out).finished


# --- 6. full disk, read-only output, truncated files --------------------------------------------------------


def _mounting_works() -> str | None:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return "needs Linux and unshare"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here ({probe.stderr.strip()})"


needs_mount = pytest.mark.skipif(_mounting_works() is not None, reason=str(_mounting_works()))


def _in_mount_namespace(setup: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` after the shell `setup` (mounts), in a private mount namespace: the mounts vanish with it.
    (Chmod cannot make a folder unwritable for root; a read-only mount or a full tmpfs can.)"""
    command = f"{setup} && exec {shlex.quote(sys.executable)} " + " ".join(shlex.quote(a) for a in args)
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, env=ENV,
                          timeout=120, **kwargs)


@needs_mount
def test_a_full_disk_gives_one_line_naming_the_file(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    result = _in_mount_namespace(f"mount -t tmpfs -o size=64k tmpfs {full}",
                                 ["-m", "qgmil", "datasets", "prepare", "synthetic-wsi", str(full / "d"),
                                  "--bags", "4", "--dim", "64", "--min_instances", "1000", "--max_instances", "1000"])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {full / 'd'}") and line.endswith("No space left on device"), line


@needs_mount
def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_it(tmp_path):
    """safetensors reports a full disk as its own SafetensorError: the write raises OSError naming the file."""
    full = tmp_path / "full"
    full.mkdir()
    code = textwrap.dedent(f"""
        import errno
        from qgmil.checkpoint import save_model
        from qgmil.models import create_model
        try:
            save_model(create_model("qgmil_light", in_dim=512, num_classes=2), {str(full / 'm.safetensors')!r})
        except OSError as err:
            print(err.errno == errno.ENOSPC, err.filename)
    """)
    result = _in_mount_namespace(f"mount -t tmpfs -o size=64k tmpfs {full}", ["-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", str(full / "m.safetensors")]


@needs_mount
def test_a_read_only_run_directory_gives_one_line_naming_it(run, digits, tmp_path):
    setup = f"mount --bind {run} {run} && mount -o remount,ro,bind {run}"
    result = _in_mount_namespace(setup, ["-m", "qgmil", "evaluate", str(run)])
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: cannot write {run / 'run.lock'}: Read-only file system"]
    out = tmp_path / "preds"
    out.mkdir()
    result = _in_mount_namespace(f"mount --bind {out} {out} && mount -o remount,ro,bind {out}",
                                 ["-m", "qgmil", "predict", str(run), str(digits / "labels.csv"), "--out", str(out)])
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {out}") and line.endswith("Read-only file system"), line


def test_a_truncated_attention_file_is_named(run, tmp_path):
    attention = run / "folds" / "seed0-fold0" / "attention.h5"
    data = attention.read_bytes()
    attention.write_bytes(data[: len(data) // 2])
    result = cli("explain", "mass", run, "--out", tmp_path / "mass")
    assert result.exit_code == 2, result.output
    assert f"{attention}: cannot read this attention file, truncated or damaged" in result.output


def test_os_errors_of_libraries_are_read_for_their_errno():
    from qgmil.atomic import os_error

    h5 = OSError("Unable to synchronously create file (unable to open file: name = '/x/.a.h5.tmp', errno = 30, "
                 "error message = 'Read-only file system')")
    assert (os_error(h5, "/x/a.h5").errno, os_error(h5, "/x/a.h5").filename) == (30, "/x/a.h5")
    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert os_error(rust).errno == 28 and os_error(ValueError("no errno here")) is None
    assert os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")).errno == 28
