"""All speed and memory benchmarks behind one command, summarised in one table.

    python benchmarks/run_all.py [--full] [--device cpu] [--out DIR]

Runs, each in its own process (their full output goes to DIR/<name>.log, their figures to DIR/<name>.json):
  qgmil_scale.py        QG-MIL forward / training step time and peak memory vs bag size, against an eager-attention
                        implementation of the same math in the same run
  models_scale.py       every architecture: inference and training step time and peak memory vs bag size
  train_throughput.py   training bags/s at small, hematology (~500 x 384) and WSI (~10k x 1024) scale: batch 1 (old
                        and fused optimizer), padded, instance-budget and packed batches
  train_defaults.py     seconds per epoch of `qgmil train` on digit-bags at the former defaults and at today's
  loader_throughput.py  bag loader vs a plain h5py loop
  extract_throughput.py tiles/s for reading, the encoder, and the whole extraction (needs the CMU slide)
Default: the scripts' quick settings (about 15-20 minutes on 2 cores); --full: their documented settings (hours).
Figures are only comparable within one run on one machine: each ratio is against a baseline measured alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts(full: bool, device: str) -> dict[str, list[str]]:
    quick = [] if full else ["--quick"]
    return {
        "qgmil_scale": [*quick],
        "models_scale": [*quick],
        "train_throughput": [*quick, "--device", device],
        "train_defaults": [] if not full else ["--full"],
        "loader_throughput": [*quick],
        "extract_throughput": ["--device", device] + ([] if full else ["--copies", "2", "--encoder", "timm:resnet18"]),
    }


def summary_rows(name: str, data) -> list[tuple[str, str, str]]:
    """(what, setting, figure) rows from one script's JSON."""
    rows = []
    if name == "qgmil_scale":
        cells = {(c["impl"], c["mode"], c["n"]): c for c in data["cells"] if c.get("status") == "ok"}
        for (impl, mode, n), c in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
            rows.append((f"qgmil {mode} ({impl})", f"N={n:,}", f"{c['time_s']:.2f} s, {c['peak_gib']:.2f} GiB"))
    elif name == "models_scale":
        for row in data:
            for mode in ("infer", "train"):
                cell = row.get(mode)
                if cell and cell.get("status") == "ok":
                    rows.append((f"{row['model']} {mode}", f"N={row['n']:,}",
                                 f"{cell['time_s']:.2f} s, {cell['peak_gib']:.2f} GiB"))
    elif name == "train_throughput":
        for row in data:
            rows.append((f"train {row['model']}", f"{row['scale']}, {row['mode']}", f"{row['bags_per_s']:.2f} bags/s"))
    elif name == "train_defaults":
        for row in data["rows"]:
            f1 = f", macro-F1 {row['macro_f1']:.3f}" if data.get("full") else ""  # only at convergence
            rows.append(("qgmil train, digit-bags", f"defaults: {row['defaults']}", f"{row['s_per_epoch']:.2f} s/epoch{f1}"))
        rows.append(("qgmil train, digit-bags", "today vs former", f"{data['epoch_ratio']:.1f}x per epoch"))
    elif name == "loader_throughput":
        base = data["configs"].get("a", {}).get("time_s")
        for key, cell in data["configs"].items():
            ratio = f" ({cell['time_s'] / base:.2f}x baseline)" if base else ""
            rows.append(("loader", cell["name"], f"{cell['bags_per_s']:.1f} bags/s{ratio}"))
    elif name == "extract_throughput":
        for row in data["rows"]:
            rows.append(("extraction", row["stage"], f"{row['tiles_per_s']:.1f} tiles/s"))
        rows.append(("extraction", "encoder busy in the whole run", f"{100 * data['encoder_busy']:.0f}%"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the scripts' documented settings (hours on 2 cores)")
    parser.add_argument("--device", default="cpu", help="for the training and extraction throughput scripts")
    parser.add_argument("--only", help="comma-separated script names (default: all)")
    parser.add_argument("--out", type=Path, help="keep logs and JSON here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="qgmil-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = scripts(args.full, args.device)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}

    table, failed = [], []
    for name, extra in chosen.items():
        json_path, log = out / f"{name}.json", out / f"{name}.log"
        start = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with open(log, "w") as fh:
            proc = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *extra, "--json", str(json_path)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        took = time.perf_counter() - start
        if proc.returncode != 0 or not json_path.exists():
            failed.append(f"{name} (exit {proc.returncode}; see {log})")
            continue
        print(f"  done in {took:.0f} s", file=sys.stderr, flush=True)
        table += summary_rows(name, json.loads(json_path.read_text()))

    print("| what | setting | figure |\n|---|---|---|")
    for what, setting, figure in table:
        print(f"| {what} | {setting} | {figure} |")
    print(f"\nlogs and JSON: {out}")
    if failed:
        print("failed: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
