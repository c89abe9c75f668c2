"""Feature extraction: whole-slide images and single-cell images -> feature bags (HDF5, one per bag).

    slide.py     one Slide interface over openslide, tiffslide and Pillow
    limits.py    the pixel limit of plain images (Pillow decodes them whole)
    tissue.py    tissue segmentation on a thumbnail
    tiling.py    tile grid at a physical size over the tissue; a Dataset that reads the tiles
    encoders.py  image encoders on timm (resnet50_trunc, UNI, DinoBloom, any timm model)
    engine.py    the shared loop: resumable, failures recorded, torchrun sharding, several jobs on one folder
    locks.py     per-bag lock files (host, pid, heartbeat) so that jobs never encode a bag twice
    wsi.py       extract_slides;  cells.py  extract_cells

Names are imported lazily so that `qgmil.extract.slide` (used by the heatmaps) does not pull in torch.
"""

from importlib import import_module

_EXPORTS = {
    "extract_slides": "wsi", "TilingSettings": "wsi", "find_slides": "wsi",
    "extract_cells": "cells", "find_samples": "cells",
    "create_encoder": "encoders", "list_encoders": "encoders", "encoder_info": "encoders",
    "open_slide": "slide", "segment_tissue": "tissue", "plan_tiles": "tiling",
    "ExtractError": "engine", "ExtractSummary": "engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
