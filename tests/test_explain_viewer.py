"""QuPath GeoJSON export, Deep Zoom pyramids and the slide viewer (`qgmil explain export|view`), the viewer
loaded in a real headless Chromium (tests/browser.py; skipped without one, failing with QGMIL_REQUIRE_BROWSER=1).

The runs are tiny (two folds, one epoch) on bags made here whose tiles lie on real slide images: a synthetic
PNG slide (pink tissue on the left, glass on the right) and the CMU-1 region (CC0 Aperio .svs). Their test
attention is then planted in the runs' attention.h5 (a 3 x 3 block of tiles on the PNG, one tile on CMU-1),
so the tests know where the overlay must be hot.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from browser import browser  # noqa: F401  (the headless Chromium fixture, tests/browser.py)

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "CMU-1-Small-Region.svs"
PLANTED = "planted"  # the synthetic slide's bag
CMU = "CMU-1-Small-Region"
PNG_SIZE = (2048, 1536)  # level-0 px of the synthetic slide
PNG_PATCH = 128
GLASS_X = 1280  # glass right of this (level-0 x), tissue left of it
BLOCK = (512, 640, 3)  # the planted block: top-left tile corner x, y and side in tiles (level 0: 512..896, 640..1024)
CMU_PATCH = 256


def grid(nx, ny, patch, origin=(0, 0)):
    ys, xs = np.mgrid[0:ny, 0:nx]
    return np.stack([xs.ravel() * patch + origin[0], ys.ravel() * patch + origin[1]], axis=1).astype(np.float64)


def in_block(coords):
    x0, y0, n = BLOCK
    return ((coords[:, 0] >= x0) & (coords[:, 0] < x0 + n * PNG_PATCH) &
            (coords[:, 1] >= y0) & (coords[:, 1] < y0 + n * PNG_PATCH))


def write_png_slide(path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    small = (np.array([215, 140, 190]) + rng.integers(-15, 15, (PNG_SIZE[1] // 16, PNG_SIZE[0] // 16, 3)))
    small = small.clip(0, 255).astype(np.uint8)
    small[:, GLASS_X // 16:] = 255
    Image.fromarray(small).resize(PNG_SIZE, Image.NEAREST).save(path)


@functools.lru_cache(maxsize=1)
def cmu_tiles() -> tuple[np.ndarray, np.ndarray]:
    """(coords, attention) of the CMU-1 bag: the 256 px tiles on its tissue, each attended by how dark it is
    (hematoxylin-rich tissue hot, pale stroma and glass cold: a made-up attention, but one that is easy to
    check by eye); without the slide, its whole grid with attention growing along it."""
    coords = grid(2220 // CMU_PATCH, 2967 // CMU_PATCH, CMU_PATCH)
    try:
        from qgmil.explain.heatmap import read_thumbnail
        from qgmil.extract.tiling import tissue_fractions
        from qgmil.extract.tissue import segment_tissue

        thumb, size = read_thumbnail(SLIDE, 555)  # 4 level-0 px per thumbnail px: 64 px per tile
    except Exception:  # no slide or no reader: the test that needs the slide skips
        return coords, np.linspace(1.0, 2.0, len(coords))
    keep = tissue_fractions(segment_tissue(thumb), coords, CMU_PATCH, size) >= 0.25
    coords = coords[keep]
    grey = thumb.mean(axis=2)
    step = thumb.shape[1] / size[0]
    rows = [slice(int(y * step), int((y + CMU_PATCH) * step)) for y in coords[:, 1]]
    cols = [slice(int(x * step), int((x + CMU_PATCH) * step)) for x in coords[:, 0]]
    dark = np.array([255 - grey[r, c].mean() for r, c in zip(rows, cols)])
    return coords, np.exp(dark / 20)


def bag_coords() -> dict[str, np.ndarray]:
    coords = {PLANTED: grid(GLASS_X // PNG_PATCH, PNG_SIZE[1] // PNG_PATCH, PNG_PATCH)}  # tissue only
    coords[CMU] = cmu_tiles()[0]
    for k in range(6):  # bags without a slide
        coords[f"other_{k}"] = grid(6, 5, 256, origin=(256 * k, 0))
    return coords


def plant(run: Path, bag_id: str, weights: np.ndarray, branch: int | None = None) -> None:
    """Replace the test attention of a bag in the run's attention.h5 (the branch's too, for multi-branch runs)."""
    import h5py

    weights = (weights / weights.sum()).astype(np.float32)
    hits = 0
    for path in run.glob("folds/*/attention.h5"):
        with h5py.File(path, "r+") as f:
            if bag_id in f:
                f[bag_id][...] = weights
                hits += 1
                if branch is not None and "branch_attention" in f:
                    b = f["branch_attention"][bag_id][()]
                    b[branch] = weights
                    f["branch_attention"][bag_id][...] = b
    assert hits == 1, f"{bag_id} tested {hits} times in {run}"


@pytest.fixture(scope="module")
def slide_runs(tmp_path_factory):
    """{"abmil": run, "clam_mb": run, "slides": folder, "data": folder}: two runs over bags on the slides."""
    import pandas as pd

    from qgmil.data import write_bag
    from qgmil.rundir.config import load_config
    from qgmil.train.run import train_run

    root = tmp_path_factory.mktemp("viewer")
    slides = root / "slides"
    slides.mkdir()
    write_png_slide(slides / f"{PLANTED}.png")
    if SLIDE.is_file():
        (slides / f"{CMU}.svs").symlink_to(SLIDE)
    rng = np.random.default_rng(0)
    rows = []
    for k, (bag_id, coords) in enumerate(bag_coords().items()):
        patch = PNG_PATCH if bag_id == PLANTED else CMU_PATCH if bag_id == CMU else 256
        write_bag(root / "features" / f"{bag_id}.h5", rng.standard_normal((len(coords), 8)).astype(np.float32),
                  coords, attrs={"patch_size_px": patch})
        rows.append({"bag_id": bag_id, "label": ["positive", "negative"][k % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    runs = {"slides": slides, "data": root}
    for model in ("abmil", "clam_mb"):
        config = load_config(None, [], {
            "data.table": root / "labels.csv", "data.features": root / "features", "eval.folds": 2,
            "optim.epochs": 1, "optim.batch_size": 4, "runtime.progress": False, "runtime.tensorboard": False,
            "model.name": model, "eval.bootstrap": 10})
        train_run(config, root / model)
        runs[model] = root / model
    coords = bag_coords()
    # 50 on the block; elsewhere 1 to 1.5, falling off with the distance to the block: cold far from it
    centre = np.array(BLOCK[:2]) + 1.5 * PNG_PATCH
    far = np.hypot(*(coords[PLANTED] + PNG_PATCH / 2 - centre).T)
    hot = np.where(in_block(coords[PLANTED]), 50.0, 1.0 + 0.5 * np.exp(-far / 300))
    for model in ("abmil", "clam_mb"):
        plant(runs[model], PLANTED, hot, branch=1 if model == "clam_mb" else None)
        plant(runs[model], CMU, cmu_tiles()[1], branch=1 if model == "clam_mb" else None)
    return runs


def read_attention(run: Path, bag_id: str, branch: bool = False) -> np.ndarray:
    import h5py

    for path in run.glob("folds/*/attention.h5"):
        with h5py.File(path) as f:
            if bag_id in f:
                return f["branch_attention"][bag_id][()] if branch else f[bag_id][()]
    raise KeyError(bag_id)


# --- QuPath GeoJSON ---------------------------------------------------------------------------------

def test_export_geojson_for_qupath(slide_runs, tmp_path):
    from click.testing import CliRunner

    from qgmil.cli import main

    out = tmp_path / "geo"
    result = CliRunner().invoke(main, ["explain", "export", str(slide_runs["clam_mb"]), "--format", "geojson",
                                       "--slides", str(slide_runs["slides"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"no slide for [^:]*other_0", result.output)  # exported, but its annotation unclipped
    assert sorted(p.stem for p in out.glob("*.geojson")) == sorted(bag_coords())
    assert not list(out.glob(".*.tmp"))

    collection = json.loads((out / f"{PLANTED}.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    notes = [f for f in collection["features"] if f["properties"]["objectType"] == "annotation"]
    coords = bag_coords()[PLANTED]
    assert len(tiles) == len(coords) and len(notes) == 1
    attention = read_attention(slide_runs["clam_mb"], PLANTED)
    branches = read_attention(slide_runs["clam_mb"], PLANTED, branch=True)
    assert len({f["id"] for f in collection["features"]}) == len(collection["features"])  # unique UUIDs
    for feature in tiles:
        m = feature["properties"]["measurements"]
        t = m["tile index"]
        x, y = coords[t]
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + PNG_PATCH, y], [x + PNG_PATCH, y + PNG_PATCH], [x, y + PNG_PATCH], [x, y]]
        assert m["attention"] == pytest.approx(float(attention[t]), rel=1e-6)
        assert m["attention (negative)"] == pytest.approx(float(branches[0, t]), rel=1e-6)
        assert m["attention (positive)"] == pytest.approx(float(branches[1, t]), rel=1e-6)
        suffixes = ("", " rank", " percentile")
        assert set(m) == {"tile index", *(f"attention{s}" for s in suffixes),
                          *(f"attention ({c}){s}" for c in ("negative", "positive") for s in suffixes)}
        # the planted block holds the 9 top ranks (tied), the others one each
        assert m["attention rank"] == (1 if in_block(coords[t:t + 1])[0] else 1 + (attention > attention[t]).sum())
        below, tied = np.sum(attention < attention[t]), np.sum(attention == attention[t])
        assert m["attention percentile"] == pytest.approx((below + (tied - 1) / 2) / (len(coords) - 1), abs=1e-6)
    note = notes[0]["properties"]
    box = notes[0]["geometry"]["coordinates"][0]
    assert box[0] == [0, 0] and box[2] == [GLASS_X, PNG_SIZE[1]]  # the tiles' bounding box
    assert note["classification"]["name"] in ("negative", "positive") and len(note["classification"]["color"]) == 3
    assert note["name"].startswith(f"{PLANTED}: predicted {note['classification']['name']} (p = ")
    assert note["name"].endswith("label positive")
    assert set(note["measurements"]) == {"prob_negative", "prob_positive"}

    # two runs: every measurement named after its run; the tiles as QuPath tiles
    result = CliRunner().invoke(main, ["explain", "export", str(slide_runs["abmil"]), str(slide_runs["clam_mb"]),
                                       "--bags", PLANTED, "--object-type", "tile", "--no-branches",
                                       "--out", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    two = json.loads((tmp_path / "two" / f"{PLANTED}.geojson").read_text())
    m = two["features"][0]["properties"]["measurements"]
    assert two["features"][0]["properties"]["objectType"] == "tile"
    suffixes = ("", " rank", " percentile")
    assert set(m) == {"tile index", *(f"{r}: attention{s}" for r in ("abmil", "clam_mb") for s in suffixes)}
    assert m["abmil: attention"] == pytest.approx(float(read_attention(slide_runs["abmil"], PLANTED)[0]), rel=1e-6)


# --- Deep Zoom pyramids -------------------------------------------------------------------------------

def test_deepzoom_pyramid_geometry_and_generators(slide_runs, site, tmp_path):
    from PIL import Image

    from qgmil.explain.deepzoom import level_dimensions, read_dzi, tile_box, write_pyramid

    assert level_dimensions(5, 3) == [(1, 1), (2, 1), (3, 2), (5, 3)]
    assert tile_box((600, 300), 1, 0, 254, 1) == (253, 0, 509, 255)
    png = slide_runs["slides"] / f"{PLANTED}.png"
    pyramid = write_pyramid(png, tmp_path, "p")
    assert pyramid.generator == "pillow"  # a plain image: Pillow's pyramid
    assert read_dzi(pyramid.dzi) == {"width": 2048, "height": 1536, "tile_size": 254, "overlap": 1, "format": "jpeg"}
    levels = level_dimensions(2048, 1536)
    assert len(levels) == 12 and levels[-1] == (2048, 1536)
    names = {p.relative_to(pyramid.tiles).as_posix() for p in pyramid.tiles.rglob("*.jpeg")}
    expected = {f"{lv}/{c}_{r}.jpeg" for lv, (w, h) in enumerate(levels)
                for c in range(-(-w // 254)) for r in range(-(-h // 254))}
    assert names == expected
    with Image.open(pyramid.tiles / "11" / "1_1.jpeg") as tile:  # interior tile: 1 px overlap on each side
        assert tile.size == (256, 256)
        level0 = np.asarray(Image.open(png).convert("RGB"), dtype=int)[253:509, 253:509]
        assert np.abs(np.asarray(tile, dtype=int) - level0).mean() < 4  # JPEG
    # reused when unchanged; made afresh when the .dzi is missing (an interrupted pyramid)
    stamp = pyramid.dzi.stat().st_mtime_ns
    assert write_pyramid(png, tmp_path, "p").dzi.stat().st_mtime_ns == stamp
    pyramid.dzi.unlink()
    (pyramid.tiles / "11" / "0_0.jpeg").unlink()
    write_pyramid(png, tmp_path, "p")
    assert (pyramid.tiles / "11" / "0_0.jpeg").is_file() and pyramid.dzi.is_file()

    if not SLIDE.is_file():
        pytest.skip(f"{SLIDE} not found")
    pytest.importorskip("openslide", reason="DeepZoomGenerator needs openslide: pip install 'qgmil[wsi]'")
    before = (site / "pyramids" / f"{CMU}.dzi").stat().st_mtime_ns
    ours = write_pyramid(slide_runs["slides"] / f"{CMU}.svs", site / "pyramids", CMU)  # the viewer's, reused
    assert ours.dzi.stat().st_mtime_ns == before
    assert ours.generator == "openslide" and (ours.width, ours.height) == (2220, 2967)
    pillow = write_pyramid(SLIDE, tmp_path / "pil", "cmu", generator="pillow")
    files = sorted(p.relative_to(ours.tiles) for p in ours.tiles.rglob("*.jpeg"))
    assert files == sorted(p.relative_to(pillow.tiles) for p in pillow.tiles.rglob("*.jpeg")) and len(files) == 160
    for rel in ("12/3_4.jpeg", "10/1_1.jpeg"):  # the same pixels, up to JPEG and the downsampling filter
        with Image.open(ours.tiles / rel) as a, Image.open(pillow.tiles / rel) as b:
            assert a.size == b.size
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean() < 12


# --- the viewer's files -------------------------------------------------------------------------------

def page_data(page: Path) -> dict:
    found = re.search(r"<script>window\.QGMIL_PAGE = (.*?);</script>", page.read_text(), flags=re.S)
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def site(slide_runs, tmp_path_factory):
    from click.testing import CliRunner

    from qgmil.cli import main

    out = tmp_path_factory.mktemp("site") / "view"
    result = CliRunner().invoke(main, ["explain", "view", str(slide_runs["abmil"]), str(slide_runs["clam_mb"]),
                                       "--slides", str(slide_runs["slides"]), "--out", str(out), "--top", "5"])
    assert result.exit_code == 0, result.output
    assert re.search(r"no slide for [^:]*other_0[^\n]*not in the viewer", result.output), result.output
    return out


def test_viewer_files(site, slide_runs):
    from PIL import Image

    stems = [PLANTED] + ([CMU] if SLIDE.is_file() else [])
    assert sorted(p.stem for p in (site / "slides").glob("*.html")) == sorted(stems)
    index = (site / "index.html").read_text()
    for stem in stems:
        assert f'href="slides/{stem}.html"' in index
    assert (site / "assets" / "openseadragon" / "openseadragon.min.js").is_file()
    assert (site / "assets" / "openseadragon" / "LICENSE.txt").read_text().startswith("Copyright (C) 2009 CodePlex")
    assert (site / "pyramids" / f"{PLANTED}.dzi").is_file()

    data = page_data(site / "slides" / f"{PLANTED}.html")
    assert data["slide"]["label"] == "positive" and (data["slide"]["width"], data["slide"]["height"]) == PNG_SIZE
    assert data["slide"]["tile_source"]["Image"]["Url"] == f"../pyramids/{PLANTED}_files/"
    assert [p["name"] for p in data["panels"]] == ["abmil", "clam_mb"]
    names = [lay["name"] for lay in data["panels"][1]["layers"]]
    assert names == ["clam_mb", "clam_mb / negative", "clam_mb / positive"]
    coords = bag_coords()[PLANTED]
    for panel in data["panels"]:
        layer = panel["layers"][0]
        top = layer["top"]
        assert len(top) == 5 and all(in_block(np.array([[t["x"], t["y"]]]))[0] for t in top)
        assert [t["rank"] for t in top] == [1] * 5  # the block's 9 tiles share the top weight
        attention = read_attention(slide_runs[panel["name"]], PLANTED)
        assert layer["range"]["raw"] == pytest.approx([float(attention.min()), float(attention.max())], rel=1e-6)
        assert panel["prediction"].split(" ")[0] in ("negative", "positive")
        # the overlay: red on the block, blue on the other tiles, transparent on glass
        with Image.open(site / "slides" / layer["images"]["rank"]) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=int)
        per_px = layer["rect"][2] / rgba.shape[1]
        assert layer["rect"][:2] == [0.0, 0.0] and layer["rect"][3] / rgba.shape[0] == pytest.approx(per_px)
        assert per_px == PNG_PATCH / 8
        def at(x, y):
            return rgba[int(y / per_px), int(x / per_px)]
        assert at(BLOCK[0] + 1.5 * PNG_PATCH, BLOCK[1] + 1.5 * PNG_PATCH)[0] > 100  # jet near 1: dark red
        assert at(BLOCK[0] + 1.5 * PNG_PATCH, BLOCK[1] + 1.5 * PNG_PATCH)[2] < 30
        assert at(100, 100)[2] > 100 and at(100, 100)[0] < 30 and at(100, 100)[3] == 255  # cold tissue
        assert at(GLASS_X + 300, 700)[3] == 0  # glass: no tile, no paint
        assert len(coords) == data["slide"]["tiles"]
    # nothing in the page or the viewer's own files points at the network
    for path in [site / "slides" / f"{PLANTED}.html", site / "index.html", site / "assets" / "viewer.js",
                 site / "assets" / "viewer.css"]:
        text = path.read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), path
        assert "http://" not in text.replace("http://schemas.microsoft.com/deepzoom/2008", "").replace(
            "http://localhost:8000/", ""), path


# --- in a real browser ------------------------------------------------------------------------------

def open_page(browser, url):  # noqa: F811
    page = browser.open(url)
    page.wait_for("window.qgmilViewer && window.qgmilViewer.isReady()", timeout=30, what=f"{url} to load")
    # two frames more, so that what is loaded is also drawn
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return page


def local_only(urls):
    return [u for u in urls if not (u.startswith(("file://", "data:", "about:", "blob:"))
                                    or re.match(r"https?://(localhost|127\.0\.0\.1)(:\d+)?/", u))]


def settle(page):
    page.wait_for("window.qgmilViewer.isReady()", timeout=20, what="the viewer to settle")
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def test_viewer_in_browser_planted_slide(site, browser):  # noqa: F811
    page = open_page(browser, (site / "slides" / f"{PLANTED}.html").as_uri())
    try:
        state = page.evaluate("qgmilViewer.state()")
        assert [p["name"] for p in state["panels"]] == ["abmil", "clam_mb"]
        assert [p["layer"] for p in state["panels"]] == ["r0", "r1"]
        assert [lay["key"] for lay in state["panels"][1]["layers"]] == ["r1", "r1b0", "r1b1"]
        assert page.evaluate("qgmilViewer.errors") == []
        shot = page.screenshot()

        def pixel(panel, x, y, image=None):
            p = page.evaluate(f"qgmilViewer.imageToPage({panel}, {x}, {y})")
            return (shot if image is None else image)[int(p["y"]), int(p["x"])].astype(int)

        block = (BLOCK[0] + 1.5 * PNG_PATCH, BLOCK[1] + 1.5 * PNG_PATCH)
        for panel in (0, 1):
            hot = pixel(panel, *block)
            cold = pixel(panel, 200, 1300)  # tissue far from the block
            glass = pixel(panel, GLASS_X + 380, 700)
            assert hot[0] - hot[2] > 60, hot  # red over pink
            assert cold[2] - cold[0] > 20, cold  # blue over pink
            assert (glass > 240).all(), glass  # glass: white, no overlay
        # toggling the layer off leaves the slide: pink tissue, where the overlay was red
        page.evaluate("qgmilViewer.setLayer(0, null)")
        settle(page)
        off = page.screenshot()
        assert page.evaluate("qgmilViewer.state().panels[0].layer") is None
        bare = pixel(0, *block, image=off)
        assert np.abs(bare - [215, 140, 190]).max() < 40, bare
        assert (pixel(1, *block, image=off) == pixel(1, *block)).all()  # the other panel is unchanged
        changed = np.abs(off.astype(int) - shot.astype(int)).max(axis=2) > 30
        assert changed.mean() > 0.05
        # the raw scale and the opacity change the pixels too; opacity 0 shows the slide
        page.evaluate("qgmilViewer.setLayer(0, 'r0'); qgmilViewer.setScale('raw'); qgmilViewer.setOpacity(0)")
        settle(page)
        assert page.evaluate("qgmilViewer.state().scale") == "raw"
        assert page.evaluate("qgmilViewer.state().panels[0].layers[0].src").endswith("r0-raw.png")
        zero = page.screenshot()
        assert np.abs(pixel(0, *block, image=zero) - bare).max() < 12
        page.evaluate("qgmilViewer.setOpacity(0.5)")

        # a click on the first listed tile zooms both panels onto it (the viewports are in step)
        page.evaluate("document.querySelector('#qgmil-panel-0 .qgmil-top li').click()")
        settle(page)
        state = page.evaluate("qgmilViewer.state()")
        first = page.evaluate("qgmilViewer.page.panels[0].layers[0].top[0]")
        for panel in state["panels"]:
            b = panel["bounds"]
            assert b["x"] <= first["x"] and first["x"] + first["size"] <= b["x"] + b["width"]
            assert b["y"] <= first["y"] and first["y"] + first["size"] <= b["y"] + b["height"]
            assert b["width"] < 0.5 * PNG_SIZE[0]  # zoomed in
        assert state["panels"][0]["zoom"] == pytest.approx(state["panels"][1]["zoom"], rel=1e-6)
        assert state["panels"][0]["center"]["x"] == pytest.approx(state["panels"][1]["center"]["x"], rel=1e-6)

        requests = page.requests()
        assert any(u.endswith(".jpeg") for u in requests) and any(u.endswith("r0-rank.png") for u in requests)
        assert local_only(requests) == [], "fetched from the network"
        assert page.failed_requests() == []
        assert page.console_errors() == []
    finally:
        page.close()


def test_viewer_in_browser_cmu_slide_and_over_http(site, browser):  # noqa: F811
    import functools
    import http.server
    import threading

    if not SLIDE.is_file():
        pytest.skip(f"{SLIDE} not found")
    page = open_page(browser, (site / "slides" / f"{CMU}.html").as_uri())
    try:
        assert page.evaluate("qgmilViewer.errors") == []
        shot_path = os.environ.get("QGMIL_VIEWER_SCREENSHOT")  # docs/viewer.png is made this way
        shot = page.screenshot(Path(shot_path) if shot_path else None)
        state = page.evaluate("qgmilViewer.state()")
        # the whole slide in view, drawn from its pyramid
        b = state["panels"][0]["bounds"]
        assert b["x"] <= 0 and b["y"] <= 0 and b["x"] + b["width"] >= 2220 - 1 and b["y"] + b["height"] >= 2967 - 1
        for panel in (0, 1):  # the most attended tile is red, the least blue
            for k, hot in ((0, True), (-1, False)):
                order = np.argsort(-cmu_tiles()[1], kind="stable")
                x, y = cmu_tiles()[0][order[k]] + CMU_PATCH / 2
                at = page.evaluate(f"qgmilViewer.imageToPage({panel}, {x}, {y})")
                rgb = shot[int(at["y"]), int(at["x"])].astype(int)
                assert (rgb[0] - rgb[2] > 40) if hot else (rgb[2] - rgb[0] > 40), (k, rgb)
        page.evaluate("qgmilViewer.setLayer(0, null); qgmilViewer.setLayer(1, null)")
        settle(page)
        bare = page.screenshot()
        inside = page.evaluate("[qgmilViewer.imageToPage(0, 0, 0), qgmilViewer.imageToPage(0, 2220, 2967)]")
        slide = bare[int(inside[0]["y"]) + 2:int(inside[1]["y"]) - 2, int(inside[0]["x"]) + 2:int(inside[1]["x"]) - 2]
        stained = (slide.max(axis=2).astype(int) - slide.min(axis=2)) > 30  # H&E colour, not glass or grey
        assert stained.mean() > 0.2
        assert local_only(page.requests()) == [] and page.failed_requests() == []
    finally:
        page.close()

    # the same folder served over http works too (python -m http.server)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page = open_page(browser, f"http://127.0.0.1:{server.server_address[1]}/slides/{CMU}.html")
        try:
            assert page.evaluate("qgmilViewer.errors") == []
            assert local_only(page.requests()) == [] and page.failed_requests() == []
        finally:
            page.close()
    finally:
        server.shutdown()
        server.server_close()
