"""Feature files: one bag per file, in the layouts other pipelines write, auto-detected per file.

Layouts read (all give `features` (N, D); coordinates and provenance travel along when present):
  qgmil    .h5  `features`, `coords` (level-0 px), root attr format="qgmil-bag"  (this project's own)
  trident  .h5  `features`, `coords` (level-0 px, attrs patch_size_level0, ...)  (TRIDENT)
  clam     .h5  `features`, `coords` (level-0 px, attrs patch_level, ...)        (CLAM h5_files)
  stamp    .h5  `feats`, `coords` in micrometres, attrs unit, extractor, ...     (STAMP)
  pt       .pt  a (N, D) tensor (CLAM pt_files), or a dict of tensors; loaded with weights_only=True (a pickled
                NumPy array, TRIDENT's saveas='pt', is refused: it cannot be read without unpickling)
  npy      .npy a (N, D) array, loaded without pickle
Every other dataset in the file (e.g. `instance_labels`, cell names) is kept in `Bag.extras`.

Every reader first checks what the file declares against `BagLimits` (instances, dim, bytes, and declared
versus stored bytes), its dtype (real numbers only) and its coordinates' shape, so that a corrupt or
hostile header is refused by name instead of allocating terabytes or reading fill values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth", ".npy")
QGMIL_FORMAT = "qgmil-bag"
QGMIL_FORMAT_VERSION = 1


class BagFileError(ValueError):
    """A feature file that cannot be read as a bag. The message names the file and the problem."""


class BagLimits(BaseModel):
    """What one feature file may declare, checked from its header before anything is read (config key
    `data.limits`; `qgmil data check --limit KEY=VALUE`). The defaults are generous for real WSIs: a bag of
    1M tiles x 1024 float32 is 4 GiB."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    instances: int = Field(1_000_000, ge=1, description="instances (rows) per bag")
    dim: int = Field(16384, ge=1, description="feature dimension")
    gib: float = Field(8.0, gt=0, description="GiB of all datasets of one file together, as declared")
    compression: float = Field(1000.0, gt=1, description="declared / stored bytes of a dataset above 1 MiB")


DEFAULT_LIMITS = BagLimits()
# Below this a dataset is too small to matter, however little of it is stored (tiny chunked datasets).
_RATIO_FLOOR = 2**20


def _over(path: Path, what: str, key: str, limits: BagLimits) -> BagFileError:
    return BagFileError(
        f"{path}: {what}, over the limit data.limits.{key} = {getattr(limits, key):,} (raise it with "
        f"--set data.limits.{key}=... or `qgmil data check --limit {key}=...` if the file is genuine)"
    )


def _check_dtype(dtype, path: Path, what: str = "features") -> None:
    """Features and coordinates must be real numbers: complex would lose its imaginary part, bool and text
    are not features."""
    kind = getattr(dtype, "kind", None)
    if kind not in ("f", "i", "u"):
        raise BagFileError(f"{path}: {what} have dtype {dtype}, not real numbers (float or integer)")


def _check_size(path: Path, n: int, d: int, nbytes: int, limits: BagLimits, what: str = "the file") -> None:
    if n > limits.instances:
        raise _over(path, f"features declare {n:,} instances", "instances", limits)
    if d > limits.dim:
        raise _over(path, f"features declare dim {d:,}", "dim", limits)
    if nbytes > limits.gib * 2**30:
        raise _over(path, f"{what} declares {nbytes / 2**30:,.1f} GiB", "gib", limits)


def _check_coords(shape: tuple, n: int, path: Path) -> None:
    shape = tuple(shape[1:]) if len(shape) == 3 and shape[0] == 1 else tuple(shape)
    if shape != (n, 2):
        raise BagFileError(f"{path}: coords have shape {shape}, expected ({n}, 2): one (x, y) per instance")


def _guard_h5(f: h5py.File, path: Path, key: str, limits: BagLimits | None) -> tuple[int, int]:
    """Refuse a file whose header declares too much, or far more than it stores (fill values, or a compression
    bomb), before any data is read; -> (instances, dim)."""
    limits = limits or DEFAULT_LIMITS
    ds = f[key]
    n, d = _check_shape(ds.shape, path)
    _check_dtype(ds.dtype, path, f"features {key!r}")
    datasets = {name: obj for name, obj in f.items() if isinstance(obj, h5py.Dataset)}
    declared = {name: int(obj.size) * obj.dtype.itemsize for name, obj in datasets.items()}
    largest = max(declared, key=declared.get)
    _check_size(path, n, d, sum(declared.values()), limits,
                f"the file (largest: dataset {largest!r} of shape {datasets[largest].shape})")
    for name, obj in datasets.items():
        stored = obj.id.get_storage_size()
        if declared[name] > _RATIO_FLOOR and declared[name] > limits.compression * stored:
            raise BagFileError(
                f"{path}: dataset {name!r} of shape {obj.shape} declares {declared[name] / 2**20:,.0f} MiB but stores "
                f"{stored / 2**20:,.3f} MiB (unwritten fill values or a compression bomb; more than "
                f"data.limits.compression = {limits.compression:g}x); refused without reading it"
            )
    if "coords" in f:
        coords = f["coords"]
        if not isinstance(coords, h5py.Dataset):
            raise BagFileError(f"{path}: 'coords' is not a dataset")
        _check_dtype(coords.dtype, path, "coords")
        _check_coords(coords.shape, n, path)
    return n, d


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


