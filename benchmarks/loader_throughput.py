"""Bag loader throughput on CPU against a plain h5py read loop, and against the model's training time.

Data: a synthetic dataset shaped like typical WSI patch features is written with `qgmil.data.write_bag`
(one HDF5 file per bag, `features` (N, D) and `coords` on a 256 px grid): by default 48 bags with N
log-uniform in [2000, 20000], D = 1024, float32 (what TRIDENT / CLAM store; `--dtype float16` for
half-precision files), random normal features, labels alternating, fixed `--seed`. It goes into a temp
dir that is deleted at the end, or into `--data DIR`, which is kept and reused by later runs (a DIR
that already holds `table.csv` is read as is, whatever the generation options say).

Measured, each as one full pass over all bags (median of `--repeats` passes, the configs interleaved
round by round so slow drift of the machine hits all of them alike):

  a  baseline   plain loop: `with h5py.File(p) as f: x = torch.from_numpy(f["features"][()]).float()`
                (`.float()` is a no-op for float32 files; for float16 files it gives the loader's dtype)
  b  loader     make_loader(ds, batch_size=1, train=True, num_workers=0)
  c  workers    the same with num_workers=2 (workers restart each epoch, as in training: included)
  d  batch8     batch_size=8, length-bucketed; also the padding fraction of that epoch's batches
  e  cache fp16 MILDataset(cache="fp16"): ds.preload() (timed separately), then a later epoch from RAM
  f  subsample  max_instances=4096 (a random subset of rows of each larger bag, as in training)
  g  diagnostic `for i in range(len(ds)): ds[i]` (dataset reads only): b - g is the cost of the
                DataLoader + collate_bags (padding copy) part of the loader

For each: seconds, bags/s, MB/s of feature data delivered as float32 in memory (real instances only,
padding not counted; for f only the kept rows), MB/s of the feature files on disk (whole files, the
size they occupy; e reads nothing from disk and f still reads whole files - see below), and the
time as a multiple of the baseline of the same run; also the CPU seconds (user + sys, workers
included) and minor page faults of the pass: each extra copy of a bag into freshly allocated memory
shows up there (sys time), not in a Python profile.

Noise: on a small shared machine other processes take cores; torch ops running on `--threads` threads
(the collate copy is one) can then wait on a descheduled thread, which makes a whole process slow
(seen here: ~10 ms per op on 2 cores, bimodal between runs). The load average before and after the
run is printed; compare configs only within one run, and look at "all passes s" for outliers.

Page cache: the files were just written (or are read once, untimed, before the passes), so they sit
in the OS page cache: this measures the software overhead of the loader (HDF5 parsing, copies,
collate, worker IPC), not the disk. See `--drop-cache-hint` for measuring cold reads (needs root).

Model time: one training step of the `qgmil` preset (forward + cross-entropy + backward + AdamW step,
batch size 1, `--threads` torch threads) is timed on `--model-bags` bags spanning the size range
(after one warm-up step); model time per epoch is extrapolated to all bags with a fit
t(N) = c0 + c1 N + c2 N^2 (non-negative least squares; attention is quadratic in N, so time per
instance grows with N and a per-instance linear estimate depends on which bags were timed; it is
printed too), or measured on every bag with `--full-model`. The ratio loader time / model time per
epoch is printed for configs b and c. With num_workers=0 loading adds to the epoch; with workers > 0
it overlaps compute, so the effective cost is ~ max(0, loader - model) (on a 2-core machine the
workers also compete with the model's threads for the same cores, which this ratio does not show).

Run:   python benchmarks/loader_throughput.py                 (default, ~1-2 min on 2 cores)
       python benchmarks/loader_throughput.py --full-model    (+ a training step on all 48 bags, ~+4 min)
       python benchmarks/loader_throughput.py --quick         (12 bags, N 500-3000, D 256; < 1 min)
       python benchmarks/loader_throughput.py --data /tmp/bags --dtype float16 --json out.json
       python benchmarks/loader_throughput.py --drop-cache-hint
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT = {"bags": 48, "n_min": 2000, "n_max": 20000, "dim": 1024}
QUICK = {"bags": 12, "n_min": 500, "n_max": 3000, "dim": 256}
CONFIGS = {
    "a": "baseline h5py loop",
    "b": "loader bs=1 workers=0",
    "c": "loader bs=1 workers={workers}",
    "d": "loader bs={batch} bucketed",
    "e": "loader cache=fp16 (RAM)",
    "f": "loader max_instances={sub}",
    "g": "ds[i] loop, no DataLoader/collate",
}
MB = 1e6
TABLE = "table.csv"

DROP_CACHE_HINT = """\
To measure cold reads (disk + software) instead of page-cached ones:
  1. write the data once and keep it:    python benchmarks/loader_throughput.py --data /path/bags --skip-model
  2. for each config X in a b c d f, drop the page cache (root), then run only that config:
         sync && echo 3 | sudo tee /proc/sys/vm/drop_caches
         python benchmarks/loader_throughput.py --data /path/bags --configs X --repeats 1 --no-warmup --skip-model
     (one config per run: the first pass over the files fills the page cache for every later pass,
     and --no-warmup skips the untimed read that would fill it before the timed pass).
