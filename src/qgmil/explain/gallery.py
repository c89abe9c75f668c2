"""Galleries of the most and least attended instances of a bag: slide tiles or cell images, with their weights.

  top_bottom(weights, k)                          -> (top, bottom) instance indices, each by decreasing weight
  tile_crops(slide, coords, patch, indices)       -> (tile_px, tile_px, 3) uint8 crops of slide tiles
  cell_paths(files, bag_id, images=None)          -> each cell's image path, from `instance_names` + `image_root`
  ranked_rows(label, weights, k, load)            -> the "top" and "bottom" GalleryRows of one attention
  render_gallery(rows, path, title=...)           -> PNG: one labelled row of tiles per row, "#rank  weight" under each
  run_cell_galleries(run_dirs, out, bags=...)     -> OUT/<bag_id>_cells.png per bag, two rows per run

Rank 1 is the most attended instance; ties keep the instances' order in the bag.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .heatmap import HeatmapError

TILE_PX = 128  # side of every tile in a gallery
GAP = 6  # px between tiles and rows
LABEL_W = 150  # left column holding the row labels
CAPTION_H = 18  # strip under each tile for "#rank  weight"
TITLE_H = 30
FRAME = 200  # grey of the 1 px frame around each tile
DPI = 100


@dataclass
class GalleryRow:
    """One labelled row of a gallery: images (h, w, 3) uint8 (fitted into square tiles) and their captions."""

    label: str
    images: list[np.ndarray]
    captions: list[str]


def top_bottom(weights, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom): the min(k, N) most attended instance indices and the min(k, N - top) least attended,
    both ordered by decreasing weight (ranks 1..k and N-k+1..N), never overlapping."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = np.argsort(-w, kind="stable")
    n_top = min(k, w.size)
    n_bottom = min(k, w.size - n_top)
    return order[:n_top], order[w.size - n_bottom:]


def ranks(weights) -> np.ndarray:
    """(N,) int rank of each instance, 1 = the largest weight (ties in bag order, as `top_bottom`)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    out = np.empty(w.size, dtype=np.int64)
    out[np.argsort(-w, kind="stable")] = np.arange(1, w.size + 1)
    return out


def fit_tile(image: np.ndarray, size: int = TILE_PX) -> np.ndarray:
    """(size, size, 3) uint8: the image scaled (up or down) so that its long side is `size`, centred on white."""
    from PIL import Image

    image = np.asarray(image)[..., :3]
    h, w = image.shape[:2]
    scale = size / max(h, w, 1)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.Resampling.BILINEAR))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = resized
    return out


def tile_crops(slide, coords, patch_size_level0: float, indices: Sequence[int], tile_px: int = TILE_PX
               ) -> list[np.ndarray]:
    """(tile_px, tile_px, 3) uint8 crops of the tiles `indices` (coords: (N, 2) level-0 top-left corners)
    of `slide` (a path, or a `Slide` already open).

    Each tile is read at the coarsest pyramid level still at least tile_px across (`best_level(patch /
    tile_px)`), so a 100k-tile slide never decodes more than the few tiles shown, then resized.
    """
    from ..extract.slide import Slide, SlideError, open_slide

    coords = np.asarray(coords, dtype=np.float64)
    patch = float(patch_size_level0)
    try:
        with nullcontext(slide) if isinstance(slide, Slide) else open_slide(slide) as opened:
            level = opened.best_level(patch / tile_px)
            side = max(1, round(patch / opened.level_downsamples[level]))
            return [fit_tile(opened.read_region((round(coords[i, 0]), round(coords[i, 1])), level, (side, side)),
                             tile_px) for i in indices]
    except SlideError as err:
        raise HeatmapError(str(err)) from None


