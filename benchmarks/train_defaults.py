"""Cross-validation at the former defaults against today's, through the real training run, in one run.

    python benchmarks/train_defaults.py [--model qgmil] [--epochs 3] [--full] [--json OUT]

Both runs are `qgmil train` (qgmil.train.train_run) on the built-in digit-bags (400 bags of 8-24 digits, 5 folds,
seed 0) with the same model, learning rate and epochs; they differ only in what the defaults were:
  former   one bag per step, padded, AdamW's single-tensor update, every bag read from its HDF5 file every time
           (optim.batch_size 1, optim.batch_instances null, optim.pack false, data.cache null; the package
           defaults before optim.batch_instances, packing, the fused optimizer and data.cache auto)
  today    the defaults: up to 32 bags / 16,384 instances per step, packed, fused AdamW, data.cache auto
Default: `--epochs` (3) fixed epochs per fold, no early stopping, timed per epoch (validation pass, checkpoint and
state writes included; each fold's test pass and the report are not in it). `--full`: both runs to convergence
(50 epochs, early stopping with patience 10) with macro-F1 per fold, the accuracy half of the target. The two runs
go one after the other in this process: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qgmil.train.loop as loop
from qgmil.data import prepare_dataset
from qgmil.rundir.config import load_config
from qgmil.train.run import train_run

FORMER = {"optim.batch_size": 1, "optim.batch_instances": None, "optim.pack": False, "data.cache": None}


def single_tensor_adamw(groups, **kwargs):
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


class EpochClock:
    """Wall time between the ends of consecutive epochs of each fold (loop._epoch_end_hook is called at each)."""

    def __init__(self):
        self.last: dict[str, float] = {}
        self.seconds: dict[str, list[float]] = {}

    def start_fold(self, fold: str) -> None:
        self.last[fold] = time.perf_counter()

    def __call__(self, fold: str, epoch: int) -> None:
        now = time.perf_counter()
        self.seconds.setdefault(fold, []).append(now - self.last[fold])
        self.last[fold] = now


def run(name: str, data: Path, out: Path, args) -> dict:
    overrides = {"data.table": data / "labels.csv", "data.features": data / "features", "model.name": args.model,
                 "optim.lr": 1e-4, "eval.folds": 5, "eval.seeds": [0], "runtime.progress": False,
                 "runtime.tensorboard": False, **(FORMER if name == "former" else {})}
    if not args.full:
        overrides.update({"optim.epochs": args.epochs, "eval.patience": None})
    config = load_config(None, [], overrides)
    clock = EpochClock()
    real_fit = loop.FoldTrainer.fit

    def timed_fit(self, fold, *a, **k):  # starts each fold's clock where its first epoch starts
        clock.start_fold(fold.name)
        return real_fit(self, fold, *a, **k)

    saved = loop.adamw, loop._epoch_end_hook, loop.FoldTrainer.fit
    loop.adamw = single_tensor_adamw if name == "former" else saved[0]
    loop._epoch_end_hook, loop.FoldTrainer.fit = clock, timed_fit
    start = time.perf_counter()
    try:
        summary = train_run(config, out / name)
    finally:
        loop.adamw, loop._epoch_end_hook, loop.FoldTrainer.fit = saved
    total = time.perf_counter() - start
    per_fold = [statistics.median(s[1:] or s) for s in clock.seconds.values()]  # the first epoch warms up
    f1 = [json.loads(p.read_text())["test"]["macro_f1"] for p in sorted((out / name / "folds").glob("*/metrics.json"))]
    return {"defaults": name, "s_per_epoch_per_fold": per_fold, "s_per_epoch": statistics.median(per_fold),
            "epochs_per_fold": [len(s) for s in clock.seconds.values()], "total_s": total,
            "macro_f1_per_fold": f1, "macro_f1": summary["macro_f1"]["mean"], "macro_f1_std": summary["macro_f1"]["std"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qgmil")
    parser.add_argument("--epochs", type=int, default=3, help="fixed epochs per fold (without --full)")
    parser.add_argument("--full", action="store_true", help="both runs to convergence (50 epochs, patience 10)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qgmil-train-defaults-") as tmp:
        data = prepare_dataset("digit-bags", Path(tmp) / "digits", progress=False)
        rows = [run(name, data, Path(tmp), args) for name in ("former", "today")]
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.model} on digit-bags, 5 folds, {'to convergence' if args.full else f'{args.epochs} epochs per fold'}\n")
    # After a few fixed epochs macro-F1 says nothing (the former defaults take ~30x more steps per epoch): shown
    # only at convergence.
    print("| defaults | s / epoch (median over folds) | per fold | whole run s |"
          + (" macro-F1 per fold | macro-F1 mean ± std |" if args.full else ""))
    print("|---|---|---|---|" + ("---|---|" if args.full else ""))
    for r in rows:
        f1 = (f" {', '.join(f'{f:.3f}' for f in r['macro_f1_per_fold'])} | {r['macro_f1']:.3f} ± {r['macro_f1_std']:.3f} |"
              if args.full else "")
        print(f"| {r['defaults']} | {r['s_per_epoch']:.2f} | {', '.join(f'{s:.2f}' for s in r['s_per_epoch_per_fold'])} | "
              f"{r['total_s']:.0f} |{f1}")
    ratio = rows[0]["s_per_epoch"] / rows[1]["s_per_epoch"]
    print(f"\nan epoch at today's defaults: {ratio:.1f}x faster than at the former ones "
          f"(whole run: {rows[0]['total_s'] / rows[1]['total_s']:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "epoch_ratio": ratio, "full": args.full}, indent=1))


if __name__ == "__main__":
    main()
