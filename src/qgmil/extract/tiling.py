"""Tile grids over a slide's tissue at a physical resolution, and a Dataset that reads the tiles.

    tiling = plan_tiles(slide, mask, tile_px=256, magnification=20)   # or tile_um=128; neither: level 0
    dataset = TileDataset(slide.path, tiling)                          # items: (256, 256, 3) uint8 tensors

Resolution: a tile of `tile_px` output px covers target_mpp * tile_px um. It is read at the pyramid level
just finer than target (`read_size` px there) and resized to `tile_px`; when a level is within 2% of the
target (0.499 vs 0.5 um/px) it is read there at `tile_px` as it is, since resampling would only blur it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .slide import Slide, SlideError, open_slide

SNAP = 0.02  # relative resolution difference read as "the same" (no resampling)


@dataclass
class Tiling:
    """Where a slide's tiles are and how to read them.

    coords: (N, 2) int64 top-left (x, y) of each tile in level-0 px; tissue: (N,) float32 tissue fraction
    of each tile (1 without a mask); level: pyramid level read from; read_size: tile side read at `level`,
    in that level's px; tile_px: side of the tiles handed to the encoder; patch_size_level0: tile side in
    level-0 px (read_size x the level's downsample); mpp: the slide's level-0 um/px; target_mpp: um/px of
    the output tiles as read (mpp x patch_size_level0 / tile_px, e.g. 0.499 when 0.5 was asked and snapped).
    """

    coords: np.ndarray
    tissue: np.ndarray
    level: int
    read_size: int
    tile_px: int
    patch_size_level0: float
    mpp: float | None
    target_mpp: float | None

    @property
    def tile_um(self) -> float | None:
        """Tile side in micrometres, None without a slide resolution."""
        return None if self.target_mpp is None else self.target_mpp * self.tile_px

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _target_downsample(slide: Slide, tile_px: int, tile_um: float | None,
                       magnification: float | None) -> float:
    """Level-0 px per output px asked for (1 when neither `tile_um` nor `magnification` is given)."""
    if tile_um is not None and magnification is not None:
        raise ValueError("give either tile_um or magnification, not both")
    if tile_um is None and magnification is None:
        return 1.0
    if tile_um is not None and not tile_um > 0:
        raise ValueError(f"tile_um must be > 0, got {tile_um}")
    if magnification is not None and not magnification > 0:
        raise ValueError(f"magnification must be > 0, got {magnification}")
    # 10 / magnification: the 20x = 0.5 um/px convention of the pathology foundation models
    target_mpp = tile_um / tile_px if tile_um is not None else 10.0 / magnification
    asked = f"{tile_um:g} um tiles of {tile_px} px" if tile_um is not None else f"{magnification:g}x"
    if slide.mpp is None:
        raise SlideError(f"{slide.path}: the slide's metadata has no resolution (um/px), needed for {asked}: "
                         "pass --mpp (e.g. --mpp 0.25 for a 40x scan)")
    downsample = target_mpp / slide.mpp
    if downsample < 1.0 - SNAP:
        raise SlideError(f"{slide.path}: {asked} needs {target_mpp:.4g} um/px, finer than the scan's "
                         f"{slide.mpp:.4g} um/px")
    return downsample


def _level_and_read_size(slide: Slide, downsample: float, tile_px: int) -> tuple[int, int]:
    """(level, read_size): a level within 2% of `downsample` read at tile_px, else the best finer level."""
    near = [(abs(d / downsample - 1.0), i) for i, d in enumerate(slide.level_downsamples)
            if abs(d / downsample - 1.0) <= SNAP]
    if near:
        return min(near)[1], tile_px
    level = slide.best_level(downsample)
    return level, max(1, round(tile_px * downsample / slide.level_downsamples[level]))


def tissue_fractions(mask: np.ndarray, coords: np.ndarray, patch: float,
                     slide_size: tuple[int, int]) -> np.ndarray:
    """(N,) float32 mean of `mask` over each tile's footprint, O(N + mask size) with a summed-area table.

    mask: (h, w) bool over the whole slide (any size, e.g. a thumbnail); coords: (N, 2) level-0 px top-left
    corners; patch: tile side in level-0 px; slide_size: level-0 (W, H). A tile covers mask columns
    rint(x w / W) .. rint((x + patch) w / W) (likewise rows), at least one mask pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.size:
        raise ValueError(f"mask must be a non-empty (h, w) array, got shape {mask.shape}")
    h, w = mask.shape
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)

    def span(start, n, size):
        # multiply before dividing: exact for integer inputs, so ties round the same way every time
        lo = np.clip(np.rint(start * n / size).astype(np.int64), 0, n - 1)
        hi = np.clip(np.rint((start + patch) * n / size).astype(np.int64), lo + 1, n)
        return lo, hi

    c0, c1 = span(coords[:, 0], w, slide_size[0])
    r0, r1 = span(coords[:, 1], h, slide_size[1])
    table = np.zeros((h + 1, w + 1), dtype=np.int64)
    table[1:, 1:] = mask.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    inside = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return (inside / ((r1 - r0) * (c1 - c0))).astype(np.float32)


