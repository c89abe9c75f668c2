"""Galleries of the most / least attended instances: tile crops from slides (`explain heatmap --patches`) and
cell images (`explain cells`), checked pixel by pixel against planted attention."""

import importlib.util
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from qgmil.cli import main
from qgmil.data import write_bag
from qgmil.explain.gallery import (
    CAPTION_H, GAP, LABEL_W, TITLE_H, GalleryRow, cell_paths, fit_tile, gallery_size, ranked_rows, ranks,
    render_gallery, run_cell_galleries, tile_crops, top_bottom,
)
from qgmil.explain.heatmap import HeatmapError, bag_geometry

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
PINK, BLOCK = (220, 150, 200), (90, 60, 160)  # tissue and a dark purple "tumour"
TRAIN = {"eval.folds": 2, "optim.epochs": 1, "optim.batch_size": 4, "runtime.progress": False,
         "runtime.tensorboard": False, "eval.bootstrap": 10}


def train(table, features, out, model="abmil"):
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    train_run(load_config(None, [], {**TRAIN, "data.table": table, "data.features": features, "model.name": model}), out)
    return out


def plant(run_dir, bag_id, weights):
    """Overwrite the bag's saved test attention (every fold that tested it) with `weights`."""
    weights = np.asarray(weights, dtype=np.float64)
    for path in run_dir.glob("folds/*/attention.h5"):
        with h5py.File(path, "r+") as f:
            if bag_id in f:
                f[bag_id][...] = (weights / weights.sum()).astype(np.float32)


def tile_at(png, row, col, tile_px=128, title=True):
    """The pixels of tile (row, col) of a gallery PNG (the layout of `render_gallery`)."""
    y = (TITLE_H if title else 0) + GAP + row * (tile_px + CAPTION_H + GAP)
    x = LABEL_W + GAP + col * (tile_px + GAP)
    return png[y:y + tile_px, x:x + tile_px]


def is_colour(pixels, colour, tol=25):
    return np.abs(pixels.reshape(-1, 3).astype(int) - colour).max(axis=1).mean() < tol


# --- selection and layout -----------------------------------------------------------------------

def test_top_bottom_and_ranks():
    w = np.array([0.1, 0.4, 0.2, 0.2, 0.05, 0.05])
    top, bottom = top_bottom(w, 2)
    assert top.tolist() == [1, 2] and bottom.tolist() == [4, 5]  # ties keep bag order, both by decreasing weight
    assert ranks(w).tolist() == [4, 1, 2, 3, 5, 6]
    top, bottom = top_bottom(w, 4)  # never overlapping: 4 + 2
    assert top.tolist() == [1, 2, 3, 0] and bottom.tolist() == [4, 5]
    top, bottom = top_bottom([1.0], 3)
    assert top.tolist() == [0] and bottom.size == 0
    with pytest.raises(ValueError, match="k must be"):
        top_bottom(w, 0)
    rows = ranked_rows("abmil", w, 2, lambda idx: [np.zeros((4, 4, 3), np.uint8)] * len(idx))
    assert [r.label for r in rows] == ["abmil\ntop 2", "abmil\nbottom 2"]
    assert rows[0].captions == ["#1  0.4", "#2  0.2"] and rows[1].captions == ["#5  0.05", "#6  0.05"]


def test_fit_tile_letterboxes():
    tile = fit_tile(np.zeros((20, 40, 3), np.uint8), 64)
    assert tile.shape == (64, 64, 3)
    assert (tile[16:48] == 0).all() and (tile[:16] == 255).all() and (tile[48:] == 255).all()


def test_render_gallery_is_pixel_exact(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0)]
    rows = [GalleryRow("run a\ntop 3", [np.full((50, 50, 3), c, np.uint8) for c in colours], ["#1", "#2", "#3"]),
            GalleryRow("run a\nbottom 1", [np.full((30, 60, 3), 90, np.uint8)], ["#9"])]
    out = render_gallery(rows, tmp_path / "g.png", title="bag", tile_px=64)
    assert not list(tmp_path.glob(".*.tmp"))
    with Image.open(out) as im:
        assert im.size == gallery_size(2, 3, 64) == (LABEL_W + 3 * 70 + GAP, TITLE_H + 2 * (64 + CAPTION_H + GAP) + GAP)
        png = np.asarray(im.convert("RGB"))
    for col, colour in enumerate(colours):
        assert (tile_at(png, 0, col, 64) == colour).all()
    assert (tile_at(png, 1, 0, 64)[20:44] == 90).all()  # letterboxed 30 x 60 -> rows 16..48 of the tile
    with pytest.raises(ValueError, match="captions"):
        render_gallery([GalleryRow("x", [np.zeros((4, 4, 3), np.uint8)], [])], tmp_path / "bad.png")