# TRIDENT's `saveas="pt"` (`WSI.extract_patch_features`, `Processor.run_patch_feature_extraction_job`) is
# `torch.save` of the NumPy features: a pickle whose NumPy objects only an unpickler can rebuild, and an unpickler
# runs whatever the file names. Its default, `saveas="h5"` (all `run_batch_of_slides.py --task feat` writes), is
# read here with its coordinates.
_PICKLED_NUMPY = (
    "{path}: holds pickled NumPy objects ({found}), not tensors: this is what TRIDENT writes with "
    "saveas='pt' (torch.save of its NumPy features). Reading it means unpickling, which can run any code the file "
    "holds, so qgmil does not read it (torch.load(weights_only=True) refuses it too). Use TRIDENT's h5 output "
    "instead: saveas='h5', the default, and what run_batch_of_slides.py --task feat writes "
    "(<job_dir>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5, with the tiles' coords). "
    "Only for a file you made yourself and trust: numpy.save('<slide>.npy', torch.load('<slide>.pt', "
    "weights_only=False)) once, then qgmil reads the .npy without pickle"
)


def _pickled_numpy(path: Path) -> str:
    """The NumPy globals a torch file's pickle names (listed by torch without unpickling anything), or ''."""
    import torch

    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is None:  # torch < 2.5 cannot list them; the plain error is given instead
        return ""
    try:
        names = lister(path)
    except Exception:  # noqa: BLE001 - not a torch file at all: the caller says so
        return ""
    numpy = sorted(n for n in names if n.split(".")[0] == "numpy")
    return ", ".join(numpy)


def _load_pt(path: Path, limits: BagLimits | None = None) -> dict[str, Any]:
    import zipfile

    import torch

    limits = limits or DEFAULT_LIMITS
    if zipfile.is_zipfile(path):  # torch's format is a zip: its entries' sizes are known before inflating any
        with zipfile.ZipFile(path) as z:
            unpacked = sum(i.file_size for i in z.infolist())
        if unpacked > limits.gib * 2**30:
            raise _over(path, f"the file unpacks to {unpacked / 2**30:,.1f} GiB", "gib", limits)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        pickled = _pickled_numpy(path)
        if pickled:
            raise BagFileError(_PICKLED_NUMPY.format(path=path, found=pickled)) from None
        raise BagFileError(f"{path}: not a readable tensor file ({type(err).__name__}: {err})") from None
    if isinstance(obj, torch.Tensor):
        data = {"features": obj}
    elif isinstance(obj, dict):
        key = next((k for k in ("features", "feats") if k in obj), None)
        if key is None:
            raise BagFileError(f"{path}: dict without a 'features' or 'feats' tensor (keys: {sorted(map(str, obj))})")
        data = {("features" if k == key else k): v for k, v in obj.items()}
    else:
        raise BagFileError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
    features = data["features"]
    if not isinstance(features, torch.Tensor):
        raise BagFileError(f"{path}: 'features' is a {type(features).__name__}, not a tensor")
    ints = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if not (features.dtype.is_floating_point or features.dtype in ints):  # complex and bool are not features
        raise BagFileError(f"{path}: features have dtype {features.dtype}, not real numbers (float or integer)")
    n, d = _check_shape(tuple(features.shape), path)
    _check_size(path, n, d, features.numel() * features.element_size(), limits)
    coords = data.get("coords")
    if coords is not None:
        if not isinstance(coords, torch.Tensor) or coords.dtype.is_complex or coords.dtype == torch.bool:
            raise BagFileError(f"{path}: 'coords' must be a tensor of numbers, got {getattr(coords, 'dtype', type(coords).__name__)}")
        _check_coords(tuple(coords.shape), n, path)
    return data


def _to_numpy(value):
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    # numpy has no bfloat16; integer/bool tensors (labels, masks) keep their type.
    return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()


