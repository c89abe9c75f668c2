"""`qgmil benchmark` (model x dataset grids and the paper's tables) and `qgmil demo` (the quick start)."""

from __future__ import annotations

import sys

import click

from .options import command_line

BUILTIN_OUT = "qgmil-benchmark"  # --out of `qgmil benchmark --builtin` when none is given

@click.command()
@click.argument("bench_file", required=False, type=click.Path(dir_okay=False))
@click.option("--builtin", is_flag=True,
              help="The built-in benchmark (qgmil/bench/builtin.yaml: musk1, musk2, elephant, digit-bags; the "
                   "ablation set and five baselines) instead of BENCH_FILE; flags still override it.")
@click.option("--datasets", help="Comma-separated built-in datasets or dataset directories (labels.csv + features/).")
@click.option("--models", help="Comma-separated models; groups: ablation, baselines; patterns such as 'qgmil*'.")
@click.option("--folds", type=int, help="Cross-validation folds per cell (default 5).")
@click.option("--seeds", help="Comma-separated seeds, one k-fold each (default 0).")
@click.option("--workers", type=click.IntRange(1), help="Cells trained at once, each in its own process (default 1).")
@click.option("--epochs", type=int, help="Maximum epochs (optim.epochs), for every cell.")
@click.option("--batch-size", type=int, help="Bags per step (optim.batch_size), for every cell.")
@click.option("--lr", type=float, help="Peak learning rate (optim.lr), for every cell.")
@click.option("--device", help="auto, cpu, cuda, cuda:1 (runtime.device).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Run-config key for every cell, e.g. eval.patience=5.")
@click.option("--out", type=click.Path(file_okay=False),
              help=f"Benchmark directory (required, except with --builtin: default {BUILTIN_OUT}).")
@click.option("--shard", metavar="I/N", help="Run only the cells with index % N == I (split the grid over machines).")
@click.option("--report-only", is_flag=True, help="Train nothing; rebuild the tables from the finished cells.")
@click.option("--progress", is_flag=True, help="Also show per-fold progress bars (not with --workers > 1).")
def benchmark(bench_file, builtin, datasets, models, folds, seeds, workers, epochs, batch_size, lr, device, sets, out,
              shard, report_only, progress):
    """Cross-validate every model on every dataset into --out and build the paper's tables.

    `qgmil benchmark --datasets musk1,elephant --models ablation,abmil --out BENCH` writes one run per
    model x dataset under BENCH/runs/, then results.md/.csv/.tex (macro-F1, best in bold, gain of QG-MIL
    over the best baseline), auroc.md, calibration.md, gains.csv, ablation.md, significance.md/.csv
    (paired per-fold tests), attention_mass.md/.csv and results.png, ranks.png. BENCH_FILE (YAML:
    datasets, models, folds, seeds, workers, train) sets the same; flags override it. Rerun to continue:
    finished cells are skipped. Exits with 1 when a cell failed (the others still run).
    """
    from ..bench.runner import load_spec, parse_shard, run_benchmark
    from ..rundir.config import parse_set

    if out is None and not builtin:
        raise click.UsageError("missing option --out (the benchmark directory)")
    out = out or BUILTIN_OUT
    train = {"optim.epochs": epochs, "optim.batch_size": batch_size, "optim.lr": lr, "runtime.device": device}
    train = {k: v for k, v in train.items() if v is not None}
    train.update(dict(parse_set(list(sets))))
    spec = load_spec(
        bench_file, builtin=builtin, datasets=datasets.split(",") if datasets else None,
        models=models.split(",") if models else None, folds=folds,
        seeds=[int(s) for s in seeds.split(",")] if seeds else None, workers=workers, train=train,
    )
    tables = run_benchmark(spec, out, shard=parse_shard(shard), report_only=report_only, progress=progress,
                           echo=click.echo, command=command_line())
    click.echo("\n" + tables["results_md"])
    if tables["ablation_md"]:
        click.echo("\n" + tables["ablation_md"])
    written = ["results.md", "results.csv", "results.tex", "auroc.md", "calibration.md", "gains.csv",
               *(["ablation.md"] if tables["ablation_md"] else []), "significance.md", "attention_mass.md",
               *(p.name for p in tables["figures"])]
    click.echo(f"\n{tables['finished']}/{tables['cells']} cells finished; tables in {out}/ ({', '.join(written)})")
    if not report_only:
        seconds = tables["seconds"]
        click.echo(f"wall time {seconds:.0f} s" if seconds < 120 else f"wall time {seconds / 60:.1f} min")
    if tables["failures"]:
        click.echo(f"\n{len(tables['failures'])} cell(s) failed (tracebacks in {out}/failures.txt):", err=True)
        for failure in tables["failures"]:
            click.echo(f"  {failure.cell.model} on {failure.cell.dataset}: {failure.error}", err=True)
        sys.exit(1)


@click.command()
@click.option("--out", default="qgmil-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", help="Comma-separated built-in datasets (default: musk1,elephant,digit-bags).")
@click.option("--models", help="Comma-separated models (default: qgmil,abmil_gated).")
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(out, datasets, models, folds, epochs, seed):
    """Cross-validate QG-MIL and gated ABMIL on the built-in datasets and print the results (the quick start)."""
    from pathlib import Path

    from ..demo import format_results, run_demo

    table = run_demo(out, datasets.split(",") if datasets else None, models.split(",") if models else None,
                     folds=folds, epochs=epochs, seed=seed)
    click.echo("\n" + format_results(table))
    click.echo(f"\nresults: {Path(out) / 'results.md'} (and results.csv, results.png); "
               f"one run directory per dataset and model under {out}/")
