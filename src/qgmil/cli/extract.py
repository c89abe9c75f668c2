"""`qgmil extract wsi|cells|encoders`: slides and cell images to feature files."""

from __future__ import annotations

import sys

import click

from ..extract.locks import STALE_MINUTES  # light modules: `qgmil --help` still does not import torch
from ..extract.limits import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV
from .options import POSITIVE, FiniteFloat, command_line


@click.group()
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
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--workers", type=click.IntRange(min=0),
                     help="DataLoader workers reading images (default: cores - 1, max 8)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                     show_default=True, help="auto: bf16 on GPU, fp32 on CPU."),
        click.option("--skip-errors", is_flag=True, help="Record a failing input in failed/ and go on."),
        click.option("--seed", default=0, show_default=True, help="Seed of --weights random."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--shard", metavar="I/N", help="Take only bags I, I+N, I+2N... of the sorted list (a static "
                                                      "share per job, e.g. a SLURM array task); jobs on one --out "
                                                      "never encode the same bag even without (lock files)."),
        click.option("--stale-lock-minutes", default=STALE_MINUTES, type=POSITIVE,
                     show_default=True, help="Another job's lock without heartbeat for this long is taken over "
                                             "(a dead pid on this host: at once)."),
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
@click.option("--tile-px", default=256, type=click.IntRange(min=8), help="Tile side handed to the encoder, in pixels.")
@click.option("--tile-um", type=POSITIVE, help="Tile side in micrometres (instead of --magnification).")
@click.option("--magnification", type=POSITIVE,
              help="Objective magnification to tile at (20 = 0.5 um/px) [default: 20].")
@click.option("--mpp", type=POSITIVE, help="Level-0 micrometres per pixel of slides whose metadata lack it "
                                             "(metadata win).")
@click.option("--min-tissue", default=0.5, type=FiniteFloat(0, 1), help="Minimum tissue fraction of a kept tile.")
@click.option("--tissue-threshold", type=FiniteFloat(0, 255),
              help="Saturation threshold 0-255 (default: Otsu per slide).")
@click.option("--no-tissue", is_flag=True, help="Tile the whole image (no tissue segmentation).")
@click.option("--recursive", is_flag=True, help="Look for slides in subfolders too.")
@click.option("--max-image-pixels", type=click.IntRange(min=1),
              help="Largest plain image (PNG, JPEG, plain TIFF; decoded whole) read, in pixels "
                   f"[default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_IMAGE_PIXELS:_}].")
def extract_wsi(slides, out, encoder, weights, batch_size, workers, device, precision, skip_errors, seed, quiet,
                shard, stale_lock_minutes, tile_px, tile_um, magnification, mpp, min_tissue, tissue_threshold,
                no_tissue, recursive, max_image_pixels):
    """Slides (files or folders) to one feature file per slide with tile coordinates.

    Run under `torchrun --nproc-per-node N qgmil extract wsi ...` to share the slides over N processes/GPUs,
    or start several jobs on one --out (e.g. SLURM array tasks): lock files keep them from encoding a slide twice.
    """
    from ..extract.wsi import DEFAULT_ENCODER as DEFAULT_WSI_ENCODER
    from ..extract.wsi import TilingSettings, extract_slides

    settings = TilingSettings(tile_px=tile_px, tile_um=tile_um, magnification=magnification, min_tissue=min_tissue,
                              tissue=not no_tissue, tissue_threshold=tissue_threshold, mpp=mpp,
                              max_image_pixels=max_image_pixels)
    summary = extract_slides(slides, out, encoder or DEFAULT_WSI_ENCODER, weights=weights, settings=settings,
                             batch_size=batch_size, num_workers=workers, device=device, precision=precision,
                             skip_errors=skip_errors, recursive=recursive, seed=seed, progress=not quiet,
                             command=" ".join(command_line()), shard=shard, stale_minutes=stale_lock_minutes)
    _report_extraction(summary)


@extract.command("cells", context_settings={"show_default": True})
@click.argument("root", required=False, type=click.Path(exists=True, file_okay=False))
@_extract_options
@click.option("--table", type=click.Path(exists=True, dir_okay=False),
              help="Instead of ROOT: a CSV/TSV with one row per cell image (path, sample id).")
@click.option("--path-column", default="path", help="Image path column of --table (relative to the table).")
@click.option("--sample-column", default="sample_id", help="Sample id column of --table.")
@click.option("--cell-px", type=click.IntRange(min=8),
              help="Side cells are resized to (default: the encoder's input size).")
def extract_cells_cmd(root, out, encoder, weights, batch_size, workers, device, precision, skip_errors, seed, quiet,
                      shard, stale_lock_minutes, table, path_column, sample_column, cell_px):
    """Single-cell images to one feature file per sample: ROOT/<sample>/*.png (any depth), or --table."""
    from ..extract.cells import DEFAULT_ENCODER as DEFAULT_CELL_ENCODER
    from ..extract.cells import extract_cells

    summary = extract_cells(root, out, encoder or DEFAULT_CELL_ENCODER, table=table, path_column=path_column,
                            sample_column=sample_column, weights=weights, cell_px=cell_px, batch_size=batch_size,
                            num_workers=workers, device=device, precision=precision, skip_errors=skip_errors,
                            seed=seed, progress=not quiet, command=" ".join(command_line()), shard=shard,
                            stale_minutes=stale_lock_minutes)
    _report_extraction(summary)


@extract.command("encoders")
def extract_encoders():
    """List the registered encoders (any timm model also works as timm:<name>)."""
    from ..extract.encoders import encoder_info, list_encoders

    for name in list_encoders():
        info = encoder_info(name)
        size = f"{info.input_size}px" if info.input_size else "any size"
        gated = "  [gated: HF_TOKEN]" if info.gated else ""
        click.echo(f"{name:16s} dim {info.dim:5d}  {size:9s} {info.source}{gated}\n    {info.description}")
