"""The attention file, `attention.h5`: what a model attended to in each bag. The one reader and writer.

  attrs               facts about where it came from (a fold: fold, seed, fold_name; `qgmil predict`: models)
  <bag_id>            (N,) float32, the pooling attention over the bag's real instances (sums to 1)
  branch_attention/   multi-branch models only: <bag_id> (K, N) float32 per bag; attrs["names"] (K,)
                      the branch names (class names where branch k is class k's)

A bag named `branch_attention` would collide with the group: then no branch attention is written.
Bag ids are stored percent-escaped ("/" -> "%2F", "%" -> "%25"; attrs["name_encoding"] = "percent"), since a
"/" in an HDF5 name makes nested groups; files written before that are read as they are, nested groups included.
Written atomically (temporary file, then rename), so a file that exists is complete.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write

BRANCH_GROUP = "branch_attention"
NAME_ENCODING = "percent"


def _escape(bag_id: str) -> str:
    name = str(bag_id).replace("%", "%25").replace("/", "%2F")
    return "%2E" if name == "." else name  # "." is the group itself in HDF5


def _unescape(name: str) -> str:
    from urllib.parse import unquote

    return unquote(name)


def _datasets(group, prefix: str = "", skip: str | None = None):
    """(path, dataset) of every dataset under `group`, nested groups walked (but not `skip`)."""
    import h5py

    for name, item in group.items():
        if isinstance(item, h5py.Dataset):
            yield prefix + name, item
        elif isinstance(item, h5py.Group) and prefix + name != skip:
            yield from _datasets(item, prefix + name + "/")


def write_attention(path: str | Path, bag_ids: Sequence[str], attention: Sequence[np.ndarray], *,
                    branches: Sequence[np.ndarray] | None = None, branch_names: Sequence[str] | None = None,
                    attrs: dict | None = None) -> Path:
    """Write OUT attention.h5: attention[i] (N_i,) of bag_ids[i]; branches[i] (K, N_i) with K branch_names."""
    import h5py

    if branches is not None and branch_names is None:
        raise ValueError("branch attention needs its branch names")

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs or {})
            f.attrs["name_encoding"] = NAME_ENCODING
            for bag_id, a in zip(bag_ids, attention):
                f.create_dataset(_escape(bag_id), data=np.asarray(a, dtype=np.float32))
            if branches is not None and BRANCH_GROUP not in bag_ids:
                group = f.create_group(BRANCH_GROUP)
                group.attrs["names"] = [str(n) for n in branch_names]
                for bag_id, b in zip(bag_ids, branches):
                    group.create_dataset(_escape(bag_id), data=np.asarray(b, dtype=np.float32))

    return atomic_write(path, write)


@dataclass
class AttentionFile:
    """The contents of one attention.h5 (the branch part only when read with `branches=True`)."""

    path: Path
    attrs: dict
    pooled: dict[str, np.ndarray]  # bag_id -> (N,)
    branches: dict[str, np.ndarray] = field(default_factory=dict)  # bag_id -> (K, N)
    branch_names: list[str] | None = None  # None: the file has no branch attention

    @property
    def has_branches(self) -> bool:
        return self.branch_names is not None


class AttentionFileError(ValueError):
    """An attention.h5 that cannot be read; the message names it."""


def read_attention(path: str | Path, *, bags: Iterable[str] | None = None, branches: bool = False) -> AttentionFile:
    """Read an attention.h5: every bag's pooling attention (or only `bags`'), and with `branches` their
    branch attention; the branch names are read whenever the file has the group."""
    path = Path(path)
    try:
        return _read(path, None if bags is None else set(bags), branches)
    except OSError as err:  # h5py's words for a truncated or damaged file do not name it
        if isinstance(err, FileNotFoundError) or not path.exists():
            raise FileNotFoundError(f"{path}: no such attention file") from None
        raise AttentionFileError(f"{path}: cannot read this attention file, truncated or damaged ({err}); "
                                 "run the fold (or `qgmil predict`) again to write it anew") from None



def _read(path: Path, wanted: set[str] | None, branches: bool) -> AttentionFile:
    import h5py

    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        decode = _unescape if attrs.pop("name_encoding", None) == NAME_ENCODING else str
        pooled = {}
        for name, item in _datasets(f, skip=BRANCH_GROUP):
            if wanted is None or decode(name) in wanted:
                pooled[decode(name)] = item[()]
        out = AttentionFile(path, attrs, pooled)
        group = f.get(BRANCH_GROUP)
        if isinstance(group, h5py.Group):
            out.branch_names = [str(n) for n in group.attrs.get("names", [])]
            if branches:
                out.branches = {decode(name): item[()] for name, item in _datasets(group)
                                if wanted is None or decode(name) in wanted}
    return out
