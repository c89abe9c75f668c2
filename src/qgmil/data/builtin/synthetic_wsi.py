"""synthetic-wsi: generated WSI-scale bags (tile coords on one blob of tissue, a contiguous witness region).

Owns the generator (shared background, tissue tiles, witness region, Beatty-sequence labels), its
option check and the registry entry `ENTRY`.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

from .base import CLASSES, BuiltinDataset, _Entry, _Plan, _Record

_WSI_MPP = 0.5
_WSI_RANK = 8  # rank of the shared background
_WSI_SHIFT = 1.5  # witness mean shift along the direction, in noise std (instance AUC ~0.86)
_WSI_SLIDE_EFFECT = 0.5  # per-slide offset inside the background subspace, like stain variation
_WSI_CHUNK = 8192  # rows generated at a time, so a 100k x 1024 bag needs little more than its output


def _wsi_shared(seed: int, dim: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (label offset u, mean (D,), scaled basis (R, D), slide basis (R, D), witness direction (D,))."""
    rng = np.random.default_rng([seed, 0])
    u = float(rng.random())
    rank = min(_WSI_RANK, dim - 1)
    q, _ = np.linalg.qr(rng.standard_normal((dim, rank + 1)))
    basis, direction = q[:, :rank].T, q[:, rank]  # the direction is orthogonal to the background
    scales = rng.uniform(1.0, 3.0, size=rank)
    mean = rng.normal(0.0, 0.5, size=dim)
    f32 = np.float32
    return u, mean.astype(f32), (scales[:, None] * basis).astype(f32), basis.astype(f32), direction.astype(f32)


