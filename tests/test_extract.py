"""Feature extraction end to end: slides and cell folders -> feature bags, resume, errors, torchrun, CLI.

The encoder is timm's tiny `test_vit` (64-d, 160 px input) with seeded random weights: the same code path
as a real encoder, fast enough for CI.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qgmil.cli import main
from qgmil.data import read_bag
from qgmil.extract.cells import extract_cells
from qgmil.extract.encoders import create_encoder
from qgmil.extract.engine import ExtractError
from qgmil.extract.slide import open_slide
from qgmil.extract.tiling import plan_tiles
from qgmil.extract.wsi import TilingSettings, extract_slides, tissue_mask

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
ENCODER = "timm:test_vit"
FAST = dict(weights="random", num_workers=0, progress=False, batch_size=16, device="cpu")  # exact on any machine


@pytest.fixture(scope="module")
def cmu():
    if not SLIDE.is_file():
        if os.environ.get("QGMIL_REQUIRE_FIXTURES"):
            pytest.fail(f"{SLIDE} not found")
        pytest.skip(f"{SLIDE} not found")
    return SLIDE


def _plain_slide(path: Path, size=(512, 384), seed=0) -> Path:
    """A plain RGB image: pink 'tissue' on the left half, white on the right, with some texture."""
    rng = np.random.default_rng(seed)
    image = np.full((size[1], size[0], 3), 245, np.uint8)
    tissue = rng.integers(0, 40, (size[1], size[0] // 2, 3), dtype=np.uint8)
    image[:, : size[0] // 2] = np.array([200, 120, 170], np.uint8) - tissue
    Image.fromarray(image).save(path)
    return path


def test_cmu_slide_end_to_end(cmu, tmp_path):
    out = tmp_path / "feats"
    settings = TilingSettings(tile_px=256, magnification=20)
    summary = extract_slides([cmu], out, ENCODER, settings=settings, **FAST)
    assert summary.count("done") == 1 and not summary.failed
    bag = read_bag(out / "features" / "CMU-1-Small-Region.h5")
    n = len(bag)
    assert bag.features.shape == (n, 64) and np.isfinite(bag.features).all()

    # The tiles are exactly those planned over the tissue mask, on a 256 px level-0 grid inside the slide.
    with open_slide(cmu) as slide:
        _, mask = tissue_mask(slide, settings)
        tiling = plan_tiles(slide, mask, tile_px=256, magnification=20, min_tissue=0.5)
        full_grid = (slide.dimensions[0] // 256) * (slide.dimensions[1] // 256)
        np.testing.assert_array_equal(bag.coords, tiling.coords)
        assert 0 < n < full_grid  # background tiles were dropped
        assert (bag.coords % 256 == 0).all()
        assert (bag.coords[:, 0] + 256 <= 2220).all() and (bag.coords[:, 1] + 256 <= 2967).all()
        assert (bag.extras["tissue_fraction"] >= 0.5).all()
        # Dropped tiles are the bright background: kept tiles are darker on average.
        kept = {tuple(c) for c in bag.coords.tolist()}
        grid = [(x, y) for x in range(0, 2220 - 255, 256) for y in range(0, 2967 - 255, 256)]
        brightness = {c: slide.read_region(c, 0, (256, 256)).mean() for c in grid}
        dropped = [b for c, b in brightness.items() if c not in kept]
        assert dropped and np.mean(dropped) > np.mean([brightness[c] for c in kept]) + 10

        # The loader path gives what the encoder gives on the tiles read directly.
        encoder = create_encoder(ENCODER, "random")
        tiles = torch.from_numpy(np.stack([slide.read_region(tuple(c), 0, (256, 256)) for c in bag.coords[:3]]))
        np.testing.assert_allclose(bag.features[:3], encoder(tiles).numpy(), atol=1e-5)

    assert bag.attrs["patch_size_level0"] == 256 and bag.attrs["patch_size_px"] == 256
    assert abs(bag.attrs["mpp"] - 0.499) < 1e-3 and bag.attrs["feature_dim"] == 64
    assert bag.attrs["encoder"] == "timm:test_vit (weights=random(seed=0))"
    assert (out / "masks" / "CMU-1-Small-Region.png").is_file()
    manifest = json.loads((out / "extract.json").read_text())
    assert manifest["kind"] == "wsi" and manifest["settings"]["tile_px"] == 256
    assert pd.read_csv(out / "bags.csv")["num_instances"].tolist() == [n]


def test_resume_skips_finished_and_redoes_missing(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        _plain_slide(slides / f"s{i}.png", seed=i)
    out = tmp_path / "out"
    settings = TilingSettings(tile_px=64, magnification=20, mpp=0.5)
    first = extract_slides([slides], out, ENCODER, settings=settings, **FAST)
    assert first.count("done") == 3
    before = {p.name: read_bag(p).features for p in (out / "features").glob("*.h5")}
    stamp = (out / "features" / "s0.h5").stat().st_mtime_ns

    (out / "features" / "s1.h5").unlink()
    again = extract_slides([slides], out, ENCODER, settings=settings, **FAST)
    assert {r.bag_id: r.status for r in again.results} == {"s0": "skipped", "s1": "done", "s2": "skipped"}
    assert (out / "features" / "s0.h5").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(read_bag(out / "features" / "s1.h5").features, before["s1.h5"])

    # Another tile size into the same folder would mix two extractions: refused, nothing touched.
    with pytest.raises(ExtractError, match="another extraction.*tile_px"):
        extract_slides([slides], out, ENCODER, settings=TilingSettings(tile_px=32, magnification=20, mpp=0.5), **FAST)
    assert (out / "features" / "s0.h5").stat().st_mtime_ns == stamp


def test_mpp_option_only_fills_in_missing_metadata(cmu, tmp_path):
    """--mpp is a fallback: the CMU slide keeps its 0.499 um/px; an image without metadata takes it, and
    adding it on a rerun after "no mpp" failures resumes the same extraction."""
    _plain_slide(tmp_path / "plain.png")
    (tmp_path / "cmu.svs").symlink_to(cmu)
    out = tmp_path / "out"
    first = extract_slides([tmp_path], out, ENCODER, settings=TilingSettings(tile_px=128), skip_errors=True, **FAST)
    assert {r.bag_id: r.status for r in first.results} == {"cmu": "done", "plain": "failed"}
    again = extract_slides([tmp_path], out, ENCODER, settings=TilingSettings(tile_px=128, mpp=0.25), **FAST)
    assert {r.bag_id: r.status for r in again.results} == {"cmu": "skipped", "plain": "done"}
    assert not (out / "failed" / "plain.txt").exists()
    cmu_bag, plain_bag = (read_bag(out / "features" / f"{name}.h5") for name in ("cmu", "plain"))
    assert abs(cmu_bag.attrs["mpp"] - 0.499) < 1e-3 and cmu_bag.attrs["mpp_source"] == "metadata"
    assert plain_bag.attrs["mpp"] == 0.25 and plain_bag.attrs["mpp_source"] == "--mpp"
    assert plain_bag.attrs["patch_size_level0"] == 256  # 128 px at 0.5 um/px from a 0.25 um/px image


def test_left_half_tissue_gives_left_half_tiles(tmp_path):
    slide = _plain_slide(tmp_path / "half.png", size=(512, 384))
    out = tmp_path / "out"
    extract_slides([slide], out, ENCODER, settings=TilingSettings(tile_px=64, magnification=20, mpp=0.5), **FAST)
    coords = read_bag(out / "features" / "half.h5").coords
    assert len(coords) == 4 * 6  # 4 columns of 64 px in the 256 px tissue half, 6 rows
    assert coords[:, 0].max() < 256

    everything = tmp_path / "all"
    extract_slides([slide], everything, ENCODER,
                   settings=TilingSettings(tile_px=64, magnification=20, mpp=0.5, tissue=False), **FAST)
    assert len(read_bag(everything / "features" / "half.h5")) == 8 * 6


def test_bad_slides_fail_clearly_or_are_skipped(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    _plain_slide(slides / "a_good.png")
    (slides / "b_broken.svs").write_bytes(b"not a slide at all")
    _plain_slide(slides / "c_no_mpp.png")
    out = tmp_path / "out"
    # Plain images have no mpp: only the override makes them usable, so give it per run below.
    with pytest.raises(ExtractError, match="b_broken.svs"):
        extract_slides([slides], out, ENCODER, settings=TilingSettings(tile_px=64, mpp=0.5), **FAST)
    assert (out / "features" / "a_good.h5").is_file()  # finished before the failure, kept

    out2 = tmp_path / "out2"
    summary = extract_slides([slides], out2, ENCODER, settings=TilingSettings(tile_px=64), skip_errors=True, **FAST)
    status = {r.bag_id: r for r in summary.results}
    assert status["b_broken"].status == "failed" and status["c_no_mpp"].status == "failed"
    assert "--mpp" in status["c_no_mpp"].error
    assert (out2 / "failed" / "b_broken.txt").read_text().startswith(str(slides / "b_broken.svs"))
    table = pd.read_csv(out2 / "bags.csv")
    assert set(table.loc[table.status == "failed", "bag_id"]) == {"a_good", "b_broken", "c_no_mpp"}
    assert "FAILED b_broken" in summary.format()


def test_blank_slide_is_reported_empty(tmp_path):
    Image.fromarray(np.full((256, 256, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    summary = extract_slides([tmp_path / "blank.png"], tmp_path / "out", ENCODER,
                             settings=TilingSettings(tile_px=64, mpp=0.5), **FAST)
    assert summary.results[0].status == "empty" and "tissue" in summary.results[0].error
    assert not (tmp_path / "out" / "features" / "blank.h5").exists()


def _cells(root: Path, samples=("p1", "p2", "p3"), per_sample=(5, 8, 3)) -> dict[str, list[str]]:
    """Crops of scikit-image's IHC image as cell folders ROOT/<class>/<sample>/cell_k.png."""
    skimage_data = pytest.importorskip("skimage.data")
    image = skimage_data.immunohistochemistry()
    names = {}
    for s, (sample, n) in enumerate(zip(samples, per_sample)):
        folder = root / ("aml" if s % 2 else "normal") / sample
        folder.mkdir(parents=True)
        names[sample] = []
        for k in range(n):
            y, x = 37 * s + 23 * k, 29 * k + 11 * s
            Image.fromarray(image[y: y + 48 + k, x: x + 48 + k]).save(folder / f"cell_{k}.png")
            names[sample].append(f"cell_{k}.png")
    return names


