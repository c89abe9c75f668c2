"""The benchmark runner: execution only. Prepare the built-in datasets, train the cells of a spec (one after
another, or in worker processes), record the failures, then hand the finished cells to the report.

What the grid is and where everything goes in OUT/ is qgmil.bench.spec's; the tables are
qgmil.bench.report's. Rerun the same command to continue: finished cells are skipped, unfinished ones
resume fold by fold. `workers` runs cells in that many processes at once; `shard=(i, n)` runs only the
cells whose index % n == i, so the grid can be split over machines sharing OUT; `report_only` rebuilds
the tables from whatever cells have finished. With the slurm executor (qgmil.bench.cluster) the cells are
SLURM array tasks instead of local processes: the same train_cell runs in each.
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write_text
from ..rundir.config import dump_yaml
from ..runtime import available_cpus
from .report import build_tables, cell_score
from .spec import BenchmarkError, BenchSpec, Cell, load_spec, plan_cells


@dataclass(frozen=True)
class CellFailure:
    """A cell whose training raised: the error in one line, and its traceback for failures.txt."""

    cell: Cell
    error: str
    traceback: str


def prepare_builtin_data(cells: list[Cell], echo: Callable[[str], None] = print) -> None:
    """Prepare each built-in dataset of `cells` once, before any cell runs, so parallel workers never
    race to write the same OUT/data/<dataset>."""
    from ..data.builtin import prepare_dataset

    done: set[Path] = set()
    for cell in cells:
        data = cell.config.data
        if data.builtin is None or data.builtin_dir in done:
            continue
        done.add(data.builtin_dir)
        if not (data.builtin_dir / "labels.csv").exists():
            echo(f"preparing {data.builtin} -> {data.builtin_dir}")
        try:
            prepare_dataset(data.builtin, data.builtin_dir, progress=False, **data.builtin_options)
        except (ValueError, OSError) as err:
            raise BenchmarkError(f"dataset {cell.dataset}: cannot prepare {data.builtin_dir}: {err}") from None


def train_cell(cell: Cell, command: list[str], threads: int | None = None) -> dict[str, Any]:
    """Train (or resume) one cell; runs in the benchmark's process or in a worker process.

    `threads` (workers only) caps torch's intra-op threads, unless the cell's config sets runtime.threads,
    and turns progress bars off (they would interleave). Returns {"summary", "seconds"}, or {"error",
    "traceback"} instead of raising, so that one cell's failure reaches the caller intact (some
    exceptions do not pickle) and the other cells go on.
    """
    from ..train.run import train_run
    from ..tune import tune_run

    run = tune_run if cell.tuned else train_run
    config = cell.config
    if threads is not None:
        runtime = {"threads": config.runtime.threads or threads, "progress": False}
        config = config.model_copy(update={"runtime": config.runtime.model_copy(update=runtime)})
    start = time.time()
    try:
        summary = run(config, cell.run_dir, resume=cell.rundir.holds_run, command=command)
    except Exception as err:  # noqa: BLE001 - any error of one cell is reported and the others go on
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    return {"summary": summary, "seconds": time.time() - start}


def run_cell_task(out: str, spec: str, index: int, threads: int, role: int = 0) -> dict[str, Any]:
    """The body of one array task: train cell `index` of the grid in the `spec` file (OUT's benchmark.yaml as
    submitted); the result goes to OUT/slurm/results/<index>.json (and is returned). Role > 0: a helper that
    runs trials of the tuned cell's studies once the role-0 task has opened its run."""
    from . import cluster

    root = Path(out)
    cell = plan_cells(load_spec(spec), root)[index]
    if role > 0:
        return _help_tuning(cell, threads)
    result = train_cell(cell, ["qgmil", "benchmark", "(slurm task)"], threads=threads)
    results = cluster.slurm_dir(root) / "results"
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / f"{index}.json", json.dumps(result, default=str))
    return {k: v for k, v in result.items() if k != "traceback"}