Without root (containers), use files larger than RAM or a fresh machine instead."""


# --------------------------------------------------------------------------------------------
# Data


def generate(root: Path, bags: int, n_min: int, n_max: int, dim: int, dtype: str, seed: int) -> None:
    """Write `bags` bags + table.csv into root (random normal features, grid coords, alternating labels)."""
    from qgmil.data import write_bag

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(n_min), math.log(n_max), size=bags)).round().astype(int)
    rows = ["bag_id,label,patient_id"]
    for i, n in enumerate(lengths):
        bag_id = f"bag{i:03d}"
        features = rng.standard_normal((int(n), dim), dtype=np.float32).astype(dtype, copy=False)
        side = math.ceil(math.sqrt(n))
        idx = np.arange(n)
        coords = np.stack([idx % side, idx // side], axis=1).astype(np.int64) * 256
        write_bag(root / f"{bag_id}.h5", features, coords, attrs={"encoder": "synthetic-normal", "seed": seed})
        rows.append(f"{bag_id},{i % 2},patient{i:03d}")
    (root / TABLE).write_text("\n".join(rows) + "\n")
    meta = {"bags": bags, "n_min": n_min, "n_max": n_max, "dim": dim, "dtype": dtype, "seed": seed}
    (root / "meta.json").write_text(json.dumps(meta))


def feature_bytes_on_disk(path: Path) -> int:
    """Bytes the `features` dataset occupies in the file (its storage size)."""
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["features"].id.get_storage_size())


def read_all_raw(files: list[Path]) -> None:
    """Untimed warm-up: read every file's bytes once, so every config starts from the page cache."""
    for p in files:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


# --------------------------------------------------------------------------------------------
# Passes


