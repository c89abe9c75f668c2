"""Slides (openslide / tiffslide / Pillow), tissue segmentation and tile planning for feature extraction."""

import importlib.util
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qgmil.extract.slide import Slide, SlideError, open_slide
from qgmil.extract.tiling import TileDataset, Tiling, plan_tiles, tissue_fractions
from qgmil.extract.tissue import otsu_threshold, save_mask_png, segment_tissue

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("openslide", "tiffslide")}


@pytest.fixture
def cmu() -> Path:
    """The CMU-1 small region: a single-level Aperio H&E svs, 2220 x 2967 px at 0.499 um/px, 20x."""
    if not SLIDE.is_file():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{SLIDE} not found")
        pytest.skip(f"{SLIDE} not found")
    if not any(HAVE.values()):
        pytest.skip("needs openslide or tiffslide")
    return SLIDE


def write_png(path: Path, array: np.ndarray, **save) -> Path:
    Image.fromarray(array).save(path, **save)
    return path


def pyramid_tif(path: Path, level0: np.ndarray, downsamples=(1, 4, 16), mpp: float = 0.25) -> Path:
    """A lossless tiled pyramidal TIFF (levels by striding) that openslide and tiffslide both read."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for ds in downsamples:
            tw.write(level0[::ds, ::ds], tile=(128, 128), photometric="rgb", subfiletype=0 if ds == 1 else 1,
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def fake_slide(width: int, height: int, mpp: float | None = 0.5, downsamples=(1.0,)) -> SimpleNamespace:
    """What plan_tiles reads of a Slide, without an image behind it (for huge grids)."""
    fake = SimpleNamespace(path=Path("fake.svs"), dimensions=(width, height), mpp=mpp,
                           level_downsamples=tuple(downsamples),
                           level_dimensions=tuple((int(width // d), int(height // d)) for d in downsamples))
    fake.best_level = lambda downsample: Slide.best_level(fake, downsample)
    return fake


# --- slides -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_cmu_svs(cmu, backend):
    if not HAVE[backend]:
        pytest.skip(f"{backend} is not installed")
    with open_slide(cmu, backend=backend) as slide:
        assert slide.backend == backend and slide.path == cmu
        assert slide.dimensions == (2220, 2967)
        assert slide.level_dimensions == ((2220, 2967),) and slide.level_downsamples == (1.0,)
        assert slide.mpp == pytest.approx(0.499) and slide.magnification == 20
        assert slide.best_level(1.0) == 0 and slide.best_level(8.0) == 0

        region = slide.read_region((1000, 1200), 0, (64, 48))
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8 and region.std() > 5  # tissue
        # straddling the bottom-right corner: the part outside the slide is white, the inside is not
        corner = slide.read_region((2100, 2900), 0, (300, 200))
        assert corner.shape == (200, 300, 3)
        assert (corner[:, 120:] == 255).all() and (corner[67:] == 255).all()
        assert (corner[:67, :120] < 255).any()
        assert (slide.read_region((-50, -40), 0, (30, 20)) == 255).all()
        assert (slide.read_region((5000, 5000), 0, (30, 20)) == 255).all()
        np.testing.assert_array_equal(slide.read_region((-10, 0), 0, (30, 20))[:, 10:],
                                      slide.read_region((0, 0), 0, (20, 20)))

        thumb = slide.thumbnail(512)
        assert thumb.dtype == np.uint8 and thumb.shape[2] == 3 and max(thumb.shape[:2]) == 512
        assert abs(thumb.shape[1] / thumb.shape[0] - 2220 / 2967) < 0.01
    assert slide._handle is None  # closed by the context manager


def test_cmu_backends_agree(cmu):
    if not all(HAVE.values()):
        pytest.skip("needs both openslide and tiffslide")
    with open_slide(cmu) as a, open_slide(cmu, backend="tiffslide") as b:
        assert a.backend == "openslide"  # openslide first when both are installed
        ra, rb = (s.read_region((700, 1500), 0, (128, 96)).astype(int) for s in (a, b))
        assert np.abs(ra - rb).mean() < 2  # the same JPEG tiles, maybe different decoders


def test_plain_png(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (200, 300, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0  # transparent corner
    path = write_png(tmp_path / "plain.png", rgba)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "pillow" and slide.dimensions == (300, 200)
        assert slide.level_dimensions == ((300, 200),) and slide.level_downsamples == (1.0,)
        assert slide.mpp == 0.5 and slide.magnification is None
        region = slide.read_region((20, 30), 0, (40, 50))
        np.testing.assert_array_equal(region, rgba[30:80, 20:60, :3])
        assert (slide.read_region((0, 0), 0, (10, 10)) == 255).all()  # transparent -> white
        edge = slide.read_region((280, 190), 0, (40, 20))
        np.testing.assert_array_equal(edge[:10, :20], rgba[190:, 280:, :3])
        assert (edge[10:] == 255).all() and (edge[:, 20:] == 255).all()
        thumb = slide.thumbnail(100)
        assert thumb.shape[1] == 100 and abs(thumb.shape[0] - 67) <= 1 and thumb.dtype == np.uint8
        assert slide.thumbnail(1000).shape == (200, 300, 3)  # never upscaled
    # resolution tags: a scanner's (2 um/px) is used, an image editor's 72 dpi is not
    assert open_slide(write_png(tmp_path / "scan.png", rgba[..., :3], dpi=(12700, 12700))).mpp == pytest.approx(2.0)
    assert open_slide(write_png(tmp_path / "web.png", rgba[..., :3], dpi=(72, 72))).mpp is None


def test_plain_tif_falls_back_to_pillow(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    path = write_png(tmp_path / "strips.tif", rgb)  # a plain (strip) TIFF: openslide cannot open it
    with open_slide(path, mpp=1.0) as slide:
        assert slide.dimensions == (96, 64)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (96, 64)), rgb)


def test_pyramid_levels(tmp_path):
    if not any(HAVE.values()):
        pytest.skip("needs openslide or tiffslide")
    level0 = np.random.default_rng(2).integers(0, 255, (1536, 2048, 3), dtype=np.uint8)
    path = pyramid_tif(tmp_path / "pyramid.tif", level0)
    for backend in [b for b, ok in HAVE.items() if ok]:
        with open_slide(path, backend=backend) as slide:
            assert slide.level_downsamples == (1.0, 4.0, 16.0) and slide.mpp == pytest.approx(0.25)
            assert [slide.best_level(d) for d in (0.5, 1, 3.97, 3.95, 4, 15, 100)] == [0, 0, 1, 0, 1, 1, 2]
            np.testing.assert_array_equal(slide.read_region((400, 800), 1, (50, 40)),
                                          level0[::4, ::4][200:240, 100:150])
            # level-1 pixels past the level's edge (512 px wide) are white
            assert (slide.read_region((2000, 0), 1, (40, 8))[:, 12:] == 255).all()


def test_slide_errors(tmp_path):
    with pytest.raises(SlideError, match=r"missing\.svs.*no such slide"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    with pytest.raises(SlideError, match=r"garbage\.png"):
        open_slide(tmp_path / "garbage.png")
    if any(HAVE.values()):
        (tmp_path / "garbage.svs").write_bytes(b"not a slide")
        with pytest.raises(SlideError, match=r"garbage\.svs.*cannot open"):
            open_slide(tmp_path / "garbage.svs")
        (tmp_path / "garbage.tif").write_bytes(b"not a slide")  # neither the WSI reader nor Pillow
        with pytest.raises(SlideError, match=r"garbage\.tif.*cannot open.*nor can Pillow"):
            open_slide(tmp_path / "garbage.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SlideError, match=r"notes\.txt"):
        open_slide(tmp_path / "notes.txt")
    png = write_png(tmp_path / "ok.png", np.zeros((4, 4, 3), np.uint8))
    for bad in (0, -0.5, float("nan"), "x"):
        with pytest.raises(SlideError, match=r"ok\.png.*mpp"):
            open_slide(png, mpp=bad)
    with pytest.raises(ValueError, match="backend"):
        open_slide(png, backend="vips")
    with open_slide(png) as slide, pytest.raises(SlideError, match="level 3"):
        slide.read_region((0, 0), 3, (2, 2))


def test_slide_modules_do_not_import_torch():
    code = ("import sys, qgmil.extract.slide, qgmil.extract.tissue, qgmil.explain.heatmap; "
            "print(sorted(m for m in ('torch', 'openslide', 'tiffslide') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- tissue -------------------------------------------------------------------------------------

def synthetic_thumb(seed: int = 0):
    """(300, 400, 3) glass with a pink ellipse (a 15 px hole in it) and scattered pink specks -> thumb,
    blob (the ellipse without its hole), hole."""
    rng = np.random.default_rng(seed)
    thumb = (242 + rng.integers(-6, 7, (300, 400, 3))).astype(np.uint8)
    yy, xx = np.mgrid[0:300, 0:400]
    blob = ((xx - 150) / 90.0) ** 2 + ((yy - 150) / 70.0) ** 2 <= 1
    hole = (xx - 150) ** 2 + (yy - 140) ** 2 <= 15 ** 2
    pink = np.array([205, 120, 185]) + rng.integers(-25, 25, (300, 400, 3))
    thumb[blob & ~hole] = pink[blob & ~hole].clip(0, 255)
    salt = rng.random((300, 400)) < 0.003  # single coloured pixels on the glass
    salt &= ((xx - 150) / 100.0) ** 2 + ((yy - 150) / 80.0) ** 2 > 1
    thumb[salt] = (60, 20, 160)
    thumb[5:8, 350:353] = (200, 60, 120)  # a 3 x 3 speck: survives the median, not the opening
    return thumb, blob & ~hole, hole


def test_segment_synthetic_blob():
    thumb, tissue, hole = synthetic_thumb()
    mask = segment_tissue(thumb)
    assert mask.shape == (300, 400) and mask.dtype == bool
    assert mask[tissue].mean() > 0.99  # the blob
    assert mask[hole].all()  # its hole, filled
    yy, xx = np.mgrid[0:300, 0:400]
    around = ((xx - 150) / 95.0) ** 2 + ((yy - 150) / 75.0) ** 2 <= 1
    assert not mask[~around].any()  # no noise, no speck, no halo
    open_hole = segment_tissue(thumb, fill_holes=False)
    assert not open_hole[140, 150] and open_hole[tissue].mean() > 0.99


def test_segment_small_objects_and_threshold():
    thumb, tissue, _ = synthetic_thumb()
    thumb[200:230, 330:360] = (205, 120, 185)  # a 30 x 30 fragment: 0.75% of the thumbnail
    assert segment_tissue(thumb)[215, 345]
    assert not segment_tissue(thumb, min_area=0.01)[215, 345]
    assert segment_tissue(thumb, min_area=0.01)[tissue].mean() > 0.99
    # an explicit threshold above the blob's saturation (~105) finds nothing
    assert not segment_tissue(thumb, threshold=200).any()
    assert segment_tissue(thumb, threshold=50)[tissue].mean() > 0.99


def test_segment_blank_and_dark():
    rng = np.random.default_rng(0)
    assert not segment_tissue(np.full((64, 80, 3), 255, np.uint8)).any()
    glass = (235 + rng.integers(-8, 9, (128, 128, 3))).astype(np.uint8)
    assert not segment_tissue(glass).any()  # Otsu would split the noise; the saturation floor does not
    dark = rng.integers(0, 19, (64, 64, 3)).astype(np.uint8)  # saturated-looking but black: a border
    assert not segment_tissue(dark).any()
    with pytest.raises(ValueError, match="uint8"):
        segment_tissue(np.zeros((8, 8, 3), np.float32))


def test_otsu_threshold():
    values = np.concatenate([np.full(500, 10), np.full(300, 120)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 120
    low, high = (np.random.default_rng(0).normal(m, 8, 2000).clip(0, 255).astype(np.uint8) for m in (30, 160))
    assert low.max() <= otsu_threshold(np.concatenate([low, high])) < high.min()  # separates the two modes
    assert otsu_threshold(np.full(10, 7, np.uint8)) == 0.0  # one class: nothing to split


def test_save_mask_png(tmp_path):
    thumb, _, _ = synthetic_thumb()
    mask = segment_tissue(thumb)
    out = save_mask_png(mask, tmp_path / "masks" / "a.png", thumb)
    assert out.read_bytes()[:8] == PNG_SIGNATURE and not list(out.parent.glob(".*.tmp"))
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    assert rgb.shape == (300, 400, 3)
    assert (rgb[mask][:, 1] > rgb[mask][:, 0]).mean() > 0.95  # tissue tinted green
    assert rgb[~mask].max() < 110  # glass dimmed
    with Image.open(save_mask_png(mask, tmp_path / "plain.png")) as im:
        np.testing.assert_array_equal(np.asarray(im) > 0, mask)
    with pytest.raises(ValueError, match="differ"):
        save_mask_png(mask[:, :10], tmp_path / "bad.png", thumb)


def test_cmu_tissue(cmu, tmp_path):
    with open_slide(cmu) as slide:
        thumb = slide.thumbnail(1024)
    mask = segment_tissue(thumb)
    h, w = mask.shape
    assert 0.25 < mask.mean() < 0.5  # ~35%: the section runs down the middle, glass on both sides
    for corner in (mask[: h // 8, : w // 8], mask[: h // 8, -w // 8:], mask[-h // 8:, : w // 8]):
        assert not corner.any()
    assert mask[int(0.6 * h), int(0.45 * w)]  # inside the section
    save_mask_png(mask, tmp_path / "cmu.png", thumb)


# --- tiling -------------------------------------------------------------------------------------

def test_plan_left_half(tmp_path):
    png = write_png(tmp_path / "s.png", np.full((800, 1000, 3), 200, np.uint8))
    mask = np.zeros((80, 100), bool)
    mask[:, :50] = True  # tissue in the left half
    with open_slide(png, mpp=0.5) as slide:
        tiling = plan_tiles(slide, mask, tile_px=100)
        everything = plan_tiles(slide, mask, tile_px=100, min_tissue=0)
        unmasked = plan_tiles(slide, None, tile_px=100)
        half = mask.copy()
        half[:, 50:55] = True  # the column of tiles at x = 500 is now half tissue
        straddle = [len(plan_tiles(slide, half, tile_px=100, min_tissue=t)) for t in (0.5, 0.51)]
    ys, xs = np.mgrid[0:800:100, 0:500:100]
    np.testing.assert_array_equal(tiling.coords, np.stack([xs.ravel(), ys.ravel()], 1))
    assert tiling.coords.dtype == np.int64 and len(tiling) == 40 and (tiling.tissue == 1).all()
    assert tiling.level == 0 and tiling.read_size == tiling.tile_px == 100 and tiling.patch_size_level0 == 100
    assert tiling.mpp == 0.5 and tiling.target_mpp == 0.5 and tiling.tile_um == 50
    assert len(everything) == 80 and sorted(set(everything.tissue.tolist())) == [0.0, 1.0]
    assert len(unmasked) == 80 and (unmasked.tissue == 1).all() and unmasked.tissue.dtype == np.float32
    assert straddle == [48, 40]


def test_plan_bounds_and_stride():
    slide = fake_slide(1030, 790)
    tiling = plan_tiles(slide, None, tile_px=100)
    assert len(tiling) == 10 * 7
    assert (tiling.coords % 100 == 0).all() and (tiling.coords >= 0).all()
    assert (tiling.coords + 100 <= np.array([1030, 790])).all()
    strided = plan_tiles(slide, None, tile_px=100, stride_px=50)
    assert len(strided) == 19 * 14 and (strided.coords % 50 == 0).all()
    assert (strided.coords + 100 <= np.array([1030, 790])).all()
    # at half resolution a 100 px output tile covers 200 level-0 px, and so does the stride
    half = plan_tiles(slide, None, tile_px=100, magnification=10)
    assert half.read_size == 200 and len(half) == 5 * 3 and (half.coords % 200 == 0).all()
    assert len(plan_tiles(fake_slide(99, 500), None, tile_px=100)) == 0


def test_resolution_math():
    forty = fake_slide(4000, 3000, mpp=0.25)  # a 40x scan, single level
    at20 = plan_tiles(forty, None, tile_px=224, magnification=20)
    assert (at20.level, at20.read_size, at20.patch_size_level0) == (0, 448, 448.0)
    assert at20.target_mpp == pytest.approx(0.5) and at20.tile_um == pytest.approx(112)
    um = plan_tiles(forty, None, tile_px=224, tile_um=224)  # 1 um/px
    assert (um.read_size, um.target_mpp, um.tile_um) == (896, pytest.approx(1.0), pytest.approx(224))
    native = plan_tiles(forty, None, tile_px=224)
    assert (native.read_size, native.target_mpp) == (224, 0.25)
    # a pyramid: 1 um/px is level 1 (4x) as it is; 2 um/px is level 1 read at twice the size
    pyramid = fake_slide(8192, 8192, mpp=0.25, downsamples=(1.0, 4.0, 16.0))
    assert (lambda t: (t.level, t.read_size))(plan_tiles(pyramid, None, tile_px=256, tile_um=256)) == (1, 256)
    assert (lambda t: (t.level, t.read_size))(plan_tiles(pyramid, None, tile_px=256, tile_um=512)) == (1, 512)
    assert (lambda t: (t.level, t.read_size))(plan_tiles(pyramid, None, tile_px=256, magnification=2.5)) == (2, 256)


def test_near_native_snap():
    # within 2% of a level's resolution: read there at tile_px, no resampling
    for mpp in (0.495, 0.499, 0.5, 0.505, 0.509):
        t = plan_tiles(fake_slide(3000, 3000, mpp=mpp), None, tile_px=256, magnification=20)
        assert (t.level, t.read_size, t.patch_size_level0) == (0, 256, 256.0)
        assert t.target_mpp == pytest.approx(mpp)
    assert plan_tiles(fake_slide(3000, 3000, mpp=0.48), None, tile_px=256, magnification=20).read_size == 267
    # a level a little coarser than asked (3.95 vs 4) counts too
    pyramid = fake_slide(8192, 8192, mpp=0.2532, downsamples=(1.0, 4.0, 16.0))
    assert (lambda t: (t.level, t.read_size))(plan_tiles(pyramid, None, tile_px=256, tile_um=256)) == (1, 256)


def test_cmu_magnification_20_reads_level_0(cmu):
    with open_slide(cmu) as slide:
        tiling = plan_tiles(slide, None, tile_px=256, magnification=20)
    assert (tiling.level, tiling.read_size, tiling.patch_size_level0) == (0, 256, 256.0)
    assert tiling.target_mpp == pytest.approx(0.499) and len(tiling) == (2220 // 256) * (2967 // 256)


def test_plan_errors(tmp_path):
    with pytest.raises(SlideError, match=r"fake\.svs.*--mpp"):
        plan_tiles(fake_slide(1000, 1000, mpp=None), None, magnification=20)
    with pytest.raises(SlideError, match="--mpp"):
        plan_tiles(fake_slide(1000, 1000, mpp=None), None, tile_um=128)
    assert len(plan_tiles(fake_slide(1000, 1000, mpp=None), None, tile_px=100)) == 100  # level 0 needs no mpp
    with pytest.raises(ValueError, match="not both"):
        plan_tiles(fake_slide(1000, 1000), None, tile_um=128, magnification=20)
    with pytest.raises(SlideError, match="finer than the scan"):
        plan_tiles(fake_slide(1000, 1000, mpp=0.5), None, magnification=40)
    for bad in (dict(tile_px=0), dict(min_tissue=1.5), dict(stride_px=0), dict(magnification=-1), dict(tile_um=0)):
        with pytest.raises(ValueError):
            plan_tiles(fake_slide(1000, 1000), None, **bad)


def brute_force_fractions(mask, coords, patch, size):
    h, w = mask.shape
    out = []
    for x, y in coords:
        c0 = min(max(int(np.rint(x * w / size[0])), 0), w - 1)
        c1 = min(max(int(np.rint((x + patch) * w / size[0])), c0 + 1), w)
        r0 = min(max(int(np.rint(y * h / size[1])), 0), h - 1)
        r1 = min(max(int(np.rint((y + patch) * h / size[1])), r0 + 1), h)
        out.append(mask[r0:r1, c0:c1].mean())
    return np.array(out)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.integers(50, 3000), st.integers(50, 3000),
       st.integers(1, 400), st.floats(0.05, 0.95), st.integers(0, 2 ** 31))
def test_tissue_fractions_match_brute_force(h, w, width, height, patch, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    coords = np.stack([rng.integers(0, width, 40), rng.integers(0, height, 40)], axis=1)
    fast = tissue_fractions(mask, coords, patch, (width, height))
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, brute_force_fractions(mask, coords, patch, (width, height)), atol=1e-6)


def test_tissue_fractions_exact_at_full_resolution():
    rng = np.random.default_rng(0)
    mask = rng.random((300, 400)) < 0.4
    slide = fake_slide(400, 300)
    tiling = plan_tiles(slide, mask, tile_px=32, min_tissue=0)
    expected = [mask[y:y + 32, x:x + 32].mean() for x, y in tiling.coords]
    np.testing.assert_allclose(tiling.tissue, expected, atol=1e-6)
    # a thumbnail 8x smaller, tiles aligned to its pixels: the mean over 4 x 4 mask pixels
    small = rng.random((40, 50)) < 0.5
    tiling = plan_tiles(fake_slide(400, 320), small, tile_px=32, min_tissue=0)
    np.testing.assert_allclose(tiling.tissue, [small[y // 8:y // 8 + 4, x // 8:x // 8 + 4].mean()
                                               for x, y in tiling.coords], atol=1e-6)


def test_plan_100k_tiles_is_fast():
    slide = fake_slide(317 * 224, 317 * 224, mpp=0.5)  # 100,489 tiles of 224 px
    yy, xx = np.mgrid[0:2048, 0:2048]
    mask = (xx - 1024) ** 2 + (yy - 1024) ** 2 < 900 ** 2
    plan_tiles(slide, mask, tile_px=224, magnification=20)  # warm-up
    start = time.perf_counter()
    tiling = plan_tiles(slide, mask, tile_px=224, magnification=20, min_tissue=0)
    seconds = time.perf_counter() - start
    assert len(tiling) == 317 * 317
    assert seconds < 2.0, f"plan_tiles took {seconds:.2f} s for 100k tiles"


# --- reading tiles ------------------------------------------------------------------------------

def test_tile_dataset_reads_regions(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    png = write_png(tmp_path / "s.png", rgb)
    with open_slide(png, mpp=0.25) as slide:
        native = plan_tiles(slide, None, tile_px=128)
        resized = plan_tiles(slide, None, tile_px=64, magnification=20)  # 128 px read -> 64 px
    data = TileDataset(png, native)
    assert len(data) == 6 * 4
    for i in (0, 5, len(data) - 1):
        x, y = native.coords[i]
        tile = data[i]
        assert isinstance(tile, torch.Tensor) and tile.dtype == torch.uint8 and tile.shape == (128, 128, 3)
        np.testing.assert_array_equal(tile.numpy(), rgb[y:y + 128, x:x + 128])
    assert resized.read_size == 128 and resized.tile_px == 64
    x, y = resized.coords[7]
    expected = Image.fromarray(rgb[y:y + 128, x:x + 128]).resize((64, 64), Image.Resampling.BILINEAR,
                                                                  reducing_gap=3.0)
    tile = TileDataset(png, resized)[7]
    assert tile.shape == (64, 64, 3)
    np.testing.assert_array_equal(tile.numpy(), np.asarray(expected))


def test_tile_dataset_pyramid_level(tmp_path):
    if not any(HAVE.values()):
        pytest.skip("needs openslide or tiffslide")
    level0 = np.random.default_rng(4).integers(0, 255, (1536, 2048, 3), dtype=np.uint8)
    path = pyramid_tif(tmp_path / "pyramid.tif", level0)
    with open_slide(path) as slide:
        tiling = plan_tiles(slide, None, tile_px=64, tile_um=64)  # 1 um/px: level 1 (4x) as it is
    assert (tiling.level, tiling.read_size, tiling.patch_size_level0) == (1, 64, 256.0) and len(tiling) == 8 * 6
    x, y = tiling.coords[9]
    np.testing.assert_array_equal(TileDataset(path, tiling)[9].numpy(),
                                  level0[::4, ::4][y // 4:y // 4 + 64, x // 4:x // 4 + 64])


def test_tile_dataset_in_workers(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 255, (256, 384, 3), dtype=np.uint8)
    png = write_png(tmp_path / "s.png", rgb)
    with open_slide(png, mpp=0.5) as slide:
        tiling = plan_tiles(slide, None, tile_px=64)
    data = TileDataset(png, tiling)
    first = data[0]  # opens the slide in this process
    assert data._slide is not None
    clone = pickle.loads(pickle.dumps(data))
    assert clone._slide is None and clone.slide_path == png
    torch.testing.assert_close(clone[0], first)
    loader = torch.utils.data.DataLoader(data, batch_size=5, num_workers=2)
    batches = torch.cat(list(loader))
    assert batches.shape == (len(tiling), 64, 64, 3)
    expected = torch.stack([torch.from_numpy(rgb[y:y + 64, x:x + 64].copy()) for x, y in tiling.coords])
    torch.testing.assert_close(batches, expected)


# --- end to end on the real slide ---------------------------------------------------------------

def test_cmu_plan_end_to_end(cmu):
    with open_slide(cmu) as slide:
        thumb = slide.thumbnail(2048)
        mask = segment_tissue(thumb)
        tiling = plan_tiles(slide, mask, tile_px=256, magnification=20, min_tissue=0.5)
        assert isinstance(tiling, Tiling)
        assert 15 <= len(tiling) <= 60  # 31 of the 88 grid tiles
        assert (tiling.coords >= 0).all() and (tiling.coords + 256 <= np.array(slide.dimensions)).all()
        assert (tiling.tissue >= 0.5).all()
        # no tile centred on the glass of the top-left and top-right corners
        centres = tiling.coords + 128
        for x0, x1 in ((0, 600), (1700, 2220)):
            assert not ((centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] < 600)).any()
        tile = TileDataset(cmu, tiling)[0].numpy()
        x, y = tiling.coords[0]
        np.testing.assert_array_equal(tile, slide.read_region((int(x), int(y)), 0, (256, 256)))
