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

Layouts written: qgmil's own (`write_bag`; with TRIDENT's patching attributes on `coords` when the bag comes from
a slide, so that TRIDENT's readers take qgmil's files as they are), and the three peers' exactly as their own code
writes them (`write_trident_bag`, `write_clam_bag` + `write_clam_pt`, `write_stamp_bag`: dataset names, dtypes,
attribute names, types and places), from what any layout records about its tiles (`TileFacts`).

Every reader first checks what the file declares against `BagLimits` (instances, dim, bytes, and declared
versus stored bytes), its dtype (real numbers only) and its coordinates' shape, so that a corrupt or
hostile header is refused by name instead of allocating terabytes or reading fill values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..atomic import atomic_write
from ..numbers import positive_number

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
    coords_attrs: dict[str, Any] | None = None,
) -> Path:
    """Write a bag in this project's layout, atomically (temp file then rename).

    features (N, D) float; coords (N, 2) level-0 px (or `coord_unit`); attrs: provenance written as
    root attributes (None values skipped); extras: other per-bag datasets (arrays or lists of str);
    coords_attrs: attributes of the `coords` dataset (where TRIDENT reads its patching facts:
    `trident_coords_attrs`). qgmil reads its own from the root, so files without them read as before.
    """
    from .. import __version__

    path = Path(path)
    features = np.asarray(features)
    _check_shape(features.shape, path)
    if coords is not None and np.shape(coords) != (features.shape[0], 2):
        raise BagFileError(f"{path}: coords shape {coords.shape} does not match {features.shape[0]} instances")
    if coords_attrs and coords is None:
        raise BagFileError(f"{path}: coords attributes ({', '.join(coords_attrs)}) given without coords")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": QGMIL_FORMAT, "format_version": QGMIL_FORMAT_VERSION, "qgmil_version": __version__})
            f.create_dataset("features", data=features)
            if coords is not None:
                f.create_dataset("coords", data=coords)
                f["coords"].attrs.update(coords_attrs or {})
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


# --- peer layouts, written ------------------------------------------------------------------------------------
#
# As the peers' own code writes them (checked against files they wrote, in tests/test_peer_outputs.py):
#   TRIDENT  `features` float32 (attrs encoder, name, savetodir) and `coords` int64 level-0 px carrying the patching
#            attributes, as whole numbers (trident/IO.py coords_to_h5); both growable along the first axis
#   CLAM     `features` float32 and `coords` int32 level-0 px, growable, no attribute at all; the .pt holds the plain
#            float32 (N, D) tensor (torch.save), which torch.load(weights_only=True) reads
#   STAMP    `feats` float16 and `coords` float32 in micrometres, fixed size, STAMP's root attributes

PEER_LAYOUTS = ("trident", "clam", "stamp")
#: the STAMP release whose files `write_stamp_bag` matches. STAMP refuses files naming a newer release than its own,
#: so this is the release the layout was checked against, never qgmil's version.
STAMP_LAYOUT_VERSION = "2.5.0"
#: TRIDENT's patching attributes that are whole numbers (its readers pass them to read_region as sizes)
TRIDENT_INT_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                     "level0_width", "level0_height", "overlap")
_PEER_DTYPES = {"trident": ("float32", "int64"), "clam": ("float32", "int32"), "stamp": ("float16", "float32")}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def trident_coords_attrs(*, name: str, patch_size: float, patch_size_level0: float, level0_magnification: float,
                         level0_width: float, level0_height: float, target_magnification: float | None = None,
                         overlap: float = 0, savetodir: str | Path = "") -> dict[str, Any]:
    """TRIDENT's attributes of `coords` as TRIDENT writes them (trident/IO.py coords_to_h5): whole numbers, since its
    readers use them as such (`read_region(xy, 0, (patch_size_level0, patch_size_level0))`, slide encoders).

    qgmil's own sizes may be fractional (a tile read at a level of downsample 4.0003 covers 1024.08 level-0 px, an
    mpp of 0.2527 is 39.6x), so they are rounded here; qgmil keeps the exact values among its root attributes.
    target_magnification default: level0_magnification x patch_size / patch_size_level0 (TRIDENT's own relation).
    """
    if target_magnification is None:
        target_magnification = level0_magnification * patch_size / patch_size_level0
    values = {"patch_size": patch_size, "patch_size_level0": patch_size_level0,
              "level0_magnification": level0_magnification, "target_magnification": target_magnification,
              "level0_width": level0_width, "level0_height": level0_height, "overlap": overlap}
    attrs: dict[str, Any] = {key: np.int64(round(float(value))) for key, value in values.items()}
    for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification"):
        # TRIDENT divides by these (patch_size * src_mag // target_mag): never 0, even for a 0.4x overview
        attrs[key] = max(attrs[key], np.int64(1))
    return {**attrs, "name": str(name), "savetodir": str(savetodir)}


