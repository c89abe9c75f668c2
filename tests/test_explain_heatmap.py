"""Attention heatmaps: painting tiles at thumbnail scale, overlays, slides, and `qgmil explain heatmap`."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qgmil.explain.heatmap import (
    HeatmapError, attention_heatmap, bag_geometry, find_slide, normalise_attention, read_thumbnail, render_overlay,
    render_panels, restrict_to_tissue,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"


def grid(nx, ny, patch=256, origin=(0, 0)):
    ys, xs = np.mgrid[0:ny, 0:nx]
    return np.stack([xs.ravel() * patch + origin[0], ys.ravel() * patch + origin[1]], axis=1)


def test_three_by_three_exact_values():
    coords = grid(3, 3)
    a = np.arange(1, 10, dtype=float)
    a /= a.sum()
    heat = attention_heatmap(coords, a, 256, scale=32, normalise="none")
    assert heat.shape == (24, 24)  # 768 / 32
    centres = heat[4::8, 4::8]
    np.testing.assert_allclose(centres, a.reshape(3, 3), rtol=0, atol=1e-12)
    # every output pixel of a tile carries its value
    np.testing.assert_allclose(heat[8:16, 16:24], a[5], atol=1e-12)
    assert not np.isnan(heat).any()


def test_nan_outside_tiles_and_slide_size():
    coords = np.array([[256, 256], [1024, 512]])
    heat = attention_heatmap(coords, [0.25, 0.75], 256, slide_size=(2048, 1024), scale=64, normalise="none")
    assert heat.shape == (16, 32)
    assert np.isnan(heat[0, 0]) and np.isnan(heat[-1, -1])
    assert heat[4:8, 4:8] == pytest.approx(np.full((4, 4), 0.25))
    assert heat[8:12, 16:20] == pytest.approx(np.full((4, 4), 0.75))
    assert np.isfinite(heat).sum() == 32
    # a missing tile of a grid leaves a hole
    coords = np.delete(grid(3, 3), 4, axis=0)
    heat = attention_heatmap(coords, np.full(8, 1 / 8), 256, scale=32)
    assert np.isnan(heat[12, 12]) and np.isfinite(heat[4, 4])


def test_rank_and_minmax_normalisation():
    a = np.array([0.1, 0.4, 0.2, 0.2, 0.1]) / 1.0
    np.testing.assert_allclose(normalise_attention(a, "rank"), [0.125, 1.0, 0.625, 0.625, 0.125])
    np.testing.assert_allclose(normalise_attention([0.2, 0.5, 0.3], "rank"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalise_attention([0.2, 0.5, 0.3], "minmax"), [0.0, 1.0, 1 / 3])
    assert normalise_attention([1.0], "rank") == pytest.approx([1.0])
    assert normalise_attention([0.5, 0.5], "minmax") == pytest.approx([0.5, 0.5])
    heat = attention_heatmap(grid(3, 1), [0.2, 0.5, 0.3], 256, scale=256)  # default rank
    np.testing.assert_allclose(heat, [[0.0, 1.0, 0.5]])
    with pytest.raises(ValueError, match="normalise"):
        normalise_attention([1.0], "zscore")


def test_output_size_follows_scale():
    coords = grid(10, 5)
    a = np.full(50, 0.02)
    assert attention_heatmap(coords, a, 256, scale=256).shape == (5, 10)
    assert attention_heatmap(coords, a, 256, scale=100).shape == (13, 26)  # ceil(1280/100), ceil(2560/100)
    assert attention_heatmap(coords, a, 256, max_size=64).shape == (32, 64)  # default: long side <= max_size
    # overlapping tiles average
    heat = attention_heatmap([[0, 0], [128, 0]], [0.2, 0.8], 256, scale=64, normalise="none")
    assert heat.shape == (4, 6)
    assert heat[0, :2] == pytest.approx([0.2, 0.2]) and heat[0, 2:4] == pytest.approx([0.5, 0.5])
    assert heat[0, 4:] == pytest.approx([0.8, 0.8])


def test_bad_inputs():
    with pytest.raises(ValueError, match="coords"):
        attention_heatmap(np.zeros((3, 3)), np.ones(3) / 3, 256)
    with pytest.raises(ValueError, match="2 coords for 3"):
        attention_heatmap(np.zeros((2, 2)), np.ones(3) / 3, 256)
    with pytest.raises(ValueError, match="patch"):
        attention_heatmap(np.zeros((1, 2)), [1.0], 0)


def test_large_slide_is_fast():
    import time

    coords = grid(400, 250)  # 100k tiles, 102400 x 64000 px at level 0
    start = time.perf_counter()
    heat = attention_heatmap(coords, np.random.default_rng(0).random(coords.shape[0]), 256)
    assert time.perf_counter() - start < 5
    assert heat.shape == (1280, 2048) and not np.isnan(heat).any()


def test_planted_block_on_slide_png(tmp_path):
    from PIL import Image

    # a pinkish "slide" 4096 x 3072 with some texture
    rng = np.random.default_rng(0)
    small = (np.array([230, 190, 220]) + rng.integers(-20, 20, (96, 128, 3))).clip(0, 255).astype(np.uint8)
    slide = tmp_path / "slides" / "bag_a.png"
    slide.parent.mkdir()
    Image.fromarray(small).resize((4096, 3072), Image.NEAREST).save(slide)
    assert find_slide(tmp_path / "slides", "bag_a") == slide and find_slide(tmp_path / "slides", "bag") is None

    thumb, size = read_thumbnail(slide, 1024)
    assert size == (4096, 3072) and thumb.shape == (768, 1024, 3) and thumb.dtype == np.uint8

    coords = grid(16, 12)  # 256 px tiles over the whole slide
    a = np.full(coords.shape[0], 1.0)
    block = (coords[:, 0] >= 2560) & (coords[:, 0] < 3328) & (coords[:, 1] >= 512) & (coords[:, 1] < 1280)
    a[block] = 50.0  # a 3 x 3 block of tiles
    a /= a.sum()
    heat = attention_heatmap(coords, a, 256, slide_size=size, scale=4, normalise="minmax")
    assert heat.shape == (768, 1024)
    out = render_overlay(heat, tmp_path / "out" / "bag_a.png", background=thumb, alpha=0.6, colorbar=False)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert not list(out.parent.glob(".*.tmp"))
    with Image.open(out) as im:
        assert im.size == (1024, 768)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    hot = (rgb[..., 0] - rgb[..., 2]) > 60  # jet: red at 1, blue at 0
    ys, xs = np.nonzero(hot)
    assert hot.sum() > 0.8 * 192 * 192
    # the block is level-0 x 2560..3328, y 512..1280 -> output x 640..832, y 128..320
    assert 640 <= xs.min() and xs.max() < 832 and 128 <= ys.min() and ys.max() < 320
    # with a title and colorbar the figure grows, side-by-side panels too
    two = render_panels([heat, heat[:, ::-1]], tmp_path / "two.png", background=thumb, titles=["a", "b"])
    with Image.open(two) as im:
        assert im.size[0] > 2 * 1024 and im.size[1] > 768


def test_thumbnail_errors(tmp_path):
    (tmp_path / "x.ndpi").write_bytes(b"not a slide")
    if importlib.util.find_spec("openslide") is None and importlib.util.find_spec("tiffslide") is None:
        with pytest.raises(HeatmapError, match=r"x\.ndpi.*pip install 'qgmil\[wsi\]'"):
            read_thumbnail(tmp_path / "x.ndpi", 256)
    (tmp_path / "y.png").write_bytes(b"not a png")
    with pytest.raises(HeatmapError, match=r"y\.png"):
        read_thumbnail(tmp_path / "y.png", 256)
    with pytest.raises(FileNotFoundError):
        read_thumbnail(tmp_path / "missing.svs", 256)


def test_stamp_coords_in_micrometres(tmp_path):
    from qgmil.data import write_bag

    coords_um = grid(4, 2, patch=128).astype(np.float32)  # 256 px tiles at 0.5 mpp
    path = tmp_path / "stamp.h5"
    write_bag(path, np.zeros((8, 4), np.float32), coords_um, coord_unit="um", attrs={"mpp": 0.5, "tile_size_um": 128})
    coords, patch = bag_geometry(path)
    assert patch == pytest.approx(256) and coords[:, 0].max() == pytest.approx(768)
    bad = tmp_path / "nompp.h5"
    write_bag(bad, np.zeros((8, 4), np.float32), coords_um, coord_unit="um")
    with pytest.raises(HeatmapError, match="mpp"):
        bag_geometry(bad)
    flag = tmp_path / "boolmpp.h5"  # a bool is no resolution, though float(True) == 1
    write_bag(flag, np.zeros((8, 4), np.float32), coords_um, coord_unit="um", attrs={"mpp": True})
    with pytest.raises(HeatmapError, match="mpp"):
        bag_geometry(flag)


@pytest.mark.skipif(importlib.util.find_spec("openslide") is None and importlib.util.find_spec("tiffslide") is None,
                    reason="needs openslide or tiffslide")
def test_real_svs(tmp_path):
    if not SLIDE.is_file():
        pytest.skip(f"{SLIDE} not found")
    thumb, size = read_thumbnail(SLIDE, 512)
    assert tuple(size) == (2220, 2967)  # the CMU-1 region at level 0 (0.499 um/px)
    assert max(thumb.shape[:2]) <= 512 and thumb.shape[2] == 3
    assert abs(thumb.shape[1] / thumb.shape[0] - 2220 / 2967) < 0.02
    coords = grid(size[0] // 256, size[1] // 256)
    heat = attention_heatmap(coords, np.linspace(0, 1, coords.shape[0]), 256, slide_size=size, max_size=512)
    out = render_overlay(heat, tmp_path / "svs.png", background=thumb, title="CMU-1")
    assert out.read_bytes()[:8] == PNG_SIGNATURE


# --- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wsi_runs(tmp_path_factory):
    from qgmil.data import prepare_dataset
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    root = tmp_path_factory.mktemp("heatmap")
    data = root / "wsi"
    prepare_dataset("synthetic-wsi", data, bags=4, min_instances=300, max_instances=600, dim=16, progress=False)
    runs = {}
    for model in ("abmil", "mean_pool", "clam_mb"):
        config = load_config(None, [], {
            "data.table": data / "labels.csv", "data.features": data / "features", "eval.folds": 2,
            "optim.epochs": 2, "optim.batch_size": 4, "runtime.progress": False, "runtime.tensorboard": False,
            "model.name": model, "eval.bootstrap": 20})
        train_run(config, root / model)
        runs[model] = root / model
    return runs


def test_explain_heatmap_cli(wsi_runs, tmp_path):
    import pandas as pd
    from click.testing import CliRunner
    from PIL import Image

    from qgmil.cli import main

    out = tmp_path / "heat"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(wsi_runs["abmil"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    bags = list(dict.fromkeys(pd.read_csv(wsi_runs["abmil"] / "predictions.csv", dtype={"bag_id": str})["bag_id"]))
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == sorted(bags[:3])
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(p) as im:
            im.verify()

    # two runs -> one figure with two panels, wider than the single-run one
    both = tmp_path / "both"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(wsi_runs["abmil"]), str(wsi_runs["mean_pool"]),
                                       "--bags", bags[0], "--out", str(both), "--normalise", "minmax"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in both.glob("*.png")] == [f"{bags[0]}.png"]
    with Image.open(both / f"{bags[0]}.png") as two, Image.open(out / f"{bags[0]}.png") as one:
        assert two.size[0] > 1.8 * (one.size[0] - 90)

    result = CliRunner().invoke(main, ["explain", "heatmap", str(wsi_runs["abmil"]), "--bags", "nope",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "nope" in result.output


def test_explain_heatmap_of_a_survival_run(tmp_path):
    """Heatmaps need the attention and the bags' geometry only: a survival run on the WSI bags draws them too."""
    import pandas as pd
    from click.testing import CliRunner
    from PIL import Image

    from qgmil.cli import main
    from qgmil.data import prepare_dataset
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    pytest.importorskip("sksurv", reason="survival needs pip install 'qgmil[survival]'")
    data = tmp_path / "wsi"
    prepare_dataset("synthetic-wsi", data, bags=6, min_instances=200, max_instances=300, dim=16, progress=False)
    table = pd.read_csv(data / "labels.csv")
    positive = table["label"] == "positive"
    table["time"], table["event"] = np.where(positive, 10.0, 30.0) + np.arange(6), [1, 1, 0, 1, 1, 1]
    table.drop(columns=["label"]).to_csv(tmp_path / "survival.csv", index=False)
    config = load_config(None, [], {
        "data.table": tmp_path / "survival.csv", "data.features": data / "features", "task": "survival",
        "eval.folds": 2, "optim.epochs": 2, "optim.batch_size": 4, "runtime.progress": False,
        "runtime.tensorboard": False, "model.name": "abmil", "eval.bootstrap": 10})
    train_run(config, tmp_path / "run")
    out = tmp_path / "heat"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(tmp_path / "run"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    bags = list(dict.fromkeys(pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"bag_id": str})["bag_id"]))
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(bags[:3])
    with Image.open(out / f"{bags[0]}.png") as im:
        im.verify()


