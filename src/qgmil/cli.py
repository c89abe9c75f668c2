"""The `qgmil` command line. Subcommands of later pipeline stages register here too."""

from __future__ import annotations

import json
import sys

import click

from . import __version__


class _Errors(click.Group):
    """Turn the library's validation errors into one clean line instead of a traceback."""

    def invoke(self, ctx):
        from pydantic import ValidationError

        try:
            return super().invoke(ctx)
        except (ValueError, ValidationError, FileNotFoundError, ImportError) as err:
            click.secho(f"error: {err}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Errors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qgmil")
def main():
    """qgmil: multiple instance learning for medical imaging, built around the QG-MIL aggregator."""


@main.command()
@click.argument("pattern", default="*")
@click.option("--params", is_flag=True, help="Also count parameters (at --in-dim, 2 classes).")
@click.option("--in-dim", default=1024, show_default=True, help="Feature dimension for --params.")
@click.option("--tag", "tags", multiple=True, help="Only models with this tag (repeatable): "
              "qgmil, official, ablation, baseline, multi_branch.")
def models(pattern, params, in_dim, tags):
    """List registered models matching PATTERN (shell-style, e.g. 'qgmil*') with their tags."""
    from .models import create_model, list_models, model_entry

    names = list_models(pattern, tags=tags)
    if not names:
        raise click.ClickException(f"no model matches {pattern!r}" + (f" with tags {', '.join(tags)}" if tags else ""))
    width = max(map(len, names))
    for name in names:
        extra = ""
        if params:
            n = sum(p.numel() for p in create_model(name, in_dim=in_dim, num_classes=2).parameters())
            extra = f"{n / 1e6:7.2f}M  "
        entry = model_entry(name)
        click.echo(f"{name:<{width}}  {extra}{entry.description}  [{', '.join(sorted(entry.tags))}]")


