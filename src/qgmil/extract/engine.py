"""The extraction loop shared by slides and cell folders: bags of images -> encoder -> one feature file each.

Output folder (`out`):
  extract.json          what was extracted and how (encoder, weights, settings); a rerun must match it
  features/<bag>.h5     one bag per file (this project's layout, written atomically: a file that exists is complete)
  failed/<bag>.txt      why a bag failed (removed when a later run succeeds)
  locks/<bag>.lock      the job encoding the bag right now (see `locks`)
  jobs/<time>-<host>-<pid>.csv   one row per bag of one job: status, instances, seconds, error
  bags.csv              one row per bag, merged over the jobs: its latest outcome

Rerunning skips bags whose feature file exists (resume). Several jobs may run on one folder at once (SLURM
array tasks, other machines): a job claims each bag by its lock file first and skips bags other live jobs
hold ("busy"), so no bag is encoded twice; `shard=(i, n)` gives a job a static share besides. Under `torchrun`
each rank takes a disjoint share of the job's bags (sorted, round-robin); rank 0 writes the job's summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_create_text, atomic_write_text, leftovers
from ..data.bagfile import write_bag
from ..runtime import Dist, all_gather, autocast_dtype, barrier
from ..runtime import parse_shard as runtime_parse_shard
from .locks import STALE_MINUTES, BagLocks, Holder, LockBusy

MANIFEST = "extract.json"
PREPARE_AHEAD = 2  # bags prepared in background threads while one is encoded
OUTCOMES = ("done", "failed", "empty")  # what a job found out about a bag (skipped and busy say nothing new)


class ExtractError(ValueError):
    """Extraction cannot start or go on; the message names the file or setting and the problem."""


@dataclass
class BagSource:
    """One bag to extract: its id (the feature file's stem) and what it is made from (a slide, a folder)."""

    bag_id: str
    source: str
    payload: Any = None  # what the kind-specific `prepare` needs (e.g. the list of cell image paths)


@dataclass
class PreparedBag:
    """A bag ready to encode: a dataset of images plus what goes into its feature file besides features.

    dataset items: (H, W, 3) uint8 RGB tensors, all of one size within a bag. coords_attrs: attributes of the
    `coords` dataset (a slide's: TRIDENT's patching attributes, where TRIDENT reads them).
    """

    source: BagSource
    dataset: torch.utils.data.Dataset
    coords: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BagResult:
    bag_id: str
    source: str
    status: str  # done | skipped (already extracted) | failed | empty (no instance, e.g. no tissue)
    #              | busy (another job holds its lock; error says which)
    num_instances: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    prepare_wait_seconds: float = 0.0  # waiting for the bag's preparation (slide open, tissue, tiling)
    error: str = ""
    job: str = ""  # the process that reported it (host:pid, SLURM job)
    finished: str = field(default_factory=lambda: _now().isoformat(timespec="milliseconds"))  # UTC


@dataclass
class ExtractSummary:
    out: Path
    results: list[BagResult]
    seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[BagResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def instances_per_second(self) -> float:
        done = [r for r in self.results if r.status == "done"]
        seconds = sum(r.seconds for r in done)
        return sum(r.num_instances for r in done) / seconds if seconds > 0 else 0.0

    @property
    def encoder_busy(self) -> float:
        """Share of the extraction time the encoder was computing (the rest: waiting for images)."""
        done = [r for r in self.results if r.status == "done"]
        seconds = sum(r.seconds for r in done)
        return sum(r.encode_seconds for r in done) / seconds if seconds > 0 else 0.0

    def format(self) -> str:
        busy = f", {self.count('busy')} busy in other jobs (rerun to pick up what they leave)" \
            if self.count("busy") else ""
        lines = [f"{self.count('done')} extracted, {self.count('skipped')} already done, "
                 f"{self.count('empty')} empty, {len(self.failed)} failed{busy} in {self.seconds:.1f} s "
                 f"({self.instances_per_second:.1f} instances/s, encoder busy {100 * self.encoder_busy:.0f}%)"
                 f" -> {self.out}"]
        lines += [f"  FAILED {r.bag_id} ({r.source}): {r.error}" for r in self.failed]
        lines += [f"  empty  {r.bag_id} ({r.source}): {r.error}" for r in self.results if r.status == "empty"]
        lines += [f"  busy   {r.bag_id}: {r.error}" for r in self.results if r.status == "busy"]
        return "\n".join(lines)


# --- run folder ---------------------------------------------------------------------------------

def make_manifest(kind: str, encoder, settings: dict, command: str | None = None, **extra) -> dict:
    """extract.json: what must match on resume (kind, encoder, settings), then provenance and `extra`."""
    from .. import __version__

    return {"kind": kind, "encoder": {"name": encoder.name, "weights": encoder.weights, "dim": encoder.dim},
            "settings": settings, **extra, "encoder_version": encoder.version, "qgmil_version": __version__,
            "command": command}


def check_manifest(out: Path, manifest: dict) -> None:
    """Write `extract.json`, or check that an existing one describes the same extraction (resume).

    Created exclusively: of two jobs starting together on a new folder one writes it and the other checks
    against it, so two jobs with different settings never both go on.
    """
    path = out / MANIFEST
    if atomic_create_text(path, json.dumps(manifest, indent=2) + "\n"):
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExtractError(f"{path}: not valid JSON ({err})") from None
    keys = ("kind", "encoder", "settings")
    differ = [k for k in keys if old.get(k) != manifest.get(k)]
    if differ:
        details = "; ".join(f"{k}: was {old.get(k)!r}, now {manifest.get(k)!r}" for k in differ)
        raise ExtractError(f"{out} holds another extraction ({details}). Use another --out, or rerun with the "
                           "same settings to resume.")


def is_whole(value, minimum: int) -> bool:
    """An integer (not a bool) >= minimum."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def is_finite(value) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_run_options(batch_size, num_workers, stale_minutes) -> None:
    """Refuse bad batching / worker / lock settings before anything is created (not as a failure of each bag)."""
    if not is_whole(batch_size, 1):
        raise ExtractError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if num_workers is not None and not is_whole(num_workers, 0):
        raise ExtractError(f"--workers must be a whole number >= 0, got {num_workers!r}")
    if not (is_finite(stale_minutes) and stale_minutes > 0):
        raise ExtractError(f"--stale-lock-minutes must be a number > 0, got {stale_minutes!r}")


def feature_path(out: Path, bag_id: str) -> Path:
    return out / "features" / f"{bag_id}.h5"


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """`runtime.parse_shard`, raising ExtractError."""
    try:
        return runtime_parse_shard(shard)
    except ValueError as err:
        raise ExtractError(str(err)) from None


def _share(sources: Sequence[BagSource], shard: tuple[int, int] | None, dist: Dist) -> list[BagSource]:
    """This process's bags: the job's shard of the sorted bags, then this torchrun rank's share of it."""
    ordered = sorted(sources, key=lambda s: s.bag_id)
    if shard is not None:
        ordered = ordered[shard[0]::shard[1]]
    return ordered[dist.rank::dist.world]


def _now() -> datetime:
    return datetime.now(timezone.utc)


SUMMARY_COLUMNS = ["bag_id", "source", "status", "num_instances", "seconds", "encode_seconds", "prepare_wait_seconds",
                   "error", "job", "finished"]


def job_summary_path(out: Path, started: datetime, holder: Holder) -> Path:
    """jobs/<start time>-<host>-<pid>.csv: unique per job (a pid is reused only later), sorted by start."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", holder.host)
    return out / "jobs" / f"{started.strftime('%Y%m%dT%H%M%S.%f')}-{host}-{holder.pid}.csv"


def merge_summaries(files: Sequence[Path], bag_ids: set[str]):
    """bags.csv from the job summaries: per bag of `bag_ids`, the latest outcome (done, failed, empty), else
    the latest row (skipped, busy). A summary that cannot be read is left out with a warning."""
    import pandas as pd

    frames = []
    for path in files:
        try:  # as text: the rows are copied, not computed with
            frames.append(pd.read_csv(path, dtype=str, keep_default_na=False))
        except (OSError, ValueError) as err:
            warnings.warn(f"{path}: cannot read this job summary ({err}); left out of bags.csv", stacklevel=2)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = rows.reindex(columns=SUMMARY_COLUMNS, fill_value="")
    rows = rows[rows["bag_id"].isin(bag_ids)]
    rows = rows.assign(_outcome=rows["status"].isin(OUTCOMES))
    rows = rows.sort_values(["_outcome", "finished"], kind="stable").drop_duplicates("bag_id", keep="last")
    return rows.drop(columns="_outcome").sort_values("bag_id")


def _write_results(out: Path, results: Sequence[BagResult], job_file: Path, bag_ids: set[str]) -> None:
    """This job's summary, then bags.csv merged over every job's."""
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(r) for r in results], columns=SUMMARY_COLUMNS)
    atomic_write_text(job_file, frame.to_csv(index=False))
    # Jobs ending together may each miss the other's summary. Each looks again after writing bags.csv and
    # rebuilds it until no summary appeared meanwhile: then the last bags.csv written holds them all.
    listed = None
    while (files := sorted((out / "jobs").glob("*.csv"))) != listed:
        listed = files
        atomic_write_text(out / "bags.csv", merge_summaries(files, bag_ids).to_csv(index=False))


# --- encoding -----------------------------------------------------------------------------------

def _chunks(loader, size: int):
    """Regroup the loader's small batches into batches of `size` images (the last may be smaller)."""
    pending, count = [], 0
    for images in loader:
        pending.append(images)
        count += len(images)
        if count >= size:
            yield torch.cat(pending) if len(pending) > 1 else pending[0]
            pending, count = [], 0
    if pending:
        yield torch.cat(pending)


def encode_dataset(dataset, encoder: torch.nn.Module, *, device: torch.device, batch_size: int = 64,
                   num_workers: int = 0, precision: str = "auto", progress: tqdm | None = None
                   ) -> tuple[np.ndarray, float]:
    """All images of `dataset` through `encoder`, in order -> ((N, D) float32 features, seconds encoding)."""
    dtype = autocast_dtype(device, precision)
    # Workers hand over small batches so that all of them read at once even on a small slide; the encoder
    # still gets full batches of `batch_size`.
    per_worker = max(1, min(32, batch_size, math.ceil(len(dataset) / max(1, 2 * num_workers))))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_worker if num_workers else batch_size, shuffle=False, num_workers=num_workers,
        prefetch_factor=4 if num_workers else None,
    )
    features = np.empty((len(dataset), encoder.dim), dtype=np.float32)
    row, busy = 0, 0.0
    for images in _chunks(loader, batch_size):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = encoder(images.to(device))
        out = out.float().cpu().numpy()  # waits for the device, so `busy` is the encoder's real time
        busy += time.perf_counter() - start
        features[row:row + len(out)] = out
        row += len(out)
        if progress is not None:
            progress.update(len(out))
    return features, busy


def run_extraction(
    sources: Sequence[BagSource],
    out: Path,
    encoder: torch.nn.Module,
    prepare: Callable[[BagSource], PreparedBag],
    *,
    manifest: dict,
    dist: Dist,
    batch_size: int = 64,
    num_workers: int | None = None,
    precision: str = "auto",
    skip_errors: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    stale_minutes: float = STALE_MINUTES,
) -> ExtractSummary:
    """Extract every bag of `sources` not yet in `out`, nor being extracted by another job.

    This process takes its share: the sorted bags, then `shard` (i, n): every n-th from the i-th, then the
    torchrun rank's sources[rank::world]. Each bag is claimed by its lock file first; a bag another live job
    holds is reported "busy" and left to it. num_workers: DataLoader workers reading images (None: cores - 1,
    at most 8). stale_minutes: a lock whose heartbeat is older may be taken over (see `locks`).

    A bag that fails (unreadable slide, no mpp...) stops the run unless `skip_errors`: then it is recorded in
    failed/<bag>.txt and bags.csv, and the others go on. Nothing written before is lost either way.
    """
    out = Path(out)
    check_run_options(batch_size, num_workers, stale_minutes)
    ids = [s.bag_id for s in sources]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ExtractError(f"several inputs give the same bag id: {', '.join(duplicates[:5])}")
    unsafe = [i for i in ids if not i or i.startswith(".") or "/" in i or "\\" in i]
    if unsafe:
        raise ExtractError(f"bag ids name the feature files, so they cannot be empty, start with '.' or hold a "
                           f"slash: {', '.join(map(repr, unsafe[:5]))}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_manifest(out, manifest)
    barrier(dist)
    if not dist.is_main:
        check_manifest(out, manifest)  # every rank refuses a foreign folder, not only rank 0

    start, started = time.perf_counter(), _now()
    locks = BagLocks(out / "locks", stale_after=stale_minutes * 60)
    job = str(locks.me)
    mine = _share(sources, shard, dist)
    finished = {s.bag_id for s in mine if feature_path(out, s.bag_id).exists()}
    results = [BagResult(s.bag_id, s.source, "skipped", job=job) for s in mine if s.bag_id in finished]
    todo = [s for s in mine if s.bag_id not in finished]
    num_workers = resolve_workers(num_workers)
    encoder = encoder.to(dist.device)
    show = progress and dist.is_main
    with tqdm(total=len(todo), desc="bags", unit="bag", disable=not show, position=0) as bar, locks, \
            ThreadPoolExecutor(max_workers=PREPARE_AHEAD, thread_name_prefix="qgmil-prepare") as pool:
        # A bag is claimed when its preparation starts: the slide opened, tissue segmented, tiles planned, in
        # threads while the bag before is encoded (numpy/scipy/Pillow/openslide release the GIL).
        claimed = _claim_each(todo, locks, out, results, bar)
        pending: deque[tuple[BagSource, Future]] = deque()

        def prepare_next() -> None:
            source = next(claimed, None)
            if source is not None:
                pending.append((source, pool.submit(prepare, source)))

        for _ in range(PREPARE_AHEAD):
            prepare_next()
        while pending:
            source, prepared = pending.popleft()
            prepare_next()
            try:
                results.append(_extract_one(source, prepared, out, encoder, dist.device, batch_size, num_workers,
                                            precision, skip_errors, show, locks))
            finally:  # after the feature file is in place or failed/<bag>.txt written, or on the way out
                locks.release(source.bag_id)
            bar.update()

    gathered = [r for part in all_gather(results, dist) for r in part]
    summary = ExtractSummary(out, sorted(gathered, key=lambda r: r.bag_id), time.perf_counter() - start)
    if dist.is_main:
        _write_results(out, summary.results, job_summary_path(out, started, locks.me), set(ids))
    barrier(dist)
    return summary


def _claim_each(todo: Sequence[BagSource], locks: BagLocks, out: Path, results: list[BagResult], bar: tqdm):
    """Yield the bags of `todo` this job claims; the others go to `results` (busy, or finished meanwhile)."""
    for source in todo:
        try:
            recovered = locks.claim(source.bag_id)
        except LockBusy as busy:
            results.append(BagResult(source.bag_id, source.source, "busy", error=f"locked by {busy.by}",
                                     job=str(locks.me)))
            bar.update()
            continue
        target = feature_path(out, source.bag_id)
        if target.exists():  # finished by another job since the start: it wrote the file before unlocking
            locks.release(source.bag_id)
            results.append(BagResult(source.bag_id, source.source, "skipped", job=str(locks.me)))
            bar.update()
            continue
        if recovered:  # the job that held the lock was killed, maybe mid-write: nobody else writes this bag now
            for tmp in leftovers(target):
                tmp.unlink(missing_ok=True)
        yield source


def _extract_one(source: BagSource, prepared: Future, out: Path, encoder, device, batch_size, num_workers,
                 precision, skip_errors: bool, show: bool, locks: BagLocks) -> BagResult:
    target = feature_path(out, source.bag_id)
    failed = out / "failed" / f"{source.bag_id}.txt"
    job = str(locks.me)
    start = time.perf_counter()
    try:
        bag = prepared.result()
        waited = time.perf_counter() - start
        n = len(bag.dataset)
        if n == 0:
            # No instance (e.g. no tissue found): no feature file, so that training never sees an empty bag.
            reason = bag.attrs.get("empty_reason", "no instance to extract")
            atomic_write_text(failed, f"{source.source}: {reason}\n")
            return BagResult(source.bag_id, source.source, "empty", error=reason, job=job)
        with tqdm(total=n, desc=source.bag_id, unit="img", leave=False, disable=not show, position=1) as bar:
            features, busy = encode_dataset(bag.dataset, encoder, device=device, batch_size=batch_size,
                                            num_workers=num_workers, precision=precision, progress=bar)
        attrs = {"encoder": encoder_label(encoder), "encoder_version": encoder.version,
                 "encoder_weights": encoder.weights, "feature_dim": int(features.shape[1]), **bag.attrs,
                 "extracted_by": job}
        locks.verify(source.bag_id)  # another job took the bag over (this one had stopped beating): it writes
        write_bag(target, features, bag.coords, attrs=attrs, extras=bag.extras, coords_attrs=bag.coords_attrs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except LockBusy as lost:
        return BagResult(source.bag_id, source.source, "busy", seconds=time.perf_counter() - start,
                         error=f"lock taken over by {lost.by} while encoding; not written", job=job)
    except Exception as err:  # any problem with one input is reported against that input
        message = f"{type(err).__name__}: {err}"
        if not skip_errors:
            where = "" if source.source in str(err) else f"{source.source}: "  # slide errors name the file already
            raise ExtractError(f"{where}{message} (use --skip-errors to go on with the others)") from err
        atomic_write_text(failed, f"{source.source}: {message}\n\n{traceback.format_exc()}")
        return BagResult(source.bag_id, source.source, "failed", seconds=time.perf_counter() - start, error=message,
                         job=job)
    failed.unlink(missing_ok=True)
    return BagResult(source.bag_id, source.source, "done", n, time.perf_counter() - start, busy, waited, job=job)


def encoder_label(encoder) -> str:
    """The `encoder` attribute of feature files: the name, plus the weights when they are not the published
    ones, so that `qgmil predict` refuses to mix features of random and pretrained weights."""
    if encoder.weights == "pretrained":
        return encoder.name
    weights = encoder.weights if encoder.weights.startswith("random") else Path(encoder.weights).name
    return f"{encoder.name} (weights={weights})"


def resolve_workers(num_workers: int | None) -> int:
    """None -> a sensible default: up to 8 workers, leaving a core for the main process."""
    if num_workers is not None:
        return num_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))