# --- slide tiles ----------------------------------------------------------------------------------

def make_slide(path, size=(2048, 1536), block=(2, 1, 2, 2)):
    """A textured pink slide, white glass in its right quarter and a purple block of tiles
    (x, y, w, h in 256 px tiles); returns the block's tile indices in the 8 x 6 grid of `grid_coords`."""
    rng = np.random.default_rng(0)
    w, h = size
    small = (np.array(PINK) + rng.integers(-15, 15, (h // 16, w // 16, 3))).clip(0, 255).astype(np.uint8)
    image = np.array(Image.fromarray(small).resize(size, Image.NEAREST))
    image[:, 3 * w // 4:] = 255
    bx, by, bw, bh = block
    image[by * 256:(by + bh) * 256, bx * 256:(bx + bw) * 256] = BLOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    coords = grid_coords()
    inside = ((coords[:, 0] >= bx * 256) & (coords[:, 0] < (bx + bw) * 256)
              & (coords[:, 1] >= by * 256) & (coords[:, 1] < (by + bh) * 256))
    return np.flatnonzero(inside)


def grid_coords(nx=8, ny=6, patch=256):
    ys, xs = np.mgrid[0:ny, 0:nx]
    return np.stack([xs.ravel() * patch, ys.ravel() * patch], axis=1)


def test_tile_crops_find_the_planted_block(tmp_path):
    block = make_slide(tmp_path / "s.png")
    coords = grid_coords()
    a = np.full(len(coords), 1.0)
    a[block] = 20.0 + np.arange(len(block))
    top, bottom = top_bottom(a, len(block))
    assert sorted(top) == sorted(block)
    crops = tile_crops(tmp_path / "s.png", coords, 256, top)
    assert len(crops) == 4 and all(c.shape == (128, 128, 3) and c.dtype == np.uint8 for c in crops)
    assert all(is_colour(c, BLOCK, tol=2) for c in crops)
    assert not any(is_colour(c, BLOCK) for c in tile_crops(tmp_path / "s.png", coords, 256, bottom))
    with pytest.raises(HeatmapError, match="missing.png"):
        tile_crops(tmp_path / "missing.png", coords, 256, [0])


@pytest.mark.skipif(importlib.util.find_spec("openslide") is None and importlib.util.find_spec("tiffslide") is None,
                    reason="needs openslide or tiffslide")
def test_tile_crops_on_real_svs(tmp_path):
    if not SLIDE.is_file():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{SLIDE} not found")
        pytest.skip(f"{SLIDE} not found")
    coords = grid_coords(4, 5, 512)  # 512 px tiles of the 2220 x 2967 region
    a = np.random.default_rng(0).random(len(coords))
    rows = ranked_rows("CMU-1", a, 3, lambda idx: tile_crops(SLIDE, coords, 512, idx))
    crops = rows[0].images + rows[1].images
    assert len(crops) == 6 and all(c.shape == (128, 128, 3) for c in crops)
    assert np.mean([c.std() for c in crops]) > 5  # tissue texture, not blank tiles
    out = render_gallery(rows, tmp_path / "cmu.png", title="CMU-1")
    with Image.open(out) as im:
        assert im.size == gallery_size(2, 3)


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """(run, slides folder): a run on four 8 x 6-tile bags whose slides are PNGs with a planted purple block;
    the test attention of bag b0 is planted on that block."""
    root = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(0)
    coords = grid_coords()
    for i in range(4):
        block = make_slide(root / "slides" / f"b{i}.png")
        write_bag(root / "features" / f"b{i}.h5", rng.standard_normal((len(coords), 8)).astype(np.float32),
                  coords.astype(np.float32), attrs={"patch_size_px": 256})
    pd.DataFrame({"bag_id": [f"b{i}" for i in range(4)], "label": ["x", "y"] * 2}).to_csv(root / "labels.csv",
                                                                                          index=False)
    run = train(root / "labels.csv", root / "features", root / "run")
    a = np.ones(len(coords))
    a[block] = 50.0 + np.arange(len(block))
    plant(run, "b0", a)
    return run, root / "slides"


def test_explain_heatmap_patches_and_tissue_only(slide_run, tmp_path):
    run, slides = slide_run
    out = tmp_path / "figs"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--bags", "b0", "--slides", str(slides),
                                       "--patches", "4", "--tissue-only", "--max-size", "256", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["b0.png", "b0_patches.png"]
    with Image.open(out / "b0_patches.png") as im:
        assert im.size == gallery_size(2, 4)
        png = np.asarray(im.convert("RGB"))
    assert all(is_colour(tile_at(png, 0, c), BLOCK, tol=2) for c in range(4))  # top row: the planted block
    assert not any(is_colour(tile_at(png, 1, c), BLOCK) for c in range(4))

    # heat panel: 2048 x 1536 at scale 8 -> 256 x 192, shown 2x, below a 40 px title; glass is x >= 1536
    def glass_is_white(path):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=int)
        glass = rgb[40 + 20:40 + 2 * 192 - 20, 2 * 192 + 20:2 * 256 - 20]
        tissue = rgb[40 + 20:40 + 2 * 192 - 20, 20:2 * 192 - 20]
        assert np.abs(tissue - PINK).max(axis=2).mean() > 40  # the tissue is painted
        return bool((glass > 245).all())

    assert glass_is_white(out / "b0.png")
    plain = tmp_path / "plain"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--bags", "b0", "--slides", str(slides),
                                       "--max-size", "256", "--out", str(plain)])
    assert result.exit_code == 0, result.output
    assert not glass_is_white(plain / "b0.png") and not (plain / "b0_patches.png").exists()

    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--patches", "3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--patches needs the slides (--slides)" in result.output


def test_cell_gallery_refuses_bags_without_names(slide_run, tmp_path):
    run, _ = slide_run
    result = CliRunner().invoke(main, ["explain", "cells", str(run), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert re.search(r"features/b\d\.h5: the feature file has no `instance_names`", result.output), result.output


# --- cells ----------------------------------------------------------------------------------------

RED = (220, 30, 30)


def make_cells(root, samples=6, per_sample=7):
    """IHC crops of scikit-image as ROOT/<class>/<sample>/cell_k.png (sizes vary); cells 2 and 5 of every
    sample are plain red ("positive")."""
    image = pytest.importorskip("skimage.data").immunohistochemistry()
    for s in range(samples):
        folder = root / ("pos" if s % 2 else "neg") / f"s{s}"
        folder.mkdir(parents=True)
        for k in range(per_sample):
            y, x = 31 * s + 17 * k, 23 * k + 9 * s
            crop = image[y:y + 40 + k, x:x + 40 + k].copy()
            if k in (2, 5):
                crop[:] = RED
            Image.fromarray(crop).save(folder / f"cell_{k}.png")


@pytest.fixture(scope="module")
def cell_runs(tmp_path_factory):
    from qgmil.extract.cells import extract_cells

    root = tmp_path_factory.mktemp("cells")
    make_cells(root / "cells")
    extract_cells(root / "cells", root / "bags", "timm:test_vit", weights="random", num_workers=0, progress=False,
                  device="cpu", batch_size=16)
    pd.DataFrame({"bag_id": [f"s{s}" for s in range(6)], "label": ["neg", "pos"] * 3}).to_csv(root / "labels.csv",
                                                                                              index=False)
    features = root / "bags" / "features"
    return {m: train(root / "labels.csv", features, root / m, model=m) for m in ("abmil", "mean_pool")}, root


def test_cell_paths_and_top_k_selection(cell_runs):
    runs, root = cell_runs
    features = root / "bags" / "features"
    paths = cell_paths([features / "s1.h5"], "s1")
    assert paths == [root / "cells" / "pos" / "s1" / f"cell_{k}.png" for k in range(7)]
    predictions = pd.read_csv(runs["abmil"] / "predictions.csv")
    fold = predictions.loc[predictions["bag_id"] == "s1", "fold"].item()
    with h5py.File(runs["abmil"] / "folds" / f"seed0-fold{fold}" / "attention.h5") as f:
        a = f["s1"][()]
    top, bottom = top_bottom(a, 3)
    by_weight = sorted(range(7), key=lambda i: -a[i])
    assert [paths[i].name for i in top] == [f"cell_{i}.png" for i in by_weight[:3]]
    assert [paths[i].name for i in bottom] == [f"cell_{i}.png" for i in by_weight[-3:]]


def test_explain_cells_two_runs_planted(cell_runs, tmp_path):
    runs, root = cell_runs
    plant(runs["abmil"], "s3", [1, 1, 40, 1, 1, 30, 1])  # cells 2 and 5 are the red ones
    out = tmp_path / "gal"
    result = CliRunner().invoke(main, ["explain", "cells", str(runs["abmil"]), str(runs["mean_pool"]),
                                       "--bags", "s3", "--top", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.glob("*.png")] == ["s3_cells.png"]
    with Image.open(out / "s3_cells.png") as im:
        assert im.size == gallery_size(4, 2)  # top + bottom row per run
        png = np.asarray(im.convert("RGB"))
    assert is_colour(tile_at(png, 0, 0), RED, tol=2) and is_colour(tile_at(png, 0, 1), RED, tol=2)
    assert not any(is_colour(tile_at(png, 1, c), RED) for c in range(2))
    # each tile is the cell image itself, fitted to 128 px: cell_2 (42 px) is the first of the top row
    with Image.open(root / "cells" / "pos" / "s3" / "cell_2.png") as cell:
        assert (tile_at(png, 0, 0) == fit_tile(np.asarray(cell.convert("RGB")))).all()

    # default bags: the first 3 test bags of the first run
    written = run_cell_galleries([runs["mean_pool"]], tmp_path / "d", top=3)
    first = list(dict.fromkeys(pd.read_csv(runs["mean_pool"] / "predictions.csv", dtype={"bag_id": str})["bag_id"]))
    assert [p.name for p in written] == [f"{b}_cells.png" for b in first[:3]]
    with Image.open(written[0]) as im:
        assert im.size == gallery_size(2, 3)


def test_explain_cells_on_a_survival_and_a_regression_run(cell_runs, tmp_path):
    """The attention is the same object for every task: galleries of runs with other targets rank the same way."""
    runs, root = cell_runs
    table = root / "targets.csv"
    pd.DataFrame({"bag_id": [f"s{s}" for s in range(6)], "time": [5, 40, 9, 33, 12, 50], "event": [1, 1, 0, 1, 1, 0],
                  "score": [0.1, 2.0, 0.3, 1.7, 0.2, 2.4]}).to_csv(table, index=False)
    features = root / "bags" / "features"
    for task, keys in (("survival", {}), ("regression", {"data.columns.targets": ["score"]})):
        from qgmil.rundir.config import load_config
        from qgmil.train.run import train_run

        run = tmp_path / task
        train_run(load_config(None, [], {**TRAIN, "data.table": table, "data.features": features, "task": task,
                                         "model.name": "abmil", **keys}), run)
        plant(run, "s3", [1, 1, 40, 1, 1, 30, 1])
        out = tmp_path / f"gal-{task}"
        result = CliRunner().invoke(main, ["explain", "cells", str(run), "--bags", "s3", "--top", "2",
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        with Image.open(out / "s3_cells.png") as im:
            assert im.size == gallery_size(2, 2)
            png = np.asarray(im.convert("RGB"))
        assert is_colour(tile_at(png, 0, 0), RED, tol=2) and is_colour(tile_at(png, 0, 1), RED, tol=2)
        assert not any(is_colour(tile_at(png, 1, c), RED) for c in range(2))


def test_explain_cells_moved_images(cell_runs, tmp_path):
    runs, root = cell_runs
    moved = tmp_path / "archive" / "cells"
    shutil.copytree(root / "cells", moved)
    shutil.move(root / "cells", root / "cells_gone")
    try:
        result = CliRunner().invoke(main, ["explain", "cells", str(runs["abmil"]), "--bags", "s1",
                                           "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert str(root / "cells" / "pos" / "s1") in result.output and "--images ROOT" in result.output
        for images in (moved, moved / "pos", moved / "pos" / "s1"):  # the sample folders' new root, at any depth
            result = CliRunner().invoke(main, ["explain", "cells", str(runs["abmil"]), "--bags", "s1", "--images",
                                               str(images), "--out", str(tmp_path / "o")])
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, ["explain", "cells", str(runs["abmil"]), "--bags", "s1", "--images",
                                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "not under --images" in result.output and "s1" in result.output
    finally:
        shutil.move(root / "cells_gone", root / "cells")


def test_bag_geometry_of_cell_bags_is_an_error(cell_runs):
    _, root = cell_runs
    with pytest.raises(HeatmapError, match="no coords"):
        bag_geometry(root / "bags" / "features" / "s0.h5")