def ranked_rows(label: str, weights, k: int, load: Callable[[np.ndarray], list[np.ndarray]]) -> list[GalleryRow]:
    """The rows "<label> / top k" and "<label> / bottom k" of one bag's attention; `load(indices)` gives
    the instances' images. Captions: "#rank  weight" (weight as given, 3 significant digits)."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    rank = ranks(w)
    rows = []
    for name, idx in zip(("top", "bottom"), top_bottom(w, k)):
        if idx.size:
            rows.append(GalleryRow(f"{label}\n{name} {idx.size}", load(idx),
                                   [f"#{rank[i]}  {w[i]:.3g}" for i in idx]))
    return rows


def gallery_size(n_rows: int, n_cols: int, tile_px: int = TILE_PX, title: bool = True) -> tuple[int, int]:
    """(width, height) in px of a gallery of n_rows rows of at most n_cols tiles."""
    width = LABEL_W + n_cols * (tile_px + GAP) + GAP
    height = (TITLE_H if title else 0) + n_rows * (tile_px + CAPTION_H + GAP) + GAP
    return width, height


def render_gallery(rows: Sequence[GalleryRow], path, *, title: str | None = None, tile_px: int = TILE_PX) -> Path:
    """PNG of `rows`, exactly `gallery_size(len(rows), longest row, tile_px, title)` px: the row label on
    the left, the tiles (each fitted into tile_px x tile_px, pixel-exact, in a 1 px grey frame) and their
    captions under them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("galleries need matplotlib: pip install 'qgmil[plots]'") from e
    from ..plotting import save_exact

    rows = [r for r in rows if r.images]
    if not rows:
        raise ValueError("a gallery needs at least one row with images")
    for row in rows:
        if len(row.captions) != len(row.images):
            raise ValueError(f"row {row.label!r}: {len(row.captions)} captions for {len(row.images)} images")
    n_cols = max(len(r.images) for r in rows)
    width, height = gallery_size(len(rows), n_cols, tile_px, title is not None)
    top = TITLE_H if title is not None else 0
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def text(x, y, s, **kw):  # (x, y) in px from the top left
        fig.text(x / width, 1.0 - y / height, s, **kw)

    if title is not None:
        text(width / 2, TITLE_H / 2 + 2, title, ha="center", va="center", fontsize=12)
    for r, row in enumerate(rows):
        y = top + GAP + r * (tile_px + CAPTION_H + GAP)
        label = "\n".join(textwrap.fill(line, 22) for line in row.label.split("\n"))
        text(GAP, y + tile_px / 2, label, ha="left", va="center", fontsize=9)
        for c, (image, caption) in enumerate(zip(row.images, row.captions)):
            x = LABEL_W + GAP + c * (tile_px + GAP)
            canvas[y - 1:y + tile_px + 1, x - 1:x + tile_px + 1] = FRAME  # 1 px outside: blank tiles stay visible
            canvas[y:y + tile_px, x:x + tile_px] = fit_tile(image, tile_px)
            text(x + tile_px / 2, y + tile_px + CAPTION_H / 2 + 1, caption, ha="center", va="center", fontsize=8)
    fig.figimage(canvas, 0, 0, origin="upper", zorder=0)
    return save_exact(fig, path, DPI)


# --- cell bags ----------------------------------------------------------------------------------

def _instance_names(path: Path) -> tuple[list[str], str | None]:
    """(instance_names, attrs image_root or None) of a feature file, or HeatmapError naming it."""
    import h5py

    from ..data import read_attrs, read_bag

    if path.suffix.lower() in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            names = f["instance_names"][()] if isinstance(f.get("instance_names"), h5py.Dataset) else None
    else:
        names = read_bag(path).extras.get("instance_names")
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

    from .heatmap import _bag_units, bag_attention, run_names
    from .mass import load_run

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    bags = [str(b) for b in bags] if bags else list(dict.fromkeys(runs[0].rows["bag_id"]))[:3]
    names = run_names(runs)
    units = _bag_units(runs[0])
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
        title = f"{bag_id} (label {labels[bag_id]})" if bag_id in labels else bag_id
        written.append(render_gallery(rows, out / f"{bag_id}_cells.png", title=title, tile_px=tile_px))
    return written
