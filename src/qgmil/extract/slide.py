"""One interface over whole-slide readers (openslide, tiffslide) and plain images (Pillow).

    with open_slide("slide.svs") as slide:
        slide.dimensions, slide.mpp, slide.magnification   # level-0 (W, H), um / px, objective power
        tile = slide.read_region((x, y), level, (w, h))     # (h, w, 3) uint8 RGB, location in level-0 px
        thumb = slide.thumbnail(2048)                        # (h', w', 3) uint8 RGB, long side <= 2048

Every read is RGB uint8: transparent pixels (e.g. the empty parts of an .mrxs) and pixels outside the
image are white, so downstream code (tissue detection, encoders) sees glass, not black.

Plain images are decoded whole by Pillow, so they are refused above `max_image_pixels()` pixels (a small PNG
can decode to gigabytes); WSI formats are read tile by tile and have no such limit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..numbers import positive_number
from .limits import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, max_image_pixels  # noqa: F401  (re-exported)

#: formats only a WSI reader (openslide / tiffslide) opens (.tif / .tiff: tried with one, then Pillow)
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BACKENDS = ("openslide", "tiffslide", "pillow")
INSTALL_HINT = "pip install 'qgmil[wsi]'"
# resolution tags outside this range (um / px) are image-editor defaults (72 dpi = 353 um / px), not scans
_PLAUSIBLE_MPP = (0.05, 20.0)


class SlideError(ValueError):
    """A slide that cannot be opened or read; the message names the file and the problem."""


class ImageTooLarge(SlideError):
    """A plain image above the pixel limit (`max_image_pixels`)."""


@contextmanager
def _no_pixel_limit():
    """Lift Pillow's decompression-bomb limit while we open a slide: slides are legitimately huge."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _to_rgb(image) -> np.ndarray:
    """PIL image -> (h, w, 3) uint8 RGB, composited over white where it has transparency."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        if rgba[..., 3].min() == 255:  # the usual case inside a slide: opaque, nothing to composite
            return np.ascontiguousarray(rgba[..., :3])
        from PIL import Image

        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, Image.fromarray(rgba)).convert("RGB"))
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _wsi_backend() -> str | None:
    """openslide if importable, else tiffslide, else None."""
    import importlib.util

    for name in ("openslide", "tiffslide"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


class Slide:
    """An open slide: level geometry, resolution metadata and RGB reads. Use `open_slide` to make one.

    path: the file; backend: "openslide" | "tiffslide" | "pillow";
    dimensions: level-0 (W, H) px; level_dimensions: (W, H) per level; level_downsamples: level-0 px per level px;
    mpp: um per level-0 px from the metadata, else the `mpp` given to open_slide, else None
    (mpp_from_metadata says which); magnification: objective power or None.
    """

    def __init__(self, path: Path, backend: str, *, mpp: float | None = None, max_pixels: int | None = None):
        self.path = path
        self.backend = backend
        self.max_pixels = max_image_pixels(max_pixels)
        self._handle = None  # openslide / tiffslide object
        self._image = None  # pillow: (H, W, 3) uint8, decoded on the first read_region
        if backend == "pillow":
            self._open_pillow()
        else:
            self._open_wsi()
        self.mpp_from_metadata = self.mpp is not None
        if self.mpp is None and mpp is not None:
            self.mpp = float(mpp)

    def _open_wsi(self):
        try:
            if self.backend == "openslide":
                import openslide

                handle = openslide.OpenSlide(str(self.path))
            else:
                import tiffslide

                handle = tiffslide.TiffSlide(str(self.path))
        except ImportError:
            raise SlideError(f"{self.path}: the {self.backend} backend is not installed: {INSTALL_HINT}") from None
        except Exception as err:  # each reader raises its own error types
            raise SlideError(f"{self.path}: {self.backend} cannot open the slide ({err})") from None
        self._handle = handle
        self.dimensions = tuple(int(v) for v in handle.dimensions)
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        props = handle.properties
        self.mpp = (positive_number(props.get(f"{self.backend}.mpp-x"))
                    or positive_number(props.get(f"{self.backend}.mpp-y")))
        self.magnification = (positive_number(props.get(f"{self.backend}.objective-power"))
                              or positive_number(props.get("aperio.AppMag")))

    def _open_pillow(self):
        from PIL import Image

        try:
            with _no_pixel_limit(), Image.open(self.path) as image:  # reads the header only
                self.dimensions = (int(image.size[0]), int(image.size[1]))
                dpi = image.info.get("dpi")
        except OSError as err:
            raise SlideError(f"{self.path}: cannot read the image ({err})") from None
        width, height = self.dimensions
        if width * height > self.max_pixels:
            raise ImageTooLarge(
                f"{self.path}: {width} x {height} px ({width * height / 1e6:,.0f} megapixels) is above the limit of "
                f"{self.max_pixels / 1e6:,.0f} megapixels for plain images, which are decoded whole (this one would "
                f"take {3 * width * height / 2**30:.1f} GiB per process). Convert it to a pyramidal TIFF or SVS, read "
                "tile by tile (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`), or raise the "
                f"limit with --max-image-pixels or ${MAX_PIXELS_ENV}")
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)
        dots_per_inch = positive_number(dpi[0]) if dpi else None
        mpp = 25400.0 / dots_per_inch if dots_per_inch else None
        self.mpp = mpp if mpp and _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None
        self.magnification = None

    def _decoded(self) -> np.ndarray:
        if self._image is None:
            from PIL import Image

            try:
                with _no_pixel_limit(), Image.open(self.path) as image:
                    self._image = _to_rgb(image)
            except OSError as err:
                raise SlideError(f"{self.path}: cannot decode the image ({err})") from None
            except MemoryError:
                raise self._out_of_memory("decoding the image") from None
        return self._image

    def _out_of_memory(self, doing: str) -> SlideError:
        """A MemoryError while reading, as an error that names the slide (MemoryError's own message is empty)."""
        width, height = self.dimensions
        return SlideError(f"{self.path}: out of memory {doing} ({width} x {height} px, {self.backend}); "
                          "free memory, use fewer --workers, or convert a plain image to a pyramidal TIFF")

    # --- reads -----------------------------------------------------------------------------------

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of `size` (w, h) px at `level`, top-left at `location` (x, y) in level-0 px.

        Only the part inside the image is read (tiffslide would pad it black, with a warning); the rest,
        and any transparent pixel, is white.
        """
        if not 0 <= level < len(self.level_dimensions):
            raise SlideError(f"{self.path}: no level {level} (the slide has {len(self.level_dimensions)})")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if w < 0 or h < 0:
            raise ValueError(f"region size must be >= 0, got {size}")
        ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        # output columns [c0, c1) and rows [r0, r1) fall inside the level's image (x / ds + c in [0, level_w))
        c0, c1 = min(w, max(0, math.ceil(-x / ds))), min(w, max(0, math.floor(level_w - x / ds)))
        r0, r1 = min(h, max(0, math.ceil(-y / ds))), min(h, max(0, math.floor(level_h - y / ds)))
        if c1 <= c0 or r1 <= r0:
            return out
        x0, y0 = x + round(c0 * ds), y + round(r0 * ds)
        if self.backend == "pillow":
            out[r0:r1, c0:c1] = self._decoded()[y0:y0 + r1 - r0, x0:x0 + c1 - c0]
        else:
            try:
                region = self._handle.read_region((x0, y0), level, (c1 - c0, r1 - r0))
            except MemoryError:
                raise self._out_of_memory(f"reading the region at {(x0, y0)}, level {level}") from None
            except Exception as err:  # a corrupt tile surfaces here, with the reader's own error type
                raise SlideError(f"{self.path}: cannot read the region at {(x0, y0)}, level {level} ({err})") from None
            out[r0:r1, c0:c1] = _to_rgb(region)
        return out

    def thumbnail(self, max_size: int = 2048) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the whole slide, aspect kept, long side <= max_size (never upscaled)."""
        from PIL import Image

        max_size = int(max_size)
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if self.backend != "pillow":
            try:
                return _to_rgb(self._handle.get_thumbnail((max_size, max_size)))
            except MemoryError:
                raise self._out_of_memory("reading a thumbnail") from None
            except Exception as err:
                raise SlideError(f"{self.path}: cannot read a thumbnail ({err})") from None
        try:
            if self._image is not None:
                image = Image.fromarray(self._image)
            else:  # not decoded yet: let JPEG decode at a reduced scale, and do not keep the full image
                with _no_pixel_limit(), Image.open(self.path) as opened:
                    opened.draft("RGB", (max_size, max_size))
                    image = Image.fromarray(_to_rgb(opened))
            image.thumbnail((max_size, max_size))
        except OSError as err:
            raise SlideError(f"{self.path}: cannot read the image ({err})") from None
        except MemoryError:
            raise self._out_of_memory("reading a thumbnail") from None
        return np.array(image, dtype=np.uint8)

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample <= `downsample` (1% tolerance for rounded pyramid
        downsamples such as 4.0002); 0 if none."""
        fits = [(d, i) for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(fits)[1] if fits else 0

    # --- lifetime --------------------------------------------------------------------------------

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._image = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
                f"levels={len(self.level_dimensions)}, mpp={self.mpp}, magnification={self.magnification})")


def open_slide(path, *, mpp: float | None = None, backend: str | None = None, max_pixels: int | None = None) -> Slide:
    """Open a slide or plain image.

    WSI suffixes use openslide if importable, else tiffslide; PNG / JPEG / BMP use Pillow, and so does a
    .tif / .tiff that the WSI reader cannot open (or when no WSI reader is installed). `backend` forces
    one of "openslide", "tiffslide", "pillow". `mpp` (um per level-0 px, > 0) is the resolution of a slide
    whose metadata have none (metadata win: a folder of mixed slides keeps each scan's own). `max_pixels`:
    the largest plain image (width x height) read with Pillow (default: `max_image_pixels()`).
    """
    path = Path(path)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if mpp is not None and positive_number(mpp) is None:
        raise SlideError(f"{path}: mpp must be a number > 0, got {mpp!r}")
    max_pixels = max_image_pixels(max_pixels)
    if not path.is_file():
        raise SlideError(f"{path}: no such slide")
    if backend is not None:
        return Slide(path, backend, mpp=mpp, max_pixels=max_pixels)
    suffix = path.suffix.lower()
    wsi = _wsi_backend() if suffix in WSI_SUFFIXES else None
    wsi_error = None
    if wsi is not None:
        try:
            return Slide(path, wsi, mpp=mpp, max_pixels=max_pixels)
        except SlideError as err:
            if suffix not in PLAIN_SUFFIXES:
                raise
            wsi_error = err  # perhaps a plain (non-pyramidal) TIFF: Pillow may read it
    if suffix not in PLAIN_SUFFIXES:
        raise SlideError(f"{path}: reading {suffix or 'this'} slides needs openslide or tiffslide: {INSTALL_HINT}")
    try:
        return Slide(path, "pillow", mpp=mpp, max_pixels=max_pixels)
    except ImageTooLarge:
        raise
    except SlideError as err:
        if wsi_error is not None:
            raise SlideError(f"{wsi_error}; nor can Pillow read it") from None
        hint = f" (a WSI? {INSTALL_HINT})" if suffix in (".tif", ".tiff") else ""
        raise SlideError(f"{err}{hint}") from None