def test_cell_folders_and_table_give_the_same_bags(tmp_path):
    names = _cells(tmp_path / "cells")
    out = tmp_path / "out"
    summary = extract_cells(tmp_path / "cells", out, ENCODER, **FAST)
    assert summary.count("done") == 3
    for sample, cells in names.items():
        bag = read_bag(out / "features" / f"{sample}.h5")
        assert bag.features.shape == (len(cells), 64) and bag.coords is None
        assert list(bag.extras["instance_names"]) == cells
        assert bag.attrs["cell_px"] == 160  # test_vit's input size
        assert all((Path(bag.attrs["image_root"]) / name).is_file() for name in bag.extras["instance_names"])

    rows = [{"path": f"cells/{'aml' if s == 'p2' else 'normal'}/{s}/{c}", "sample_id": s}
            for s, cells in names.items() for c in cells]
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    out2 = tmp_path / "out2"
    extract_cells(None, out2, ENCODER, table=tmp_path / "cells.csv", **FAST)
    for sample in names:
        a, b = (read_bag(o / "features" / f"{sample}.h5") for o in (out, out2))
        np.testing.assert_allclose(a.features, b.features, atol=1e-6)
        assert [Path(n).name for n in b.extras["instance_names"]] == names[sample]
        assert all((Path(b.attrs["image_root"]) / name).is_file() for name in b.extras["instance_names"])