def rusage() -> tuple[float, int]:
    """(user + sys CPU seconds, minor page faults) of this process and its reaped children (workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime, a.ru_minflt + b.ru_minflt


def loadavg() -> float | None:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def baseline_pass(files: list[Path]) -> tuple[float, int, int]:
    import h5py
    import torch

    t0 = time.perf_counter()
    bags = inst = 0
    for p in files:
        with h5py.File(p, "r") as f:
            x = torch.from_numpy(f["features"][()]).float()
        bags += 1
        inst += x.shape[0]
    return time.perf_counter() - t0, bags, inst


def dataset_pass(ds) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    bags = inst = 0
    for i in range(len(ds)):
        x = ds[i].features
        bags += 1
        inst += x.shape[0]
    return time.perf_counter() - t0, bags, inst


def loader_pass(loader, epoch: int) -> tuple[float, int, int]:
    from qgmil.data import set_epoch

    set_epoch(loader, epoch)
    t0 = time.perf_counter()
    bags = inst = 0
    for batch in loader:
        bags += len(batch)
        inst += int(batch.mask.sum())
    return time.perf_counter() - t0, bags, inst


# --------------------------------------------------------------------------------------------
# Model time


def nnls_fit(n: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative least squares for t = c0 + c1 n + c2 n^2 (all 7 supports tried: 3 unknowns)."""
    basis = np.stack([np.ones_like(n), n, n * n], axis=1).astype(float)
    best, best_err = np.zeros(3), math.inf
    for k in range(1, 4):
        for support in itertools.combinations(range(3), k):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(basis[:, cols], t, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[cols] = coef
            err = float(((basis @ full - t) ** 2).sum())
            if err < best_err:
                best, best_err = full, err
    return best


def time_model(ds, indices: list[int], threads: int) -> list[dict]:
    """One training step (bs 1) of the qgmil preset per bag in `indices`, after a warm-up step."""
    import torch
    import torch.nn.functional as F

    import qgmil

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = qgmil.create_model("qgmil", in_dim=ds.in_dim, num_classes=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, label):
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x, mask).logits, torch.tensor([label]))
        loss.backward()
        opt.step()

    step(torch.randn(1, 1000, ds.in_dim), 0)  # warm-up: kernels, thread pool, optimizer state
    out = []
    for i in indices:
        item = ds[i]
        x = item.features.unsqueeze(0)
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, item.label)
        wall = time.perf_counter() - t0
        # CPU seconds / (wall x threads): well below 1 means other load shared the cores.
        util = (time.process_time() - c0) / (wall * threads)
        out.append({"index": i, "n": int(x.shape[1]), "time_s": wall, "cpu_util": util})
        print(f"  model step N={x.shape[1]:>6}: {out[-1]['time_s']:.2f} s", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Output


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="12 bags, N 500-3000, D 256 (smoke check, < 1 min)")
    p.add_argument("--bags", type=int, help=f"number of bags (default {DEFAULT['bags']})")
    p.add_argument("--n-min", type=int, help=f"fewest instances per bag (default {DEFAULT['n_min']})")
    p.add_argument("--n-max", type=int, help=f"most instances per bag (default {DEFAULT['n_max']})")
    p.add_argument("--dim", type=int, help=f"feature dimension (default {DEFAULT['dim']})")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--data", metavar="DIR", help="write the data here and keep it; reuse it if DIR/table.csv exists")
    p.add_argument("--configs", default="abcdefg", help="which configs to run, e.g. 'abc' (default abcdefg)")
    p.add_argument("--repeats", type=int, default=3, help="passes per config; the median is reported (default 3)")
    p.add_argument("--workers", type=int, default=2, help="num_workers of config c (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of config d (default 8)")
    p.add_argument("--subsample", type=int, default=4096, help="max_instances of config f (default 4096)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed read of all files before the passes")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--model-bags", type=int, default=6, help="bags timed for the model fit (default 6)")
    p.add_argument("--full-model", action="store_true", help="time a training step on every bag (slow)")
    p.add_argument("--skip-model", action="store_true", help="loader only")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--drop-cache-hint", action="store_true", help="print how to measure cold reads, and exit")
    args = p.parse_args(argv)

    if args.drop_cache_hint:
        print(DROP_CACHE_HINT)
        return
    configs = [c for c in CONFIGS if c in args.configs]
    if not configs or set(args.configs) - set(CONFIGS):
        p.error(f"--configs takes letters from 'abcdefg', got {args.configs!r}")
    sys.stdout.reconfigure(line_buffering=True)  # progress goes to stderr; keep the two in order

    import torch

    from qgmil.data import MILDataset, inspect_bag, make_loader, padding_fraction, set_epoch

    torch.set_num_threads(args.threads)
    gen = dict(QUICK if args.quick else DEFAULT)
    for key in gen:
        if getattr(args, key) is not None:
            gen[key] = getattr(args, key)
    if not gen["n_min"] <= gen["n_max"]:
        p.error("--n-min must be <= --n-max")

    load_start = loadavg()
    tmp = None
    root = Path(args.data) if args.data else Path(tmp := tempfile.mkdtemp(prefix="qgmil-loader-bench-"))
    try:
        t0 = time.perf_counter()
        if (root / TABLE).is_file():
            meta = json.loads((root / "meta.json").read_text()) if (root / "meta.json").is_file() else {}
            print(f"reusing {root} (generated with {meta or 'unknown options'}); generation options ignored")
        else:
            generate(root, gen["bags"], gen["n_min"], gen["n_max"], gen["dim"], args.dtype, args.seed)
            print(f"wrote {gen['bags']} bags to {root} in {time.perf_counter() - t0:.1f} s "
                  f"(N log-uniform {gen['n_min']}-{gen['n_max']}, D {gen['dim']}, {args.dtype}, seed {args.seed})")

        # Dataset + loaders. Setup time (table, file lookup, one header read per file) is separate.
        t0 = time.perf_counter()
        ds = MILDataset.from_table(root / TABLE, root)
        lengths = ds.lengths
        setup_s = time.perf_counter() - t0
        files = [u.files[0] for u in ds.units]
        dim = ds.in_dim
        file_bytes = np.array([f.stat().st_size for f in files], dtype=np.int64)
        feat_bytes = np.array([feature_bytes_on_disk(f) for f in files], dtype=np.int64)
        stored = inspect_bag(files[0]).dtype
        total_inst = int(lengths.sum())
        fp32_mb = total_inst * dim * 4 / MB
        disk_mb = file_bytes.sum() / MB
        print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}, {args.threads} threads; "
              f"load average (1 min) before the run {load_start}")
        print(f"dataset: {len(ds)} bags, N {lengths.min()}-{lengths.max()} (mean {lengths.mean():.0f}, total "
              f"{total_inst}), D {dim}, stored {stored}; on disk {disk_mb:.1f} MB "
              f"({feat_bytes.sum() / MB:.1f} MB of it features), as float32 in memory {fp32_mb:.1f} MB")
        print(f"setup (table, file lookup, {len(ds)} header reads for the bucketing lengths): {setup_s:.3f} s")

        loaders = {}
        if "b" in configs:
            loaders["b"] = make_loader(ds, batch_size=1, train=True, num_workers=0)
        if "c" in configs:
            loaders["c"] = make_loader(ds, batch_size=1, train=True, num_workers=args.workers)
        if "d" in configs:
            loaders["d"] = make_loader(ds, batch_size=args.batch_size, train=True, num_workers=0)
        preload_s = None
        if "e" in configs:
            ds_cache = MILDataset.from_table(root / TABLE, root, cache="fp16")
            loaders["e"] = make_loader(ds_cache, batch_size=1, train=True, num_workers=0)
            t0 = time.perf_counter()
            ds_cache.preload(progress=False)
            preload_s = time.perf_counter() - t0
        if "f" in configs:
            ds_sub = MILDataset.from_table(root / TABLE, root, max_instances=args.subsample)
            loaders["f"] = make_loader(ds_sub, batch_size=1, train=True, num_workers=0)
        if not args.no_warmup:
            read_all_raw(files)
            print("page cache: every file was read once (untimed) before the passes, so all configs read from "
                  "RAM: this measures software overhead, not the disk (see --drop-cache-hint)")
        else:
            print("page cache: no warm-up read (--no-warmup); files may or may not be cached")

        # Passes, interleaved round by round.
        samples: dict[str, list[dict]] = {c: [] for c in configs}
        names = {c: CONFIGS[c].format(workers=args.workers, batch=args.batch_size, sub=args.subsample) for c in configs}
        for r in range(args.repeats):
            for c in configs:
                # e: epoch r + 1, i.e. never the epoch that filled the cache (preload did that anyway).
                cpu0, flt0 = rusage()
                if c == "a":
                    t, bags, inst = baseline_pass(files)
                elif c == "g":
                    t, bags, inst = dataset_pass(ds)
                else:
                    t, bags, inst = loader_pass(loaders[c], r + (c == "e"))
                if bags != len(ds):
                    raise RuntimeError(f"config {c} delivered {bags} bags, expected {len(ds)}")
                cpu1, flt1 = rusage()
                samples[c].append({"time_s": t, "bags": bags, "instances": inst, "cpu_s": cpu1 - cpu0,
                                   "minor_faults": flt1 - flt0})
                print(f"  round {r + 1} {c} ({names[c]}): {t:.3f} s", file=sys.stderr, flush=True)

        pad = None
        if "d" in configs:
            set_epoch(loaders["d"], 0)
            pad = padding_fraction(list(loaders["d"].batch_sampler), lengths)

        results = {}
        for c in configs:
            times = [s["time_s"] for s in samples[c]]
            t = statistics.median(times)
            cpu = statistics.median(s["cpu_s"] for s in samples[c])
            faults = statistics.median(s["minor_faults"] for s in samples[c])
            inst = samples[c][0]["instances"]
            results[c] = {
                "name": names[c],
                "time_s": t, "times_s": times, "bags_per_s": len(ds) / t,
                "fp32_mb_per_s": inst * dim * 4 / MB / t, "disk_mb_per_s": disk_mb / t,
                "instances": inst, "cpu_s": cpu, "minor_faults": faults,
            }
        base = results.get("a", {}).get("time_s")

        print(f"\nOne pass over all {len(ds)} bags, median of {args.repeats} "
              f"(fp32 MB = feature data delivered as float32, real instances only; disk MB = file sizes):")
        header = ["config", "s / epoch", "bags/s", "fp32 MB/s", "disk MB/s", "vs baseline", "cpu s", "page faults",
                  "all passes s"]
        rows = []
        for c in configs:
            res = results[c]
            rows.append([f"{c} {res['name']}", f"{res['time_s']:.3f}", f"{res['bags_per_s']:.1f}",
                         f"{res['fp32_mb_per_s']:.0f}", f"{res['disk_mb_per_s']:.0f}",
                         f"{res['time_s'] / base:.2f}x" if base else "-", f"{res['cpu_s']:.2f}",
                         f"{res['minor_faults'] / 1000:.0f}k",
                         " ".join(f"{x:.3f}" for x in res["times_s"])])
        print_table(header, rows)
        notes = []
        if "d" in configs:
            notes.append(f"d: padding fraction of the epoch's batches {pad:.3f} (share of padded positions in x; "
                         f"fp32 MB counts real instances only)")
        if "e" in configs:
            notes.append(f"e: preload (reading + fp16 conversion of every bag, once) took {preload_s:.3f} s; "
                         f"the passes read nothing from disk (disk MB/s is the equivalent rate)")
        if "f" in configs:
            notes.append(f"f: fp32 MB counts the kept rows ({results['f']['instances']} of {total_inst} instances); "
                         f"disk MB/s counts whole files (for N <= 8 x {args.subsample} the loader reads the whole "
                         f"dataset, then picks rows)")
        if "c" in configs:
            notes.append(f"c: includes starting {args.workers} worker processes each epoch (persistent_workers=False)")
        notes.append("cpu s: user + sys CPU seconds of this process and its workers for the pass (median); "
                     "page faults: minor page faults (fresh memory being touched: a cost that grows with each "
                     "extra copy of the data into newly allocated buffers)")
        for n in notes:
            print("  " + n)

        # Model time.
        model = None
        if not args.skip_model:
            order = np.argsort(lengths, kind="stable")
            if args.full_model:
                picks = order.tolist()
            else:
                k = min(args.model_bags, len(ds))
                picks = order[np.unique(np.linspace(0, len(ds) - 1, k).round().astype(int))].tolist()
            print(f"\nModel: qgmil preset, in_dim {dim}, training step (fwd + CE + bwd + AdamW), batch 1, "
                  f"{args.threads} threads, on {len(picks)} bags:", flush=True)
            steps = time_model(ds, picks, args.threads)
            n_meas = np.array([s["n"] for s in steps], dtype=float)
            t_meas = np.array([s["time_s"] for s in steps])
            print_table(["N", "step s", "ms / 1k inst", "cpu util"], [
                [str(s["n"]), f"{s['time_s']:.3f}", f"{1e6 * s['time_s'] / s['n']:.1f}", f"{s['cpu_util']:.2f}"]
                for s in steps
            ])
            coef = nnls_fit(n_meas, t_meas)
            nl = lengths.astype(float)
            fit_epoch = float((coef[0] + coef[1] * nl + coef[2] * nl * nl).sum())
            linear_epoch = float(t_meas.sum() / n_meas.sum() * nl.sum())
            print(f"fit: t(N) = {coef[0]:.3g} + {coef[1]:.3g} N + {coef[2]:.3g} N^2 s")
            if args.full_model:
                epoch_s = float(t_meas.sum())
                print(f"model time per epoch ({len(ds)} bags): {epoch_s:.1f} s (measured on every bag; "
                      f"the fit over them sums to {fit_epoch:.1f} s)")
            else:
                epoch_s = fit_epoch
                print(f"model time per epoch ({len(ds)} bags): {epoch_s:.1f} s (fit summed over all bags; "
                      f"the per-instance rate of the timed bags would say {linear_epoch:.1f} s)")
            model = {"steps": steps, "fit_coef": coef.tolist(), "epoch_s": epoch_s, "fit_epoch_s": fit_epoch,
                     "linear_epoch_s": linear_epoch, "full": args.full_model, "ratios": {}}
            print("\nLoader time / model time per epoch:")
            for c in [c for c in ("b", "c") if c in results]:
                lt = results[c]["time_s"]
                ratio = lt / epoch_s
                model["ratios"][c] = ratio
                if c == "b":
                    effect = f"adds {lt:.2f} s = {100 * ratio:.2f}% to the epoch (loading and compute in series)"
                else:
                    effect = (f"overlaps compute: effective cost ~ max(0, loader - model) = "
                              f"{max(0.0, lt - epoch_s):.2f} s")
                print(f"  {c} {results[c]['name']}: {lt:.2f} s / {epoch_s:.1f} s = {ratio:.4f}; {effect}")
            worst = max(model["ratios"].values(), default=None)
            if worst is not None:
                verdict = "is NOT" if worst < 0.1 else ("may be" if worst < 1 else "IS")
                print(f"conclusion: the loader {verdict} the bottleneck of a training epoch on this data "
                      f"(loader at most {100 * worst:.2f}% of model time; page-cached files, {args.threads} threads)")

        load_end = loadavg()
        print(f"\nload average (1 min): {load_start} before the run, {load_end} at the end (this run adds up to "
              f"~{args.threads}; more than that means other processes shared the {os.cpu_count()} cores)")

        if args.json:
            payload = {
                "loadavg_start": load_start, "loadavg_end": load_end,
                "argv": sys.argv, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                "threads": args.threads, "repeats": args.repeats, "data": str(root), "generation": gen,
                "dtype": stored, "bags": len(ds), "lengths": lengths.tolist(), "dim": dim,
                "disk_mb": disk_mb, "fp32_mb": fp32_mb, "setup_s": setup_s, "preload_s": preload_s,
                "padding_fraction": pad, "configs": results, "model": model,
            }
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)
            print(f"\nwrote {args.json}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
