"""Tissue segmentation on a slide thumbnail: saturation threshold, morphology, small-object removal.

    mask = segment_tissue(slide.thumbnail(2048))   # (h, w) bool, True on tissue
    save_mask_png(mask, "masks/slide.png", thumb)  # to check it by eye

Stained tissue is coloured and glass is grey-white, so HSV saturation separates them on H&E and most
other stains regardless of brightness; it needs numpy, scipy.ndimage and Pillow only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_write

DARK_MAX = 20  # max channel below this: black scanner borders / slide edges, never tissue
MEDIAN_SIZE = 3  # px of the saturation median filter


def saturation(thumb: np.ndarray) -> np.ndarray:
    """(h, w) uint8 HSV saturation, 255 (max - min) / max, of an (h, w, 3) uint8 RGB image (0 where black)."""
    rgb = _rgb(thumb)
    high = rgb.max(axis=2).astype(np.int32)
    low = rgb.min(axis=2).astype(np.int32)
    return ((high - low) * 255 // np.maximum(high, 1)).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the k maximising the between-class variance of {<= k} vs {> k}."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 0.0
    p = hist / hist.sum()
    weight = np.cumsum(p)  # share of the class <= k
    mean = np.cumsum(p * np.arange(256))  # its first moment
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1.0 - weight))
    between = np.nan_to_num(between, nan=-1.0, posinf=-1.0)
    return float(np.argmax(between))


def disk(radius: int) -> np.ndarray:
    """(2r + 1, 2r + 1) bool disk structuring element."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r


def segment_tissue(thumb: np.ndarray, *, threshold: float | None = None, min_saturation: float = 15,
                   close_radius: int = 2, open_radius: int = 2, min_area: float = 0.0005,
                   fill_holes: bool = True) -> np.ndarray:
    """(h, w) bool tissue mask of an (h, w, 3) uint8 RGB thumbnail.

    1. HSV saturation (0-255), median-filtered over 3 x 3 px: removes isolated coloured pixels (dust,
       JPEG noise) without moving tissue borders.
    2. Tissue = saturation > max(threshold, min_saturation), threshold = Otsu's on the saturation of the
       non-dark pixels unless given. The floor `min_saturation` keeps a blank slide (where Otsu splits
       noise from noise) empty. Very dark pixels (max channel < 20: scanner borders) are never tissue.
    3. Closing (disk of `close_radius` px) bridges small gaps inside tissue; opening (disk of
       `open_radius` px) then drops specks and thin threads (pen strokes, hairs) thinner than the disk.
       The mask is edge-padded first so tissue touching the thumbnail border is not eroded.
    4. Hole filling (`fill_holes`): lumens, vessels and tears surrounded by tissue count as tissue, so
       tiles over them are not lost to a ring of tissue around them.
    5. Connected components (8-connected) smaller than `min_area` (a fraction of the thumbnail's area)
       are removed: debris and dust, too small to be a tissue section.
    """
    rgb = _rgb(thumb)
    if not min_area >= 0 or min(close_radius, open_radius) < 0:
        raise ValueError("min_area, close_radius and open_radius must be >= 0")
    sat = ndimage.median_filter(saturation(rgb), size=MEDIAN_SIZE)
    bright = rgb.max(axis=2) >= DARK_MAX
    if threshold is None:
        threshold = otsu_threshold(sat[bright]) if bright.any() else 255.0
    mask = (sat > max(float(threshold), float(min_saturation))) & bright

    pad = max(close_radius, open_radius)
    mask = np.pad(mask, pad, mode="edge")
    if close_radius:
        mask = ndimage.binary_closing(mask, structure=disk(close_radius))
    if open_radius:
        mask = ndimage.binary_opening(mask, structure=disk(open_radius))
    mask = mask[pad:pad + rgb.shape[0], pad:pad + rgb.shape[1]]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if min_area > 0 and mask.any():
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_area * mask.size
        keep[0] = False  # the background label
        mask = keep[labels]
    return mask


def save_mask_png(mask: np.ndarray, path, thumb: np.ndarray | None = None) -> Path:
    """Write the mask as a PNG for checking, atomically (a temp file beside it, then a rename).

    With `thumb` ((h, w, 3) uint8, the image the mask was computed on): the thumbnail with tissue tinted
    green and the rest dimmed; without: the mask itself (white tissue on black).
    """
    from PIL import Image

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (h, w), got shape {mask.shape}")
    if thumb is None:
        image = mask.astype(np.uint8) * 255
    else:
        rgb = _rgb(thumb).astype(np.float32)
        if rgb.shape[:2] != mask.shape:
            raise ValueError(f"thumbnail {rgb.shape[:2]} and mask {mask.shape} differ in size")
        tinted = 0.6 * rgb + 0.4 * np.array([0.0, 255.0, 0.0], dtype=np.float32)
        image = np.where(mask[..., None], tinted, 0.4 * rgb).round().astype(np.uint8)
    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return image[..., :3]
