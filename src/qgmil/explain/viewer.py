"""The slide viewer (`qgmil explain view`): static web pages that show each slide as a Deep Zoom pyramid in
OpenSeadragon, with the runs' attention as overlay layers. The one writer of the viewer's folder.

  build_viewer(run_dirs, out, slides=DIR)  -> Site: OUT/index.html and a page per slide
  colormap(values)                         -> (..., 3) uint8 RGB of matplotlib's "jet" (no matplotlib needed)
  overlay_rgba(values)                     -> (H, W, 4) uint8: jet where finite, transparent where NaN

The folder (open index.html from disk, or serve it: `python -m http.server --directory OUT`):

  index.html                           every slide: its label, each run's prediction, a link to its page
  slides/<stem>.html                   one page per slide (stem: the bag id; <bag>__<slide> for patient bags)
  assets/                              viewer.js, viewer.css and OpenSeadragon (vendored, see viewer_assets/)
  pyramids/<slide_id>.dzi, _files/     the Deep Zoom pyramid of each slide (deepzoom.py)
  overlays/<stem>/<layer>-<scale>.png  each layer's heat on the rank and the raw scale, RGBA, at most
                                       `max_size` px on its long side and 8 heat px per tile

A page holds everything it needs inline (the data as JSON in a <script>, the pyramid's descriptor too, since
a file:// page may not fetch files) and loads only files of the folder: nothing comes from the network. One
panel per run, side by side, their viewports kept in step; per panel a layer per run (and per branch of a
multi-branch run), the legend of the scale shown, the run's prediction, and its most attended tiles (a click
goes to the tile). The heats are the heatmaps' (`attention_heatmap`), coloured here with jet: rank = the
percentile of the tile in its bag, raw = the weight between the bag's smallest and largest one.

Files are written atomically; a slide's page is written after its pyramid and overlays, and index.html last,
so a page that exists is complete. Pyramids of unchanged slides are reused.
"""

from __future__ import annotations

import html
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import quote

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from .deepzoom import TILE_SIZE, write_pyramid
from .heatmap import attention_heatmap, default_scale, match_slides
from .reader import load_run
from .slide_views import Layer, SlideView, slide_ids, slide_views, tested_bags

ASSETS = Path(__file__).with_name("viewer_assets")
OPENSEADRAGON_VERSION = "6.1.1"
SCALES = ("rank", "raw")
MAX_HEAT_PX_PER_TILE = 8  # finer heat shows nothing more: a tile has one value