def _tissue_tiles(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) unique integer tile positions (x, y) forming one blob, sorted row-major."""
    amps, phases = rng.uniform(0.05, 0.18, size=3), rng.uniform(0, 2 * np.pi, size=3)
    aspect, tilt = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
    half = int(math.ceil(math.sqrt(n / math.pi) * (1 + amps.sum()) / aspect * 1.2)) + 2
    ys, xs = np.mgrid[-half : half + 1, -half : half + 1]
    xr = xs * math.cos(tilt) + ys * math.sin(tilt)
    yr = -xs * math.sin(tilt) + ys * math.cos(tilt)
    theta = np.arctan2(yr, xr)
    radius = 1 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 5), amps, phases))
    # The n cells with the smallest radius-normalised distance: a star-shaped blob of exactly n tiles.
    score = np.hypot(xr * aspect, yr / aspect) / radius
    pick = np.argpartition(score.ravel(), n - 1)[:n]
    tiles = np.stack([xs.ravel()[pick], ys.ravel()[pick]], axis=1)
    tiles = tiles - tiles.min(axis=0) + rng.integers(0, 64, size=2)
    return tiles[np.lexsort((tiles[:, 0], tiles[:, 1]))].astype(np.int64)


def _grow_region(tiles: np.ndarray, start: int, size: int) -> np.ndarray:
    """Indices of `size` tiles around tiles[start]: nearest first, 4-connected by construction."""
    lo = tiles.min(axis=0)
    grid = np.full(tuple(tiles.max(axis=0) - lo + 1), -1, dtype=np.int64)
    grid[tiles[:, 0] - lo[0], tiles[:, 1] - lo[1]] = np.arange(len(tiles))
    cx, cy = (int(v) for v in tiles[start] - lo)
    heap, seen, region = [(0, start, cx, cy)], {start}, []
    while heap and len(region) < size:
        _, i, x, y = heapq.heappop(heap)
        region.append(i)
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if 0 <= nx < grid.shape[0] and 0 <= ny < grid.shape[1]:
                j = int(grid[nx, ny])
                if j >= 0 and j not in seen:
                    seen.add(j)
                    heapq.heappush(heap, ((nx - cx) ** 2 + (ny - cy) ** 2, j, nx, ny))
    return np.array(sorted(region), dtype=np.int64)


def _wsi_label(patient: int, fraction: float, u: float) -> int:
    # A Beatty sequence: every prefix of patients holds round(n * fraction) positives, and a
    # patient's label does not depend on how many bags are asked for.
    return int(math.floor((patient + 1) * fraction + u) - math.floor(patient * fraction + u))


def _wsi_bag(k: int, opts: dict[str, Any], seed: int, shared) -> _Record:
    u, mean, scaled_basis, basis, direction = shared
    rng = np.random.default_rng([seed, 1, k])
    n = int(rng.integers(opts["min_instances"], opts["max_instances"] + 1))
    tiles = _tissue_tiles(n, rng)
    patient = k // opts["slides_per_patient"]
    label = _wsi_label(patient, opts["positive_fraction"], u)
    witness = np.zeros(n, dtype=bool)
    centre = int(rng.integers(n))
    if label:
        witness[_grow_region(tiles, centre, max(1, round(opts["witness_fraction"] * n)))] = True
    offset = mean + rng.normal(0.0, _WSI_SLIDE_EFFECT, size=len(basis)).astype(np.float32) @ basis
    features = np.empty((n, opts["dim"]), dtype=opts["dtype"])
    for lo in range(0, n, _WSI_CHUNK):
        hi = min(n, lo + _WSI_CHUNK)
        chunk = rng.standard_normal((hi - lo, opts["dim"]), dtype=np.float32)
        chunk += rng.standard_normal((hi - lo, len(basis)), dtype=np.float32) @ scaled_basis
        chunk += offset
        chunk[witness[lo:hi]] += np.float32(_WSI_SHIFT) * direction
        features[lo:hi] = chunk
    bag_id = f"slide_{k:04d}"
    patient_id = bag_id if opts["slides_per_patient"] == 1 else f"patient_{patient:04d}"
    attrs = {
        "source": "qgmil synthetic-wsi generator",
        "patch_size_px": opts["patch_size"],
        "patch_level": 0,
        "mpp": _WSI_MPP,
        "seed": seed,
        "bag_index": k,
    }
    coords = tiles * opts["patch_size"]
    return _Record(bag_id, CLASSES[label], patient_id, features, coords, witness.astype(np.int8), attrs)


def _build_wsi(opts: dict[str, Any], seed: int) -> _Plan:
    """Bags of `min_instances`-`max_instances` tiles on one blob of tissue, features (N, dim).

    Background: a shared low-rank Gaussian (rank 8, factor std 1-3) + a per-slide offset inside that
    subspace + unit noise. A positive bag holds one contiguous "tumour" region (the
    round(witness_fraction * N) tiles nearest a random centre) shifted by 1.5 noise std along a fixed
    direction orthogonal to the background. Bag k draws from its own rng (seed, k), so it is the same
    whatever `bags` is; one bag is in memory at a time.
    """
    shared = _wsi_shared(seed, opts["dim"])
    records = (_wsi_bag(k, opts, seed, shared) for k in range(opts["bags"]))
    return _Plan(opts["bags"], records, "qgmil synthetic-wsi generator")


def _check_wsi(opts: dict[str, Any]) -> None:
    problems = []
    if opts["bags"] < 1:
        problems.append("bags must be >= 1")
    if not 1 <= opts["min_instances"] <= opts["max_instances"]:
        problems.append("need 1 <= min_instances <= max_instances")
    if opts["dim"] < 2:
        problems.append("dim must be >= 2")
    if not 0.0 <= opts["positive_fraction"] <= 1.0:
        problems.append("positive_fraction must be in [0, 1]")
    if not 0.0 < opts["witness_fraction"] <= 1.0:
        problems.append("witness_fraction must be in (0, 1]")
    if opts["patch_size"] < 1:
        problems.append("patch_size must be >= 1")
    if opts["dtype"] not in ("float32", "float16"):
        problems.append(f"dtype must be 'float32' or 'float16', got {opts['dtype']!r}")
    if opts["slides_per_patient"] < 1:
        problems.append("slides_per_patient must be >= 1")
    if problems:
        raise ValueError("synthetic-wsi: " + "; ".join(problems))


ENTRY = _Entry(
    BuiltinDataset(
        "synthetic-wsi",
        "generated WSI-scale bags with tile coords and a contiguous witness region, for scale tests",
        list(CLASSES),
        {
            "bags": 40,
            "min_instances": 1000,
            "max_instances": 8000,
            "dim": 256,
            "positive_fraction": 0.5,
            "witness_fraction": 0.05,
            "patch_size": 256,
            "dtype": "float32",
            "slides_per_patient": 1,
        },
    ),
    _build_wsi,
    _check_wsi,
)