@main.command("convert-official")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--variant", required=True, help="Official registry key, e.g. qgmil, qgmil_deep, qgmil_light.")
@click.option("--in-dim", type=int, required=True, help="Official in_dim (feature dimension).")
@click.option("--num-classes", type=int, required=True, help="Official num_classes (its default is 1).")
@click.option("--embed-dim", type=int, help="Official embed_dim (default 512; 256 for qgmil_light).")
@click.option("--dropout", type=float)
@click.option("--hidden-size", type=int, help="Official hidden_size: only sets the default head_dim (hidden_size // heads).")
@click.option("--intermediate-size", type=int, help="Official intermediate_size (default 2048).")
@click.option("--num-attention-heads", type=int)
@click.option("--num-key-value-heads", type=int)
@click.option("--head-dim", type=int)
@click.option("--num-layers", type=int)
@click.option("--hidden-act", type=click.Choice(["silu", "gelu", "relu"]))
@click.option("--pooling", type=click.Choice(["attention", "mean", "max", "cls"]))
@click.option("--use-cls-token/--no-use-cls-token", default=None)
@click.option("--qkv-bias/--no-qkv-bias", default=None)
@click.option("--rms-norm-eps", type=float)
@click.option("--attention-dropout", type=float)
def convert_official_cmd(src, dst, variant, in_dim, num_classes, **official):
    """Convert an official QG-MIL state_dict SRC (.pt/.pth, or .safetensors) into a qgmil checkpoint DST.

    Give the same constructor arguments the official model was built with; shapes are checked
    tensor by tensor. The result loads with `qgmil.load_model(DST)`.
    """
    from .checkpoint import save_model
    from .convert import convert_official

    official = {k: v for k, v in official.items() if v is not None}
    model = convert_official(src, variant, in_dim=in_dim, num_classes=num_classes, **official)
    extra = {"converted_from": str(src), "official_variant": variant, "official_args": official}
    save_model(model, dst, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    click.echo(f"wrote {dst}: {model.name} ({n:,} parameters), config {model.config.model_dump_json()}")


@main.command()
@click.option("--out", default="qgmil-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--datasets", help="Comma-separated built-in datasets (default: musk1,elephant,digit-bags).")
@click.option("--models", help="Comma-separated models (default: qgmil,abmil_gated).")
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=30, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(out, datasets, models, folds, epochs, seed):
    """Cross-validate QG-MIL and gated ABMIL on the built-in datasets and print the results (the quick start)."""
    from .bench import run_demo

    result = run_demo(out, datasets.split(",") if datasets else None, models.split(",") if models else None,
                      folds=folds, epochs=epochs, seed=seed, echo=click.echo)
    click.echo("\n" + result["summary_md"])
    click.echo(f"\nresults: {out}/summary.md (and results.md, results.csv, results.png and the other benchmark "
               f"tables); one run directory per dataset and model under {out}/runs/")
    if result["failures"]:
        click.echo(f"\n{len(result['failures'])} cell(s) failed (tracebacks in {out}/failures.txt):", err=True)
        for failure in result["failures"]:
            click.echo(f"  {failure.cell.model} on {failure.cell.dataset}: {failure.error}", err=True)
        sys.exit(1)


# --- data ---------------------------------------------------------------------------------------

def _column_options(fn):
    """The table column options shared by every command that reads a dataset table."""
    for name, default in reversed([("bag-id", "bag_id"), ("label", "label"), ("patient", "patient_id"),
                                   ("split", "split"), ("fold", "fold"), ("path", "path")]):
        fn = click.option(f"--{name}-col", default=default, show_default=True, help=f"Table column: {name}.")(fn)
    return fn


def _columns(kw):
    from .data import Columns

    names = {"bag_id_col": "bag_id", "label_col": "label", "patient_col": "patient_id", "split_col": "split",
             "fold_col": "fold", "path_col": "path"}
    return Columns(**{field: kw.pop(option) for option, field in names.items()})


@main.group()
def data():
    """Check dataset tables and feature files; make patient-level splits."""


@data.command("check")
@click.option("--table", required=True, type=click.Path(dir_okay=False), help="CSV/TSV/Parquet, one row per slide/sample.")
@click.option("--features", type=click.Path(file_okay=False), help="Folder of feature files (<bag_id>.h5/.pt/.npy).")
@click.option("--classes", help="Comma-separated class names in order; other labels are problems.")
@click.option("--in-dim", type=int, help="The model's feature dimension; bags of another dim are problems.")
@click.option("--no-scan", is_flag=True, help="Skip reading every value for NaN/Inf (headers only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_column_options
def data_check(table, features, classes, in_dim, no_scan, as_json, **kw):
    """Check a dataset and print a summary; exit status 1 when a problem was found."""
    from .data import check_dataset

    report = check_dataset(
        table, features, columns=_columns(kw), classes=classes.split(",") if classes else None,
        in_dim=in_dim, scan_values=not no_scan,
    )
    click.echo(json.dumps({"ok": report.ok, "problems": report.problems, **report.summary}, indent=1)
               if as_json else report.format())
    sys.exit(0 if report.ok else 1)


@data.command("split")
@click.option("--table", required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="splits.json to write.")
@click.option("--folds", default=5, show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds (repeated k-fold).")
@click.option("--val-fraction", default=0.2, show_default=True, help="Share of training patients kept for validation.")
@click.option("--ignore-table-split", is_flag=True, help="Make k-fold even when the table has a split/fold column.")
@_column_options
def data_split(table, out, folds, seeds, val_fraction, ignore_table_split, **kw):
    """Write patient-level stratified splits (or the table's own split/fold column) to --out."""
    from .data import make_splits, read_table, splits_from_table
    from .data.splits import fold_summary

    frame = read_table(table, _columns(kw))
    seed_list = [int(s) for s in seeds.split(",")]
    splits = None if ignore_table_split else splits_from_table(frame, seed_list, val_fraction)
    splits = splits or make_splits(frame, folds, seed_list, val_fraction)
    splits.save(out)
    click.echo(fold_summary(splits, frame).to_string(index=False))
    click.echo(f"wrote {out}: {len(splits)} folds ({splits.method})")


# --- built-in datasets --------------------------------------------------------------------------

@main.group()
def datasets():
    """Built-in datasets, written to disk as any user dataset is laid out."""


@datasets.command("list")
def datasets_list():
    """List built-in datasets and their options."""
    from .data.builtin import dataset_info, list_datasets

    for name in list_datasets():
        info = dataset_info(name)
        options = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        click.echo(f"{name:<14} {info.description}" + (f"\n{'':<14} options: {options}" if options else ""))


@datasets.command("prepare", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Rewrite a dataset prepared with other options.")
@click.pass_context
def datasets_prepare(ctx, name, out_dir, seed, overwrite):
    """Write built-in dataset NAME to OUT_DIR (labels.csv + features/). Options as --key value,
    e.g. `qgmil datasets prepare synthetic-wsi DIR --bags 20 --max-instances 50000`."""
    from .data.builtin import dataset_info, prepare_dataset

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


# --- training, evaluation, prediction -----------------------------------------------------------

# --- feature extraction -------------------------------------------------------------------------

@main.group()
def extract():
    """Raw images to feature bags: `extract wsi` (slides) and `extract cells` (single-cell crops)."""


def _extract_options(fn):
    """Options `extract wsi` and `extract cells` share: encoder, output, batching, resume, devices."""
    options = [
        click.option("--out", required=True, type=click.Path(file_okay=False),
                     help="Output folder (features/, extract.json, bags.csv); rerun to resume."),
        click.option("--encoder", default=None, help="Encoder name (see `qgmil extract encoders`) or timm:<model>."),
        click.option("--weights", default="pretrained", show_default=True,
                     help="pretrained (download; gated models read HF_TOKEN), random (seeded, offline), or a "
                          "local .safetensors/.pth file."),
        click.option("--batch-size", default=64, show_default=True),
        click.option("--workers", type=int, help="DataLoader workers reading images (default: cores - 1, max 8)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: bf16 on GPU, fp32 on CPU."),
        click.option("--skip-errors", is_flag=True, help="Record a failing input in failed/ and go on."),
        click.option("--seed", default=0, show_default=True, help="Seed of --weights random."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _report_extraction(summary) -> None:
    click.echo(summary.format())
    if summary.failed:
        sys.exit(1)


@extract.command("wsi", context_settings={"show_default": True})
@click.argument("slides", nargs=-1, required=True, type=click.Path(exists=True))
@_extract_options
@click.option("--tile-px", default=256, help="Tile side handed to the encoder, in pixels.")
@click.option("--tile-um", type=float, help="Tile side in micrometres (instead of --magnification).")
@click.option("--magnification", type=float, help="Objective magnification to tile at (20 = 0.5 um/px) [default: 20].")
@click.option("--mpp", type=float, help="Level-0 micrometres per pixel of slides whose metadata lack it "
                                          "(metadata win).")
@click.option("--min-tissue", default=0.5, help="Minimum tissue fraction of a kept tile.")
@click.option("--tissue-threshold", type=float, help="Saturation threshold 0-255 (default: Otsu per slide).")
@click.option("--no-tissue", is_flag=True, help="Tile the whole image (no tissue segmentation).")
@click.option("--recursive", is_flag=True, help="Look for slides in subfolders too.")
def extract_wsi(slides, out, encoder, weights, batch_size, workers, device, precision, skip_errors, seed, quiet,
                tile_px, tile_um, magnification, mpp, min_tissue, tissue_threshold, no_tissue, recursive):
    """Slides (files or folders) to one feature file per slide with tile coordinates.

    Run under `torchrun --nproc-per-node N qgmil extract wsi ...` to share the slides over N processes/GPUs.
    """
    from .extract.wsi import TilingSettings, extract_slides

    settings = TilingSettings(tile_px=tile_px, tile_um=tile_um, magnification=magnification, min_tissue=min_tissue,
                              tissue=not no_tissue, tissue_threshold=tissue_threshold, mpp=mpp)
    summary = extract_slides(slides, out, encoder or "resnet50_trunc", weights=weights, settings=settings,
                             batch_size=batch_size, num_workers=workers, device=device, precision=precision,
                             skip_errors=skip_errors, recursive=recursive, seed=seed, progress=not quiet,
                             command=" ".join(["qgmil", *sys.argv[1:]]))
    _report_extraction(summary)


@extract.command("cells", context_settings={"show_default": True})
@click.argument("root", required=False, type=click.Path(exists=True, file_okay=False))
@_extract_options
@click.option("--table", type=click.Path(exists=True, dir_okay=False),
              help="Instead of ROOT: a CSV/TSV with one row per cell image (path, sample id).")
@click.option("--path-column", default="path", help="Image path column of --table (relative to the table).")
@click.option("--sample-column", default="sample_id", help="Sample id column of --table.")
@click.option("--cell-px", type=int, help="Side cells are resized to (default: the encoder's input size).")
def extract_cells_cmd(root, out, encoder, weights, batch_size, workers, device, precision, skip_errors, seed, quiet,
                      table, path_column, sample_column, cell_px):
    """Single-cell images to one feature file per sample: ROOT/<sample>/*.png (any depth), or --table."""
    from .extract.cells import extract_cells

    summary = extract_cells(root, out, encoder or "dinobloom-s", table=table, path_column=path_column,
                            sample_column=sample_column, weights=weights, cell_px=cell_px, batch_size=batch_size,
                            num_workers=workers, device=device, precision=precision, skip_errors=skip_errors,
                            seed=seed, progress=not quiet, command=" ".join(["qgmil", *sys.argv[1:]]))
    _report_extraction(summary)


@extract.command("encoders")
def extract_encoders():
    """List the registered encoders (any timm model also works as timm:<name>)."""
    from .extract.encoders import encoder_info, list_encoders

    for name in list_encoders():
        info = encoder_info(name)
        size = f"{info.input_size}px" if info.input_size else "any size"
        gated = "  [gated: HF_TOKEN]" if info.gated else ""
        click.echo(f"{name:16s} dim {info.dim:5d}  {size:9s} {info.source}{gated}\n    {info.description}")


@main.command(context_settings={"show_default": True})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. optim.lr=3e-4.")
@click.option("--table", type=click.Path(dir_okay=False), help="Dataset table (data.table).")
@click.option("--features", type=click.Path(file_okay=False), help="Feature files folder (data.features).")
@click.option("--dataset", "builtin", help="A built-in dataset instead of --table (data.builtin).")
@click.option("--model", help="Registered model name (model.name).")
@click.option("--folds", type=int, help="Cross-validation folds (eval.folds).")
@click.option("--seeds", help="Comma-separated seeds, one k-fold each (eval.seeds).")
@click.option("--epochs", type=int, help="Maximum epochs (optim.epochs).")
@click.option("--batch-size", type=int, help="Bags per step (optim.batch_size).")
@click.option("--lr", type=float, help="Peak learning rate (optim.lr).")
@click.option("--bag-unit", type=click.Choice(["slide", "patient"]), help="One bag per slide or per patient.")
@click.option("--max-instances", type=int, help="Random subset of larger bags while training.")
@click.option("--workers", type=int, help="DataLoader workers (data.num_workers).")
@click.option("--device", help="auto, cpu, cuda, cuda:1 (runtime.device).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue the run in --out: finished folds are skipped.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(config_file, sets, out, resume, quiet, **flags):
    """Cross-validate a model: `qgmil train --table T --features F --model qgmil --out RUN`.

    Everything else has defaults (see `qgmil train --help` and the README); a CONFIG.yaml and
    --set KEY=VALUE override them. The run directory holds the resolved config, splits, versions,
    per-fold checkpoints and metrics, test predictions and attention, and the summary.
    """
    from .rundir.config import load_config, parse_set
    from .train.run import train_run

    keys = {"table": "data.table", "features": "data.features", "builtin": "data.builtin", "model": "model.name",
            "folds": "eval.folds", "epochs": "optim.epochs", "batch_size": "optim.batch_size", "lr": "optim.lr",
            "bag_unit": "data.bag_unit", "max_instances": "data.max_instances", "workers": "data.num_workers",
            "device": "runtime.device"}
    base = {keys[k]: v for k, v in flags.items() if k in keys and v is not None}
    if flags.get("seeds"):
        base["eval.seeds"] = [int(s) for s in flags["seeds"].split(",")]
    if quiet:
        base["runtime.progress"] = False
    config = None
    if config_file or base.keys() - {"runtime.progress", "runtime.device"} or sets:
        config = load_config(config_file, parse_set(list(sets)), base)
    summary = train_run(config, out, resume=resume, command=["qgmil", *sys.argv[1:]])
    from .evaluate.metrics import format_summary

    click.echo(format_summary(summary))
    click.echo(f"run directory: {out}  (summary.md, predictions.csv, folds/*/best.safetensors)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def evaluate(run_dir):
    """Recompute and print a run's tables from its saved test predictions."""
    from pathlib import Path

    from .evaluate.report import write_report

    write_report(run_dir)
    click.echo((Path(run_dir) / "summary.md").read_text())


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.argument("data", type=click.Path(exists=True))
@click.option("--features", type=click.Path(file_okay=False), help="Feature folder when DATA is a table (default: next to it).")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--batch-size", default=1, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_column_options
def predict(source, data, features, out, batch_size, device, **kw):
    """Predict bags in DATA (a table, labels optional, or a folder of feature files) with SOURCE
    (a run directory: its fold models are averaged; or one checkpoint)."""
    from .evaluate.predict import predict_bags

    frame = predict_bags(source, data, out, features=features, columns=_columns(kw), batch_size=batch_size,
                         device=device)
    click.echo(f"{len(frame)} bags predicted; wrote {out}/predictions.csv and {out}/attention.h5")


# --- explaining runs ----------------------------------------------------------------------------

@main.group()
def explain():
    """Analyse what trained models attend to, from their run directories."""


@explain.command("mass")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the tables and figures.")
def explain_mass(run_dirs, out):
    """How concentrated is the test attention of each RUN_DIR (entropy, effective instances, top-k mass,
    Gini; attention on positive instances where the bags have instance labels)?

    Writes OUT/mass_per_bag.csv, mass_summary.csv, mass_summary.md, lorenz.png and mass_boxplots.png.
    """
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from .atomic import atomic_write, atomic_write_text
    from .explain.mass import format_summary, load_run, summarize

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    names = [f"{r.model} / {r.dataset}" for r in runs]
    names = [f"{n} ({r.run_dir.name})" if names.count(n) > 1 else n for n, r in zip(names, runs)]
    frames = [r.metrics() for r in runs]
    frame = pd.concat(frames, ignore_index=True)
    summary = summarize(frame)
    table = format_summary(summary)
    atomic_write(out / "mass_per_bag.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(out / "mass_summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    atomic_write_text(out / "mass_summary.md", table + "\n")
    written = [out / "mass_per_bag.csv", out / "mass_summary.csv", out / "mass_summary.md"]
    try:
        from .explain.mass_plots import lorenz_plot, mass_boxplots

        grid = np.linspace(0.0, 1.0, 201)
        written.append(lorenz_plot({n: r.lorenz(grid) for n, r in zip(names, runs)}, grid, out / "lorenz.png"))
        labels = pd.Series(np.repeat(names, [len(f) for f in frames]))
        written.append(mass_boxplots(frame, labels, out / "mass_boxplots.png"))
    except ImportError as err:
        click.echo(f"no figures: {err}", err=True)
    click.echo(table)
    click.echo("\nwrote " + ", ".join(str(p) for p in written))


# --- benchmarks ---------------------------------------------------------------------------------

BUILTIN_OUT = "qgmil-benchmark"  # --out of `qgmil benchmark --builtin` when none is given

@main.command()
@click.argument("bench_file", required=False, type=click.Path(dir_okay=False))
@click.option("--builtin", is_flag=True,
              help="The built-in benchmark (qgmil/bench/presets/builtin.yaml: musk1, musk2, elephant, digit-bags; "
                   "the ablation set and five baselines) instead of BENCH_FILE; flags still override it.")
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
    over the best baseline), summary.md (a row per cell), auroc.md, calibration.md, gains.csv, ablation.md,
    significance.md/.csv (paired per-fold tests), attention_mass.md/.csv and results.png, ranks.png. BENCH_FILE
    (YAML: datasets, models, folds, seeds, workers, train) sets the same; flags override it. Rerun to continue:
    finished cells are skipped. Exits with 1 when a cell failed (the others still run).
    """
    from .bench import load_spec, parse_shard, run_benchmark
    from .rundir.config import parse_set

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
                           echo=click.echo, command=["qgmil", *sys.argv[1:]])
    click.echo("\n" + tables["results_md"])
    if tables["ablation_md"]:
        click.echo("\n" + tables["ablation_md"])
    written = [p.name for p in tables["written"]]
    click.echo(f"\n{tables['finished']}/{tables['cells']} cells finished; tables in {out}/ ({', '.join(written)})")
    if not report_only:
        seconds = tables["seconds"]
        click.echo(f"wall time {seconds:.0f} s" if seconds < 120 else f"wall time {seconds / 60:.1f} min")
    if tables["failures"]:
        click.echo(f"\n{len(tables['failures'])} cell(s) failed (tracebacks in {out}/failures.txt):", err=True)
        for failure in tables["failures"]:
            click.echo(f"  {failure.cell.model} on {failure.cell.dataset}: {failure.error}", err=True)
        sys.exit(1)


@explain.command("heatmap")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--bags", help="Comma-separated bag ids (default: the first 3 test bags of the first run).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--slides", type=click.Path(file_okay=False),
              help="Folder of slides named <bag_id>.<ext> (patient bags: each slide's id) for the background.")
@click.option("--normalise", type=click.Choice(["rank", "minmax", "none"]), default="rank", show_default=True,
              help="rank: percentile of each weight within its bag; minmax: (a - min) / (max - min); none: raw.")
@click.option("--cmap", default="jet", show_default=True, help="matplotlib colormap.")
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0), help="Heat opacity.")
@click.option("--max-size", default=2048, show_default=True, type=click.IntRange(16), help="Long side of the heat (px).")
@click.option("--branches", is_flag=True,
              help="One panel per attention branch of a multi-branch run (`qgmil models --tag multi_branch`).")
@click.option("--patches", default=0, type=click.IntRange(0), metavar="K",
              help="Also write <bag_id>_patches.png: the K most and K least attended tiles (needs --slides).")
@click.option("--tissue-only", is_flag=True, help="Paint no heat outside the tissue found on the slide (needs --slides).")
def explain_heatmap(run_dirs, bags, out, slides, normalise, cmap, alpha, max_size, branches, patches, tissue_only):
    """Attention heatmaps: each tile's test attention painted over its place on the slide.

    Writes OUT/<bag_id>.png per bag; with several RUN_DIRs, one panel per run side by side. Without
    --slides the heat is drawn on white. A patient bag of several slides gives OUT/<bag_id>__<slide_id>.png
    per slide.
    """
    from .explain.heatmap import run_heatmaps

    written = run_heatmaps(run_dirs, out, bags=[b.strip() for b in bags.split(",") if b.strip()] if bags else None,
                           slides=slides, normalise=normalise, cmap=cmap, alpha=alpha, max_size=max_size,
                           branches=branches, patches=patches, tissue_only=tissue_only,
                           echo=lambda m: click.echo(m, err=True), progress=True)
    click.echo("wrote " + ", ".join(str(p) for p in written))


@explain.command("cells")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--bags", help="Comma-separated bag ids (default: the first 3 test bags of the first run).")
@click.option("--top", default=8, show_default=True, type=click.IntRange(1), help="Cells per row (most / least attended).")
@click.option("--images", type=click.Path(file_okay=False),
              help="Where the cell images are now, if they moved since `qgmil extract cells` (default: its image_root).")
def explain_cells(run_dirs, out, bags, top, images):
    """Cell galleries: the --top most and least attended cells of each bag, with their test attention.

    For cell bags written by `qgmil extract cells` (instance_names + image_root). Writes
    OUT/<bag_id>_cells.png per bag; with several RUN_DIRs, a top row and a bottom row per run.
    """
    from .explain.gallery import run_cell_galleries

    written = run_cell_galleries(run_dirs, out, bags=[b.strip() for b in bags.split(",") if b.strip()] if bags else None,
                                 top=top, images=images, progress=True)
    click.echo("wrote " + ", ".join(str(p) for p in written))
