"""Whole-slide images -> one feature bag per slide: tissue mask, tiles at a physical size, encoder features.

    extract_slides(["slides/"], "features_uni", encoder="uni", magnification=20, tile_px=256)

writes features/<slide>.h5 (features (N, D), coords (N, 2) level-0 px of each tile's top-left corner,
tissue_fraction (N,), provenance attributes at the root, and on `coords` TRIDENT's patching attributes, so that
TRIDENT's heatmaps and slide encoders read the file as it is) and masks/<slide>.png (the tissue mask over the
thumbnail, to check the segmentation), see `engine` for the rest of the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data.bagfile import trident_coords_attrs
from ..runtime import init_distributed
from .engine import (BagSource, ExtractError, ExtractSummary, PreparedBag, check_run_options, is_finite, is_whole,
                     make_manifest, parse_shard, run_extraction)
from .locks import STALE_MINUTES
from .limits import max_image_pixels
from .slide import PLAIN_SUFFIXES, WSI_SUFFIXES, open_slide
from .tiling import TileDataset, plan_tiles
from .tissue import save_mask_png, segment_tissue

SLIDE_SUFFIXES = tuple(dict.fromkeys(WSI_SUFFIXES + PLAIN_SUFFIXES))
DEFAULT_MAGNIFICATION = 20.0
MIN_MASK_SIZE = 512

DEFAULT_ENCODER = "resnet50_trunc"  # `qgmil extract wsi` without --encoder


@dataclass(frozen=True)
class TilingSettings:
    """How slides are cut. Resolution: `tile_um` (physical tile side) or `magnification` (20 = 0.5 um/px);
    neither: 20x. `mpp`: the level-0 resolution of slides whose metadata lack one (metadata win).
    `max_image_pixels`: the largest plain image (PNG, JPEG, plain TIFF) read whole (None: `max_image_pixels()`).

    Every field is checked here, so a bad value stops the run before anything is written, not each slide."""

    tile_px: int = 256
    tile_um: float | None = None
    magnification: float | None = None
    min_tissue: float = 0.5
    tissue: bool = True  # False: tile the whole slide (e.g. images that are all tissue)
    tissue_threshold: float | None = None  # saturation 0-255; None: Otsu per slide
    min_saturation: float = 15.0
    mask_size: int = 2048  # long side of the thumbnail the tissue is segmented on
    mpp: float | None = None
    max_image_pixels: int | None = None

    def __post_init__(self):
        if self.tile_um is not None and self.magnification is not None:
            raise ExtractError("give either a tile size in micrometres (--tile-um) or a magnification, not both")
        if not is_whole(self.tile_px, 8):
            raise ExtractError(f"--tile-px must be a whole number >= 8, got {self.tile_px!r}")
        # 0 must not mean "the default" (magnification 0 was read as 20x), nor NaN / inf pass a "> 0" test
        for flag, value in (("--tile-um", self.tile_um), ("--magnification", self.magnification), ("--mpp", self.mpp)):
            if value is not None and not (is_finite(value) and value > 0):
                raise ExtractError(f"{flag} must be a number > 0, got {value!r}")
        if not (is_finite(self.min_tissue) and 0 <= self.min_tissue <= 1):
            raise ExtractError(f"--min-tissue must be in [0, 1], got {self.min_tissue!r}")
        for flag, value in (("--tissue-threshold", self.tissue_threshold), ("min_saturation", self.min_saturation)):
            if value is not None and not (is_finite(value) and 0 <= value <= 255):
                raise ExtractError(f"{flag} must be a saturation in [0, 255], got {value!r}")
        if not is_whole(self.mask_size, 16):
            raise ExtractError(f"mask_size must be a whole number >= 16, got {self.mask_size!r}")
        try:
            max_image_pixels(self.max_image_pixels)
        except ValueError as err:
            raise ExtractError(str(err)) from None

    @property
    def target_mpp(self) -> float:
        """Micrometres per pixel of the tiles asked for (20x = 0.5)."""
        if self.tile_um is not None:
            return self.tile_um / self.tile_px
        return 10.0 / (self.magnification or DEFAULT_MAGNIFICATION)

    @property
    def resolution(self) -> dict:
        if self.tile_um is not None:
            return {"tile_um": self.tile_um}
        return {"magnification": self.magnification or DEFAULT_MAGNIFICATION}


def find_slides(paths: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Slide files named directly or found in folders (by suffix), sorted, each once."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                            and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise ExtractError(f"{path}: no such slide or folder")
    if not found:
        raise ExtractError(f"no slides found in {', '.join(map(str, paths))} "
                           f"(looked for {', '.join(SLIDE_SUFFIXES)})")
    # absolute(), not resolve(): a symlinked slide keeps the name it is listed under (its bag id)
    return list(dict.fromkeys(p.absolute() for p in found))


def tissue_mask(slide, settings: TilingSettings) -> tuple[np.ndarray, np.ndarray]:
    """(thumbnail (h, w, 3) uint8, tissue mask (h, w) bool) of an open slide.

    The thumbnail is as small as keeps ~16 mask pixels along a tile's side (at least 512 px, at most
    `mask_size`): segmenting and saving a 2048 px mask costs ~1 s, which small slides need not pay.
    """
    size = settings.mask_size
    if slide.mpp:
        tile_level0 = settings.tile_px * settings.target_mpp / slide.mpp
        size = int(min(settings.mask_size, max(MIN_MASK_SIZE, 16 * max(slide.dimensions) / tile_level0)))
    thumb = slide.thumbnail(size)
    return thumb, segment_tissue(thumb, threshold=settings.tissue_threshold, min_saturation=settings.min_saturation)


def prepare_slide(source: BagSource, settings: TilingSettings, out: Path) -> PreparedBag:
    """Open a slide, segment its tissue, plan its tiles -> a PreparedBag whose dataset reads the tiles."""
    path = Path(source.source)
    with open_slide(path, mpp=settings.mpp, max_pixels=settings.max_image_pixels) as slide:
        mpp_source = "metadata" if slide.mpp_from_metadata else "--mpp" if slide.mpp else None
        mask = None
        if settings.tissue:
            thumb, mask = tissue_mask(slide, settings)
            save_mask_png(mask, out / "masks" / f"{source.bag_id}.png", thumb)
        tiling = plan_tiles(slide, mask, tile_px=settings.tile_px, min_tissue=settings.min_tissue,
                            **settings.resolution)
        slide_mpp, slide_mag, size = slide.mpp, slide.magnification, slide.dimensions
    attrs = {
        "source": path.name,
        "slide_width": size[0], "slide_height": size[1],
        "mpp": slide_mpp, "mpp_source": mpp_source, "magnification": slide_mag, "target_mpp": tiling.target_mpp,
        "patch_size_px": tiling.tile_px, "patch_size_um": tiling.tile_um,
        "patch_size_level0": tiling.patch_size_level0, "patch_level": tiling.level, "read_size": tiling.read_size,
        "min_tissue": settings.min_tissue,
    }
    if not len(tiling):
        where = f"; see masks/{source.bag_id}.png" if settings.tissue else ""
        attrs["empty_reason"] = (f"no tile with >= {settings.min_tissue:.0%} tissue{where} "
                                 "(lower --min-tissue or --tissue-threshold)")
    dataset = TileDataset(path, tiling, max_pixels=settings.max_image_pixels)
    # The slide's objective power: the scanner's word when recorded, else the 20x = 0.5 um/px convention the
    # tiling uses (tiling at a magnification or a tile size needs the mpp, so one of them is known here).
    magnification = slide_mag or (10.0 / slide_mpp if slide_mpp else None)
    trident = {} if magnification is None else trident_coords_attrs(
        name=source.bag_id, patch_size=tiling.tile_px, patch_size_level0=tiling.patch_size_level0,
        level0_magnification=magnification, level0_width=size[0], level0_height=size[1], savetodir=out)
    return PreparedBag(source, dataset, tiling.coords, attrs, {"tissue_fraction": tiling.tissue}, trident)


def extract_slides(
    slides: Sequence[str | Path],
    out: str | Path,
    encoder: str = DEFAULT_ENCODER,
    *,
    weights: str = "pretrained",
    settings: TilingSettings | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    skip_errors: bool = False,
    recursive: bool = False,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
    shard: str | tuple[int, int] | None = None,
    stale_minutes: float = STALE_MINUTES,
) -> ExtractSummary:
    """Extract features of every slide in `slides` (files or folders) into `out` (resumable, torchrun-aware).

    shard: "I/N" or (I, N), this job's static share of the sorted slides; jobs on one folder never encode the
    same slide even without (lock files, see `engine`). stale_minutes: when another job's lock counts as stale.
    """
    from .encoders import create_encoder

    shard = parse_shard(shard)
    check_run_options(batch_size, num_workers, stale_minutes)  # before the encoder loads and `out` is made
    settings = settings or TilingSettings()
    out = Path(out)
    sources = [BagSource(p.stem, str(p)) for p in find_slides(slides, recursive)]
    dist = init_distributed(device)
    # The process group is closed at the process's exit, once every rank is there (runtime.init_distributed),
    # as for `qgmil train`: closing it right after the last barrier could abort a rank (a rare SIGABRT).
    model = create_encoder(encoder, weights, seed=seed)
    # The fallback mpp only concerns slides without one, which have no features yet: adding it on a rerun
    # (after "no mpp" failures) resumes the same extraction. The pixel limit only decides which images are read.
    tiling = {k: v for k, v in asdict(settings).items() if k not in ("mpp", "max_image_pixels")}
    manifest = make_manifest("wsi", model, tiling, command, mpp_fallback=settings.mpp)
    return run_extraction(
        sources, out, model, lambda source: prepare_slide(source, settings, out), manifest=manifest, dist=dist,
        batch_size=batch_size, num_workers=num_workers, precision=precision, skip_errors=skip_errors,
        progress=progress, shard=shard, stale_minutes=stale_minutes,
    )
