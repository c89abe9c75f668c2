"""Feature files: one bag per file, in the layouts other pipelines write, auto-detected per file.

Layouts read (all give `features` (N, D); coordinates and provenance travel along when present):
  qgmil    .h5  `features`, `coords` (level-0 px), root attr format="qgmil-bag"  (this project's own)
  trident  .h5  `features`, `coords` (level-0 px, attrs patch_size_level0, ...)  (TRIDENT)
  clam     .h5  `features`, `coords` (level-0 px, attrs patch_level, ...)        (CLAM h5_files)
  stamp    .h5  `feats`, `coords` in micrometres, attrs unit, extractor, ...     (STAMP)
  pt       .pt  a (N, D) tensor (CLAM pt_files), or a dict of tensors; loaded with weights_only=True
  npy      .npy a (N, D) array, loaded without pickle
Every other dataset in the file (e.g. `instance_labels`, cell names) is kept in `Bag.extras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth", ".npy")
QGMIL_FORMAT = "qgmil-bag"
QGMIL_FORMAT_VERSION = 1


class BagFileError(ValueError):
    """A feature file that cannot be read as a bag. The message names the file and the problem."""


@dataclass
class Bag:
    """One bag read from disk.

    features: (N, D) as stored (float16 or float32); coords: (N, 2) or None, in `coord_unit`
    ("px" = level-0 pixels, "um" = micrometres); attrs: provenance (encoder, patch size, mpp...);
    extras: the file's other datasets, e.g. extras["instance_labels"] (N,) or extras["instance_names"].
    """

    features: np.ndarray
    path: Path
    layout: str
    coords: np.ndarray | None = None
    coord_unit: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


@dataclass(frozen=True)
class BagInfo:
    """What a file holds, read from its header only (cheap): layout, N, D, stored dtype."""

    path: Path
    layout: str
    num_instances: int
    dim: int
    dtype: str
    has_coords: bool


def _plain(value):
    """h5py/numpy attribute values -> plain Python, so provenance is JSON-able."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "SO" else value.tolist()
    return value


def _read_dataset(ds: h5py.Dataset):
    if ds.dtype.kind in "SO" or h5py.check_string_dtype(ds.dtype) is not None:
        return [_plain(v) for v in ds.asstr()[()]] if ds.shape else ds.asstr()[()]
    return ds[()]


def _h5_layout(f: h5py.File, path: Path) -> tuple[str, str]:
    """-> (layout, name of the features dataset)."""
    if "features" in f and isinstance(f["features"], h5py.Dataset):
        if _plain(f.attrs.get("format")) == QGMIL_FORMAT:
            return "qgmil", "features"
        coord_attrs = f["coords"].attrs if "coords" in f else {}
        return ("trident" if "patch_size_level0" in coord_attrs else "clam"), "features"
    if "feats" in f and isinstance(f["feats"], h5py.Dataset):
        return "stamp", "feats"
    found = ", ".join(sorted(f.keys())) or "nothing"
    raise BagFileError(f"{path}: no 'features' (TRIDENT/CLAM/qgmil) or 'feats' (STAMP) dataset; the file holds {found}")


def _attrs(f: h5py.File, key: str) -> dict[str, Any]:
    """Provenance sits on the root (qgmil, STAMP) or on the datasets (TRIDENT, CLAM): merge all."""
    attrs: dict[str, Any] = {}
    for name in ("coords", key):
        if name in f:
            attrs.update({k: _plain(v) for k, v in f[name].attrs.items()})
    attrs.update({k: _plain(v) for k, v in f.attrs.items()})
    return attrs