def _load_npy(path: Path, mmap: bool = False, limits: BagLimits | None = None) -> np.ndarray:
    """The array, its header checked first (dtype, shape against the limits, and against the file's size), so
    that a header declaring more than the limits, or than the file holds, is refused before anything is mapped
    or allocated."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            version = fmt.read_magic(fh)
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fh)
            offset = fh.tell()
    except (OSError, ValueError) as err:
        raise BagFileError(f"{path}: not a readable .npy array ({err})") from None
    _check_dtype(dtype, path)
    n, d = _check_shape(shape, path)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    _check_size(path, n, d, nbytes, limits or DEFAULT_LIMITS)
    if offset + nbytes > path.stat().st_size:
        raise BagFileError(f"{path}: truncated .npy: the header declares shape {shape} ({nbytes:,} bytes of data), "
                           f"the file holds {path.stat().st_size - offset:,}")
    if nbytes == 0:  # an empty array cannot be memory-mapped
        return np.empty(shape, dtype)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BagFileError(f"{path}: not a readable .npy array ({err})") from None
    return array if mmap else np.array(array)


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BagFileError(f"{path}: feature file not found")
    if path.suffix.lower() not in FEATURE_SUFFIXES:
        raise BagFileError(f"{path}: unknown feature file type {path.suffix!r} (expected one of {', '.join(FEATURE_SUFFIXES)})")
    return path


def inspect_bag(path: str | Path, *, limits: BagLimits | None = None) -> BagInfo:
    """Layout and shape of a feature file without reading its features (h5: header; npy: mmap), its
    declared sizes, dtype and coordinates checked (BagFileError naming the file)."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            layout, key = _h5_layout(f, path)
            n, d = _guard_h5(f, path, key, limits)
            return BagInfo(path, layout, n, d, str(f[key].dtype), "coords" in f)
    if suffix == ".npy":
        array = _load_npy(path, mmap=True, limits=limits)
        n, d = _check_shape(array.shape, path)
        return BagInfo(path, "npy", n, d, str(array.dtype), False)
    data = _load_pt(path, limits)
    n, d = _check_shape(tuple(data["features"].shape), path)
    return BagInfo(path, "pt", n, d, str(data["features"].dtype).removeprefix("torch."), "coords" in data)


def read_features(path: str | Path, rows: np.ndarray | None = None, *, limits: BagLimits | None = None) -> np.ndarray:
    """Only the (N, D) features (or the given sorted `rows` of them): the fast path the loader uses."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            _, key = _h5_layout(f, path)
            _guard_h5(f, path, key, limits)
            ds = f[key]
            if ds.ndim == 3:
                return ds[0] if rows is None else ds[0][rows]
            if rows is None:
                return ds[()]
            # h5py point selection is slow for many scattered rows; one contiguous read is faster.
            return ds[()][rows] if len(rows) > ds.shape[0] // 8 else ds[rows]
    if suffix == ".npy":
        array = _as_2d(_load_npy(path, mmap=True, limits=limits))
        return np.ascontiguousarray(array if rows is None else array[rows])
    features = _load_pt(path, limits)["features"]
    array = _as_2d(_to_numpy(features))
    return array if rows is None else array[rows]


def read_coords(path: str | Path, *, limits: BagLimits | None = None) -> tuple[np.ndarray | None, str | None]:
    """Only the (N, 2) coordinates and their unit ("px" level-0 pixels or "um"), or (None, None)."""
    path = _check_file(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        bag = read_bag(path, limits=limits)
        return bag.coords, bag.coord_unit
    with _open_h5(path) as f:
        layout, key = _h5_layout(f, path)
        _guard_h5(f, path, key, limits)
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


def read_extra(path: str | Path, name: str, *, limits: BagLimits | None = None):
    """Only the extra dataset `name` of a feature file (as in `Bag.extras`: e.g. `instance_labels`,
    `instance_names`), or None when the file has none. h5 files read that one dataset; .npy files hold no
    extras; .pt files are loaded whole."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            _, key = _h5_layout(f, path)
            _guard_h5(f, path, key, limits)
            obj = f.get(name)
            if name in (key, "coords") or not isinstance(obj, h5py.Dataset):
                return None
            return _read_dataset(obj)
    if suffix == ".npy":
        _load_npy(path, mmap=True, limits=limits)  # no extras, but a bad file is refused as by every reader
        return None
    return read_bag(path, limits=limits).extras.get(name)


def read_bag(path: str | Path, *, limits: BagLimits | None = None) -> Bag:
    """Everything the file holds: features, coords (+ unit), provenance attrs and extra datasets."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        with _open_h5(path) as f:
            layout, key = _h5_layout(f, path)
            _guard_h5(f, path, key, limits)
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
        features = _as_2d(_load_npy(path, limits=limits))
        return Bag(features, path, "npy")
    data = _load_pt(path, limits)
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
    if coords is not None and np.shape(coords) != (features.shape[0], 2):
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
