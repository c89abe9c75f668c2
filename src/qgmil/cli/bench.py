"""`qgmil benchmark` (model x dataset grids and the paper's tables) and `qgmil demo` (the quick start)."""

from __future__ import annotations

import sys

import click

from .options import command_line, slurm_keys, slurm_options, training_keys, training_options

BUILTIN_OUT = "qgmil-benchmark"  # --out of `qgmil benchmark --builtin` when none is given


def _exit_on_failures(failures, out) -> None:
    """List the cells that failed (their tracebacks are in OUT/failures.txt) and exit with status 1."""
    if failures:
        click.echo(f"\n{len(failures)} cell(s) failed (tracebacks in {out}/failures.txt):", err=True)
        for failure in failures:
            click.echo(f"  {failure.cell.model} on {failure.cell.dataset}: {failure.error}", err=True)
        sys.exit(1)


@click.command()
@click.argument("bench_file", required=False, type=click.Path(dir_okay=False))
@click.option("--builtin", is_flag=True,
              help="The built-in benchmark (qgmil/bench/presets/builtin.yaml: musk1, musk2, elephant, digit-bags; "
                   "the ablation set and five baselines) instead of BENCH_FILE; flags still override it.")
@click.option("--datasets", help="Comma-separated built-in datasets or dataset directories (labels.csv + features/).")
@click.option("--models", help="Comma-separated models; groups: ablation, baselines; patterns such as 'qgmil*'.")
@click.option("--folds", type=int, help="Cross-validation folds per cell (default 5).")
@click.option("--seeds", help="Comma-separated seeds, one k-fold each (default 0,1,2).")
@click.option("--workers", type=click.IntRange(1), help="Cells trained at once, each in its own process (default 1).")
@click.option("--tune", type=click.IntRange(1), help="Nested tuning: N trials per outer (seed, fold) for every model.")
@slurm_options
@training_options
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Run-config key for every cell, e.g. eval.patience=5.")
@click.option("--out", type=click.Path(file_okay=False),
              help=f"Benchmark directory (required, except with --builtin: default {BUILTIN_OUT}).")
@click.option("--shard", metavar="I/N", help="Run only the cells with index % N == I (split the grid over machines).")
@click.option("--report-only", is_flag=True, help="Train nothing; rebuild the tables from the finished cells.")
@click.option("--progress", is_flag=True, help="Also show per-fold progress bars (not with --workers > 1).")
def benchmark(bench_file, builtin, datasets, models, folds, seeds, workers, tune, executor, wait, sets, out, shard,
              report_only, progress, **flags):
    """Cross-validate every model on every dataset into --out and build the paper's tables.

    `qgmil benchmark --datasets musk1,elephant --models ablation,abmil --out BENCH` writes one run per
    model x dataset under BENCH/runs/, then results.md/.csv/.tex (macro-F1, best in bold, gain of QG-MIL
    over the best baseline), summary.md, auroc.md, calibration.md, gains.csv, ablation.md, significance.md/.csv
    (paired per-fold tests), attention_mass.md/.csv and results.png, ranks.png. Datasets of other tasks
    (survival, regression, multilabel) may be mixed in: every table is built per task on its own metrics
    (C-index, R², macro AUROC first), with survival.md, regression.md or multilabel.md. BENCH_FILE (YAML:
    datasets, models, folds, seeds, tune, workers, executor, slurm, train) sets the same; flags override it.
    `--tune N` tunes every model inside each outer fold with N trials (and writes tuning.md);
    `--executor slurm` submits a SLURM array task per cell. Rerun to continue: finished cells are skipped.
    Exits with 1 when a cell failed (the others still run).
    """
    from ..bench import load_spec, parse_shard, run_benchmark
    from ..rundir.config import parse_set

    if out is None and not builtin:
        raise click.UsageError("missing option --out (the benchmark directory)")
    out = out or BUILTIN_OUT
    slurm = slurm_keys(flags)
    train = training_keys(flags)
    train.update(dict(parse_set(list(sets))))
    spec = load_spec(
        bench_file, builtin=builtin, datasets=datasets.split(",") if datasets else None,
        models=models.split(",") if models else None, folds=folds,
        seeds=[int(s) for s in seeds.split(",")] if seeds else None, workers=workers, tune=tune,
        executor=executor, slurm=slurm, train=train,
    )
    tables = run_benchmark(spec, out, shard=parse_shard(shard), report_only=report_only, progress=progress,
                           wait=wait, echo=click.echo, command=command_line())
    if tables["submitted"] and not wait:
        click.echo(f"\nsubmitted {len(tables['submitted'])} SLURM task(s): {', '.join(tables['submitted'])}; rerun "
                   "with --wait to wait for them and report, or --report-only later (rerunning resubmits only "
                   "cells neither finished nor queued)")
        return
    click.echo("\n" + tables["results_md"])
    if tables["ablation_md"]:
        click.echo("\n" + tables["ablation_md"])
    written = [p.name for p in tables["written"]]
    click.echo(f"\n{tables['finished']}/{tables['cells']} cells finished; tables in {out}/ ({', '.join(written)})")
    if not report_only:
        seconds = tables["seconds"]
        click.echo(f"wall time {seconds:.0f} s" if seconds < 120 else f"wall time {seconds / 60:.1f} min")
    _exit_on_failures(tables["failures"], out)


@click.command()
@click.option("--out", default="qgmil-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", help="Comma-separated built-in datasets (default: musk1,elephant,digit-bags).")
@click.option("--models", help="Comma-separated models (default: qgmil,abmil_gated).")
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(out, datasets, models, folds, epochs, seed):
    """Cross-validate QG-MIL and gated ABMIL on the built-in datasets and print the results (the quick start)."""
    from ..bench import run_demo

    result = run_demo(out, datasets.split(",") if datasets else None, models.split(",") if models else None,
                      folds=folds, epochs=epochs, seed=seed, echo=click.echo)
    click.echo("\n" + result["summary_md"])
    click.echo(f"\nresults: {out}/summary.md (and results.md, results.csv, results.png and the other benchmark "
               f"tables); one run directory per dataset and model under {out}/runs/")
    _exit_on_failures(result["failures"], out)