# --- tissue only, branches, patient bags ------------------------------------------------------------

def test_tissue_only_leaves_glass_unpainted(tmp_path):
    from PIL import Image

    from qgmil.extract.tissue import segment_tissue

    rng = np.random.default_rng(0)
    small = (np.array([220, 150, 200]) + rng.integers(-10, 10, (48, 64, 3))).clip(0, 255).astype(np.uint8)
    small[:, 40:] = 255  # glass right of x = 1280 (level 0), under tiles too
    slide = tmp_path / "s.png"
    Image.fromarray(small).resize((2048, 1536), Image.NEAREST).save(slide)
    thumb, size = read_thumbnail(slide, 200)  # 200 x 150: not the heat's grid
    tissue = segment_tissue(thumb)
    heat = attention_heatmap(grid(8, 6), np.linspace(0.1, 1, 48), 256, slide_size=size, scale=16)  # 128 x 96
    masked = restrict_to_tissue(heat, tissue)
    assert masked.shape == heat.shape == (96, 128) and not np.isnan(heat).any()  # the input is kept
    assert np.isnan(masked[:, 82:]).all()  # x >= 1312 at level 0: glass
    assert np.isfinite(masked[:, :78]).mean() > 0.99  # x < 1248: tissue (the mask may lose a corner pixel)
    out = render_overlay(masked, tmp_path / "o.png", background=thumb, colorbar=False)
    with Image.open(out) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)  # 512 x 384: each heat pixel 4 x 4
    assert (rgb[:, 4 * 84:] > 245).all()  # glass stays white: no heat painted
    assert np.abs(rgb[:, :4 * 76] - [220, 150, 200]).max(axis=2).mean() > 40  # tissue is painted