@dataclass(frozen=True)
class TileFacts:
    """What a feature file records about its tiles, in the terms each layout needs, whichever layout wrote it.

    Read from (attribute names): qgmil (root: mpp, patch_size_level0, patch_size_px, patch_size_um, magnification,
    slide_width/height, encoder), TRIDENT (on coords: patch_size_level0, patch_size, level0_magnification,
    target_magnification, level0_width/height, overlap; encoder on features), CLAM (patch_size at patch_level 0),
    STAMP (tile_size_um, tile_size_px, extractor; coords in um). What a file does not record is None.
    """

    coord_unit: str  # of the file's coords: "px" (level-0 pixels) or "um"
    mpp: float | None = None  # level-0 micrometres per pixel
    patch_size_level0: float | None = None  # tile side in level-0 px
    patch_px: int | None = None  # tile side as the encoder saw it, in px
    tile_um: float | None = None  # tile side in micrometres
    level0_magnification: float | None = None
    target_magnification: float | None = None
    level0_size: tuple[int, int] | None = None  # (width, height) in px
    overlap: int = 0  # px between neighbouring tiles (TRIDENT)
    encoder: str | None = None

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], layout: str, mpp: float | None = None,
                   tile_size: float | None = None) -> TileFacts:
        """`attrs` as `read_attrs` returns them (root attributes win over the datasets'); `mpp`: the level-0
        resolution to assume when the file records none, `tile_size`: the tile side in level-0 px to assume
        when it records none (CLAM's h5 files record neither; the file's own values win)."""
        def first(*keys):
            return next((v for v in (positive_number(attrs.get(k)) for k in keys) if v is not None), None)

        unit = str(attrs.get("coord_unit") or attrs.get("unit") or ("um" if layout == "stamp" else "px"))
        mpp = first("mpp") or positive_number(mpp)
        tile_um = first("tile_size_um", "patch_size_um")
        ps0 = first("patch_size_level0")
        if ps0 is None and tile_um and mpp:
            ps0 = tile_um / mpp
        if ps0 is None and attrs.get("patch_level") == 0:  # CLAM: patch_size is in px of patch_level
            ps0 = first("patch_size")
        given = positive_number(tile_size)
        ps0 = ps0 or given
        if tile_um is None and ps0 and mpp:
            tile_um = ps0 * mpp
        # a side given for a file that records none was cut at level 0 (CLAM's default patch_level)
        patch_px = first("patch_size_px", "tile_size_px", "patch_size") or (round(given) if given else None)
        magnification = first("magnification", "level0_magnification") or (10.0 / mpp if mpp else None)
        target = first("target_magnification")
        if target is None and magnification and patch_px and ps0:
            target = magnification * patch_px / ps0
        width, height = first("level0_width", "slide_width"), first("level0_height", "slide_height")
        encoder = next((str(attrs[k]) for k in ("encoder", "extractor") if attrs.get(k)), None)
        return cls(unit, mpp, ps0, None if patch_px is None else int(round(patch_px)), tile_um, magnification, target,
                   (int(width), int(height)) if width and height else None, int(first("overlap") or 0), encoder)

    def missing(self, layout: str) -> list[str]:
        """What writing `layout` needs that the file does not record (empty: it can be written)."""
        unit = "um" if layout == "stamp" else "px"
        need = []
        if self.coord_unit not in ("px", "um"):
            need.append(f"coords in level-0 px or um (they are in {self.coord_unit!r})")
        elif self.coord_unit != unit and not self.mpp:
            need.append(f"the slide's resolution (mpp, um/px) to convert its coords from {self.coord_unit} to {unit}")
        if layout == "trident":
            if not self.patch_size_level0:
                need.append("the tile size in level-0 px (patch_size_level0, or tile_size_um and the mpp)")
            if not self.level0_magnification:
                need.append("the slide's magnification or resolution (mpp)")
        if layout == "stamp" and not self.tile_um:
            need.append("the tile size in um (tile_size_um / patch_size_um, or patch_size_level0 and the mpp)")
        if layout in ("trident", "stamp") and not self.patch_px:
            need.append("the tile size in px (patch_size_px / patch_size / tile_size_px)")
        return need

    def coords_in(self, coords: np.ndarray, unit: str) -> np.ndarray:
        """The file's coords (N, 2) in `unit` ("px" level-0 pixels or "um"), float64."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if unit == self.coord_unit:
            return coords
        if not self.mpp or {unit, self.coord_unit} != {"px", "um"}:
            raise BagFileError(f"cannot convert coords from {self.coord_unit!r} to {unit!r}"
                               + ("" if self.mpp else " without the slide's mpp"))
        return coords * self.mpp if unit == "um" else coords / self.mpp


def _whole(coords: np.ndarray, dtype, path: Path) -> np.ndarray:
    """Level-0 px as the peers' integers: rounded (coords that went through micrometres are a hair off)."""
    rounded = np.rint(np.asarray(coords, dtype=np.float64))
    limits = np.iinfo(dtype)
    if rounded.size and (rounded.min() < limits.min or rounded.max() > limits.max):
        raise BagFileError(f"{path}: coords up to {rounded.max():,.0f} px do not fit {np.dtype(dtype).name}")
    return rounded.astype(dtype)


