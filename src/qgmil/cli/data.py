"""`qgmil data check|split` (dataset tables and feature files) and `qgmil datasets list|prepare` (built-in datasets)."""

from __future__ import annotations

import json
import sys

import click

from .options import column_options, columns, patient_label_option


@click.group()
def data():
    """Check dataset tables and feature files; make patient-level splits."""


@data.command("check")
@click.option("--table", required=True, type=click.Path(dir_okay=False), help="CSV/TSV/Parquet, one row per slide/sample.")
@click.option("--features", type=click.Path(file_okay=False), help="Folder of feature files (<bag_id>.h5/.pt/.npy).")
@click.option("--classes", help="Comma-separated class names in order; other labels are problems.")
@click.option("--in-dim", type=int, help="The model's feature dimension; bags of another dim are problems.")
@click.option("--no-scan", is_flag=True, help="Skip reading every value for NaN/Inf (headers only).")
@click.option("--cache", type=click.Choice(["fp16", "fp32"]), help="Also check the values fit this data.cache.")
@click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
              help="Raise a file-size limit (data.limits: instances, dim, gib, compression), e.g. instances=2000000.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--bag-unit", type=click.Choice(["slide", "patient"]), default="slide", show_default=True,
              help="Check for training on slide or patient bags (data.bag_unit): with patient bags, slides of one "
                   "patient with different labels need --patient-label majority or max.")
@patient_label_option
@column_options
def data_check(table, features, classes, in_dim, no_scan, cache, limits, as_json, bag_unit, patient_label,
               slide_table, **kw):
    """Check a dataset and print a summary; exit status 1 when a problem was found."""
    from ..data import BagLimits, check_dataset

    pairs = [item.partition("=") for item in limits]
    if any(not sep for _, sep, _ in pairs):
        raise click.UsageError(f"--limit takes KEY=VALUE, got {limits}")
    report = check_dataset(
        table, features, columns=columns(kw), classes=classes.split(",") if classes else None,
        in_dim=in_dim, scan_values=not no_scan, cache=cache,
        limits=BagLimits(**{key.strip(): value for key, _, value in pairs}),
        slide_table=slide_table, bag_unit=bag_unit, patient_label=patient_label or "refuse",
    )
    click.echo(json.dumps({"ok": report.ok, "problems": report.problems, "notes": report.notes, **report.summary},
                          indent=1) if as_json else report.format())
    sys.exit(0 if report.ok else 1)


@data.command("split")
@click.option("--table", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="splits.json to write.")
@click.option("--folds", default=5, show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (repeated k-fold).")
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of training patients kept for validation.")
@click.option("--ignore-table-split", is_flag=True, help="Make k-fold even when the table has a split/fold column.")
@patient_label_option
@column_options
def data_split(table, out, folds, seeds, val_fraction, ignore_table_split, patient_label, slide_table, **kw):
    """Write patient-level stratified splits (or the table's own split/fold column) to --out.

    A patient's slides always go to the same part, even when their labels differ (CLAM's datasets): the
    patient is then stratified on its label under --patient-label (default: its slides' majority), the
    splits `qgmil train` makes with the same rule."""
    from ..data import make_splits, read_table, splits_from_table
    from ..data.splits import fold_summary
    from ..data.table import add_patient_labels, infer_classes

    frame = read_table(table, columns(kw), slide_table=slide_table, mixed_labels=True)
    if patient_label not in (None, "refuse"):
        frame = add_patient_labels(frame, patient_label, infer_classes(frame["label"]))
    seed_list = [int(s) for s in seeds.split(",")]
    splits = None if ignore_table_split else splits_from_table(frame, seed_list, val_fraction)
    splits = splits or make_splits(frame, folds, seed_list, val_fraction)
    splits.save(out)
    click.echo(fold_summary(splits, frame).to_string(index=False))
    click.echo(f"wrote {out}: {len(splits)} folds ({splits.method})")


# --- built-in datasets --------------------------------------------------------------------------

@click.group()
def datasets():
    """Built-in datasets, written to disk as any user dataset is laid out."""


@datasets.command("list")
def datasets_list():
    """List built-in datasets and their options."""
    from ..data.builtin import dataset_info, list_datasets

    names = list_datasets()
    width = max(map(len, names))
    for name in names:
        info = dataset_info(name)
        options = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        task = "" if info.task == "classification" else f" [{info.task}]"
        click.echo(f"{name:<{width}}  {info.description}{task}"
                   + (f"\n{'':<{width}}  options: {options}" if options else ""))


@datasets.command("prepare", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Rewrite a dataset prepared with other options.")
@click.pass_context
def datasets_prepare(ctx, name, out_dir, seed, overwrite):
    """Write built-in dataset NAME to OUT_DIR (labels.csv + features/). Options as --key value,
    e.g. `qgmil datasets prepare synthetic-wsi DIR --bags 20 --max-instances 50000`."""
    from ..data.builtin import dataset_info, prepare_dataset

    defaults = dataset_info(name).defaults
    options, args = {}, list(ctx.args)
    while args:  # --key value pairs; values are converted to each option's type by prepare_dataset
        flag = args.pop(0)
        key = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or key not in defaults:
            raise click.UsageError(f"unknown option {flag!r} for {name} (options: {', '.join(defaults) or 'none'})")
        if not args:
            raise click.UsageError(f"{flag} needs a value")
        options[key] = args.pop(0)
    path = prepare_dataset(name, out_dir, seed=seed, overwrite=overwrite, **options)
    click.echo(f"{name} ready in {path}: --table {path / 'labels.csv'} --features {path / 'features'}")