def test_branch_attention_saved_and_drawn(wsi_runs, tmp_path):
    import h5py
    from click.testing import CliRunner
    from PIL import Image

    from qgmil.cli import main
    from qgmil.evaluate.predict import predict_bags
    from qgmil.explain import run_metrics

    run = wsi_runs["clam_mb"]
    files = sorted(run.glob("folds/*/attention.h5"))
    for path in files:
        with h5py.File(path) as f:
            group = f["branch_attention"]
            assert list(group.attrs["names"]) == ["negative", "positive"]
            assert set(group) == {k for k in f if k != "branch_attention"}
            for bag_id in group:
                b, a = group[bag_id][()], f[bag_id][()]
                assert b.dtype == np.float32 and b.shape == (2, a.size)
                np.testing.assert_allclose(b.sum(1), 1, atol=1e-4)
                assert min(np.abs(b - a).max(1)) < 1e-6  # the pooling attention is the predicted class's branch
    assert len(run_metrics(run)) == 4  # the mass reader skips the group

    out = tmp_path / "br"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--branches", "--bags", "slide_0000",
                                       "--max-size", "128", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--bags", "slide_0000",
                                       "--max-size", "128", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    with Image.open(out / "slide_0000.png") as two, Image.open(tmp_path / "one" / "slide_0000.png") as one:
        panel = one.size[0] - 90  # minus the colorbar
        assert two.size == (2 * panel + 10 + 90, one.size[1])  # K = 2 panels, 10 px apart

    for args, message in ((["--branches"], "no branch attention"),
                          (["--branches", str(run)], "one run, got 2 run directories")):
        result = CliRunner().invoke(main, ["explain", "heatmap", str(wsi_runs["abmil"]), *args, "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output

    # `qgmil predict` with a run: the fold models' branch attentions averaged
    data = run / "data" / "synthetic-wsi"
    data = data if data.is_dir() else Path(load_table_dir(run))
    predict_bags(run, data / "labels.csv", tmp_path / "pred", progress=False)
    with h5py.File(tmp_path / "pred" / "attention.h5") as f:
        group = f["branch_attention"]
        assert list(group.attrs["names"]) == ["negative", "positive"] and len(group) == 4
        for bag_id in group:
            assert group[bag_id].shape == (2, f[bag_id].shape[0])
            np.testing.assert_allclose(group[bag_id][()].sum(1), 1, atol=1e-4)


def load_table_dir(run):
    from qgmil.rundir.config import load_config

    return load_config(run / "config.yaml").data.table.parent


@pytest.fixture(scope="module")
def patient_run(tmp_path_factory):
    from qgmil.data import prepare_dataset
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    root = tmp_path_factory.mktemp("patients")
    data = root / "wsi"
    prepare_dataset("synthetic-wsi", data, bags=8, min_instances=100, max_instances=200, dim=8, slides_per_patient=2,
                    progress=False)
    config = load_config(None, [], {
        "data.table": data / "labels.csv", "data.features": data / "features", "data.bag_unit": "patient",
        "eval.folds": 2, "optim.epochs": 1, "optim.batch_size": 4, "runtime.progress": False,
        "runtime.tensorboard": False, "model.name": "abmil", "eval.bootstrap": 10})
    train_run(config, root / "run")
    return root / "run", data


def test_patient_bags_one_png_per_slide(patient_run, tmp_path):
    import h5py
    import pandas as pd
    from click.testing import CliRunner
    from PIL import Image

    from qgmil.cli import main

    run, data = patient_run
    table = pd.read_csv(data / "labels.csv")
    slides = table.loc[table["patient_id"] == "patient_0001", "bag_id"].tolist()
    n = [bag_geometry(data / "features" / f"{s}.h5")[0].shape[0] for s in slides]
    # attention growing along the bag: the first slide holds the low ranks, the second the high ones
    for path in run.glob("folds/*/attention.h5"):
        with h5py.File(path, "r+") as f:
            if "patient_0001" in f:
                assert f["patient_0001"].shape == (sum(n),)
                f["patient_0001"][...] = np.arange(1, sum(n) + 1, dtype=np.float32) / (sum(n) * (sum(n) + 1) / 2)
    out = tmp_path / "p"
    result = CliRunner().invoke(main, ["explain", "heatmap", str(run), "--bags", "patient_0001", "--max-size", "128",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"patient_0001__{s}.png" for s in slides]

    def redness(name):
        with Image.open(out / name) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=int)[40:, :-90]  # below the title, left of the colorbar
        painted = rgb.min(axis=2) < 245
        return float((rgb[..., 0] - rgb[..., 2])[painted].mean())

    assert redness(f"patient_0001__{slides[0]}.png") < -30 < 30 < redness(f"patient_0001__{slides[1]}.png")