def _growable(f: h5py.File, name: str, data: np.ndarray) -> h5py.Dataset:
    """A dataset as TRIDENT's save_h5 and CLAM's save_hdf5 make them: chunked, growable along the first axis (they
    append batch by batch, and so may a peer's script that adds to the file)."""
    chunks = (max(1, min(len(data), 1024)), *data.shape[1:])  # bigger than theirs (1, D): the same layout, read faster
    return f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), chunks=chunks)


def _checked_features(features: np.ndarray, path: Path) -> np.ndarray:
    features = np.asarray(features)
    _check_shape(features.shape, path)
    _check_dtype(features.dtype, path)
    return _as_2d(features)


def write_trident_bag(path: str | Path, features: np.ndarray, coords_px: np.ndarray, facts: TileFacts, *,
                      encoder: str) -> Path:
    """TRIDENT's `features_<encoder>/<slide>.h5` (slide: the file's stem), atomically. coords_px: (N, 2) level-0 px;
    facts: the tiles' sizes and magnifications (`TileFacts.missing("trident")` empty). Where the slide's size is not
    recorded, level0_width/height are the tiles' far edges (the least the slide must measure)."""
    path = Path(path)
    features = _checked_features(features, path).astype(np.float32, copy=False)
    coords, coords_attrs = _trident_coords(coords_px, facts, path, name=path.stem)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            _growable(f, "features", features).attrs.update(
                {"encoder": str(encoder), "name": path.stem, "savetodir": str(path.parent)})
            _growable(f, "coords", coords).attrs.update(coords_attrs)

    return atomic_write(path, write)


def write_trident_patches(path: str | Path, coords_px: np.ndarray, facts: TileFacts, *, name: str) -> Path:
    """TRIDENT's `patches/<slide>_patches.h5` (what its visualisation and slide encoders read), atomically: `coords`
    int64 level-0 px with TRIDENT's attributes; `name`: the slide's."""
    path = Path(path)
    coords, coords_attrs = _trident_coords(coords_px, facts, path, name=name)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            _growable(f, "coords", coords).attrs.update(coords_attrs)

    return atomic_write(path, write)


def _trident_coords(coords_px: np.ndarray, facts: TileFacts, path: Path, *, name: str) -> tuple[np.ndarray, dict]:
    """The coords (N, 2) int64 of a TRIDENT file at `path` and the attributes TRIDENT reads on them."""
    coords = _whole(coords_px, np.int64, path)
    size = facts.level0_size or _extent(coords, facts.patch_size_level0)
    return coords, trident_coords_attrs(
        name=name, patch_size=facts.patch_px, patch_size_level0=facts.patch_size_level0,
        level0_magnification=facts.level0_magnification, target_magnification=facts.target_magnification,
        level0_width=size[0], level0_height=size[1], overlap=facts.overlap, savetodir=path.parent.parent)


