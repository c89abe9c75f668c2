"""Hostile and broken inputs to slide reading, extraction and heatmaps (issue 15, part "slides").

A PNG that decodes to gigabytes, numeric options that mean nothing (0x, negative workers), a --slides folder
that matches no bag, a second job on a folder in use: each gets one clear error (or warning) naming the file,
option or bag, with nothing written that should not be. Memory bombs run under tests/capped.py's cap, so a
regression fails with MemoryError instead of exhausting the machine.
"""

import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from capped import run_capped
from lockholder import held_bag_lock
from click.testing import CliRunner
from PIL import Image

from qgmil.cli import main
from qgmil.extract.engine import ExtractError
from qgmil.extract.slide import SlideError, open_slide
from qgmil.extract.wsi import TilingSettings, extract_slides

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")  # the subprocesses import this checkout's qgmil
ENCODER = ["--encoder", "timm:test_vit", "--weights", "random", "--device", "cpu", "--workers", "0", "--quiet"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 50_000, rows: int = 100) -> Path:
    """A valid side x side 1-bit black PNG of ~300 KB (7 GB as RGB), written in milliseconds: the deflate
    stream of `rows` zero rows is made once, full-flushed (so it refers to nothing before it) and repeated."""
    block = bytes(1 + (side + 7) // 8) * rows  # each row: filter byte 0, then the packed pixels
    z = zlib.compressobj(9)
    first = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(block) + z.flush(zlib.Z_FULL_FLUSH)
    end = z.flush(zlib.Z_FINISH)[:-4]
    n = len(block) * (side // rows)
    adler = (n % 65521) << 16 | 1  # adler32 of n zero bytes
    idat = first + again * (side // rows - 1) + end + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_png_bomb_builder_is_a_real_png(tmp_path):
    small = png_bomb(tmp_path / "small.png", side=400)
    with Image.open(small) as image:
        image.load()  # decodes: the stream, its checksum and the CRCs are valid
        assert image.size == (400, 400) and image.mode == "1" and image.getextrema() == (0, 0)


# --- 1. decompression bombs ---------------------------------------------------------------------

def test_png_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1_000_000
    code = f"from qgmil.extract.slide import open_slide\nopen_slide({str(bomb)!r}, mpp=0.5).thumbnail(512)"
    result = run_capped(["-c", code], env=ENV)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qgmil.extract.slide.ImageTooLarge: ") and str(bomb) in last
    for part in ("50000 x 50000 px", "limit of 400 megapixels", "pyramidal TIFF", "--max-image-pixels",
                 "QGMIL_MAX_IMAGE_PIXELS"):
        assert part in last
    assert "MemoryError" not in result.stderr


def test_memory_error_while_decoding_names_the_slide(tmp_path):
    # The limit raised past the bomb: decoding it runs out of the capped memory, and says which slide did.
    # 1.5 GB: this process imports no torch, and the decode then fails at once instead of after 2.5 GB.
    bomb = png_bomb(tmp_path / "bomb.png")
    code = ("from qgmil.extract.slide import SlideError, open_slide\n"
            f"slide = open_slide({str(bomb)!r}, mpp=0.5, max_pixels=3_000_000_000)\n"
            "for read in (lambda: slide.thumbnail(512), lambda: slide.read_region((0, 0), 0, (256, 256))):\n"
            "    try:\n        read()\n    except SlideError as err:\n        print(err)\n")
    result = run_capped(["-c", code], cap_gb=1.5, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    thumbnail, region = result.stdout.strip().splitlines()
    assert thumbnail.startswith(f"{bomb}: out of memory reading a thumbnail (50000 x 50000 px")
    assert region.startswith(f"{bomb}: out of memory decoding the image")


def test_extract_refuses_a_png_bomb_with_one_error_line(tmp_path):
    bomb, out = png_bomb(tmp_path / "bomb.png"), tmp_path / "out"
    result = run_capped(["extract", "wsi", str(bomb), "--out", str(out), "--mpp", "0.5", *ENCODER], env=ENV,
                        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert str(bomb) in result.stderr and "limit of 400 megapixels" in result.stderr
    assert not list(out.glob("features/*.h5"))


def test_pixel_limit_settings(tmp_path, monkeypatch):
    png = tmp_path / "s.png"
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(png)
    with pytest.raises(SlideError, match=r"40 x 30 px .* limit of 0 megapixels"):
        open_slide(png, max_pixels=1000)
    assert open_slide(png, max_pixels=1200).dimensions == (40, 30)
    monkeypatch.setenv("QGMIL_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(SlideError, match="QGMIL_MAX_IMAGE_PIXELS"):
        open_slide(png)
    monkeypatch.setenv("QGMIL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="QGMIL_MAX_IMAGE_PIXELS must be a whole number"):
        open_slide(png)
    with pytest.raises(ExtractError, match="QGMIL_MAX_IMAGE_PIXELS"):
        TilingSettings()  # checked when the extraction is set up, not per slide
    monkeypatch.delenv("QGMIL_MAX_IMAGE_PIXELS")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_image_pixels must be a whole number"):
            open_slide(png, max_pixels=bad)


# --- 2. numeric options -------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--magnification", "0"), ("--magnification", "-20"), ("--magnification", "nan"), ("--tile-um", "-128"),
    ("--tile-um", "inf"), ("--mpp", "0"), ("--batch-size", "0"), ("--workers", "-1"), ("--tile-px", "4"),
    ("--min-tissue", "1.5"), ("--min-tissue", "nan"), ("--tissue-threshold", "300"), ("--stale-lock-minutes", "nan"),
    ("--max-image-pixels", "0"),
])
def test_bad_extract_wsi_option_is_one_usage_error(tmp_path, option, value):
    slide, out = tmp_path / "s.png", tmp_path / "out"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(slide)
    result = CliRunner().invoke(main, ["extract", "wsi", str(slide), "--out", str(out), option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--cell-px", "0"), ("--batch-size", "0"), ("--workers", "-2")])
def test_bad_extract_cells_option_is_one_usage_error(tmp_path, option, value):
    (tmp_path / "cells" / "p1").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "cells" / "p1" / "c.png")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", "cells", str(tmp_path / "cells"), "--out", str(out), option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not out.exists()


def test_library_entry_points_check_settings_before_creating_the_folder(tmp_path):
    from qgmil.extract.cells import extract_cells

    slide, out = tmp_path / "s.png", tmp_path / "out"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(slide)
    for settings, flag in ((dict(magnification=0), "--magnification"), (dict(tile_um=-1.0), "--tile-um"),
                           (dict(magnification=float("nan")), "--magnification"), (dict(tile_px=64.5), "--tile-px"),
                           (dict(tissue_threshold=-1), "--tissue-threshold"), (dict(mpp=float("inf")), "--mpp")):
        with pytest.raises(ExtractError, match=flag):
            TilingSettings(**settings)
    for kwargs, flag in ((dict(batch_size=0), "--batch-size"), (dict(num_workers=-1), "--workers"),
                         (dict(stale_minutes=0), "--stale-lock-minutes")):
        with pytest.raises(ExtractError, match=flag):
            extract_slides([slide], out, "timm:test_vit", weights="random", **kwargs)
        with pytest.raises(ExtractError, match=flag):
            extract_cells(tmp_path, out, "timm:test_vit", weights="random", **kwargs)
    with pytest.raises(ExtractError, match="--cell-px"):
        extract_cells(tmp_path, out, "timm:test_vit", weights="random", cell_px=0)
    assert not out.exists()


# --- 3. heatmaps and the --slides folder ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-bag run (2 folds, 1 epoch of mean pooling): its test bags have attention to draw."""
    from qgmil.data import prepare_dataset
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    root = tmp_path_factory.mktemp("hostile_heatmap")
    prepare_dataset("synthetic-wsi", root / "wsi", bags=4, min_instances=20, max_instances=40, dim=8, progress=False)
    config = load_config(None, [], {
        "data.table": root / "wsi" / "labels.csv", "data.features": root / "wsi" / "features", "eval.folds": 2,
        "optim.epochs": 1, "optim.batch_size": 4, "runtime.progress": False, "runtime.tensorboard": False,
        "model.name": "mean_pool", "eval.bootstrap": 10})
    train_run(config, root / "run")
    import pandas as pd

    bags = sorted(set(pd.read_csv(root / "run" / "predictions.csv", dtype={"bag_id": str})["bag_id"]))
    return root / "run", bags


def _heatmap(run, out, *args):
    return CliRunner().invoke(main, ["explain", "heatmap", str(run), "--out", str(out), *args])


def test_heatmap_slides_folder_matching_no_bag_is_an_error(tiny_run, tmp_path):
    run, bags = tiny_run
    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(np.full((32, 32, 3), 230, dtype=np.uint8)).save(slides / "other_name.png")
    (slides / f"{bags[0]}.h5").write_bytes(b"")  # a feature file is not a slide
    out = tmp_path / "heat"
    result = _heatmap(run, out, "--bags", ",".join(bags[:2]), "--slides", str(slides), "--patches", "2",
                      "--tissue-only")
    assert result.exit_code == 2, result.output
    assert f"error: {slides}: no slide for any of the bags drawn" in result.output
    assert all(b in result.output for b in bags[:2]) and "other_name.png" in result.output
    assert not out.exists()
    result = _heatmap(run, out, "--slides", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "nowhere" in result.output and not out.exists()


def test_heatmap_warns_naming_bags_without_a_slide(tiny_run, tmp_path):
    run, bags = tiny_run
    slides = tmp_path / "slides"
    slides.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(slides / f"{bags[0]}.png")
    out = tmp_path / "heat"
    result = _heatmap(run, out, "--bags", ",".join(bags[:2]), "--slides", str(slides), "--patches", "1",
                      "--tissue-only", "--max-size", "64")
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert bags[1] in warning and bags[0] not in warning.split("no slide for")[1]
    assert "drawn on white" in warning and "tissue masking" in warning and "patch grid" in warning
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{bags[0]}.png", f"{bags[0]}_patches.png",
                                                            f"{bags[1]}.png"])


def test_heatmap_unknown_colormap_is_an_error(tiny_run, tmp_path):
    run, _ = tiny_run
    result = _heatmap(run, tmp_path / "heat", "--cmap", "no_such_map")
    assert result.exit_code == 2 and "no_such_map" in result.output and not (tmp_path / "heat").exists()


# --- 4. extraction outputs ----------------------------------------------------------------------

def test_second_job_on_a_folder_in_use_encodes_nothing(tmp_path):
    # A first job holds the slide (its lock, its live pid); a second identical command leaves the slide to it.
    slide, out = tmp_path / "s0.png", tmp_path / "out"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(slide)
    with held_bag_lock(out / "locks", "s0", ENV) as holder:
        lock = out / "locks" / "s0.lock"
        before = lock.read_text()
        result = CliRunner().invoke(main, ["extract", "wsi", str(slide), "--out", str(out), "--mpp", "0.5",
                                           "--tile-px", "32", "--no-tissue", *ENCODER])
        assert result.exit_code == 0, result.output
        assert "0 extracted" in result.output and "1 busy" in result.output
        assert f"busy   s0: locked by {socket.gethostname()}:{holder.pid}" in result.output
        assert not (out / "features" / "s0.h5").exists() and lock.read_text() == before  # the holder's lock kept


def test_validation_failures_leave_no_output_folder(tmp_path):
    slide, out = tmp_path / "s.png", tmp_path / "out"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(slide)
    for args in (["--tile-um", "128", "--magnification", "20"],  # checked by the library, not click
                 ["--shard", "3/2"], ["--encoder", "no_such_encoder"], ["--weights", str(tmp_path / "none.pth")]):
        result = CliRunner().invoke(main, ["extract", "wsi", str(slide), "--out", str(out), *args])
        assert result.exit_code == 2 and result.output.startswith("error: "), (args, result.output)
        assert not out.exists(), args
    result = CliRunner().invoke(main, ["extract", "wsi", str(tmp_path / "empty_dir_missing"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
