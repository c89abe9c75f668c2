"""Deep Zoom pyramids of slides for the viewer: the one writer (and reader) of `.dzi` files and their tiles.

    pyramid = write_pyramid("slide.svs", out_dir, "slide")   # out_dir/slide.dzi, out_dir/slide_files/<L>/<c>_<r>.jpeg
    pyramid.tile_source("pyramids/slide_files/")            # the .dzi as OpenSeadragon's inline tile source

The Deep Zoom layout (Microsoft's DZI, as OpenSeadragon reads it): level L is the level-0 image downsampled
2^(max_level - L) times (each level halves the previous one, sizes rounded up, down to 1 x 1), cut into
`tile_size` px tiles that overlap their neighbours by `overlap` px on interior edges. The image is the whole
level-0 slide (no bounds cropping), so viewer coordinates are level-0 pixels, those of the feature files' coords.

Slides that openslide opens are tiled by OpenSlide's own `openslide.deepzoom.DeepZoomGenerator` (its reads from
the best pyramid level and its downsampling). Plain images (PNG, JPEG, plain TIFF), and any slide where openslide
is not installed (tiffslide), are tiled here with Pillow over `open_slide`: the same geometry, levels made by
halving the previous one (single-level images) or read from the slide's best level and resized.

The .dzi is written last and atomically, after every tile: a pyramid whose .dzi exists is complete. Beside it,
`<name>.source.json` records what made it (the slide file, its size and mtime, the settings); writing the same
pyramid again reuses a complete one that matches, and otherwise starts it afresh.
"""

from __future__ import annotations

import json
import math
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_text
from ..extract.slide import SlideError, open_slide

TILE_SIZE = 254  # + 2 px of overlap = 256, the size viewers handle best
OVERLAP = 1
FORMAT = "jpeg"
QUALITY = 90
GENERATORS = ("openslide", "pillow")
DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"  # a namespace name, never fetched


