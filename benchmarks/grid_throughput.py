"""Benchmark-grid throughput on this machine: the same cells through local worker processes and through SLURM.

    python benchmarks/grid_throughput.py [--models mean_pool,abmil_gated,qgmil_light,max_pool] [--workers 2]
                                         [--partition debug] [--epochs 5] [--json OUT]

One built-in dataset (digit-bags, 100 bags), one cell per model, 3 folds, untuned; first `qgmil benchmark
--executor local --workers W` (W processes, CPUs / W threads each), then the same grid with `--executor slurm
--wait` and W CPUs' worth of 1-CPU tasks, into fresh directories. Reports wall time and cells per minute
for each, and checks that both gave the same results (runtime.threads 1 everywhere, so the float sums
agree). Needs a running SLURM (e.g. `.ci/slurm.sh` as root); without sbatch only the local row is shown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def run(spec: Path, out: Path, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qgmil", "benchmark", str(spec), "--out", str(out), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mean_pool,abmil_gated,qgmil_light,max_pool")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "grid.yaml"
        spec.write_text(
            "datasets: [{name: digit-bags, options: {bags: 100}}]\n"
            f"models: [{', '.join(models)}]\nfolds: 3\nseeds: [0]\nworkers: {args.workers}\n"
            f"slurm: {{cpus_per_task: 1, mem_gb: 2, time_min: 30"
            + (f", partition: {args.partition}" if args.partition else "") + ", array_parallelism: "
            f"{args.workers}}}\n"
            f"train: {{optim.epochs: {args.epochs}, optim.batch_size: 16, eval.bootstrap: 100, runtime.threads: 1}}\n")
        rows = [{"executor": f"local, {args.workers} processes", "seconds": run(spec, tmp / "local")}]
        if shutil.which("sbatch"):
            # the data is prepared by the driver before submission, as for the local grid; time all of it
            rows.append({"executor": f"slurm, {args.workers} x 1-CPU array tasks",
                         "seconds": run(spec, tmp / "slurm", "--executor", "slurm", "--wait")})
            same = pd.read_csv(tmp / "local" / "results.csv").drop(columns="seconds").equals(
                pd.read_csv(tmp / "slurm" / "results.csv").drop(columns="seconds"))
        else:
            same = None
            print("no sbatch on this machine: the SLURM row is left out")
    print(f"\n{len(models)} cells (digit-bags 100 bags, 3 folds, {args.epochs} epochs, 1 torch thread per cell)\n")
    print("| executor | wall s | cells / min | vs local |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['executor']} | {row['seconds']:.1f} | {len(models) / row['seconds'] * 60:.2f} | "
              f"{rows[0]['seconds'] / row['seconds']:.2f}x |")
    if same is not None:
        print(f"\nresults identical local vs SLURM: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "same": same}, indent=1))


if __name__ == "__main__":
    main()