def _check_shape(shape: tuple, path: Path, what: str = "features") -> tuple[int, int]:
    # Some pipelines save (1, N, D); the leading 1 is a batch axis.
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise BagFileError(f"{path}: {what} must be 2-D (instances, dim), got shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def _as_2d(array: np.ndarray) -> np.ndarray:
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise BagFileError(f"{path}: not a readable HDF5 file ({err})") from None


def _load_pt(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise BagFileError(f"{path}: not a readable tensor file ({type(err).__name__}: {err})") from None
    if isinstance(obj, torch.Tensor):
        return {"features": obj}
    if isinstance(obj, dict):
        key = next((k for k in ("features", "feats") if k in obj), None)
        if key is None:
            raise BagFileError(f"{path}: dict without a 'features' or 'feats' tensor (keys: {sorted(map(str, obj))})")
        return {("features" if k == key else k): v for k, v in obj.items()}
    raise BagFileError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def _to_numpy(value):
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    # numpy has no bfloat16; integer/bool tensors (labels, masks) keep their type.
    return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()


def _load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BagFileError(f"{path}: not a readable .npy array ({err})") from None


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BagFileError(f"{path}: feature file not found")
    if path.suffix.lower() not in FEATURE_SUFFIXES:
        raise BagFileError(f"{path}: unknown feature file type {path.suffix!r} (expected one of {', '.join(FEATURE_SUFFIXES)})")
    return path


def inspect_bag(path: str | Path) -> BagInfo:
    """Layout and shape of a feature file without reading its features (h5: header; npy: mmap)."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            layout, key = _h5_layout(f, path)
            n, d = _check_shape(f[key].shape, path)
            return BagInfo(path, layout, n, d, str(f[key].dtype), "coords" in f)
    if suffix == ".npy":
        array = _load_npy(path, mmap=True)
        n, d = _check_shape(array.shape, path)
        return BagInfo(path, "npy", n, d, str(array.dtype), False)
    data = _load_pt(path)
    n, d = _check_shape(tuple(data["features"].shape), path)
    return BagInfo(path, "pt", n, d, str(data["features"].dtype).removeprefix("torch."), "coords" in data)


def read_features(path: str | Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Only the (N, D) features (or the given sorted `rows` of them): the fast path the loader uses."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            _, key = _h5_layout(f, path)
            ds = f[key]
            _check_shape(ds.shape, path)
            if ds.ndim == 3:
                return ds[0] if rows is None else ds[0][rows]
            if rows is None:
                return ds[()]
            # h5py point selection is slow for many scattered rows; one contiguous read is faster.
            return ds[()][rows] if len(rows) > ds.shape[0] // 8 else ds[rows]
    if suffix == ".npy":
        array = _as_2d(_load_npy(path, mmap=rows is not None))
        _check_shape(array.shape, path)
        return np.ascontiguousarray(array if rows is None else array[rows])
    features = _load_pt(path)["features"]
    _check_shape(tuple(features.shape), path)
    array = _as_2d(_to_numpy(features))
    return array if rows is None else array[rows]


def read_coords(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """Only the (N, 2) coordinates and their unit ("px" level-0 pixels or "um"), or (None, None)."""
    path = _check_file(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        bag = read_bag(path)
        return bag.coords, bag.coord_unit
    with _open_h5(path) as f:
        layout, _ = _h5_layout(f, path)
        if "coords" not in f:
            return None, None
        unit = _plain(f.attrs.get("coord_unit") or f.attrs.get("unit")) or ("um" if layout == "stamp" else "px")
        return _as_2d(f["coords"][()]), unit


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Provenance attributes only (no data read): encoder, patch size, mpp... ({} for .pt/.npy)."""
    path = _check_file(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return {}
    with _open_h5(path) as f:
        return _attrs(f, _h5_layout(f, path)[1])


def read_extra(path: str | Path, name: str):
    """Only the extra dataset `name` of a feature file (as in `Bag.extras`: e.g. `instance_labels`,
    `instance_names`), or None when the file has none. h5 files read that one dataset; .npy files hold no
    extras; .pt files are loaded whole."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            _, key = _h5_layout(f, path)
            obj = f.get(name)
            if name in (key, "coords") or not isinstance(obj, h5py.Dataset):
                return None
            return _read_dataset(obj)
    if suffix == ".npy":
        return None
    return read_bag(path).extras.get(name)


def read_bag(path: str | Path) -> Bag:
    """Everything the file holds: features, coords (+ unit), provenance attrs and extra datasets."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            layout, key = _h5_layout(f, path)
            _check_shape(f[key].shape, path)
            attrs = _attrs(f, key)
            features = _as_2d(f[key][()])
            coords = _as_2d(f["coords"][()]) if "coords" in f else None
            extras = {
                name: _read_dataset(obj)
                for name, obj in f.items()
                if name not in (key, "coords") and isinstance(obj, h5py.Dataset)
            }
        unit = attrs.get("coord_unit") or attrs.get("unit") or ("um" if layout == "stamp" else "px")
        return Bag(features, path, layout, coords, unit if coords is not None else None, attrs, extras)
    if suffix == ".npy":
        features = _as_2d(_load_npy(path))
        _check_shape(features.shape, path)
        return Bag(features, path, "npy")
    data = _load_pt(path)
    _check_shape(tuple(data["features"].shape), path)
    arrays = {k: _to_numpy(v) for k, v in data.items()}
    coords = arrays.pop("coords", None)
    unit = arrays.pop("coord_unit", "px" if coords is not None else None)
    features = _as_2d(arrays.pop("features"))
    return Bag(features, path, "pt", coords, unit, {}, arrays)


def write_bag(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray | None = None,
    *,
    coord_unit: str = "px",
    attrs: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
) -> Path:
    """Write a bag in this project's layout, atomically (temp file then rename).

    features (N, D) float; coords (N, 2) level-0 px (or `coord_unit`); attrs: provenance written as
    root attributes (None values skipped); extras: other per-bag datasets (arrays or lists of str).
    """
    from .. import __version__
    from ..atomic import atomic_write

    path = Path(path)
    features = np.asarray(features)
    _check_shape(features.shape, path)
    if coords is not None and (coords.ndim != 2 or coords.shape[0] != features.shape[0]):
        raise BagFileError(f"{path}: coords shape {coords.shape} does not match {features.shape[0]} instances")
    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": QGMIL_FORMAT, "format_version": QGMIL_FORMAT_VERSION, "qgmil_version": __version__})
            f.create_dataset("features", data=features)
            if coords is not None:
                f.create_dataset("coords", data=coords)
                f.attrs["coord_unit"] = coord_unit
            for key, value in (attrs or {}).items():
                if value is not None:
                    f.attrs[key] = value
            for key, value in (extras or {}).items():
                if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
                    f.create_dataset(key, data=np.array(value, dtype=h5py.string_dtype()))
                else:
                    f.create_dataset(key, data=np.asarray(value))

    return atomic_write(path, write)