def test_cell_inputs_are_checked(tmp_path):
    _cells(tmp_path / "cells")
    (tmp_path / "cells" / "aml" / "p1").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cells" / "aml" / "p1" / "x.png")
    with pytest.raises(ExtractError, match="both named 'p1'"):
        extract_cells(tmp_path / "cells", tmp_path / "out", ENCODER, **FAST)

    pd.DataFrame({"path": ["nope.png"], "sample_id": ["s"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ExtractError, match=r"t.csv: image files not found: row 2: nope.png"):
        extract_cells(None, tmp_path / "out", ENCODER, table=tmp_path / "t.csv", **FAST)

    broken = tmp_path / "broken"
    _cells(broken, samples=("q1", "q2"), per_sample=(2, 2))
    (broken / "aml" / "q2" / "cell_1.png").write_bytes(b"garbage")
    summary = extract_cells(broken, tmp_path / "out3", ENCODER, skip_errors=True, **FAST)
    status = {r.bag_id: r for r in summary.results}
    assert status["q1"].status == "done" and status["q2"].status == "failed"
    assert "cell_1.png" in status["q2"].error


def test_extracted_bags_train_directly(tmp_path):
    """The output is a feature folder `qgmil data check` and training accept as is."""
    from qgmil.data import check_dataset

    names = _cells(tmp_path / "cells", samples=tuple(f"p{i}" for i in range(6)), per_sample=(3,) * 6)
    out = tmp_path / "out"
    extract_cells(tmp_path / "cells", out, ENCODER, **FAST)
    pd.DataFrame({"bag_id": list(names), "label": ["a", "b"] * 3}).to_csv(tmp_path / "labels.csv", index=False)
    report = check_dataset(tmp_path / "labels.csv", out / "features", progress=False)
    assert report.ok, report.format()


def test_cli_extract_wsi_and_encoders(tmp_path):
    slide = _plain_slide(tmp_path / "img.png")
    result = CliRunner().invoke(main, ["extract", "wsi", str(slide), "--out", str(tmp_path / "o"), "--encoder", ENCODER,
                                       "--weights", "random", "--tile-px", "64", "--mpp", "0.5", "--workers", "0",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 extracted" in result.output and (tmp_path / "o" / "features" / "img.h5").is_file()

    result = CliRunner().invoke(main, ["extract", "wsi", str(slide), "--out", str(tmp_path / "p"), "--encoder", ENCODER,
                                       "--weights", "random", "--tile-px", "64", "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "--mpp" in result.output  # a plain image has no resolution metadata

    listing = CliRunner().invoke(main, ["extract", "encoders"])
    assert listing.exit_code == 0 and "resnet50_trunc" in listing.output and "uni" in listing.output


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_torchrun_two_processes_share_the_slides(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        _plain_slide(slides / f"s{i}.png", size=(256, 192), seed=i)
    args = ["extract", "wsi", str(slides), "--encoder", ENCODER, "--weights", "random", "--tile-px", "64",
            "--mpp", "0.5", "--workers", "0", "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "qgmil", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "qgmil", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    table = pd.read_csv(tmp_path / "two" / "bags.csv")
    assert table["status"].tolist() == ["done"] * 4
    for i in range(4):
        a, b = (read_bag(tmp_path / r / "features" / f"s{i}.h5") for r in ("one", "two"))
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)
        np.testing.assert_array_equal(a.coords, b.coords)
