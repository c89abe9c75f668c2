"""`qgmil export features`: feature files in the layout TRIDENT, CLAM or STAMP read."""

from __future__ import annotations

from pathlib import Path

import click

from .options import POSITIVE, column_options, columns


@click.group()
def export():
    """Copy qgmil's outputs into the layouts other pathology tools read."""


@export.command("features")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to", required=True, type=click.Choice(["trident", "stamp", "clam"]), help="Target layout.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (rerun to resume; export.json records what it holds).")
@click.option("--table", type=click.Path(exists=True, dir_okay=False),
              help="qgmil table (bag_id, label, patient_id): export its bags and write the peer's tables "
                   "(STAMP clini.csv, CLAM dataset.csv). Default for a run directory: the run's table.")
@click.option("--mpp", type=POSITIVE, help="Level-0 um/px of slides whose files record none (STAMP's micrometre "
                                           "coords need it).")
@click.option("--tile-size", type=POSITIVE, metavar="PX", help="Tile side in level-0 px of files that record none "
                                                               "(CLAM's h5 files; TRIDENT and STAMP need it).")
@click.option("--encoder", help="Name to file the features under (features_<encoder>/, <encoder>/; default: the "
                                "encoder the files record).")
@click.option("--copy", "copy", is_flag=True, help="Copy files already in the target layout instead of hard-linking.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@column_options
def export_features_cmd(source, to, out, table, mpp, tile_size, encoder, copy, quiet, **kw):
    """Write the feature files of SOURCE (a folder of qgmil, TRIDENT, CLAM or STAMP .h5 files, a `qgmil extract`
    folder, or a training run directory: the features it trained on) as TRIDENT, STAMP or CLAM lay them out."""
    from ..data.export import export_features
    from ..rundir import RunDir

    cols = columns(kw)
    run = RunDir(source)
    if run.holds_run:  # a training run: the bags it trained on, with its table and column names by default
        config = run.read_config()
        _, run_table, features = run.dataset_source(config)
        source = features
        if table is None:
            table, cols = run_table, config.data.columns
    summary = export_features(Path(source) if source is not None else None, to, out, table=table, columns=cols,
                              mpp=mpp, tile_size=tile_size, encoder=encoder, link=not copy,
                              progress=not quiet)
    click.echo(summary.format())