def plan_tiles(slide: Slide, mask: np.ndarray | None, *, tile_px: int = 224, tile_um: float | None = None,
               magnification: float | None = None, min_tissue: float = 0.5, stride_px: int | None = None) -> Tiling:
    """The grid of tiles over `slide` with at least `min_tissue` of their area on tissue.

    mask: (h, w) bool tissue mask over the whole slide at any scale (e.g. `segment_tissue` of a thumbnail),
    None: keep every tile. Resolution: `tile_um` (tile side in um -> tile_um / tile_px um/px) or
    `magnification` (10 / magnification um/px) or neither (level-0 px); both need the slide's mpp.
    The grid starts at (0, 0), steps by one tile (or `stride_px` output px) and holds only tiles wholly
    inside the image; coords are row-major (y, then x).
    """
    tile_px = int(tile_px)
    if tile_px < 1:
        raise ValueError(f"tile_px must be >= 1, got {tile_px}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if stride_px is not None and not int(stride_px) >= 1:
        raise ValueError(f"stride_px must be >= 1, got {stride_px}")
    downsample = _target_downsample(slide, tile_px, tile_um, magnification)
    level, read_size = _level_and_read_size(slide, downsample, tile_px)
    level_ds = slide.level_downsamples[level]
    patch = read_size * level_ds
    stride = patch if stride_px is None else int(stride_px) * patch / tile_px

    # the level's image may be a fraction of a pixel short of level 0 (2967 / 4 -> 741 rows): stay inside both
    width = min(slide.dimensions[0], slide.level_dimensions[level][0] * level_ds)
    height = min(slide.dimensions[1], slide.level_dimensions[level][1] * level_ds)
    # floor(i * stride) + patch <= i * stride + patch <= size for i < n (1e-9: float noise in the division)
    nx = math.floor((width - patch) / stride + 1e-9) + 1 if width >= patch else 0
    ny = math.floor((height - patch) / stride + 1e-9) + 1 if height >= patch else 0
    ys, xs = np.meshgrid(np.arange(ny) * stride, np.arange(nx) * stride, indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    coords = np.floor(coords + 1e-9).astype(np.int64)

    if mask is None or not len(coords):
        tissue = np.ones(len(coords), dtype=np.float32)
    else:
        tissue = tissue_fractions(mask, coords, patch, slide.dimensions)
        keep = tissue >= min_tissue
        coords, tissue = coords[keep], tissue[keep]
    target_mpp = None if slide.mpp is None else slide.mpp * patch / tile_px
    return Tiling(coords=coords, tissue=tissue, level=level, read_size=read_size, tile_px=tile_px,
                  patch_size_level0=float(patch), mpp=slide.mpp, target_mpp=target_mpp)


class TileDataset(torch.utils.data.Dataset):
    """The tiles of a Tiling as (tile_px, tile_px, 3) uint8 RGB tensors, read from the slide on demand.

    The slide is opened on the first read in each process (DataLoader workers included) and never
    pickled, so the dataset goes to spawned workers without an open file handle. With the Pillow
    backend each process decodes the whole image once.
    """

    def __init__(self, slide_path, tiling: Tiling, *, backend: str | None = None, max_pixels: int | None = None):
        self.slide_path = Path(slide_path)
        self.tiling = tiling
        self.backend = backend
        self.max_pixels = max_pixels  # the plain-image limit the slide was opened with (see slide.py)
        self._slide: Slide | None = None
        self._pid: int | None = None

    def _open(self) -> Slide:
        # a handle inherited through fork belongs to the parent: reopen in each process
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path, backend=self.backend, max_pixels=self.max_pixels)  # no mpp
            self._pid = os.getpid()
        return self._slide

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return len(self.tiling)

    def __getitem__(self, i) -> torch.Tensor:
        from PIL import Image

        t = self.tiling
        x, y = (int(v) for v in t.coords[i])
        tile = self._open().read_region((x, y), t.level, (t.read_size, t.read_size))
        if t.read_size != t.tile_px:
            # reducing_gap: a box reduce first, then bilinear over the last factor <= 3 (fast, no aliasing)
            image = Image.fromarray(tile).resize((t.tile_px, t.tile_px), Image.Resampling.BILINEAR, reducing_gap=3.0)
            tile = np.array(image, dtype=np.uint8)
        return torch.from_numpy(tile)
