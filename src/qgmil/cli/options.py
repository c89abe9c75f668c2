"""Options several commands share, and the command line recorded in outputs."""

from __future__ import annotations

import math
import sys

import click


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which pass its comparisons)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


#: an option value > 0 (a magnification, micrometres, um / px)
POSITIVE = FiniteFloat(min=0, min_open=True)

#: the table column options: option name -> Columns field (= its default column name)
COLUMN_FLAGS = {"bag_id_col": "bag_id", "label_col": "label", "patient_col": "patient_id", "split_col": "split",
                "fold_col": "fold", "path_col": "path"}
#: what a column holds, and the peers' names for it that are found without the option (data.table.PEER_COLUMNS)
_COLUMN_HELP = {
    "bag_id": "bag id (without one: CLAM's slide_id, else the file names of the path column)",
    "label": "label (STAMP: the target in the clinical table)",
    "patient_id": "patient (without one: CLAM's case_id or STAMP's PATIENT, else the bag id)",
    "path": "feature file (without one: STAMP's FILENAME, else <features>/<bag id>.h5 ...)",
}


def _column_help(field: str) -> str:
    return f"Table column: {_COLUMN_HELP.get(field, field)}"


def column_options(fn):
    """The table column options shared by every command that reads a dataset table, plus --slide-table."""
    fn = slide_table_option(fn)
    for option, field in reversed(COLUMN_FLAGS.items()):
        fn = click.option(f"--{option.replace('_', '-')}", default=field, show_default=True,
                          help=f"{_column_help(field)}.")(fn)
    return fn


def run_column_options(fn):
    """The table column options of `qgmil train` and `qgmil tune` (each sets data.columns.<field>; unset, the
    config's or the default name), --slide-table (data.slide_table) and --patient-label (data.patient_label)."""
    fn = patient_label_option(fn, key="data.patient_label")
    fn = slide_table_option(fn, key=" (data.slide_table)")
    for option, field in reversed(COLUMN_FLAGS.items()):
        fn = click.option(f"--{option.replace('_', '-')}",
                          help=f"{_column_help(field)} (data.columns.{field}; default {field}).")(fn)
    return fn


def slide_table_option(fn, key: str = ""):
    return click.option("--slide-table", type=click.Path(dir_okay=False),
                        help="STAMP's layout: a slide table (patient + feature file per row, e.g. PATIENT, FILENAME) "
                             f"beside --table, which is then the clinical table (patient + label){key}.")(fn)


def patient_label_option(fn, key: str = "data.patient_label", default: str | None = None):
    return click.option("--patient-label", type=click.Choice(["refuse", "majority", "max"]), default=default,
                        show_default=default is not None,
                        help="A patient's label from its slides' (patient bags; slide bags stratify their splits on "
                             "it): refuse slides of different labels, their majority (ties: the first class), or "
                             f"the last class (CLAM's max voting) ({key}; default refuse).")(fn)


def columns(kw):
    """The Columns the column options give (popped from `kw`)."""
    from ..data import Columns

    return Columns(**{field: kw.pop(option) for option, field in COLUMN_FLAGS.items()})


def column_keys(flags: dict) -> dict:
    """The data.columns.* keys of the run column options given (popped from `flags`)."""
    values = {option: flags.pop(option, None) for option in COLUMN_FLAGS}
    return {f"data.columns.{COLUMN_FLAGS[o]}": v for o, v in values.items() if v is not None}


def command_line() -> list[str]:
    """This invocation as `qgmil ...`, for run.json and extract.json."""
    return ["qgmil", *sys.argv[1:]]


#: flags of `qgmil train` and `qgmil benchmark` that each set one run-config key: flag -> (key, type, help)
TRAINING_FLAGS = {
    "epochs": ("optim.epochs", int, "Maximum epochs"),
    "batch_size": ("optim.batch_size", int, "At most this many bags per step"),
    "lr": ("optim.lr", float, "Peak learning rate"),
    "device": ("runtime.device", str, "auto, cpu, cuda, cuda:1"),
}


def training_options(fn):
    """--epochs, --batch-size, --lr, --device (TRAINING_FLAGS)."""
    for flag, (key, kind, text) in reversed(TRAINING_FLAGS.items()):
        fn = click.option(f"--{flag.replace('_', '-')}", type=kind, help=f"{text} ({key}).")(fn)
    return fn


def training_keys(flags: dict) -> dict:
    """The run-config keys of the TRAINING_FLAGS given on the command line (popped from `flags`)."""
    values = {flag: flags.pop(flag, None) for flag in TRAINING_FLAGS}
    return {TRAINING_FLAGS[flag][0]: v for flag, v in values.items() if v is not None}


#: flags that set one SLURM option of a task (qgmil.slurm.SlurmOptions): flag -> (type, help)
SLURM_FLAGS = {
    "partition": (str, "SLURM partition (slurm.partition)."),
    "time_min": (click.IntRange(1), "SLURM time limit per task, minutes (default 240)."),
    "mem_gb": (float, "SLURM memory per task, GB (default 8)."),
    "cpus_per_task": (click.IntRange(1), "SLURM CPUs per task = its torch threads (default 2)."),
    "gpus_per_task": (click.IntRange(0), "SLURM GPUs per task (default 0)."),
}


def slurm_options(fn):
    """--executor, --partition, --time-min, --mem-gb, --cpus-per-task, --gpus-per-task, --sbatch, --wait."""
    options = [click.option("--executor", type=click.Choice(["local", "slurm"]),
                            help="Local processes (default) or SLURM tasks through submitit.")]
    options += [click.option(f"--{flag.replace('_', '-')}", type=kind, help=text)
                for flag, (kind, text) in SLURM_FLAGS.items()]
    options += [click.option("--sbatch", "sbatch_options", multiple=True, metavar="KEY=VALUE",
                             help="Extra sbatch option for every task, e.g. account=lab or qos=low (repeatable)."),
                click.option("--wait", is_flag=True, help="With --executor slurm: wait for the tasks, then report.")]
    for option in reversed(options):
        fn = option(fn)
    return fn


def slurm_keys(flags: dict) -> dict:
    """The SlurmOptions fields given on the command line (popped from `flags`, with --sbatch)."""
    from ..rundir.config import parse_set

    keys = {flag: flags.pop(flag, None) for flag in SLURM_FLAGS}
    keys = {k: v for k, v in keys.items() if v is not None}
    sbatch = flags.pop("sbatch_options", ())
    if sbatch:
        keys["sbatch"] = dict(parse_set(list(sbatch)))
    return keys
