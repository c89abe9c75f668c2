"""Attention heatmaps (`qgmil explain heatmap`): paint each tile's attention over its footprint on the slide,
at thumbnail scale.

  attention_heatmap(coords, attention, patch_size_level0, scale=...)  -> (H', W') float, NaN off-tissue
  render_overlay(heat, path, background=thumbnail)                     -> PNG (matplotlib Agg, atomic)
  read_thumbnail(slide_path, max_size)                                 -> (RGB uint8, level-0 (W, H))
  read_slide_size(slide_path)                                          -> level-0 (W, H)
  slides_by_id(dir), match_slides(dir, ids, ...)                       -> {slide id: file} (`--slides`)
  bag_geometry(feature_file)                                           -> (level-0 coords, patch side)
  run_heatmaps(run_dirs, out, bags=...)                                -> OUT/<bag_id>.png per bag
      branches=True: a panel per attention branch (per class where branch k is class k's); patches=k: also
      OUT/<bag_id>_patches.png, the k most / least attended tiles (grid.py); tissue_only=True: no heat off
      the thumbnail's tissue

The runs are read by reader.py (`HeatmapError` is its error type).

The heat is never built at level-0 resolution: tile rectangles are mapped to the output grid
(level-0 px / scale) and painted with a 2-D difference array, O(N + H' W') time and memory, so a
100k-tile slide renders in well under a second. Overlapping tiles get the mean of their values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..extract.slide import PLAIN_SUFFIXES, WSI_SUFFIXES, SlideError, open_slide
from ..numbers import positive_number
from ..plotting import new_figure, save_exact
from .grid import ranked_rows, render_gallery, tile_crops
from .reader import HeatmapError, bag_attention, bag_branch_attention, bag_units, load_run, run_names

NORMALISE = ("rank", "minmax", "none")


def normalise_attention(attention, how: str = "rank") -> np.ndarray:
    """rank: percentile rank in [0, 1] ((rank - 1) / (N - 1), ties share their mean rank; N = 1 -> 1);
    minmax: (a - min) / (max - min) (constant -> 0.5, as rank gives); none: the weights as they are."""
    a = np.asarray(attention, dtype=np.float64).reshape(-1)
    if how not in NORMALISE:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISE)}, got {how!r}")
    if how == "none" or a.size == 0:
        return a
    if how == "rank":
        from scipy.stats import rankdata

        return np.ones(1) if a.size == 1 else (rankdata(a, method="average") - 1.0) / (a.size - 1)
    lo, hi = a.min(), a.max()
    return np.full_like(a, 0.5) if hi <= lo else (a - lo) / (hi - lo)


def default_scale(slide_size: tuple[float, float], max_size: int = 2048) -> float:
    """Level-0 px per output px so that the long side of the heat is <= max_size (never below 1)."""
    return max(1.0, max(slide_size) / max(1, int(max_size)))


def attention_heatmap(coords, attention, patch_size_level0: float, *, slide_size=None, scale: float | None = None,
                      max_size: int = 2048, normalise: str = "rank") -> np.ndarray:
    """(H', W') float64 heat: every tile paints its (normalised) value over its footprint, NaN where no tile.

    coords: (N, 2) level-0 px top-left corners (x, y); attention: (N,); patch_size_level0: tile side in
    level-0 px; slide_size: level-0 (W, H), default the coords extent + one patch; scale: level-0 px per
    output px (default: long side <= max_size). H' = ceil(H / scale), W' = ceil(W / scale). A tile covers
    output columns round(x / scale) .. round((x + patch) / scale) (at least one pixel), so tiles of a
    regular grid tile the output without gaps or overlaps; overlapping tiles average.
    """
    coords = np.asarray(coords, dtype=np.float64)
    values = np.asarray(attention, dtype=np.float64).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2), got shape {coords.shape}")
    if coords.shape[0] != values.size:
        raise ValueError(f"{coords.shape[0]} coords for {values.size} attention weights")
    if values.size == 0:
        raise ValueError("no tiles")
    if not (np.all(np.isfinite(coords)) and np.all(np.isfinite(values))):
        raise ValueError("coords / attention hold NaN or Inf")
    patch = float(patch_size_level0)
    if not patch > 0:
        raise ValueError(f"patch_size_level0 must be > 0, got {patch_size_level0}")
    values = normalise_attention(values, normalise)
    if slide_size is None:
        slide_size = (coords[:, 0].max() + patch, coords[:, 1].max() + patch)
    width, height = float(slide_size[0]), float(slide_size[1])
    if not (width > 0 and height > 0):
        raise ValueError(f"slide_size must be positive, got {slide_size}")
    scale = default_scale((width, height), max_size) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    out_w, out_h = max(1, math.ceil(width / scale - 1e-9)), max(1, math.ceil(height / scale - 1e-9))

    x0 = np.rint(coords[:, 0] / scale).astype(np.int64)
    y0 = np.rint(coords[:, 1] / scale).astype(np.int64)
    x1 = np.maximum(np.rint((coords[:, 0] + patch) / scale).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.rint((coords[:, 1] + patch) / scale).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, out_w), np.clip(x1, 0, out_w)
    y0, y1 = np.clip(y0, 0, out_h), np.clip(y1, 0, out_h)
    keep = (x1 > x0) & (y1 > y0)  # tiles entirely outside the slide are dropped
    x0, x1, y0, y1, values = x0[keep], x1[keep], y0[keep], y1[keep], values[keep]

    # 2-D difference arrays: +v at (y0, x0) and (y1, x1), -v at (y0, x1) and (y1, x0); cumsum both axes.
    total = np.zeros((out_h + 1, out_w + 1), dtype=np.float64)
    count = np.zeros((out_h + 1, out_w + 1), dtype=np.int32)
    for ys, xs, sign in ((y0, x0, 1), (y1, x1, 1), (y0, x1, -1), (y1, x0, -1)):
        np.add.at(total, (ys, xs), sign * values)
        np.add.at(count, (ys, xs), sign)
    total = total.cumsum(0).cumsum(1)[:out_h, :out_w]
    count = count.cumsum(0).cumsum(1)[:out_h, :out_w]
    with np.errstate(invalid="ignore", divide="ignore"):
        heat = total / count
    heat[count <= 0] = np.nan
    return heat


# --- figures ------------------------------------------------------------------------------------

def _display_factor(heats: Sequence[np.ndarray]) -> int:
    """Small heats are drawn enlarged (each heat pixel as an f x f block) so the PNG stays legible."""
    return max(1, 512 // max(max(h.shape) for h in heats))


def render_panels(heats: Sequence[np.ndarray], path, *, background: np.ndarray | None = None,
                  titles: Sequence[str | None] | None = None, cmap: str = "jet", alpha: float = 0.5,
                  colorbar: bool = True, vmin: float | None = None, vmax: float | None = None) -> Path:
    """Side-by-side overlays of heats of the same shape (one per model) on the same background.

    The PNG shows each heat pixel as f x f pixels, f = max(1, 512 // long side); without titles and
    colorbar it is exactly (W' f * panels + gaps) x (H' f). NaN is transparent (the background shows).
    """
    heats = [np.asarray(h, dtype=np.float64) for h in heats]
    if not heats or any(h.ndim != 2 for h in heats):
        raise ValueError("heats must be a non-empty list of 2-D arrays")
    if len({h.shape for h in heats}) != 1:
        raise ValueError(f"all heats must have the same shape, got {[h.shape for h in heats]}")
    if background is not None:
        background = np.asarray(background)
        if background.ndim != 3 or background.shape[2] not in (3, 4):
            raise ValueError(f"background must be (H, W, 3) uint8, got shape {background.shape}")
    titles = list(titles) if titles is not None else [None] * len(heats)
    if len(titles) != len(heats):
        raise ValueError(f"{len(titles)} titles for {len(heats)} heats")
    if vmin is None or vmax is None:
        finite = np.concatenate([h[np.isfinite(h)] for h in heats])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)

    dpi = 100
    f = _display_factor(heats)
    h_px, w_px = heats[0].shape[0] * f, heats[0].shape[1] * f
    gap = 10 if len(heats) > 1 else 0
    top = 40 if any(titles) else 0
    right = 90 if colorbar else 0
    fig_w = len(heats) * w_px + (len(heats) - 1) * gap + right
    fig_h = h_px + top
    fig = new_figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    from matplotlib import colormaps  # importable: new_figure found matplotlib

    colors = colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # NaN: transparent
    extent = (0, heats[0].shape[1], heats[0].shape[0], 0)
    image = None
    for i, (heat, title) in enumerate(zip(heats, titles)):
        ax = fig.add_axes(((i * (w_px + gap)) / fig_w, 0.0, w_px / fig_w, h_px / fig_h))
        ax.set_axis_off()
        ax.set_facecolor("white")
        if background is not None:
            ax.imshow(background[..., :3], extent=extent, interpolation="antialiased")
        image = ax.imshow(np.ma.masked_invalid(heat), cmap=colors, alpha=alpha, vmin=vmin, vmax=vmax,
                          extent=extent, interpolation="nearest")
        ax.set_xlim(0, heat.shape[1])
        ax.set_ylim(heat.shape[0], 0)
        if title:
            fig.text((i * (w_px + gap) + w_px / 2) / fig_w, 1.0 - (top / 2) / fig_h, title,
                     ha="center", va="center", fontsize=12)
    if colorbar:
        cax = fig.add_axes(((fig_w - right + 15) / fig_w, 0.1 * h_px / fig_h, 18 / fig_w, 0.8 * h_px / fig_h))
        bar = fig.colorbar(image, cax=cax)
        bar.solids.set_alpha(1.0)
    # not save_figure: its bbox_inches="tight" would change the size; save the figure as laid out
    return save_exact(fig, path, dpi)


def render_overlay(heat: np.ndarray, path, *, background: np.ndarray | None = None, cmap: str = "jet",
                   alpha: float = 0.5, title: str | None = None, colorbar: bool = True,
                   vmin: float | None = None, vmax: float | None = None) -> Path:
    """One heat over `background` ((H, W, 3) uint8 thumbnail, stretched to the heat's extent; None: white)."""
    return render_panels([heat], path, background=background, titles=[title], cmap=cmap, alpha=alpha,
                         colorbar=colorbar, vmin=vmin, vmax=vmax)


# --- slides -------------------------------------------------------------------------------------

def read_thumbnail(slide_path, max_size: int = 2048, *, max_pixels: int | None = None
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 thumbnail with long side <= max_size, level-0 (W, H)) of a slide or plain image.

    WSI formats (.svs, .ndpi, .mrxs, pyramidal .tif...) use openslide if importable, else tiffslide;
    PNG / JPEG / BMP (and .tif without a WSI reader) use Pillow, up to `max_pixels` (see `open_slide`).
    """
    path = Path(slide_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slide")
    try:
        with open_slide(path, max_pixels=max_pixels) as slide:
            return slide.thumbnail(max_size), slide.dimensions
    except SlideError as err:
        raise HeatmapError(str(err)) from None


def read_slide_size(slide_path, *, max_pixels: int | None = None) -> tuple[int, int]:
    """Level-0 (W, H) of a slide or plain image (of a plain image, only its header is read)."""
    path = Path(slide_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such slide")
    try:
        with open_slide(path, max_pixels=max_pixels) as slide:
            return tuple(int(v) for v in slide.dimensions)
    except SlideError as err:
        raise HeatmapError(str(err)) from None


_SLIDE_ORDER = {s: i for i, s in enumerate(dict.fromkeys(WSI_SUFFIXES + PLAIN_SUFFIXES))}


def slides_by_id(slides_dir) -> dict[str, Path]:
    """{slide id: file} of the slide files (by suffix) directly in `slides_dir`; WSI formats win over plain
    images of the same id. Names are compared, not globbed, so ids may hold `[`, `*` or `?`."""
    found: dict[str, Path] = {}
    for path in sorted(Path(slides_dir).iterdir()):
        if path.suffix.lower() not in _SLIDE_ORDER or path.name.startswith(".") or not path.is_file():
            continue
        best = found.get(path.stem)
        if best is None or _SLIDE_ORDER[path.suffix.lower()] < _SLIDE_ORDER[best.suffix.lower()]:
            found[path.stem] = path
    return found


def find_slide(slides_dir, bag_id: str) -> Path | None:
    """`<slides_dir>/<bag_id>.<ext>` of a slide format (WSI formats first), or None."""
    return slides_by_id(slides_dir).get(bag_id)


def match_slides(slides, wanted: Sequence[str], *, warn, missing_means: str) -> dict[str, Path]:
    """{slide id: file} for the `wanted` slide ids found in the folder `slides`.

    None found is an error (a wrong folder, or files named otherwise) naming the folder, the ids looked for and
    the names it holds; some missing is a warning naming them and what that means (`missing_means`, e.g.
    "drawn on white")."""
    folder = Path(slides)
    if not folder.is_dir():
        raise HeatmapError(f"--slides {folder}: no such folder")
    available = slides_by_id(folder)
    found = {s: available[s] for s in wanted if s in available}
    missing = [s for s in wanted if s not in available]
    if not found:
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        holds = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"
        more = " ..." if len(missing) > 8 else ""
        raise HeatmapError(f"{folder}: no slide for any of the bags drawn: looked for {', '.join(missing[:8])}{more} "
                           f"(as <id>.<ext>, ext one of {' '.join(_SLIDE_ORDER)}); the folder holds {holds}")
    if missing:
        warn(f"warning: {folder}: no slide for {', '.join(missing)}: {missing_means}")
    return found


# --- feature files ------------------------------------------------------------------------------

def slide_mpp(slide_path, *, mpp: float | None = None, max_pixels: int | None = None) -> float | None:
    """um per level-0 px of a slide: its metadata (openslide / tiffslide `mpp-x`, `mpp-y`; a plain image's DPI,
    as `open_slide` reads them), else `mpp`, else None."""
    try:
        with open_slide(Path(slide_path), mpp=mpp, max_pixels=max_pixels) as slide:
            return slide.mpp
    except SlideError as err:
        raise HeatmapError(str(err)) from None


def bag_geometry(path, *, slide=None, mpp: float | None = None, tile_size: float | None = None, warn=None,
                 micrometres_ok: bool = False, max_pixels: int | None = None) -> tuple[np.ndarray, float]:
    """(coords (N, 2) in level-0 px, tile side in level-0 px) of a feature file.

    Tile side: `tile_size` (level-0 px, given by the user: --tile-size) when given, else attrs
    patch_size_level0 (TRIDENT) / patch_size_px (qgmil) / patch_size at patch_level 0 (CLAM) / tile_size_um
    (STAMP, in micrometres), else the grid step of the coords, with a warning through `warn` (default
    `warnings.warn`) saying so (CLAM's h5 files record no tile size; the step is too small for overlapping tiles).
    Micrometre coords (STAMP) are divided by the resolution (um per level-0 px): the file's `mpp` attribute,
    else the metadata of `slide` (the slide file they were cut from; STAMP records no mpp and its own heatmaps
    read the slide's), else `mpp`. With none of them, `micrometres_ok` keeps micrometres as the unit (a map
    drawn on white looks the same in any unit; the tile side is then in micrometres too), else HeatmapError.
    """
    from ..data import read_attrs, read_coords

    coords, unit = read_coords(path)
    if coords is None:
        raise HeatmapError(f"{path}: the feature file has no coords, so its attention cannot be placed")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    attrs = read_attrs(path)
    given = positive_number(tile_size)
    if tile_size is not None and given is None:
        raise HeatmapError(f"--tile-size must be a number > 0 (level-0 px), got {tile_size!r}")
    patch = None
    if unit == "um":
        resolution = positive_number(attrs.get("mpp"))
        if resolution is None and slide is not None:
            resolution = slide_mpp(slide, max_pixels=max_pixels)
        resolution = resolution or positive_number(mpp)
        if resolution is None and not micrometres_ok:
            where = (f"nor the slide {slide} (no mpp in its metadata)" if slide is not None
                     else "and no slide was found for it (--slides)")
            raise HeatmapError(f"{path}: coords are in micrometres (STAMP) but neither the file has an `mpp` attribute "
                               f"{where} to convert them to level-0 pixels: give the slide (--slides) or its "
                               "resolution (--mpp UM_PER_PX)")
        if resolution is None:  # drawn on white: micrometres stand in for pixels
            if given is not None:
                raise HeatmapError(f"{path}: --tile-size is in level-0 px, but the file's micrometre coords have no "
                                   "resolution to convert it: give the slide (--slides) or --mpp")
            resolution = 1.0
        coords = coords / resolution
        tile_um = positive_number(attrs.get("tile_size_um"))
        if given is None and tile_um:
            patch = tile_um / resolution
    elif unit not in (None, "px"):
        raise HeatmapError(f"{path}: unknown coord unit {unit!r}")
    if given is not None:
        return coords, given
    if patch is None:
        for key in ("patch_size_level0", "patch_size_px"):
            if attrs.get(key):
                patch = float(attrs[key])
                break
    if patch is None and attrs.get("patch_size") and int(attrs.get("patch_level", -1) or 0) == 0:
        patch = float(attrs["patch_size"])
    if patch is None:
        steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
        steps = np.concatenate([s[s > 0] for s in steps])
        if not steps.size:
            raise HeatmapError(f"{path}: no tile size attribute and a single tile: cannot size the tiles "
                               "(give --tile-size PX, level-0 px)")
        patch = float(steps.min())
        message = (f"{path}: the file records no tile size (CLAM's h5 files record none), so tiles are drawn "
                   f"{patch:g} px wide, the step of the coords' grid (right for tiles side by side, too small for "
                   "overlapping ones): give the tile side with --tile-size PX (level-0 px)")
        if warn is None:
            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
    return coords, patch


def restrict_to_tissue(heat: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """A copy of the (H', W') heat that is NaN (unpainted) where the (h, w) bool tissue mask of the thumbnail
    is False; each heat pixel takes the mask value under its centre (the two cover the same slide)."""
    heat = np.array(heat, dtype=np.float64)
    tissue = np.asarray(tissue, dtype=bool)
    rows = np.minimum(((np.arange(heat.shape[0]) + 0.5) * tissue.shape[0] / heat.shape[0]).astype(np.int64),
                      tissue.shape[0] - 1)
    cols = np.minimum(((np.arange(heat.shape[1]) + 0.5) * tissue.shape[1] / heat.shape[1]).astype(np.int64),
                      tissue.shape[1] - 1)
    heat[~tissue[np.ix_(rows, cols)]] = np.nan
    return heat


def run_heatmaps(run_dirs: Sequence, out, *, bags: Sequence[str] | None = None, slides=None,
                 normalise: str = "rank", cmap: str = "jet", alpha: float = 0.5, max_size: int = 2048,
                 branches: bool = False, patches: int = 0, tissue_only: bool = False, echo=None,
                 progress: bool = False, max_pixels: int | None = None, tile_size: float | None = None,
                 mpp: float | None = None) -> list[Path]:
    """Write OUT/<bag_id>.png per bag (default: the first 3 test bags of the first run): one panel per
    run, titled with its model name, over the slide thumbnail from `slides`; without a slide, on white
    and cropped to the tiles' bounding box.

    branches: one panel per attention branch of a single multi-branch run (per class where branch k
        is class k's) instead.
    patches: also OUT/<bag_id>_patches.png, the `patches` most and least attended tiles of every panel's
        attention, cropped from the slide (needs `slides`).
    tissue_only: no heat off the tissue that `segment_tissue` finds on the thumbnail (needs `slides`).
    With `slides`, no matching slide at all is an error; some missing is a warning (`echo`, else `warnings`).
    max_pixels: the largest plain-image slide read (see `open_slide`).
    tile_size: the tiles' side in level-0 px, for files that record none (CLAM's h5) or a wrong one; it replaces
        what the files say. mpp: um per level-0 px for micrometre coords (STAMP) whose file and slide record none.
    How each file's tiles are placed and sized: `bag_geometry`; a tile size guessed from the coords' grid is
    said once (`echo`, else `warnings`), with the number of files it concerns.
    A patient bag spanning several slides gives OUT/<bag_id>__<slide_id>.png (and _patches) per slide,
    each with its slide's share of the bag's attention (ranks taken over the whole bag).
    """
    from tqdm.auto import tqdm

    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISE)}, got {normalise!r}")
    if (patches or tissue_only) and not slides:
        raise HeatmapError(f"{'--patches' if patches else '--tissue-only'} needs the slides (--slides): "
                           "it reads them, not the feature files")
    _check_cmap(cmap)
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    if branches and len(runs) > 1:
        raise HeatmapError(f"--branches draws the branches of one run, got {len(runs)} run directories")
    bags = [str(b) for b in bags] if bags else list(dict.fromkeys(runs[0].rows["bag_id"]))[:3]
    names = run_names(runs)
    units = bag_units(runs[0])
    unknown = [b for b in bags if b not in units]
    if unknown:
        raise HeatmapError(f"{runs[0].run_dir}: bag {unknown[0]!r} is not in the run's dataset")
    # every slide is looked up before anything is drawn: a wrong --slides fails at once, not after the figures
    found = {}
    if slides:
        wanted = list(dict.fromkeys(s for b in bags for s in units[b].slide_ids))
        without = ["a slide background"] + (["tissue masking"] if tissue_only else []) + \
            (["the patch grid"] if patches else [])
        found = match_slides(slides, wanted, warn=echo or (lambda m: warnings.warn(m, stacklevel=3)),
                             missing_means=f"drawn on white, without {', '.join(without)}")
    out = Path(out)
    written = []
    say = echo or (lambda m: warnings.warn(m, stacklevel=3))
    guessed = []  # files whose tile size came from their coords' grid: the first is said, the others counted

    def guess(message: str) -> None:
        if not guessed:
            say(f"warning: {message}")
        guessed.append(message)

    for bag_id in tqdm(bags, desc="heatmaps", unit="bag", disable=not progress):
        unit = units[bag_id]
        geometry = [bag_geometry(f, slide=found.get(s), mpp=mpp, tile_size=tile_size, warn=guess,
                                 micrometres_ok=found.get(s) is None, max_pixels=max_pixels)
                    for f, s in zip(unit.files, unit.slide_ids)]
        offsets = np.cumsum([0] + [c.shape[0] for c, _ in geometry])
        views = []  # (run, panel title, weights over the whole bag)
        if branches:
            a, branch_labels, n_rows = bag_branch_attention(runs[0], bag_id)
            seeds = "" if n_rows == 1 else f" (mean of {n_rows} seeds)"
            views = [(runs[0], f"{names[0]} / {b}{seeds}", w) for b, w in zip(branch_labels, a)]
        else:
            for run, name in zip(runs, names):
                a, n_rows = bag_attention(run, bag_id)
                views.append((run, name if n_rows == 1 else f"{name} (mean of {n_rows} seeds)", a))
        for run, _, a in views:
            if a.size != offsets[-1]:
                raise HeatmapError(f"{run.run_dir}: bag {bag_id!r}: attention over {a.size} instances, "
                                   f"its feature file(s) have {offsets[-1]} coords")
        # rank / minmax over the whole bag, so the slides of a patient share one scale
        shown = [(t, normalise_attention(a, normalise)) for _, t, a in views]
        for i, ((coords, patch), slide_id) in enumerate(zip(geometry, unit.slide_ids)):
            stem = bag_id if len(unit.files) == 1 else f"{bag_id}__{slide_id}"
            parts = [(t, a[offsets[i]:offsets[i + 1]]) for t, a in shown]
            raw = [a[offsets[i]:offsets[i + 1]] for _, _, a in views]
            written += _draw_slide(stem, coords, patch, parts, raw, out, slide=found.get(slide_id), cmap=cmap,
                                   alpha=alpha, max_size=max_size, bounded=normalise != "none", patches=patches,
                                   tissue_only=tissue_only, single=len(runs) == 1, max_pixels=max_pixels)
    if len(guessed) > 1:
        say(f"warning: the same for {len(guessed) - 1} more feature file(s): tile size from the coords' grid step")
    return written


def _check_cmap(cmap: str) -> None:
    """An unknown colormap is an error naming it, before any figure (matplotlib would raise a KeyError late)."""
    try:
        from matplotlib import colormaps
    except ImportError:
        return  # new_figure says how to install matplotlib
    if cmap not in colormaps:
        raise HeatmapError(f"--cmap {cmap!r} is not a matplotlib colormap (e.g. jet, viridis, magma, coolwarm)")


def _draw_slide(stem: str, coords: np.ndarray, patch: float, parts, raw, out: Path, *, slide: Path | None,
                cmap: str, alpha: float, max_size: int, bounded: bool, patches: int, tissue_only: bool,
                single: bool, max_pixels: int | None) -> list[Path]:
    """OUT/<stem>.png (one panel per (title, normalised weights) of `parts`) over `slide` (None: on white)
    and, with `patches` and a slide, OUT/<stem>_patches.png (ranked on the `raw` weights, which the captions
    show)."""
    background, slide_size, tissue = None, None, None
    if slide is not None:
        background, slide_size = read_thumbnail(slide, max_size, max_pixels=max_pixels)
        if tissue_only:
            from ..extract.tissue import segment_tissue

            tissue = segment_tissue(background)
    if slide_size is None:  # no slide: frame the tiles' bounding box only
        coords = coords - coords.min(axis=0)
        slide_size = (coords[:, 0].max() + patch, coords[:, 1].max() + patch)
    scale = default_scale(slide_size, max_size)
    heats = []
    for _, a in parts:
        heat = attention_heatmap(coords, a, patch, slide_size=slide_size, scale=scale, normalise="none")
        heats.append(heat if tissue is None else restrict_to_tissue(heat, tissue))
    titles = [f"{stem}: {t}" if single else t for t, _ in parts]
    bounds = {"vmin": 0.0, "vmax": 1.0} if bounded else {}
    written = [render_panels(heats, out / f"{stem}.png", background=background, titles=titles, cmap=cmap,
                             alpha=alpha, **bounds)]
    if patches and slide is not None:
        rows = []
        with open_slide(slide, max_pixels=max_pixels) as opened:
            for (title, _), a in zip(parts, raw):
                rows += ranked_rows(title, a, patches, lambda idx: tile_crops(opened, coords, patch, idx))
        written.append(render_gallery(rows, out / f"{stem}_patches.png", title=f"{stem}: most / least attended tiles"))
    return written