# matplotlib's jet, as its segment data: (position, value) per channel, linear in between
_JET = {"red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0))}


def colormap(values) -> np.ndarray:
    """(..., 3) uint8 RGB of jet at `values` (clipped to [0, 1]; NaN gives 0)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    channels = [np.interp(v, [p for p, _ in _JET[c]], [y for _, y in _JET[c]]) for c in ("red", "green", "blue")]
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def legend_stops(n: int = 11) -> list[list]:
    """[[position, [r, g, b]], ...]: jet at n even positions, for the page's CSS gradient legend."""
    at = np.linspace(0.0, 1.0, n)
    return [[round(float(a), 4), [int(c) for c in rgb]] for a, rgb in zip(at, colormap(at))]


def overlay_rgba(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] (NaN where no tile) -> (H, W, 4) uint8: jet, opaque on tiles, transparent off them
    (the page sets the opacity)."""
    values = np.asarray(values, dtype=np.float64)
    rgba = np.zeros(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colormap(values)
    rgba[..., 3] = np.where(np.isfinite(values), 255, 0)
    return rgba


def _url(path: str | Path) -> str:
    """A relative URL of a relative path: every character a file name may hold but a URL may not, escaped."""
    return quote(Path(path).as_posix())


def _json_for_script(obj) -> str:
    """JSON that is safe inside <script>: no "</script>", no HTML comment, whatever the ids hold."""
    return (json.dumps(obj, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _copy_assets(out: Path) -> None:
    """OUT/assets/ from viewer_assets/static/, each file atomically."""
    static = ASSETS / "static"
    for src in sorted(static.rglob("*")):
        if src.is_file():
            dst = out / "assets" / src.relative_to(static)
            atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))


def _write_png(path: Path, rgba: np.ndarray) -> Path:
    from PIL import Image

    image = Image.fromarray(rgba, "RGBA")
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


@dataclass
class Site:
    """What build_viewer wrote: the index and one page per slide."""

    index: Path
    pages: list[Path] = field(default_factory=list)


def _layer_data(view: SlideView, layer: Layer, size: tuple[int, int], out: Path, *, max_size: int, top: int) -> dict:
    """A layer's overlays (written) and its entry in the page data."""
    scale = max(default_scale(size, max_size), view.patch / MAX_HEAT_PX_PER_TILE)
    lo, hi = layer.bag_range
    values = {"rank": layer.percentile,
              "raw": np.full(layer.weights.shape, 0.5) if hi <= lo else (layer.weights - lo) / (hi - lo)}
    images = {}
    for name in SCALES:
        heat = attention_heatmap(view.coords, values[name], view.patch, slide_size=size, scale=scale, normalise="none")
        rel = Path("overlays") / view.stem / f"{layer.key}-{name}.png"
        _write_png(out / rel, overlay_rgba(heat))
        images[name] = "../" + _url(rel)
    order = np.argsort(-layer.weights, kind="stable")[:top]
    tiles = [{"tile": view.first + int(i), "rank": int(layer.rank[i]), "x": float(view.coords[i, 0]),
              "y": float(view.coords[i, 1]), "size": float(view.patch), "weight": float(layer.weights[i]),
              "percentile": float(layer.percentile[i])} for i in order]
    return {"key": layer.key, "name": layer.name, "branch": layer.branch, "images": images,
            # the heat's extent in level-0 px: whole heat pixels, so it may reach past the slide's edge
            "rect": [0.0, 0.0, heat.shape[1] * scale, heat.shape[0] * scale],
            "range": {"rank": [0.0, 1.0], "raw": [lo, hi]}, "top": tiles}


def build_page(view: SlideView, pyramid, pyramid_url: str, out: Path, *, slide_mpp: float | None, links: dict,
               runs, top: int = 10, max_size: int = 2048, opacity: float = 0.5, scale: str = "rank") -> Path:
    """OUT/slides/<stem>.html of one slide (after its overlays, written here)."""
    from .. import __version__

    size = (pyramid.width, pyramid.height)
    panels = []
    for i, (run, name, prediction) in enumerate(zip(runs, view.run_names, view.predictions)):
        layers = [_layer_data(view, layer, size, out, max_size=max_size, top=top)
                  for layer in view.layers if layer.run == i]
        panels.append({"name": name, "model": run.model, "run_dir": str(run.run_dir), "prediction": prediction.text,
                       "predicted": prediction.predicted, "seeds": prediction.seeds, "layers": layers})
    label = view.predictions[0].label if view.predictions else None
    data = {"format": "qgmil-viewer-page", "version": 1, "qgmil_version": __version__,
            "slide": {"id": view.slide_id, "bag_id": view.bag_id, "stem": view.stem, "label": label,
                      "width": pyramid.width, "height": pyramid.height, "mpp": slide_mpp,
                      "tiles": int(view.coords.shape[0]), "patch": float(view.patch),
                      "tile_source": pyramid.tile_source(pyramid_url)},
            "panels": panels, "scales": list(SCALES), "defaults": {"scale": scale, "opacity": opacity},
            "colormap": legend_stops(), "osd_images": "../assets/openseadragon/images/", "links": links}
    text = Template((ASSETS / "page.html").read_text()).substitute(
        title=html.escape(f"{view.stem}: qgmil viewer"), version=html.escape(__version__),
        data=_json_for_script(data))
    return atomic_write_text(out / "slides" / f"{view.stem}.html", text)


def _index(out: Path, views: Sequence[SlideView], pages: Sequence[Path], names: Sequence[str]) -> Path:
    from .. import __version__

    patient_bags = any(v.stem != v.bag_id for v in views)
    head = ["slide"] + (["bag"] if patient_bags else []) + ["label", "tiles"] + [f"{n}: predicted" for n in names]
    rows = []
    for view, page in zip(views, pages):
        label = view.predictions[0].label if view.predictions else None
        cells = [f'<a href="{html.escape(_url(page.relative_to(out)), quote=True)}">{html.escape(view.slide_id)}</a>']
        cells += [html.escape(view.bag_id)] if patient_bags else []
        cells += [html.escape("unknown" if label is None else label), str(view.coords.shape[0])]
        cells += [html.escape(p.text) for p in view.predictions]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    text = Template((ASSETS / "index.html").read_text()).substitute(
        title="qgmil viewer: " + html.escape(", ".join(names)), version=html.escape(__version__),
        summary=html.escape(f"{len(views)} slide(s); attention of {len(names)} run(s)."),
        head="".join(f"<th>{html.escape(h)}</th>" for h in head), rows="\n".join(rows),
        folder=html.escape(str(out)), osd_version=OPENSEADRAGON_VERSION)
    return atomic_write_text(out / "index.html", text)


def build_viewer(run_dirs: Sequence, out, *, slides, bags: Sequence[str] | None = None, top: int = 10,
                 max_size: int = 2048, opacity: float = 0.5, scale: str = "rank", tile_size: int = TILE_SIZE,
                 generator: str | None = None, branches: bool = True, mpp: float | None = None, echo=None,
                 progress: bool = False, max_pixels: int | None = None) -> Site:
    """The viewer of `run_dirs` over the slides of `bags` (default: every test bag of the first run) found in the
    folder `slides` (<slide_id>.<ext>): OUT/index.html, OUT/slides/<stem>.html per slide, and what they load.

    Bags without a slide are left out with a warning (`echo`, else `warnings`); none found is an error.
    top: tiles listed per layer; max_size: the overlays' long side; opacity, scale ("rank" | "raw"): the page's
    defaults; tile_size, generator: of the pyramids (deepzoom.py); branches: a layer per branch of multi-branch
    runs; mpp: um per level-0 px for micrometre coords the file and slide do not resolve; max_pixels: the
    largest plain-image slide read (see `open_slide`).
    """
    from tqdm.auto import tqdm

    from ..extract.slide import open_slide

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    bags = [str(b) for b in bags] if bags else tested_bags(runs[0])
    warn = echo or (lambda m: warnings.warn(m, stacklevel=3))
    found = match_slides(slides, slide_ids(runs[0], bags), warn=warn,
                         missing_means="not in the viewer (it shows slides)")
    views = [v for v in slide_views(runs, bags, branches=branches, slides=found, mpp=mpp) if v.slide_id in found]
    out = Path(out)
    _copy_assets(out)
    pyramids, mpp = {}, {}
    for slide_id in tqdm(list(dict.fromkeys(v.slide_id for v in views)), desc="pyramids", unit="slide",
                         disable=not progress):
        pyramids[slide_id] = write_pyramid(found[slide_id], out / "pyramids", slide_id, tile_size=tile_size,
                                           generator=generator, max_pixels=max_pixels, progress=progress)
        with open_slide(found[slide_id], max_pixels=max_pixels) as slide:
            mpp[slide_id] = slide.mpp
    pages = [out / "slides" / f"{v.stem}.html" for v in views]

    def link(k: int):
        return {"name": views[k].stem, "href": _url(pages[k].name)} if 0 <= k < len(views) else None

    for k, view in enumerate(tqdm(views, desc="pages", unit="slide", disable=not progress)):
        pyramid = pyramids[view.slide_id]
        url = "../" + _url(pyramid.tiles.relative_to(out)) + "/"
        build_page(view, pyramid, url, out, slide_mpp=mpp[view.slide_id], runs=runs, top=top, max_size=max_size,
                   opacity=opacity, scale=scale,
                   links={"index": "../index.html", "previous": link(k - 1), "next": link(k + 1)})
    names = views[0].run_names if views else []
    return Site(_index(out, views, pages, names), pages)
