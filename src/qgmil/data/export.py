"""Feature files -> a copy in a peer tool's layout (`qgmil export features`), for TRIDENT, CLAM or STAMP to read.

    export_features("runs/features", "stamp", "for_stamp", table="labels.csv")

OUT, by target:
  trident  features_<encoder>/<slide>.h5        `features`, `coords` with TRIDENT's attributes on `coords`;
           patches/<slide>_patches.h5           `coords` alone, as TRIDENT's patching step leaves them
  clam     h5_files/<slide>.h5, pt_files/<slide>.pt   dataset.csv (case_id, slide_id, label; with a table)
  stamp    <encoder>/<slide>.h5                 slide.csv (PATIENT, FILENAME); clini.csv (PATIENT, <label
                                                column>; with a table that has labels)
  export.json   what was exported (target, source, table, mpp, encoder): a rerun must match it, and resumes

The source is a folder of feature files in any layout qgmil reads (qgmil, TRIDENT, CLAM, STAMP; a qgmil extraction
folder's features/ and CLAM's h5_files/ are found), or the bags of a table. Every file is checked before anything is
written (layout, coords, the facts the target needs: a STAMP copy needs the slide's mpp to put coords in
micrometres, from the file or `mpp=`), so a refused export leaves no folder behind. A source file already in the
target's layout is hard-linked (copied where the file system cannot link, or with `link=False`); the others are
rewritten by `bagfile`'s peer writers. Each file is written atomically and a rerun skips the ones there; the tables
are written last, so an interrupted export never looks complete. A file that cannot be written (features beyond
float16's range for STAMP) stops the export with its name; the files done before it stay, and a rerun resumes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import atomic_create_text, atomic_write
from .bagfile import (
    PEER_LAYOUTS, BagFileError, TileFacts, inspect_bag, peer_layout_of, read_attrs, read_bag, write_clam_bag,
    write_clam_pt, write_stamp_bag, write_trident_bag, write_trident_patches,
)
from .table import Columns, DataError, read_table, resolve_files

MANIFEST = "export.json"
_H5 = (".h5", ".hdf5")


class ExportError(ValueError):
    """An export that cannot start (bad option, another export in OUT); the message names it."""


@dataclass(frozen=True)
class _Slide:
    bag_id: str
    path: Path
    patient: str
    label: str | None
    facts: TileFacts
    linkable: bool  # already in the target's layout: hard-linked, not rewritten


@dataclass
class ExportSummary:
    out: Path
    to: str
    folder: Path  # where the feature files are (features_<encoder>/, h5_files/, <encoder>/)
    slides: int
    files: Counter = field(default_factory=Counter)  # written | linked | copied | skipped (already there)
    tables: list[Path] = field(default_factory=list)

    def format(self) -> str:
        counts = ", ".join(f"{self.files[k]} {k}" for k in ("written", "linked", "copied", "skipped") if self.files[k])
        tables = f"; tables {', '.join(p.name for p in self.tables)}" if self.tables else ""
        return f"{self.slides} slides as {self.to} ({counts or 'nothing to do'}{tables}) -> {self.folder}"


def encoder_folder_name(encoder: str) -> str:
    """A folder name from an encoder label: "timm:test_vit (weights=random(seed=0))" -> "timm_test_vit" (the full
    label stays in the files' attributes)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.split(" (", 1)[0]).strip("._")
    return name or "features"


def _source_folder(source: Path) -> Path:
    """Where the feature files of `source` are: the folder itself, a qgmil extraction's features/, CLAM's h5_files/,
    or a TRIDENT job folder's one features_<encoder>/."""
    if any(p.suffix.lower() in _H5 for p in source.iterdir()):
        return source
    for sub in ("features", "h5_files"):
        if (source / sub).is_dir():
            return source / sub
    trident = [p for p in source.glob("features_*") if p.is_dir()]
    return trident[0] if len(trident) == 1 else source


def _listed(source: Path | None, table: Path | None, columns: Columns | None) -> tuple[list[tuple], list[str]]:
    """[(bag_id, file, patient, label)] of the bags to export, and the problems met."""
    if table is not None:
        frame = read_table(table, columns, require_labels=False, mixed_labels=True)  # CLAM's cases: several labels
        files, problems = resolve_files(frame, None if source is None else _source_folder(source))
        rows = [(b, f, p, label) for b, f, p, label in zip(frame["bag_id"], files, frame["patient_id"], frame["label"])
                if f is not None]
        return rows, problems
    if source is None:
        raise ExportError("nothing to export: give a folder of feature files, or a table")
    files = sorted(p for p in _source_folder(source).iterdir()
                   if p.is_file() and p.suffix.lower() in _H5 and not p.name.startswith("."))
    if not files:
        raise ExportError(f"{source}: no .h5 feature files (nor in its features/, h5_files/ or one features_*/)")
    return [(p.stem, p, p.stem, None) for p in files], []


def _plan(rows: list[tuple], to: str, mpp: float | None, tile_size: float | None) -> tuple[list[_Slide], list[str]]:
    slides, problems = [], []
    for bag_id, path, patient, label in rows:
        if not bag_id or bag_id.startswith(".") or "/" in bag_id or "\\" in bag_id:
            problems.append(f"{path}: bag id {bag_id!r} cannot name a file (empty, starts with '.', or holds a slash)")
            continue
        if path.suffix.lower() not in _H5:
            problems.append(f"{path}: only .h5 feature files carry the tiles' coords that {to} needs")
            continue
        try:
            info = inspect_bag(path)
            facts = TileFacts.from_attrs(read_attrs(path), info.layout, mpp, tile_size)
            linkable = peer_layout_of(path) == to
        except BagFileError as err:
            problems.append(str(err))
            continue
        if not info.has_coords:
            problems.append(f"{path}: no coords; {to} needs each tile's position")
            continue
        needs = [] if linkable else facts.missing(to)
        if needs:
            hint = "".join(h for key, h in (("mpp", "; --mpp gives the resolution"),
                                            ("tile size", "; --tile-size gives the tile side (level-0 px)"))
                           if any(key in what for what in needs))
            problems.append(f"{path}: {to} needs {'; '.join(needs)}, which the file does not record{hint}")
        slides.append(_Slide(bag_id, path, patient or bag_id, label, facts, linkable))
    return slides, problems


def _encoder_name(slides: list[_Slide], encoder: str | None, to: str) -> tuple[str | None, list[str]]:
    """(the encoder label the files are filed under, problems): `encoder` when given, else the one all files record."""
    if encoder is not None or to == "clam":
        return encoder, []
    found = {s.facts.encoder for s in slides}
    if None in found:
        unnamed = [str(s.path) for s in slides if s.facts.encoder is None]
        shown = ", ".join(unnamed[:3]) + (" ..." if len(unnamed) > 3 else "")
        return None, [(f"{shown}: no encoder recorded, and {to} files features under the encoder's name; give "
                       "it with --encoder")]
    if len(found) > 1:
        return None, [(f"the files come from {len(found)} encoders ({', '.join(sorted(found))}); export each "
                       "encoder's files on their own, or name one with --encoder")]
    return found.pop() if found else None, []


def _targets(to: str, out: Path, folder: Path, bag_id: str) -> list[Path]:
    if to == "clam":
        return [out / "h5_files" / f"{bag_id}.h5", out / "pt_files" / f"{bag_id}.pt"]
    if to == "trident":  # a job folder: the features, and the patches its visualisation reads
        return [folder / f"{bag_id}.h5", out / "patches" / f"{bag_id}_patches.h5"]
    return [folder / f"{bag_id}.h5"]


def _link_or_copy(source: Path, target: Path, link: bool) -> str:
    """Hard-link `source` to `target` (through a temporary name, so the target appears whole), else copy it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        # the name atomic.leftovers recognises (no dot in the random part)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.link(source, tmp)
        except OSError:  # another file system, no hard links there, or not allowed on another user's file
            pass
        else:
            os.replace(tmp, target)
            return "linked"
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return "copied"


def _write(slide: _Slide, to: str, todo: list[Path], encoder: str | None) -> None:
    """Rewrite `slide` into the target files `todo` (not yet there) of layout `to`."""
    bag = read_bag(slide.path)
    facts = slide.facts
    try:
        for target in todo:
            if to == "trident" and target.parent.name == "patches":
                write_trident_patches(target, facts.coords_in(bag.coords, "px"), facts, name=slide.bag_id)
            elif to == "trident":
                write_trident_bag(target, bag.features, facts.coords_in(bag.coords, "px"), facts, encoder=encoder)
            elif to == "stamp":
                write_stamp_bag(target, bag.features, facts.coords_in(bag.coords, "um"), facts, extractor=encoder)
            elif target.suffix == ".pt":
                write_clam_pt(target, bag.features)
            else:
                write_clam_bag(target, bag.features, facts.coords_in(bag.coords, "px"))
    except BagFileError as err:
        raise BagFileError(f"{slide.path}: cannot be written for {to}: {err}") from None


def _check_manifest(out: Path, manifest: dict) -> None:
    """Write OUT/export.json, or check that the one there describes the same export (a rerun resumes it)."""
    path = out / MANIFEST
    if atomic_create_text(path, json.dumps(manifest, indent=1) + "\n"):
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not a readable export record ({err})") from None
    keys = ("to", "source", "table", "mpp", "tile_size", "encoder")
    differ = [k for k in keys if old.get(k) != manifest.get(k)]
    if differ:
        details = "; ".join(f"{k}: was {old.get(k)!r}, now {manifest.get(k)!r}" for k in differ)
        raise ExportError(f"{out} holds another export ({details}); use another --out, or rerun the same export to "
                          "resume it")


def _write_csv(path: Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _tables(to: str, out: Path, slides: list[_Slide], label_column: str | None) -> list[Path]:
    """The peer's tables: STAMP's slide.csv (always) and clini.csv, CLAM's dataset.csv (with labels)."""
    labelled = label_column is not None and any(s.label is not None for s in slides)
    written = []
    if to == "stamp":
        written.append(_write_csv(out / "slide.csv", pd.DataFrame(
            {"PATIENT": [s.patient for s in slides], "FILENAME": [f"{s.bag_id}.h5" for s in slides]})))
        if labelled:  # one row per patient (a qgmil table gives all slides of a patient one label)
            patients = dict.fromkeys(s.patient for s in slides)
            for s in slides:
                patients[s.patient] = patients[s.patient] or s.label
            written.append(_write_csv(out / "clini.csv", pd.DataFrame(
                {"PATIENT": list(patients), label_column: list(patients.values())})))
    elif to == "clam" and labelled:
        written.append(_write_csv(out / "dataset.csv", pd.DataFrame(
            {"case_id": [s.patient for s in slides], "slide_id": [s.bag_id for s in slides],
             "label": [s.label for s in slides]})))
    return written


def export_features(
    source: str | Path | None,
    to: str,
    out: str | Path,
    *,
    table: str | Path | None = None,
    columns: Columns | None = None,
    mpp: float | None = None,
    tile_size: float | None = None,
    encoder: str | None = None,
    link: bool = True,
    progress: bool = True,
) -> ExportSummary:
    """Write the feature files of `source` (a folder; or None with a `table` whose path column names them) into
    `out` in peer layout `to` ("trident", "clam", "stamp"); see the module docstring for what goes where.

    table: a qgmil table (`columns` names its columns): only its bags are exported, and its patients and labels go
    into the peer's tables. mpp: the slides' level-0 um/px where a file records none (needed to convert coords
    between pixels and micrometres). tile_size: the tile side in level-0 px where a file records none (CLAM's h5
    files; TRIDENT and STAMP need it). encoder: the name to file the features under (default: the one the files
    record). link: hard-link files already in the target layout (False: always copy).
    Raises DataError listing every file that cannot be exported, before anything is written.
    """
    from tqdm.auto import tqdm

    from .. import __version__

    if to not in PEER_LAYOUTS:
        raise ExportError(f"unknown target layout {to!r} (choose from {', '.join(PEER_LAYOUTS)})")
    for flag, value in (("--mpp", mpp), ("--tile-size", tile_size)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ExportError(f"{flag} must be a number > 0, got {value!r}")
    out = Path(out)
    source = Path(source) if source is not None else None
    if source is not None and not source.is_dir():
        raise ExportError(f"{source}: no such folder of feature files")
    table = Path(table) if table is not None else None

    rows, problems = _listed(source, table, columns)
    slides, found = _plan(rows, to, mpp, tile_size)
    name, unnamed = _encoder_name(slides, encoder, to)
    problems += found + unnamed
    if problems:
        raise DataError(problems, f"cannot export to {to}")
    if not slides:
        raise ExportError(f"{table}: no bags to export")

    folder = out / {"trident": f"features_{encoder_folder_name(name or '')}", "stamp": encoder_folder_name(name or ""),
                    "clam": "h5_files"}[to]
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, {"format": "qgmil-export", "to": to,
                          "source": None if source is None else str(source.resolve()),
                          "table": None if table is None else str(table.resolve()), "mpp": mpp, "tile_size": tile_size,
                          "encoder": name, "qgmil_version": __version__})
    summary = ExportSummary(out, to, folder, len(slides))
    for slide in tqdm(slides, desc=f"export {to}", unit="slide", disable=not progress):
        targets = _targets(to, out, folder, slide.bag_id)
        todo = [t for t in targets if not t.exists()]  # a file there is complete (written atomically): resume
        summary.files["skipped"] += len(targets) - len(todo)
        if slide.linkable and targets[0] in todo:  # CLAM's .pt, TRIDENT's patches are made even then
            summary.files[_link_or_copy(slide.path, targets[0], link)] += 1
            todo.remove(targets[0])
        if todo:
            _write(slide, to, todo, name)
            summary.files["written"] += len(todo)
    summary.tables = _tables(to, out, slides, (columns or Columns()).label if table is not None else None)
    return summary
