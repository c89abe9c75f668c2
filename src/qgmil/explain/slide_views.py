"""What the QuPath export and the slide viewer show of a slide: its tiles (level-0 geometry), the attention
layers of each run over them, and each run's prediction of the bag.

  slide_views(runs, bags)  -> [SlideView], one per slide of each bag (a patient bag spans several slides)
  slide_ids(run, bags)     -> the slide ids of those bags, each once (what to look for in --slides)
  tested_bags(run)         -> every test bag of a run, in predictions.csv order

A layer is one run's pooling attention, or one branch of a multi-branch run (per class for `clam_mb` and
`dsmil`), the mean over the seeds that tested the bag. Ranks and percentiles are taken over the whole bag,
so the slides of a patient share one scale (as `qgmil explain heatmap` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .heatmap import bag_geometry, normalise_attention
from .reader import (
    BagPrediction, ExplainError, RunAttention, bag_attention, bag_branch_attention, bag_prediction, bag_units,
    has_branch_attention, run_names,
)


@dataclass
class Layer:
    """One attention map over a slide's tiles."""

    key: str  # unique within the slide, safe in file names: "r0" (run 0's attention), "r1b2" (run 1, branch 2)
    run: int  # index of its run
    name: str  # "abmil", "clam_mb / positive"
    branch: str | None  # the branch (class) name, None for the pooling attention
    weights: np.ndarray  # (n,) float64: the attention of the slide's tiles (mean over seeds)
    percentile: np.ndarray  # (n,) in [0, 1], the rank within the whole bag ((rank - 1) / (N - 1), 1 = most)
    rank: np.ndarray  # (n,) int: 1 = the most attended tile of the whole bag (ties share the best rank)
    bag_range: tuple[float, float]  # (min, max) of the weights over the whole bag


@dataclass
class SlideView:
    """One slide of a bag: its tiles, their layers, and the runs' predictions of the bag."""

    bag_id: str
    slide_id: str
    stem: str  # the bag id, or "<bag_id>__<slide_id>" for one slide of a patient bag
    coords: np.ndarray  # (n, 2) float64 level-0 px top-left corners
    patch: float  # tile side in level-0 px
    first: int  # index in the bag of the slide's first tile
    layers: list[Layer] = field(default_factory=list)
    predictions: list[BagPrediction] = field(default_factory=list)  # one per run
    run_names: list[str] = field(default_factory=list)

    @property
    def tissue_box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in level-0 px: the bounding box of the tiles."""
        lo, hi = self.coords.min(axis=0), self.coords.max(axis=0) + self.patch
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def tested_bags(run: RunAttention) -> list[str]:
    """The run's test bags, in predictions.csv order, each once."""
    return list(dict.fromkeys(str(b) for b in run.rows["bag_id"]))


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(-a, method="min").astype(np.int64)


def _units(run: RunAttention, bags: Sequence[str]) -> dict:
    units = bag_units(run)
    unknown = [b for b in bags if b not in units]
    if unknown:
        raise ExplainError(f"{run.run_dir}: bag {unknown[0]!r} is not in the run's dataset")
    return units


def slide_ids(run: RunAttention, bags: Sequence[str]) -> list[str]:
    """The ids of the slides the bags hold (a slide bag: its own; a patient bag: each of its slides), each once."""
    units = _units(run, bags)
    return list(dict.fromkeys(s for b in bags for s in units[b].slide_ids))


def slide_views(runs: Sequence[RunAttention], bags: Sequence[str], *, branches: bool = True,
                slides: Mapping[str, Path] | None = None, mpp: float | None = None) -> list[SlideView]:
    """One SlideView per slide of each bag: a layer per run (and per branch of the multi-branch runs, with
    `branches`), the bags as the first run built them. Every run must have tested every bag.

    slides: slide id -> slide file, mpp: um per level-0 px; micrometre coords (STAMP's) are placed with the
    file's mpp, else the slide's, else `mpp` (`heatmap.bag_geometry`)."""
    if not runs:
        raise ValueError("no run")
    names = run_names(runs)
    units = _units(runs[0], bags)
    slides = slides or {}
    with_branches = [branches and has_branch_attention(r) for r in runs]
    views = []
    for bag_id in bags:
        unit = units[bag_id]
        geometry = [bag_geometry(f, slide=slides.get(s), mpp=mpp) for f, s in zip(unit.files, unit.slide_ids)]
        offsets = np.cumsum([0] + [c.shape[0] for c, _ in geometry])
        maps = []  # (run index, layer name, branch, weights over the whole bag)
        for i, (run, name) in enumerate(zip(runs, names)):
            a, _ = bag_attention(run, bag_id)
            maps.append((i, name, None, a))
            if with_branches[i]:
                b, branch_names, _ = bag_branch_attention(run, bag_id)
                maps += [(i, f"{name} / {n}", n, w) for n, w in zip(branch_names, b)]
        for i, _, _, a in maps:
            if a.size != offsets[-1]:
                raise ExplainError(f"{runs[i].run_dir}: bag {bag_id!r}: attention over {a.size} instances, "
                                   f"its feature file(s) have {offsets[-1]} coords")
        predictions = [bag_prediction(run, bag_id) for run in runs]
        whole = [(normalise_attention(a, "rank"), _ranks(a)) for _, _, _, a in maps]
        for s, ((coords, patch), slide_id) in enumerate(zip(geometry, unit.slide_ids)):
            lo, hi = offsets[s], offsets[s + 1]
            view = SlideView(bag_id, slide_id, bag_id if len(unit.files) == 1 else f"{bag_id}__{slide_id}",
                             coords, patch, int(lo), predictions=predictions, run_names=names)
            branch_count: dict[int, int] = {}
            for (i, name, branch, a), (pct, rank) in zip(maps, whole):
                if branch is None:
                    key = f"r{i}"
                else:
                    branch_count[i] = branch_count.get(i, -1) + 1
                    key = f"r{i}b{branch_count[i]}"
                view.layers.append(Layer(key, i, name, branch, a[lo:hi], pct[lo:hi], rank[lo:hi],
                                         (float(a.min()), float(a.max()))))
            views.append(view)
    return views
