"""Several extraction jobs on one output folder: lock files, stale locks, crashes, shards, merged summaries.

Real processes throughout (subprocesses of `python -m qgmil extract` or of a few lines on the lock module);
the encoder is timm's tiny `test_vit` with seeded random weights, as in test_extract.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from lockholder import held_bag_lock
from PIL import Image

from qgmil.atomic import leftovers
from qgmil.cli import main
from qgmil.data import read_bag
from qgmil.extract.engine import ExtractError, merge_summaries
from qgmil.extract.locks import BagLocks, LockBusy, _look, _marker
from qgmil.extract.wsi import TilingSettings, extract_slides

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pids and signals of POSIX")

ENCODER = "timm:test_vit"
FAST = {"weights": "random", "num_workers": 0, "progress": False, "batch_size": 16, "device": "cpu"}
SETTINGS = TilingSettings(tile_px=32, mpp=0.5, tissue=False)
CLI = ["extract", "wsi", "--encoder", ENCODER, "--weights", "random", "--tile-px", "32", "--mpp", "0.5",
       "--no-tissue", "--workers", "0", "--device", "cpu", "--batch-size", "16", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
HOST = socket.gethostname()


def _slides(folder: Path, n: int, side: int = 128) -> Path:
    """n random RGB images of side x side px (at 0.5 um/px and 32 px tiles: (side / 32)^2 tiles each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    return folder


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(out: Path, bag: str, host: str, pid: int, age_s: float = 0.0) -> Path:
    """A lock file as another job would have left it, its heartbeat `age_s` seconds old."""
    path = out / "locks" / f"{bag}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bag": bag, "host": host, "pid": pid, "job": None, "started": "", "token": "x"}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _statuses(summary) -> dict[str, str]:
    return {r.bag_id: r.status for r in summary.results}