def _extent(coords: np.ndarray, patch: float | None) -> tuple[int, int]:
    if not len(coords):
        return 0, 0
    far = coords.max(axis=0) + (patch or 0)
    return int(math.ceil(far[0])), int(math.ceil(far[1]))


def write_clam_bag(path: str | Path, features: np.ndarray, coords_px: np.ndarray) -> Path:
    """CLAM's `h5_files/<slide>.h5`, atomically: features float32, coords int32 level-0 px, no attributes."""
    path = Path(path)
    features = _checked_features(features, path).astype(np.float32, copy=False)
    coords = _whole(coords_px, np.int32, path)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            _growable(f, "features", features)
            _growable(f, "coords", coords)

    return atomic_write(path, write)


def write_clam_pt(path: str | Path, features: np.ndarray) -> Path:
    """CLAM's `pt_files/<slide>.pt`, atomically: the plain float32 (N, D) tensor, as CLAM's extract_features_fp.py
    saves it (torch.save of a tensor: torch.load(weights_only=True) reads it, nothing to unpickle)."""
    import torch

    path = Path(path)
    tensor = torch.from_numpy(np.ascontiguousarray(_checked_features(features, path), dtype=np.float32))
    return atomic_write(path, lambda tmp: torch.save(tensor, tmp))


def write_stamp_bag(path: str | Path, features: np.ndarray, coords_um: np.ndarray, facts: TileFacts, *,
                    extractor: str) -> Path:
    """STAMP's `<extractor>/<slide>.h5`, atomically: feats float16, coords float32 in um, STAMP's root attributes
    (`TileFacts.missing("stamp")` empty), plus `mpp` (the slide's level-0 um/px, not one of STAMP's: it takes the
    coords back to level-0 pixels exactly). Features beyond float16's range are refused, not written as inf."""
    path = Path(path)
    features = _checked_features(features, path)
    peak = float(np.nanmax(np.abs(features))) if features.size else 0.0
    if peak > _FLOAT16_MAX:
        raise BagFileError(f"{path}: features reach {peak:,.6g}, beyond float16's {_FLOAT16_MAX:,.0f}, and STAMP "
                           "stores float16: scale the features first")
    import hashlib

    attrs = {
        "stamp_version": STAMP_LAYOUT_VERSION, "extractor": str(extractor), "unit": "um",
        "tile_size_um": float(facts.tile_um), "tile_size_px": np.int64(facts.patch_px),
        # STAMP's code_hash names the extractor's code; here the encoder's name and weights, as qgmil records them
        "code_hash": hashlib.sha256(str(extractor).encode()).hexdigest()[:8], "feat_type": "tile",
    }
    if facts.mpp:
        attrs["mpp"] = float(facts.mpp)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("feats", data=features.astype(np.float16))
            f.create_dataset("coords", data=np.asarray(coords_um, dtype=np.float32).reshape(-1, 2))
            f.attrs.update(attrs)

    return atomic_write(path, write)


def peer_layout_of(path: str | Path) -> str | None:
    """The peer layout ("trident", "clam", "stamp") `path` is in exactly as that peer writes it (its datasets'
    dtypes, and for TRIDENT its whole-number attributes on coords, for STAMP its tile size), else None. Such a file
    can be hard-linked into that peer's folder instead of rewritten."""
    path = _check_file(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return None
    with _open_h5(path) as f:
        layout, key = _h5_layout(f, path)
        if layout not in _PEER_DTYPES or not isinstance(f.get("coords"), h5py.Dataset):
            return None
        if (str(f[key].dtype), str(f["coords"].dtype)) != _PEER_DTYPES[layout]:
            return None
        coords_attrs = f["coords"].attrs
        if layout == "trident" and not all(
                k in coords_attrs and np.asarray(coords_attrs[k]).dtype.kind in "iu" for k in TRIDENT_INT_ATTRS):
            return None
        if layout == "stamp" and "tile_size_um" not in f.attrs:
            return None
        return layout
