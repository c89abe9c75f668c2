"""The pixel limit of plain images (PNG, JPEG, plain TIFF), which Pillow decodes whole.

A light module (no numpy), so that the command line can show the default in its help without importing more.
"""

from __future__ import annotations

import os

#: plain images above this many pixels are refused: Pillow decodes them whole, 3 bytes / px in every process
#: that reads their tiles (20,000 x 20,000 px: 1.2 GB each), and a 2 MB PNG can decode to 50,000 x 50,000
DEFAULT_MAX_IMAGE_PIXELS = 400_000_000
MAX_PIXELS_ENV = "QGMIL_MAX_IMAGE_PIXELS"


def max_image_pixels(value: int | None = None) -> int:
    """The pixel limit of plain images: `value`, else $QGMIL_MAX_IMAGE_PIXELS, else DEFAULT_MAX_IMAGE_PIXELS."""
    where = "max_image_pixels"
    if value is None:
        value, where = os.environ.get(MAX_PIXELS_ENV), MAX_PIXELS_ENV
        if value is None:
            return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = 0
    if isinstance(value, bool) or limit < 1 or limit != float(value):
        raise ValueError(f"{where} must be a whole number of pixels >= 1, got {value!r}")
    return limit