# Prepared Python of a job, so that the jobs of a test start encoding at the same moment: each imports what it
# needs, says so through a file, waits for the go file, then runs `qgmil` with its arguments.
JOB = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import qgmil.extract.wsi, qgmil.extract.encoders, timm  # the slow imports, before the start signal
    from qgmil.cli import main
    ready, go = Path(sys.argv[1]), Path(sys.argv[2])
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    main(sys.argv[3:])
""")


def test_two_jobs_on_one_folder_encode_each_bag_once(tmp_path):
    slides, out = _slides(tmp_path / "slides", 8, side=160), tmp_path / "out"  # 25 tiles each
    go = tmp_path / "go"
    jobs = [subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path / f"ready{k}"), str(go), *CLI, str(slides),
                              "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for k in range(2)]
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    for job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-3000:]

    # Each job's summary says what it encoded; together every bag exactly once, each file by its encoder.
    summaries = {f: pd.read_csv(f) for f in sorted((out / "jobs").glob("*.csv"))}
    assert len(summaries) == 2
    encoded = {}
    for table in summaries.values():
        for row in table[table.status == "done"].itertuples():
            assert row.bag_id not in encoded, f"{row.bag_id} encoded twice"
            encoded[row.bag_id] = row.job
        # A bag a job did not encode was finished before it looked, or held by the other job.
        assert set(table.status) <= {"done", "skipped", "busy"}
    assert sorted(encoded) == [f"s{i}" for i in range(8)]
    for bag, job in encoded.items():
        features = read_bag(out / "features" / f"{bag}.h5")
        assert features.features.shape == (25, 64) and np.isfinite(features.features).all()
        assert features.attrs["extracted_by"] == job
    assert len(set(encoded.values())) == 2, "the jobs did not overlap (one encoded everything)"
    assert not list((out / "locks").iterdir())  # all released, nothing stale
    merged = pd.read_csv(out / "bags.csv")
    assert merged["status"].tolist() == ["done"] * 8 and merged["job"].tolist() == [encoded[b] for b in merged.bag_id]


def test_stale_locks_are_recovered_and_live_ones_skipped(tmp_path):
    slides, out = _slides(tmp_path / "slides", 4), tmp_path / "out"
    extract_slides([slides / "s3.png"], out, ENCODER, settings=SETTINGS, **FAST)  # the folder exists, s3 is done
    dead = _write_lock(out, "s0", HOST, _dead_pid())  # a killed job of this host: stale at once
    half = out / "features" / ".s0.h5.k1ll3d_x.tmp"  # what an atomic write killed midway leaves
    half.write_bytes(b"\x89HDF half")
    _write_lock(out, "s1", "elsewhere", 4242, age_s=3600)  # another host, no heartbeat for an hour: stale
    fresh = _write_lock(out, "s2", "elsewhere", 4242, age_s=60)  # another host, beating: busy
    summary = extract_slides([slides], out, ENCODER, settings=SETTINGS, **FAST)
    assert _statuses(summary) == {"s0": "done", "s1": "done", "s2": "busy", "s3": "skipped"}
    busy = next(r for r in summary.results if r.status == "busy")
    assert busy.error == "locked by elsewhere:4242" and "busy   s2: locked by elsewhere:4242" in summary.format()
    assert not dead.exists() and not half.exists() and fresh.exists()  # a busy lock is left alone
    assert not (out / "features" / "s2.h5").exists()
    assert not leftovers(out / "features" / "s0.h5")
    read_bag(out / "features" / "s0.h5")

    # bags.csv: each bag's latest outcome over both jobs (s3 done by the first, not "skipped" by the second).
    table = pd.read_csv(out / "bags.csv").set_index("bag_id")
    assert table["status"].to_dict() == {"s0": "done", "s1": "done", "s2": "busy", "s3": "done"}
    assert table.loc["s2", "error"] == "locked by elsewhere:4242"


def test_a_live_job_keeps_its_bag_until_it_dies(tmp_path):
    slides, out = _slides(tmp_path / "slides", 2), tmp_path / "out"
    with held_bag_lock(out / "locks", "s0", ENV) as holder:
        summary = extract_slides([slides], out, ENCODER, settings=SETTINGS, **FAST)
        assert _statuses(summary) == {"s0": "busy", "s1": "done"}
        assert summary.results[0].error == f"locked by {HOST}:{holder.pid}"
        row = pd.read_csv(out / "bags.csv").iloc[0]
        assert (row.bag_id, row.status, row.error) == ("s0", "busy", f"locked by {HOST}:{holder.pid}")
    again = extract_slides([slides], out, ENCODER, settings=SETTINGS, **FAST)  # its pid is gone: recovered
    assert _statuses(again) == {"s0": "done", "s1": "skipped"}
    assert not list((out / "locks").iterdir())


def test_a_job_killed_mid_bag_leaves_no_finished_file_and_the_next_run_recovers(tmp_path):
    # 1024 tiles: long enough to be killed inside the bag even on an idle machine (144 were not, once)
    slides, out = _slides(tmp_path / "slides", 1, side=1024), tmp_path / "out"
    lock = out / "locks" / "s0.lock"
    job = subprocess.Popen([sys.executable, "-m", "qgmil", *CLI, str(slides), "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while not lock.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # inside the bag: preparing or encoding
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, job.stderr.read()[-3000:]
    assert not (out / "features" / "s0.h5").exists()  # nothing that looks finished
    assert json.loads(lock.read_text())["pid"] == job.pid  # its lock stays, naming a dead process

    summary = extract_slides([slides], out, ENCODER, settings=SETTINGS, **FAST)
    assert _statuses(summary) == {"s0": "done"}
    assert len(read_bag(out / "features" / "s0.h5")) == 1024
    assert not lock.exists() and not leftovers(out / "features" / "s0.h5")


# Racers of the lock module alone (no torch: they start in a fraction of a second): at the start time every
# racer claims the same stale locks and creates the same file; it reports, then stays alive (its locks live)
# until the test is done.
RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from qgmil.atomic import atomic_create_text
    from qgmil.extract.locks import BagLocks, LockBusy, _look, _marker
    folder, bags, start, report, done = Path(sys.argv[1]), sys.argv[2].split(","), float(sys.argv[3]), \\
        Path(sys.argv[4]), Path(sys.argv[5])
    locks = BagLocks(folder / "locks")
    while time.time() < start:
        pass
    won = []
    for bag in bags:
        try:
            locks.claim(bag)
            won.append(bag)
        except LockBusy:
            pass
    created = atomic_create_text(folder / "manifest.json", report.name)
    report.write_text(json.dumps({"won": won, "created": created}))
    while not done.exists():
        time.sleep(0.01)
""")


def test_one_winner_among_jobs_recovering_the_same_stale_lock(tmp_path):
    bags = [f"b{i}" for i in range(40)]
    dead = _dead_pid()
    for bag in bags:
        _write_lock(tmp_path, bag, HOST, dead)
    start, done = time.time() + 1.5, tmp_path / "done"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), ",".join(bags), str(start),
                                str(tmp_path / f"report{k}.json"), str(done)], env=ENV) for k in range(5)]
    try:
        deadline = time.time() + 60
        reports = [tmp_path / f"report{k}.json" for k in range(5)]
        while not all(r.exists() for r in reports) and time.time() < deadline:
            time.sleep(0.01)
        results = [json.loads(r.read_text()) for r in reports]
    finally:
        done.touch()
        for racer in racers:
            racer.wait(timeout=30)
    won = [bag for r in results for bag in r["won"]]
    assert sorted(won) == sorted(bags)  # every stale lock recovered, each by exactly one racer
    assert sum(r["created"] for r in results) == 1  # one racer created the file ...
    winner = next(k for k, r in enumerate(results) if r["created"])
    assert (tmp_path / "manifest.json").read_text() == f"report{winner}.json"  # ... and it holds that one's text
    assert not [p for p in (tmp_path / "locks").iterdir() if p.suffix != ".lock"]  # no recovery marker left


