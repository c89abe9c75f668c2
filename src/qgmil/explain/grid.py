"""The ranked image grid: a bag's most and least attended instances as labelled rows of tiles, each
captioned with its rank and weight. Shared by heatmap.py (slide tiles, `--patches`) and gallery.py (cells).

  top_bottom(weights, k)                          -> (top, bottom) instance indices, each by decreasing weight
  ranks(weights)                                  -> each instance's rank, 1 = the most attended
  fit_tile(image, size)                           -> (size, size, 3) uint8: the image fitted on white
  tile_crops(slide, coords, patch, indices)       -> (tile_px, tile_px, 3) uint8 crops of slide tiles
  ranked_rows(label, weights, k, load)            -> the "top" and "bottom" GalleryRows of one attention
  gallery_size(n_rows, n_cols)                    -> (width, height) px of a grid
  render_gallery(rows, path, title=...)           -> PNG: one labelled row of tiles per row, "#rank  weight" under each

Rank 1 is the most attended instance; ties keep the instances' order in the bag.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..plotting import new_figure, save_exact
from .reader import ExplainError

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
        raise ExplainError(str(err)) from None


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
    fig = new_figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")

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
