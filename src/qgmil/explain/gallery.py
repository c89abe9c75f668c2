"""Cell galleries of runs (`qgmil explain cells`): the most and least attended cells of a bag, with their weights.

  cell_paths(files, bag_id, images=None)          -> each cell's image path, from `instance_names` + `image_root`
  read_cell(path, bag_id, images=None)            -> (h, w, 3) uint8 RGB of one cell image
  run_cell_galleries(run_dirs, out, bags=...)     -> OUT/<bag_id>_cells.png per bag, two rows per run

The runs are read by reader.py, the rows drawn by grid.py (whose names are importable from here too:
top_bottom, ranks, fit_tile, tile_crops, ranked_rows, gallery_size, render_gallery, GalleryRow).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .grid import (  # noqa: F401 - the grid's API, importable from here as before
    CAPTION_H, GAP, LABEL_W, TILE_PX, TITLE_H, GalleryRow, fit_tile, gallery_size, ranked_rows, ranks, render_gallery,
    tile_crops, top_bottom,
)
from .reader import HeatmapError, bag_attention, bag_units, load_run, run_names


def _instance_names(path: Path) -> tuple[list[str], str | None]:
    """(instance_names, attrs image_root or None) of a feature file, or HeatmapError naming it."""
    from ..data import read_attrs, read_extra

    names = read_extra(path, "instance_names")
    if names is None:
        raise HeatmapError(f"{path}: the feature file has no `instance_names`, so its cells cannot be shown "
                           "(cell bags come from `qgmil extract cells`)")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(names).reshape(-1)]
    root = read_attrs(path).get("image_root")
    return names, (str(root) if root else None)


def _relocate(image_root: str | None, first_name: str, images: Path) -> Path:
    """Where a sample's cells lie under `images` (the data moved): images / name, else images / <last
    folders of the old image_root> / name, trying the sample folder first, then its parents."""
    tails = Path(image_root).relative_to(Path(image_root).anchor).parts if image_root else ()
    for j in range(len(tails) + 1):
        candidate = images.joinpath(*tails[len(tails) - j:])
        if (candidate / first_name).is_file():
            return candidate
    return images


def cell_paths(files: Sequence[Path], bag_id: str, images=None) -> list[Path]:
    """Each instance's image path, in bag order (the files' instances concatenated): image_root / name,
    or relocated under `images` (see `_relocate`)."""
    paths = []
    for file in files:
        file = Path(file)
        names, root = _instance_names(file)
        if images is not None and names:
            base = _relocate(root, names[0], Path(images))
        elif root is not None:
            base = Path(root)
        else:
            raise HeatmapError(f"{file}: no `image_root` attribute: say where bag {bag_id!r}'s cell images are "
                               "with --images ROOT")
        paths += [base / n for n in names]
    return paths


def read_cell(path: Path, bag_id: str, images=None) -> np.ndarray:
    """(h, w, 3) uint8 RGB of one cell image; HeatmapError naming it (and suggesting --images) if missing."""
    from PIL import Image

    if not path.is_file():
        hint = (f"not under --images {images} either" if images is not None
                else "if the cell images moved, pass --images ROOT (their new root folder)")
        raise HeatmapError(f"{path}: cell image of bag {bag_id!r} not found; {hint}")
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except OSError as err:
        raise HeatmapError(f"{path}: cannot read the cell image ({err})") from None


def run_cell_galleries(run_dirs: Sequence, out, *, bags: Sequence[str] | None = None, top: int = 8, images=None,
                       tile_px: int = TILE_PX, progress: bool = False) -> list[Path]:
    """Write OUT/<bag_id>_cells.png per bag (default: the first 3 test bags of the first run): for every
    run (labelled with its model name) a row of its `top` most and a row of its `top` least attended
    cells, with their test attention (mean over seeds) and rank."""
    from tqdm.auto import tqdm

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    bags = [str(b) for b in bags] if bags else list(dict.fromkeys(runs[0].rows["bag_id"]))[:3]
    names = run_names(runs)
    units = bag_units(runs[0])
    labels = dict(zip(runs[0].rows["bag_id"], runs[0].rows["label"]))
    out = Path(out)
    written = []
    for bag_id in tqdm(bags, desc="cell galleries", unit="bag", disable=not progress):
        if bag_id not in units:
            raise HeatmapError(f"{runs[0].run_dir}: bag {bag_id!r} is not in the run's dataset")
        paths = cell_paths(units[bag_id].files, bag_id, images)
        def load(idx, paths=paths, bag_id=bag_id):
            return [read_cell(paths[i], bag_id, images) for i in idx]

        rows = []
        for run, name in zip(runs, names):
            a, n_rows = bag_attention(run, bag_id)
            if a.size != len(paths):
                raise HeatmapError(f"{run.run_dir}: bag {bag_id!r}: attention over {a.size} instances, "
                                   f"its feature files name {len(paths)} cells")
            label = name if n_rows == 1 else f"{name} (mean of {n_rows} seeds)"
            rows += ranked_rows(label, a, top, load)
        label = labels.get(bag_id)
        title = f"{bag_id} (label {label})" if isinstance(label, str) else bag_id  # other tasks: no class label
        written.append(render_gallery(rows, out / f"{bag_id}_cells.png", title=title, tile_px=tile_px))
    return written
