"""`qgmil explain mass|heatmap|cells|export|view`: what trained models attend to, from their run directories."""

from __future__ import annotations

import click

from ..extract.limits import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV  # light: `qgmil --help` imports no numpy
from .options import POSITIVE


@click.group()
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
    from ..explain.mass_report import write_mass_report

    report = write_mass_report(run_dirs, out)
    if report.note:
        click.echo(report.note, err=True)
    click.echo(report.table)
    click.echo("\nwrote " + ", ".join(str(p) for p in report.written))


@explain.command("heatmap")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--bags", help="Comma-separated bag ids (default: the first 3 test bags of the first run).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs.")
@click.option("--slides", type=click.Path(exists=True, file_okay=False),
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
@click.option("--max-image-pixels", type=click.IntRange(min=1),
              help="Largest plain-image slide (PNG, JPEG, plain TIFF; decoded whole) read, in pixels "
                   f"[default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_IMAGE_PIXELS:_}].")
@click.option("--tile-size", type=POSITIVE, metavar="PX",
              help="Tile side in level-0 px, for feature files that record none (CLAM's h5: otherwise the coords' "
                   "grid step, too small for overlapping tiles) or a wrong one; replaces what the files say.")
@click.option("--mpp", type=POSITIVE, metavar="UM_PER_PX",
              help="Slide resolution for micrometre coords (STAMP) when neither the feature file nor the slide's "
                   "metadata give one (the slide's is used when --slides has it).")
def explain_heatmap(run_dirs, bags, out, slides, normalise, cmap, alpha, max_size, branches, patches, tissue_only,
                    max_image_pixels, tile_size, mpp):
    """Attention heatmaps: each tile's test attention painted over its place on the slide.

    Writes OUT/<bag_id>.png per bag; with several RUN_DIRs, one panel per run side by side. Without
    --slides the heat is drawn on white; with it, no matching slide at all is an error and bags whose slide
    is missing are named in a warning. A patient bag of several slides gives OUT/<bag_id>__<slide_id>.png
    per slide. Micrometre coords (STAMP) are placed with the file's mpp, else the slide's (--slides), else --mpp;
    tiles are sized by the files' attributes, else the coords' grid step (a warning says so; --tile-size fixes it).
    """
    from ..explain.heatmap import run_heatmaps

    written = run_heatmaps(run_dirs, out, bags=[b.strip() for b in bags.split(",") if b.strip()] if bags else None,
                           slides=slides, normalise=normalise, cmap=cmap, alpha=alpha, max_size=max_size,
                           branches=branches, patches=patches, tissue_only=tissue_only,
                           echo=lambda m: click.echo(m, err=True), progress=True, max_pixels=max_image_pixels,
                           tile_size=tile_size, mpp=mpp)
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
    from ..explain.gallery import run_cell_galleries

    written = run_cell_galleries(run_dirs, out, bags=[b.strip() for b in bags.split(",") if b.strip()] if bags else None,
                                 top=top, images=images, progress=True)
    click.echo("wrote " + ", ".join(str(p) for p in written))


def _bag_list(bags):
    return [b.strip() for b in bags.split(",") if b.strip()] if bags else None


_MAX_PIXELS_HELP = ("Largest plain-image slide (PNG, JPEG, plain TIFF; decoded whole) read, in pixels "
                    f"[default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_IMAGE_PIXELS:_}].")


@explain.command("export")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["geojson"]), default="geojson", show_default=True,
              help="geojson: QuPath-compatible GeoJSON (File > Import objects).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for OUT/<bag_id>.geojson.")
@click.option("--bags", help="Comma-separated bag ids (default: every test bag of the first run).")
@click.option("--slides", type=click.Path(exists=True, file_okay=False),
              help="Folder of slides named <bag_id>.<ext>: the annotation is clipped to each slide's size.")
@click.option("--object-type", type=click.Choice(["detection", "tile"]), default="detection", show_default=True,
              help="QuPath object type of the tiles.")
@click.option("--no-branches", is_flag=True, help="Leave out the branch attention of multi-branch runs.")
@click.option("--mpp", type=POSITIVE, metavar="UM_PER_PX",
              help="Resolution for micrometre coords (STAMP) when neither the file nor its slide records one.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), help=_MAX_PIXELS_HELP)
def explain_export(run_dirs, fmt, out, bags, slides, object_type, no_branches, mpp, max_image_pixels):
    """Export the test attention of RUN_DIR(s) for other tools: per slide, its tiles as QuPath detections
    (level-0 polygons) with the attention, its rank and percentile as measurements (per branch too, for
    multi-branch runs), and one annotation over the tissue with the predicted class.

    Writes OUT/<bag_id>.geojson per slide (patient bags: OUT/<bag_id>__<slide_id>.geojson); with several
    RUN_DIRs every measurement is named after its run.
    """
    from ..explain.qupath import export_geojson

    written = export_geojson(run_dirs, out, bags=_bag_list(bags), slides=slides, object_type=object_type,
                             branches=not no_branches, mpp=mpp, echo=lambda m: click.echo(m, err=True),
                             progress=True, max_pixels=max_image_pixels)
    click.echo("wrote " + ", ".join(str(p) for p in written))


@explain.command("view")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--slides", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of slides named <bag_id>.<ext> (patient bags: each slide's id).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the web pages.")
@click.option("--bags", help="Comma-separated bag ids (default: every test bag of the first run with a slide).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(1),
              help="Most attended tiles listed per layer.")
@click.option("--opacity", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="The overlays' opacity when a page opens (a slider changes it).")
@click.option("--scale", type=click.Choice(["rank", "raw"]), default="rank", show_default=True,
              help="The overlays' scale when a page opens: percentile rank in the bag, or the raw weight.")
@click.option("--max-size", default=2048, show_default=True, type=click.IntRange(16),
              help="Long side of the overlay images (px).")
@click.option("--tile-size", default=254, show_default=True, type=click.IntRange(16), help="Deep Zoom tile size (px).")
@click.option("--no-branches", is_flag=True, help="No layer per branch of multi-branch runs.")
@click.option("--mpp", type=POSITIVE, metavar="UM_PER_PX",
              help="Resolution for micrometre coords (STAMP) when neither the file nor its slide records one.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), help=_MAX_PIXELS_HELP)
def explain_view(run_dirs, slides, out, bags, top, opacity, scale, max_size, tile_size, no_branches, mpp,
                 max_image_pixels):
    """A slide viewer of the test attention of RUN_DIR(s): static web pages, no server needed.

    Each slide as a Deep Zoom pyramid (OpenSeadragon), one panel per run side by side with synced viewports,
    the attention as an overlay per run (and per branch of multi-branch runs) with opacity, rank or raw scale
    and a legend, the most attended tiles (click: go there), and each run's prediction and the label.
    Writes OUT/index.html, OUT/slides/<bag_id>.html and what they load; open index.html in a browser, or
    serve the folder: python -m http.server --directory OUT. Nothing is fetched from the network.
    """
    from ..explain.viewer import build_viewer

    site = build_viewer(run_dirs, out, slides=slides, bags=_bag_list(bags), top=top, max_size=max_size,
                        opacity=opacity, scale=scale, tile_size=tile_size, branches=not no_branches, mpp=mpp,
                        echo=lambda m: click.echo(m, err=True), progress=True, max_pixels=max_image_pixels)
    click.echo(f"wrote {site.index} ({len(site.pages)} slide page(s)); open it in a browser "
               f"({site.index.resolve().as_uri()}) or serve the folder: python -m http.server --directory {out}")