@dataclass(frozen=True)
class Pyramid:
    """A complete Deep Zoom pyramid: `dzi` (the descriptor) and `tiles` (its `<name>_files` folder)."""

    dzi: Path
    tiles: Path
    width: int  # level-0 px
    height: int
    tile_size: int
    overlap: int
    format: str
    generator: str  # "openslide" (DeepZoomGenerator) or "pillow"

    def tile_source(self, url: str) -> dict:
        """The .dzi as the object OpenSeadragon takes in place of its URL (so no request is needed for it:
        pages opened from file:// cannot fetch files), with its tiles under `url` (ends with "/")."""
        return {"Image": {"xmlns": DZI_XMLNS, "Url": url, "Format": self.format, "Overlap": str(self.overlap),
                          "TileSize": str(self.tile_size),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}


def level_dimensions(width: int, height: int) -> list[tuple[int, int]]:
    """(w, h) of every Deep Zoom level, level 0 (1 x 1) first, the full image last (as DeepZoomGenerator)."""
    size, levels = (int(width), int(height)), [(int(width), int(height))]
    while size[0] > 1 or size[1] > 1:
        size = (max(1, math.ceil(size[0] / 2)), max(1, math.ceil(size[1] / 2)))
        levels.append(size)
    return levels[::-1]


def tile_box(level_size: tuple[int, int], col: int, row: int, tile_size: int, overlap: int
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in the level's pixels of tile (col, row), its overlap included."""
    box = []
    for t, lim in ((col, level_size[0]), (row, level_size[1])):
        start = t * tile_size - (overlap if t > 0 else 0)
        box.append((start, min(lim, (t + 1) * tile_size + overlap)))
    (left, right), (top, bottom) = box
    return left, top, right, bottom


def read_dzi(path) -> dict:
    """{width, height, tile_size, overlap, format} of a .dzi file."""
    root = ET.parse(path).getroot()
    size = next(child for child in root if child.tag.endswith("Size"))
    return {"width": int(size.get("Width")), "height": int(size.get("Height")),
            "tile_size": int(root.get("TileSize")), "overlap": int(root.get("Overlap")), "format": root.get("Format")}


def _dzi_xml(width: int, height: int, tile_size: int, overlap: int, fmt: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_XMLNS}" Format="{fmt}" '
            f'Overlap="{overlap}" TileSize="{tile_size}"><Size Width="{width}" Height="{height}"/></Image>\n')


def _save_tile(image, path: Path, fmt: str, quality: int) -> None:
    """A tile as JPEG (RGB) or PNG; not atomic by itself: the pyramid counts only once its .dzi is written."""
    if fmt == "jpeg":
        image.convert("RGB").save(path, format="JPEG", quality=quality)
    else:
        image.save(path, format="PNG")


def write_pyramid(slide_path, out_dir, name: str, *, tile_size: int = TILE_SIZE, overlap: int = OVERLAP,
                  fmt: str = FORMAT, quality: int = QUALITY, generator: str | None = None,
                  max_pixels: int | None = None, progress: bool = False) -> Pyramid:
    """OUT_DIR/<name>.dzi and OUT_DIR/<name>_files/ of the slide; an existing complete pyramid of the same slide
    file and settings is reused as it is.

    generator: "openslide" (DeepZoomGenerator; the slide must open with openslide), "pillow", or None: openslide
    where it opens the slide, else Pillow. max_pixels: the largest plain image read (see `open_slide`).
    """
    from tqdm.auto import tqdm

    if fmt not in ("jpeg", "png"):
        raise ValueError(f"tile format must be jpeg or png, got {fmt!r}")
    if generator not in (None, *GENERATORS):
        raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
    if tile_size < 1 or overlap < 0:
        raise ValueError(f"tile_size must be >= 1 and overlap >= 0, got {tile_size} and {overlap}")
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    dzi, tiles, stamp_path = out_dir / f"{name}.dzi", out_dir / f"{name}_files", out_dir / f"{name}.source.json"
    with open_slide(slide_path, max_pixels=max_pixels) as slide:
        use = generator or ("openslide" if slide.backend == "openslide" else "pillow")
        if use == "openslide" and slide.backend != "openslide":
            raise SlideError(f"{slide_path}: openslide cannot open this slide (read with {slide.backend})")
        width, height = slide.dimensions
        stat = slide_path.stat()
        stamp = {"slide": str(slide_path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "width": width, "height": height, "tile_size": tile_size, "overlap": overlap, "format": fmt,
                 "quality": quality, "generator": use}
        pyramid = Pyramid(dzi, tiles, width, height, tile_size, overlap, fmt, use)
        if dzi.is_file() and stamp_path.is_file():
            try:
                if json.loads(stamp_path.read_text()) == stamp:
                    return pyramid
            except (OSError, ValueError):
                pass  # unreadable: made afresh below
        # afresh: whatever an interrupted or different run left goes first, the .dzi before its tiles
        dzi.unlink(missing_ok=True)
        stamp_path.unlink(missing_ok=True)
        if tiles.exists():
            shutil.rmtree(tiles)
        levels = level_dimensions(width, height)
        total = sum(math.ceil(w / tile_size) * math.ceil(h / tile_size) for w, h in levels)
        with tqdm(total=total, desc=f"pyramid {name}", unit="tile", disable=not progress, leave=False) as bar:
            if use == "openslide":
                _tiles_openslide(slide_path, tiles, levels, tile_size, overlap, fmt, quality, bar)
            else:
                _tiles_pillow(slide, tiles, levels, tile_size, overlap, fmt, quality, bar)
    atomic_write_text(stamp_path, json.dumps(stamp, indent=1) + "\n")
    atomic_write_text(dzi, _dzi_xml(width, height, tile_size, overlap, fmt))
    return pyramid


def _tiles_openslide(path: Path, tiles: Path, levels, tile_size, overlap, fmt, quality, bar) -> None:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    with openslide.OpenSlide(str(path)) as osr:
        dz = DeepZoomGenerator(osr, tile_size=tile_size, overlap=overlap, limit_bounds=False)
        if list(dz.level_dimensions) != levels:  # the geometry the page and `tile_box` assume
            raise SlideError(f"{path}: DeepZoomGenerator levels {dz.level_dimensions} differ from {levels}")
        for level in range(dz.level_count):
            folder = tiles / str(level)
            folder.mkdir(parents=True, exist_ok=True)
            cols, rows = dz.level_tiles[level]
            for row in range(rows):
                for col in range(cols):
                    _save_tile(dz.get_tile(level, (col, row)), folder / f"{col}_{row}.{fmt}", fmt, quality)
                    bar.update()


def _tiles_pillow(slide, tiles: Path, levels, tile_size, overlap, fmt, quality, bar) -> None:
    """The pyramid from `open_slide`'s reads, finest level first. A single-level image (Pillow) is decoded once
    and halved from level to level; a multi-level slide (tiffslide) is read tile by tile at its best level."""
    from PIL import Image

    single = len(slide.level_dimensions) == 1
    image = None
    for level in range(len(levels) - 1, -1, -1):
        size = levels[level]
        downsample = 2 ** (len(levels) - 1 - level)
        if single:
            if image is None:
                image = Image.fromarray(slide.read_region((0, 0), 0, slide.dimensions))
            elif image.size != size:
                image = image.resize(size, Image.BOX)  # exactly half of the level above, rounded up
        folder = tiles / str(level)
        folder.mkdir(parents=True, exist_ok=True)
        for row in range(math.ceil(size[1] / tile_size)):
            for col in range(math.ceil(size[0] / tile_size)):
                box = tile_box(size, col, row, tile_size, overlap)
                if single:
                    tile = image.crop(box)
                else:
                    tile = _read_scaled(slide, box, downsample)
                _save_tile(tile, folder / f"{col}_{row}.{fmt}", fmt, quality)
                bar.update()


def _read_scaled(slide, box, downsample: float):
    """The level-pixel `box` of a Deep Zoom level `downsample` times below level 0, read from the slide's best
    level and resized to the box."""
    from PIL import Image

    left, top, right, bottom = box
    level = slide.best_level(downsample)
    ds = slide.level_downsamples[level]
    x0, y0 = round(left * downsample), round(top * downsample)
    # the level-0 extent, clipped to the slide (the last level pixel may stand for less than `downsample` px)
    x1 = min(slide.dimensions[0], round(right * downsample))
    y1 = min(slide.dimensions[1], round(bottom * downsample))
    read = (max(1, math.ceil((x1 - x0) / ds)), max(1, math.ceil((y1 - y0) / ds)))
    region = Image.fromarray(slide.read_region((x0, y0), level, read))
    return region.resize((right - left, bottom - top), Image.LANCZOS)
