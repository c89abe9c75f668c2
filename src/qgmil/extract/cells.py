"""Single-cell images -> one feature bag per sample (patient, smear), keeping each cell's file name.

Two ways to say which cells make a sample:
  a folder tree   every folder that directly holds images is one sample, its name the bag id
                  (ROOT/<sample>/*.png, or ROOT/<class>/<sample>/*.png: then the class is just a parent folder)
  a table         CSV/TSV with an image path column and a sample id column (paths relative to the table)

Each bag file has features (N, D), `instance_names` (N,) (the cell image paths relative to the sample folder
or as written in the table), and provenance attributes; there are no coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runtime import init_distributed
from .engine import (BagSource, ExtractError, ExtractSummary, PreparedBag, check_run_options, is_whole, make_manifest,
                     parse_shard, run_extraction)
from .locks import STALE_MINUTES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

DEFAULT_ENCODER = "dinobloom-s"  # `qgmil extract cells` without --encoder


@dataclass
class CellSample:
    folder: Path  # where instance names are relative to
    images: list[Path]
    names: list[str]


def find_samples(root: str | Path) -> dict[str, CellSample]:
    """{sample id: its images}: every folder under `root` that directly holds images is a sample."""
    root = Path(root)
    if not root.is_dir():
        raise ExtractError(f"{root}: no such folder")
    groups: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            groups.setdefault(path.parent, []).append(path)
    if not groups:
        raise ExtractError(f"{root}: no cell images found (looked for {', '.join(IMAGE_SUFFIXES)} in its folders)")
    samples: dict[str, CellSample] = {}
    for folder, images in groups.items():
        if folder == root:
            raise ExtractError(f"{root}: images lie directly in the root folder; put each sample's cells in its "
                               "own folder (ROOT/<sample>/...) or give a table with --table")
        bag_id = folder.name
        if bag_id in samples:
            raise ExtractError(f"two sample folders are both named {bag_id!r}: {samples[bag_id].folder} and {folder}; "
                               "sample names must be unique (they name the feature files)")
        samples[bag_id] = CellSample(folder, images, [p.relative_to(folder).as_posix() for p in images])
    return samples


def samples_from_table(table: str | Path, path_column: str = "path", sample_column: str = "sample_id"
                       ) -> dict[str, CellSample]:
    """{sample id: its images} from a table with one row per cell image."""
    from ..data.table import read_any_table

    table = Path(table)
    frame = read_any_table(table)
    missing = [c for c in (path_column, sample_column) if c not in frame.columns]
    if missing:
        raise ExtractError(f"{table}: no column {', '.join(map(repr, missing))} (columns: {', '.join(frame.columns)}); "
                           "name the columns with --path-column / --sample-column")
    samples: dict[str, CellSample] = {}
    absent = []
    for row, (raw, sample) in enumerate(zip(frame[path_column], frame[sample_column]), start=2):
        if raw != raw or sample != sample:  # NaN: an empty cell of the table
            raise ExtractError(f"{table}, row {row}: empty {path_column} or {sample_column}")
        path = Path(str(raw))
        path = path if path.is_absolute() else table.parent / path
        if not path.is_file():
            absent.append(f"row {row}: {raw}")
        entry = samples.setdefault(str(sample), CellSample(table.parent, [], []))
        entry.images.append(path)
        entry.names.append(str(raw))
    if absent:
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise ExtractError(f"{table}: image files not found: {'; '.join(absent[:5])}{more}")
    return samples


class CellDataset(torch.utils.data.Dataset):
    """Cell images of one sample, each as (size, size, 3) uint8 RGB (resized; cell crops are near-square)."""

    def __init__(self, images: Sequence[Path], size: int):
        self.images, self.size = list(images), size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.images[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (self.size, self.size):
                    image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
                return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        except (OSError, Image.DecompressionBombError) as err:  # Pillow's guard stays on for cells
            raise ExtractError(f"{path}: cannot read the image ({err})") from None
        except MemoryError:
            raise ExtractError(f"{path}: out of memory decoding the image") from None


def extract_cells(
    root: str | Path | None,
    out: str | Path,
    encoder: str = DEFAULT_ENCODER,
    *,
    table: str | Path | None = None,
    path_column: str = "path",
    sample_column: str = "sample_id",
    weights: str = "pretrained",
    cell_px: int | None = None,
    batch_size: int = 128,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    skip_errors: bool = False,
    seed: int = 0,
    progress: bool = True,
    command: str | None = None,
    shard: str | tuple[int, int] | None = None,
    stale_minutes: float = STALE_MINUTES,
) -> ExtractSummary:
    """Extract one bag per sample (folder tree under `root`, or `table`) into `out` (resumable, torchrun-aware).

    cell_px: side the cells are resized to before the encoder (default: the encoder's input size, else 224).
    shard, stale_minutes: as in `extract_slides` (several jobs on one folder).
    """
    from .encoders import create_encoder

    shard = parse_shard(shard)
    check_run_options(batch_size, num_workers, stale_minutes)
    if cell_px is not None and not is_whole(cell_px, 8):
        raise ExtractError(f"--cell-px must be a whole number >= 8, got {cell_px!r}")  # 0 must not mean the default
    if (root is None) == (table is None):
        raise ExtractError("give either a root folder of sample folders or --table, not both or neither")
    samples = find_samples(root) if table is None else samples_from_table(table, path_column, sample_column)
    out = Path(out)
    sources = [BagSource(bag_id, str(s.folder) if table is None else f"{table} (sample {bag_id})", s)
               for bag_id, s in samples.items()]
    dist = init_distributed(device)
    # The process group is closed at the process's exit, once every rank is there (runtime.init_distributed),
    # as for `qgmil train`: closing it right after the last barrier could abort a rank (a rare SIGABRT).
    model = create_encoder(encoder, weights, seed=seed)
    size = cell_px or model.info.input_size or 224
    manifest = make_manifest("cells", model, {"cell_px": size}, command)

    def prepare(source: BagSource) -> PreparedBag:
        sample: CellSample = source.payload
        # image_root / instance_name is each cell's image: what `qgmil explain cells` shows.
        attrs = {"source": source.source, "image_root": str(sample.folder.resolve()), "cell_px": size,
                 "num_cells": len(sample.images)}
        return PreparedBag(source, CellDataset(sample.images, size), None, attrs,
                           {"instance_names": sample.names})

    return run_extraction(sources, out, model, prepare, manifest=manifest, dist=dist, batch_size=batch_size,
                          num_workers=num_workers, precision=precision, skip_errors=skip_errors, progress=progress,
                          shard=shard, stale_minutes=stale_minutes)