def _help_tuning(cell: Cell, threads: int, patience_s: float = 3600.0) -> dict[str, Any]:
    """Wait (up to `patience_s`) for the cell's run to be opened by its first task, then share its studies."""
    from ..tune.run import study_worker

    deadline = time.time() + patience_s
    while not (cell.rundir.holds_run and cell.rundir.run_json.exists()):  # the config is written first, then the facts
        if cell.finished or time.time() > deadline:
            return {"helper": "no open run to help"}
        time.sleep(2)
    study_worker(str(cell.run_dir), threads)
    return {"helper": "studies done"}


def _cell_process(cell: Cell, command: list[str], threads: int, results) -> None:
    """A worker process: train one cell and put (its index, train_cell's result) on `results`."""
    results.put((cell.index, train_cell(cell, command, threads)))


def _run_cells(todo: list[Cell], heads: dict[int, str], workers: int, command: list[str],
               echo: Callable[[str], None]) -> list[CellFailure]:
    """Train `todo` one after another (workers == 1), or each in its own process, `workers` at a time;
    echo a line as each cell starts and ends. Returns the failures."""
    failures = []

    def start(cell: Cell) -> None:
        state = "resuming" if cell.rundir.holds_run else "running"
        echo(f"{heads[cell.index]}: {state} -> {cell.run_dir}")

    def finish(cell: Cell, result: dict[str, Any]) -> None:
        if "error" in result:
            echo(f"{heads[cell.index]}: FAILED: {result['error']}")
            failures.append(CellFailure(cell, result["error"], result["traceback"]))
            return
        folds = result["summary"].get(cell.main_metric, {}).get("n", 0)
        echo(f"{heads[cell.index]}: {cell_score(cell, result['summary'])} ({folds} folds, {result['seconds']:.0f} s)")

    if workers == 1:
        for cell in todo:
            start(cell)
            finish(cell, train_cell(cell, command))
        return failures

    threads = max(1, available_cpus() // workers)  # workers x threads <= CPUs: no oversubscription
    used = sorted({c.config.runtime.threads or threads for c in todo})  # runtime.threads, where set, wins
    echo(f"running {len(todo)} cells in {workers} worker processes, {'/'.join(map(str, used))} torch thread(s) each")
    # spawn, not fork: a forked child would inherit torch's thread pools and locks from this process.
    # A process per cell (not a pool) so that Ctrl-C or a crash stops exactly the running cells.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    waiting, running = list(todo), {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                cell = waiting.pop(0)
                start(cell)
                process = context.Process(target=_cell_process, args=(cell, command, threads, results))
                process.start()
                running[cell.index] = (cell, process)
            try:
                index, result = results.get(timeout=1.0)
            except queue.Empty:
                # a process that exited with an error and no result was killed (out of memory, a signal)
                for index, (cell, process) in list(running.items()):
                    if process.exitcode not in (None, 0):
                        del running[index]
                        error = f"the worker process died (exit code {process.exitcode})"
                        finish(cell, {"error": error, "traceback": error + "\n"})
                continue
            cell, process = running.pop(index)
            process.join()
            finish(cell, result)
    finally:  # on Ctrl-C or an error here: stop the running cells (they resume on the next run)
        for _, process in running.values():
            process.terminate()
            process.join()
        results.close()
    return failures


def _write_failures(out: Path, failures: list[CellFailure]) -> None:
    """OUT/failures.txt: each failed cell and its traceback; removed when no cell failed."""
    path = out / "failures.txt"
    if not failures:
        path.unlink(missing_ok=True)
        return
    text = "\n".join(f"== {f.cell.model} on {f.cell.dataset} ({f.cell.run_dir})\n{f.traceback}" for f in failures)
    atomic_write_text(path, text)


def run_benchmark(
    spec: BenchSpec,
    out: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    report_only: bool = False,
    progress: bool = False,
    wait: bool = False,
    echo: Callable[[str], None] = print,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Run the cells of `spec` (this shard's; none with `report_only`) into `out`, in `spec.workers`
    processes (or, with spec.executor "slurm", as SLURM array tasks: submitted, and with `wait` waited
    for), then build the tables from the finished cells.

    A cell that fails does not stop the others; the failures are returned (and written to
    OUT/failures.txt). Returns build_tables' dict plus failures (a list of CellFailure), submitted (SLURM task
    ids) and seconds.
    """
    out = Path(out).resolve()
    cells = plan_cells(spec, out, progress=progress)
    failures: list[CellFailure] = []
    submitted: list[str] = []
    start = time.time()
    if report_only and not any(c.finished for c in cells):
        found = "does not exist" if not out.is_dir() else "has no finished cell of this grid"
        raise BenchmarkError(f"--report-only: {out} {found}, so there is nothing to report; check --out and the grid "
                             "(BENCH_FILE, --datasets, --models, --folds, --seeds), or run it first without "
                             "--report-only")
    if not report_only:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "benchmark.yaml", dump_yaml(spec.model_dump(mode="json")))
        heads = {c.index: f"[{c.index + 1}/{len(cells)}] {c.model} on {c.dataset}" for c in cells}
        mine = [c for c in cells if shard is None or c.index % shard[1] == shard[0]]
        for cell in mine:
            if cell.finished:
                echo(f"{heads[cell.index]}: finished earlier, skipped")
        todo = [c for c in mine if not c.finished]
        prepare_builtin_data(todo, echo)
        if spec.executor == "slurm":
            submitted, failures = _run_on_slurm(spec, out, todo, heads, wait, echo)
        else:
            workers = max(1, min(spec.workers, len(todo)))
            failures = _run_cells(todo, heads, workers, command or ["qgmil", "benchmark"], echo)
        if spec.executor == "local" or wait:
            _write_failures(out, failures)
    tables = build_tables(out, cells, echo=echo)
    return {**tables, "failures": failures, "submitted": submitted, "seconds": time.time() - start}


def _run_on_slurm(spec: BenchSpec, out: Path, todo: list[Cell], heads: dict[int, str], wait: bool,
                  echo: Callable[[str], None]) -> tuple[list[str], list[CellFailure]]:
    """Submit the cells of `todo` not already queued, one array task each; with `wait`, wait for them and
    return the cells that did not finish as failures."""
    from .. import slurm
    from . import cluster

    queued = cluster.queued_cells(out)
    for cell in todo:
        if cell.index in queued:
            echo(f"{heads[cell.index]}: queued earlier as SLURM task(s) {', '.join(queued[cell.index])}")
    fresh = [c for c in todo if c.index not in queued]
    submitted = cluster.submit_cells(fresh, out, spec.slurm, run_cell_task, spec.tune_workers) if fresh else {}
    for cell in fresh:
        jobs = submitted[cell.index]
        helpers = f" (+ {len(jobs) - 1} tuning helper(s))" if len(jobs) > 1 else ""
        echo(f"{heads[cell.index]}: submitted as SLURM task {jobs[0]}{helpers}")
    ids = [job for jobs in submitted.values() for job in jobs]
    if not wait:
        return ids, []
    watched = ids + [job for c in todo for job in queued.get(c.index, [])]
    slurm.wait_for(watched, echo)
    failures = []
    for cell in todo:
        if cell.finished:
            result = cluster.task_result(out, cell) or {}
            echo(f"{heads[cell.index]}: {cell_score(cell, result.get('summary', {}))}")
            continue
        result = cluster.task_result(out, cell)
        if result and "error" in result:
            failure = CellFailure(cell, result["error"], result["traceback"])
        else:
            error = (f"the SLURM task ended without finishing the cell (cancelled, timed out or killed; its log is "
                     f"in {cluster.slurm_dir(out) / 'logs'}); rerun to resume it")
            failure = CellFailure(cell, error, error + "\n")
        echo(f"{heads[cell.index]}: FAILED: {failure.error}")
        failures.append(failure)
    return ids, failures
