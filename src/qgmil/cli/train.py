"""`qgmil train` (cross-validation runs), `qgmil tune` (nested tuning), `qgmil evaluate` (a run's report) and
`qgmil predict` (new bags)."""

from __future__ import annotations

import click

from .options import (
    column_keys, column_options, columns, command_line, run_column_options, slurm_keys, slurm_options, training_keys,
    training_options,
)


def run_options(fn):
    """The options `qgmil train` and `qgmil tune` share: config file, data, model, folds, training keys."""
    options = [
        click.argument("config_file", required=False, type=click.Path(dir_okay=False)),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a config field, e.g. optim.lr=3e-4."),
        click.option("--table", type=click.Path(dir_okay=False), help="Dataset table (data.table)."),
        click.option("--features", type=click.Path(file_okay=False), help="Feature files folder (data.features)."),
        click.option("--dataset", "builtin", help="A built-in dataset instead of --table (data.builtin)."),
        click.option("--model", help="Registered model name (model.name)."),
        click.option("--task", type=click.Choice(["classification", "survival", "regression", "multilabel"]),
                     help="What to predict (task.kind; default classification)."),
        click.option("--time-col", help="Survival: the time column (data.columns.time; default time)."),
        click.option("--event-col", help="Survival: the event column, 1 = event, 0 = censored (data.columns.event; "
                     "default event)."),
        click.option("--targets", help="Regression: the numeric target columns; multi-label: the 0/1 label columns "
                     "(comma-separated; data.columns.targets; default: the label column)."),
        click.option("--folds", type=int, help="Cross-validation folds (eval.folds)."),
        click.option("--seeds", help="Comma-separated seeds, one k-fold each (eval.seeds)."),
        training_options,
        click.option("--bag-unit", type=click.Choice(["slide", "patient"]),
                     help="One bag per slide or per patient (data.bag_unit; default slide)."),
        run_column_options,
        click.option("--max-instances", type=int, help="Random subset of larger bags while training."),
        click.option("--workers", type=int, help="DataLoader workers (data.num_workers)."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory."),
        click.option("--resume", is_flag=True, help="Continue the run in --out: finished folds are skipped."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


FLAG_KEYS = {"table": "data.table", "features": "data.features", "builtin": "data.builtin", "model": "model.name",
             "folds": "eval.folds", "task": "task.kind",
             "time_col": "data.columns.time", "event_col": "data.columns.event", "bag_unit": "data.bag_unit", "max_instances": "data.max_instances",
             "workers": "data.num_workers", "slide_table": "data.slide_table", "patient_label": "data.patient_label",
             "trials": "tune.trials", "inner_folds": "tune.inner_folds",
             "storage": "tune.storage", "pruner": "tune.pruner", "sampler": "tune.sampler"}


def run_config(config_file, sets, quiet, flags, out, resume):
    """The RunConfig the flags describe, or None when they only say where to resume (the saved one is used)."""
    from ..rundir import RunDir
    from ..rundir.config import load_config, parse_seeds, parse_set

    if resume:  # before the flags are validated as a new config, which would complain about its data source
        RunDir(out).require_resumable()
    base = training_keys(flags)
    base.update(column_keys(flags))
    base.update({FLAG_KEYS[k]: v for k, v in flags.items() if k in FLAG_KEYS and v is not None})
    if flags.get("seeds"):
        base["eval.seeds"] = parse_seeds(flags["seeds"])
    if flags.get("targets"):
        base["data.columns.targets"] = [t.strip() for t in flags["targets"].split(",") if t.strip()]
    if quiet:
        base["runtime.progress"] = False
    if config_file or base.keys() - {"runtime.progress", "runtime.device"} or sets:
        return load_config(config_file, parse_set(list(sets)), base)
    return None


@click.command(context_settings={"show_default": True})
@run_options
def train(config_file, sets, out, resume, quiet, **flags):
    """Cross-validate a model: `qgmil train --table T --features F --model qgmil --out RUN`.

    Everything else has defaults (see `qgmil train --help` and the README); a CONFIG.yaml and
    --set KEY=VALUE override them. The run directory holds the resolved config, splits, versions,
    per-fold checkpoints and metrics, test predictions and attention, and the summary.
    """
    from ..evaluate.metrics import format_summary
    from ..runtime import is_main_process
    from ..train.run import train_run

    summary = train_run(run_config(config_file, sets, quiet, flags, out, resume), out, resume=resume, command=command_line())
    if not is_main_process():  # under torchrun every rank has the summary; one prints it
        return
    click.echo(format_summary(summary))
    click.echo(f"run directory: {out}  (summary.md, predictions.csv, folds/*/best.safetensors)")


@click.command(context_settings={"show_default": True})
@run_options
@click.option("--trials", type=int, help="Trials per outer (seed, fold) (tune.trials, default 20).")
@click.option("--inner-folds", type=int, help="Score trials on k inner folds instead of the validation part.")
@click.option("--pruner", type=click.Choice(["asha", "median", "hyperband", "none"]), help="tune.pruner (default asha).")
@click.option("--sampler", type=click.Choice(["tpe", "random"]), help="tune.sampler (default tpe).")
@click.option("--storage", help="Optuna storage: a .journal file or an RDB URL (default RUN_DIR/tuning/studies.journal).")
@click.option("--parallel", type=click.IntRange(1), default=1, help="Workers sharing each study (processes here, "
              "or SLURM tasks with --executor slurm).")
@slurm_options
def tune(config_file, sets, out, resume, quiet, parallel, executor, wait, **flags):
    """Nested tuning: `qgmil tune --dataset musk1 --model abmil_gated --trials 20 --out RUN`.

    For each outer (seed, fold), an Optuna study searches the model's space (`qgmil models --space NAME`,
    changed with tune.space in the YAML) on the outer training part only, scored on the validation part
    (eval.monitor); the best settings are retrained and tested once on the outer test fold. Rerun with
    --resume after an interruption: finished trials and folds are kept.
    """
    from ..evaluate.metrics import format_summary
    from ..tune import tune_run

    from ..slurm import SlurmOptions

    options = SlurmOptions(**slurm_keys(flags))
    summary = tune_run(run_config(config_file, sets, quiet, flags, out, resume), out, resume=resume, command=command_line(),
                       workers=parallel, executor=executor or "local", slurm_options=options, wait=wait,
                       echo=click.echo)
    if not summary:  # submitted, not waited for
        click.echo(f"rerun with --resume --executor slurm --wait to wait, or `qgmil evaluate {out}` once it is done")
        return
    click.echo(format_summary(summary))
    click.echo(f"run directory: {out}  (summary.md, tuning/settings.md, tuning/<fold>/chosen.json)")


ALLOW_MISSING = click.option("--allow-missing-folds", is_flag=True,
                             help="Use the finished folds only (default: every fold of the run's splits.json).")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@ALLOW_MISSING
def evaluate(run_dir, allow_missing_folds):
    """Recompute and print a run's tables from its saved test predictions (the previous ones are kept as
    predictions.prev.csv, summary.prev.*)."""
    from pathlib import Path

    from ..evaluate.report import evaluate_run

    evaluate_run(run_dir, allow_missing_folds=allow_missing_folds)
    click.echo((Path(run_dir) / "summary.md").read_text())


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--features", type=click.Path(file_okay=False), help="Feature folder when DATA is a table (default: next to it).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--batch-size", default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@ALLOW_MISSING
@column_options
def predict(source, data, features, out, batch_size, device, allow_missing_folds, slide_table, **kw):
    """Predict bags in DATA (a table, labels optional, or a folder of feature files) with SOURCE
    (a run directory: its fold models are averaged; or one checkpoint)."""
    from ..evaluate.predict import predict_bags

    frame = predict_bags(source, data, out, features=features, columns=columns(kw), batch_size=batch_size,
                         device=device, allow_missing_folds=allow_missing_folds, slide_table=slide_table)
    click.echo(f"{len(frame)} bags predicted; wrote {out}/predictions.csv and {out}/attention.h5")
