"""Extraction speed: tiles/s for reading alone, for the encoder alone, and for the whole extraction.

    python benchmarks/extract_throughput.py [--encoder timm:resnet18] [--copies 8] [--workers 1] [--device cpu]
                                            [--mosaic K]

Slides: copies of ../shared/data/CMU-1-Small-Region.svs (or --slide); --mosaic K first tiles it K x K into
one pyramidal TIFF (a slide K^2 times larger, as real slides are, so per-slide costs weigh less). Reading = TileDataset through a
DataLoader (openslide reads + resize, no encoder), every tile of the grid at 224 px / 20x. Encoder = the
same number of random uint8 tiles through the encoder. Whole = `extract_slides` (tissue mask, tiling,
reading and encoding, writing), with the share of time the encoder was busy: near 100% means the readers
keep it fed. All figures are measured in this one run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from qgmil.extract.encoders import create_encoder
from qgmil.runtime import autocast_dtype
from qgmil.extract.slide import open_slide
from qgmil.extract.tiling import TileDataset, plan_tiles
from qgmil.extract.wsi import TilingSettings, extract_slides

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"


def mosaic(slide_path: Path, k: int, out: Path) -> tuple[Path, float]:
    """A K x K mosaic of the slide's level 0 as a tiled pyramidal TIFF -> (path, its mpp).

    Three levels, one page each (openslide reads pages, not SubIFDs)."""
    import numpy as np
    import tifffile

    with open_slide(slide_path) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
    image = np.tile(image, (k, k, 1))
    with tifffile.TiffWriter(out, bigtiff=True) as tif:
        options = dict(tile=(256, 256), photometric="rgb", compression="zlib", compressionargs={"level": 1})
        tif.write(image, **options)
        for factor in (4, 16):
            tif.write(image[::factor, ::factor], subfiletype=1, **options)
    return out, mpp


def read_rate(slides, workers: int, batch: int, mpp: float | None) -> tuple[int, float]:
    total, start = 0, time.perf_counter()
    for path in slides:
        with open_slide(path, mpp=mpp) as slide:
            tiling = plan_tiles(slide, None, tile_px=224, magnification=20)
        loader = torch.utils.data.DataLoader(TileDataset(path, tiling), batch_size=batch, num_workers=workers)
        for tiles in loader:
            total += len(tiles)
    return total, total / (time.perf_counter() - start)


@torch.inference_mode()
def encode_rate(encoder, n: int, batch: int, device: torch.device, precision: str) -> float:
    dtype = autocast_dtype(device, precision)
    tiles = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        encoder(tiles.to(device))  # warm-up
        start, done = time.perf_counter(), 0
        while done < n:
            encoder(tiles.to(device)).float().cpu()
            done += batch
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=SLIDE)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--encoder", default="timm:resnet18")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--mosaic", type=int, default=1, help="tile the slide K x K into one larger slide")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.slide.is_file():
        raise SystemExit(f"{args.slide}: slide not found (give --slide)")

    with tempfile.TemporaryDirectory() as tmp:
        source, mpp = args.slide.resolve(), None
        if args.mosaic > 1:
            source, mpp = mosaic(source, args.mosaic, Path(tmp) / "mosaic.tif")
        slides = []
        for i in range(args.copies):
            link = Path(tmp) / f"slide{i}{source.suffix}"
            link.symlink_to(source)
            slides.append(link)
        n0, read0 = read_rate(slides, 0, args.batch, mpp)
        _, read_w = read_rate(slides, args.workers, args.batch, mpp)
        encoder = create_encoder(args.encoder, "random").to(device)
        enc = encode_rate(encoder, max(n0 // 2, args.batch * 2), args.batch, device, args.precision)
        summary = extract_slides(slides, Path(tmp) / "out", args.encoder, weights="random",
                                 settings=TilingSettings(tile_px=224, magnification=20, mpp=mpp), batch_size=args.batch,
                                 num_workers=args.workers, device=args.device, precision=args.precision,
                                 progress=False)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                      if device.type == "cuda" else ""))
    mosaic_note = f" ({args.mosaic}x{args.mosaic} mosaic)" if args.mosaic > 1 else ""
    print(f"slides: {args.copies} x {args.slide.name}{mosaic_note}, 224 px tiles at 20x; encoder {args.encoder} "
          f"(random weights), batch {args.batch}, precision {args.precision}\n")
    rows = [
        ("reading, 0 workers (all grid tiles)", read0),
        (f"reading, {args.workers} workers (all grid tiles)", read_w),
        (f"encoder alone ({args.encoder})", enc),
        (f"whole extraction, {args.workers} workers (tissue tiles)", summary.instances_per_second),
    ]
    print(f"| {'stage':55s} | tiles/s |\n|{'-' * 57}|---------|")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"encoder": args.encoder, "workers": args.workers, "device": str(device),
                       "rows": [{"stage": name, "tiles_per_s": rate} for name, rate in rows],
                       "encoder_busy": summary.encoder_busy}, f, indent=1)
    for name, rate in rows:
        print(f"| {name:55s} | {rate:7.1f} |")
    print(f"\nreader headroom (reading with workers / encoder alone): {read_w / enc:.2f}x")
    print(f"encoder busy during the whole extraction: {100 * summary.encoder_busy:.0f}% of the time")
    waited = sum(r.prepare_wait_seconds for r in summary.results)
    print(f"waiting for slide preparation (tissue mask, tiling; the first slide's is not overlapped): {waited:.1f} s "
          f"of {sum(r.seconds for r in summary.results):.1f} s")


if __name__ == "__main__":
    main()
