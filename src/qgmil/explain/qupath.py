"""QuPath-compatible GeoJSON of a run's attention (`qgmil explain export --format geojson`): the one writer.

  slide_geojson(view)                      -> a FeatureCollection (dict) for one SlideView
  export_geojson(run_dirs, out, bags=...)  -> OUT/<stem>.geojson per slide

What QuPath's GeoJSON import (File > Import objects, or drag and drop; QuPath 0.4+) reads:

- one Feature per tile: a level-0 pixel Polygon of the tile's square, `properties.objectType` "detection"
  (or "tile"), and `properties.measurements` {name: number}: per layer (a run's pooling attention, each branch
  of a multi-branch run) the weight ("attention"), its rank in the bag ("attention rank", 1 = the most attended)
  and percentile ("attention percentile", 0-1, the heatmaps' rank scale), plus the tile's index in the bag.
  Measure > Show measurement maps colours the tiles by any of them.
- one annotation over the tissue (the tiles' bounding box): `objectType` "annotation", `name` the runs'
  predictions and the bag's label, `classification` {name, color} the first run's predicted class
  (classification runs), and each run's predicted values as its measurements.

With several runs each measurement name starts with its run's name ("abmil: attention"). Ids are UUIDs made
from the slide's stem and the tile index, so exporting again gives the same objects.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from .reader import load_run
from .slide_views import SlideView, slide_ids, slide_views, tested_bags

OBJECT_TYPES = ("detection", "tile")
#: class colours (QuPath takes [r, g, b]): tab10, the order of the run's classes
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_NAMESPACE = uuid.UUID("6f1c3a52-2b55-4c8e-9d1e-5a1f0c7e4b21")  # qgmil's, for uuid5 object ids


def _number(v: float) -> int | float:
    """JSON number: an int where the value is whole (tile corners), else a float rounded to 1e-3 px."""
    v = float(v)
    return int(v) if v.is_integer() else round(v, 3)


def _square(x: float, y: float, w: float, h: float) -> dict:
    x0, y0, x1, y1 = (_number(v) for v in (x, y, x + w, y + h))
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


def measurement_names(view: SlideView) -> list[tuple[str, str, str]]:
    """(attention, rank, percentile) measurement names of each layer of the view, in layer order."""
    prefix = len(view.run_names) > 1
    out = []
    for layer in view.layers:
        base = "attention" if layer.branch is None else f"attention ({layer.branch})"
        if prefix:
            base = f"{view.run_names[layer.run]}: {base}"
        out.append((base, f"{base} rank", f"{base} percentile"))
    return out


def slide_geojson(view: SlideView, *, object_type: str = "detection", slide_size=None, classes=None) -> dict:
    """The FeatureCollection of one slide: a feature per tile, then the predicted-label annotation.

    slide_size: level-0 (W, H) of the slide, to clip the annotation to it; classes: the first run's class names
    (for the annotation's colour)."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}")
    names = measurement_names(view)
    features = []
    for t, (x, y) in enumerate(view.coords):
        measurements = {"tile index": view.first + t}
        for layer, (weight, rank, pct) in zip(view.layers, names):
            measurements[weight] = float(layer.weights[t])
            measurements[rank] = int(layer.rank[t])
            measurements[pct] = round(float(layer.percentile[t]), 6)
        features.append({"type": "Feature", "id": str(uuid.uuid5(_NAMESPACE, f"{view.stem}/tile/{view.first + t}")),
                         "geometry": _square(x, y, view.patch, view.patch),
                         "properties": {"objectType": object_type, "measurements": measurements}})
    features.append(_annotation(view, slide_size, classes))
    return {"type": "FeatureCollection", "features": features}


def _annotation(view: SlideView, slide_size, classes) -> dict:
    left, top, right, bottom = view.tissue_box
    if slide_size is not None:
        left, top = max(0.0, left), max(0.0, top)
        right, bottom = min(float(slide_size[0]), right), min(float(slide_size[1]), bottom)
    several = len(view.run_names) > 1
    said = [f"{n}: {p.text}" if several else p.text for n, p in zip(view.run_names, view.predictions)]
    label = view.predictions[0].label if view.predictions else None
    name = f"{view.stem}: predicted {'; '.join(said)}" + (f"; label {label}" if label is not None else "")
    measurements = {}
    for run_name, prediction in zip(view.run_names, view.predictions):
        for column, value in prediction.values.items():
            if np.isfinite(value):
                measurements[f"{run_name}: {column}" if several else column] = value
    properties = {"objectType": "annotation", "name": name, "isLocked": True, "measurements": measurements}
    first = view.predictions[0] if view.predictions else None
    if first is not None and first.predicted is not None:
        index = list(classes or []).index(first.predicted) if first.predicted in (classes or []) else 0
        properties["classification"] = {"name": first.predicted, "color": list(PALETTE[index % len(PALETTE)])}
    return {"type": "Feature", "id": str(uuid.uuid5(_NAMESPACE, f"{view.stem}/annotation")),
            "geometry": _square(left, top, right - left, bottom - top), "properties": properties}


def export_geojson(run_dirs: Sequence, out, *, bags: Sequence[str] | None = None, slides=None,
                   object_type: str = "detection", branches: bool = True, mpp: float | None = None, echo=None,
                   progress: bool = False, max_pixels: int | None = None) -> list[Path]:
    """OUT/<stem>.geojson for every slide of `bags` (default: every test bag of the first run).

    slides: a folder of slides named <slide_id>.<ext>: their level-0 size clips the annotation to the slide (and
    their mpp places micrometre coords: STAMP's); bags whose slide is missing are exported unclipped, with a
    warning (none found: an error). mpp: um per level-0 px for micrometre coords without one."""
    from tqdm.auto import tqdm

    from .heatmap import match_slides, read_slide_size

    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}")
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directory")
    bags = [str(b) for b in bags] if bags else tested_bags(runs[0])
    found = {}
    if slides:
        warn = echo or (lambda m: warnings.warn(m, stacklevel=3))
        found = match_slides(slides, slide_ids(runs[0], bags), warn=warn,
                             missing_means="their annotation is the tiles' bounding box, unclipped")
    views = slide_views(runs, bags, branches=branches, slides=found, mpp=mpp)
    out = Path(out)
    written = []
    for view in tqdm(views, desc="geojson", unit="slide", disable=not progress):
        size = read_slide_size(found[view.slide_id], max_pixels=max_pixels) if view.slide_id in found else None
        collection = slide_geojson(view, object_type=object_type, slide_size=size, classes=runs[0].classes)
        # compact: a 100k-tile slide is tens of MB; written whole or not at all
        written.append(atomic_write_text(out / f"{view.stem}.geojson",
                                         json.dumps(collection, separators=(",", ":"), allow_nan=False)))
    return written
