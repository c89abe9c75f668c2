"""What nested tuning costs, and what the pruner saves: the same studies with and without pruning, in one run.

    python benchmarks/tuning_cost.py [--dataset digit-bags] [--model abmil_gated] [--trials 20] [--epochs 20]
                                     [--pruners none,median,hyperband] [--folds 2] [--json OUT]

Each pruner setting runs `qgmil tune` on the same data, splits and trial seeds (2 outer folds of seed 0 by
default, patience off so that an unpruned trial runs every epoch), one after another on this machine, and
reports wall time, trial-epochs (epochs trained over all trials of all studies), the share of trial-epochs
saved against no pruning, the chosen trials' validation score and the outer test macro-F1. The target: the
default pruner saves at least half the trial-epochs at a similar chosen score.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from qgmil.data.builtin import prepare_dataset
from qgmil.rundir import RunDir
from qgmil.rundir.config import load_config
from qgmil.tune import tune_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digit-bags")
    parser.add_argument("--bags", type=int, default=200, help="bags of a built-in dataset that takes the option")
    parser.add_argument("--model", default="abmil_gated")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--pruners", default="none,median,hyperband")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        options = {"bags": args.bags} if args.dataset == "digit-bags" else {}
        data = prepare_dataset(args.dataset, tmp / "data", progress=False, **options)
        rows = []
        for pruner in args.pruners.split(","):
            config = load_config(None, [], {
                "data.table": data / "labels.csv", "data.features": data / "features", "model.name": args.model,
                "eval.folds": args.folds, "eval.seeds": [0], "optim.epochs": args.epochs, "optim.batch_size": 16,
                "eval.patience": None, "eval.bootstrap": 100, "runtime.progress": False,
                "runtime.tensorboard": False, "tune.trials": args.trials, "tune.pruner": pruner,
                # an outer fold's folds (but not its studies) are split, so outer folds 1.. reuse fold 0's
                # splits file: every pruner setting sees the same folds
                **({"eval.splits": tmp / "splits.json"} if (tmp / "splits.json").exists() else {})})
            out = tmp / f"run-{pruner}"
            start = time.perf_counter()
            summary = tune_run(config, out)
            seconds = time.perf_counter() - start
            if not (tmp / "splits.json").exists():
                (tmp / "splits.json").write_text((out / "splits.json").read_text())
            chosen = RunDir(out).read_chosen().values()
            rows.append({
                "pruner": pruner, "seconds": seconds,
                "trial_epochs": sum(c["trial_epochs"] for c in chosen),
                "pruned": sum(c["pruned"] for c in chosen), "trials": sum(c["trials"] for c in chosen),
                "chosen_val": sum(c["value"] for c in chosen) / len(chosen),
                "test_macro_f1": summary["macro_f1"]["mean"], "test_std": summary["macro_f1"]["std"],
            })
            print(f"  {pruner}: {seconds:.0f} s, {rows[-1]['trial_epochs']} trial-epochs", flush=True)

    base = next((r for r in rows if r["pruner"] == "none"), rows[0])
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.dataset}, {args.model}, {args.folds} outer folds x {args.trials} trials, {args.epochs} epochs")
    print("\n| pruner | wall s | trial-epochs | saved vs none | pruned trials | chosen val macro-F1 | test macro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        saved = 1 - r["trial_epochs"] / base["trial_epochs"]
        r["saved"] = saved
        print(f"| {r['pruner']} | {r['seconds']:.0f} | {r['trial_epochs']} | {saved:.0%} | {r['pruned']}/{r['trials']} "
              f"| {r['chosen_val']:.3f} | {r['test_macro_f1']:.3f} ± {r['test_std']:.3f} |")
    for r in rows:
        if r["pruner"] != "none":
            print(f"  [{'PASS' if r['saved'] >= 0.5 else 'MISS'}] {r['pruner']} saves {r['saved']:.0%} of the "
                  "trial-epochs (target: at least half)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