def test_lock_lifecycle_in_one_process(tmp_path):
    with BagLocks(tmp_path / "locks", stale_after=1.2) as locks:  # heartbeat every 0.3 s
        assert locks.claim("a") is None
        path = locks.path("a")
        stamp = path.stat().st_mtime_ns
        time.sleep(0.7)
        assert path.stat().st_mtime_ns > stamp  # renewed: never older than stale_after while held
        other = BagLocks(tmp_path / "locks", stale_after=1.2)
        with pytest.raises(LockBusy, match=f"a.lock: locked by {HOST}:{os.getpid()}"):
            other.claim("a")  # same host, live pid, fresh heartbeat
        locks.verify("a")
    assert not path.exists()  # released at exit

    # A lock taken over while its job stopped beating: that job is told before writing, and leaves it alone.
    frozen = BagLocks(tmp_path / "locks", stale_after=0.2)
    frozen.claim("b")
    time.sleep(0.3)
    thief = BagLocks(tmp_path / "locks", stale_after=0.2)
    assert "no heartbeat" in thief.claim("b")
    with pytest.raises(LockBusy):
        frozen.verify("b")
    frozen.release("b")
    assert thief.path("b").exists()
    thief.release("b")
    assert not thief.path("b").exists()

    # A job killed while taking a stale lock over leaves its marker: it does not block the next one.
    lock = _write_lock(tmp_path, "c", HOST, _dead_pid())
    marker = _marker(lock, _look(lock))
    marker.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "token": "y"}))
    assert "process not running" in thief.claim("c")
    assert not marker.exists()


def test_shards_split_the_bags_and_bags_csv_merges_the_jobs(tmp_path):
    slides, out = _slides(tmp_path / "slides", 5), tmp_path / "out"
    first = extract_slides([slides], out, ENCODER, settings=SETTINGS, shard="0/2", **FAST)
    assert _statuses(first) == {"s0": "done", "s2": "done", "s4": "done"}
    second = extract_slides([slides], out, ENCODER, settings=SETTINGS, shard=(1, 2), **FAST)
    assert _statuses(second) == {"s1": "done", "s3": "done"}
    assert len(list((out / "jobs").glob("*.csv"))) == 2
    table = pd.read_csv(out / "bags.csv")
    assert table["bag_id"].tolist() == [f"s{i}" for i in range(5)] and set(table["status"]) == {"done"}
    for bad in ("2/2", "1", "a/b", "-1/3"):
        with pytest.raises(ExtractError, match="--shard"):
            extract_slides([slides], out, ENCODER, settings=SETTINGS, shard=bad, **FAST)
    result = CliRunner().invoke(main, [*CLI, str(slides), "--out", str(out), "--shard", "2/2"])
    assert result.exit_code == 2 and "--shard '2/2': need 0 <= I < N" in result.output


def test_merged_summary_keeps_each_bags_latest_outcome(tmp_path):
    columns = "bag_id,source,status,num_instances,seconds,encode_seconds,prepare_wait_seconds,error,job,finished\n"
    (tmp_path / "1.csv").write_text(columns + "a,x,failed,0,1.0,0,0,OSError: boom,h:1,2024-01-01T10:00:00.000\n"
                                              "b,y,done,7,2.5,2,0,,h:1,2024-01-01T10:00:01.000\n"
                                              "007,z,busy,0,0,0,0,locked by h:2,h:1,2024-01-01T10:00:02.000\n")
    (tmp_path / "2.csv").write_text(columns + "a,x,done,3,1.0,1,0,,h:2,2024-01-01T11:00:00.000\n"
                                              "b,y,skipped,0,0,0,0,,h:2,2024-01-01T11:00:00.000\n")
    (tmp_path / "3.csv").write_text("")
    with pytest.warns(UserWarning, match="3.csv: cannot read"):
        merged = merge_summaries(sorted(tmp_path.glob("*.csv")), {"a", "b", "007"})
    assert merged[["bag_id", "status", "job"]].values.tolist() == [["007", "busy", "h:1"], ["a", "done", "h:2"],
                                                                   ["b", "done", "h:1"]]
    assert merged.loc[merged.bag_id == "b", "seconds"].item() == "2.5"  # rows copied as written
