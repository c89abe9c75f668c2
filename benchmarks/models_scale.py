"""Every registered architecture side by side: forward / training-step time and peak memory vs bag size.

One preset per architecture (the QG-MIL ablation presets share qgmil's code), in_dim 1024, 2 classes,
one bag, float32, `--threads` intra-op threads (default 2). Each cell runs in a fresh subprocess (this
script with a hidden `--child` mode): peak memory is that process's ru_maxrss minus its RSS after the
model (and optimizer) were built and warmed up on a 1,000-instance bag, before the input exists, so the
input (0.2 GB at 50k instances) counts. A cell that runs out of memory or past `--timeout` says so; the
script itself never fails on it.

  inference:      model.eval(), torch.no_grad(), one forward pass
  training step:  model.train(), forward with labels (auxiliary losses included) + backward + AdamW step

The target of the baseline-zoo issue: every model does inference on a 50k-instance bag within 8 GiB.

Run:   python benchmarks/models_scale.py                       (N = 1k, 10k, 50k inference; 1k, 10k train)
       python benchmarks/models_scale.py --quick               (N = 1k, 5k)
       python benchmarks/models_scale.py --models qgmil,transmil --infer-sizes 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IN_DIM, NUM_CLASSES, WARMUP_N = 1024, 2, 1000
LIMIT_GIB, LIMIT_N = 8.0, 50000


def current_rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError("VmRSS not found")


def child(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import qgmil

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = qgmil.create_model(spec["model"], in_dim=IN_DIM, num_classes=NUM_CLASSES)
    train = spec["mode"] == "train"
    model.train(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    label = torch.tensor([1])

    def one_pass(x):
        if not train:
            with torch.no_grad():
                return model(x)
        out = model(x, labels=label)
        loss = F.cross_entropy(out.logits, label) + sum(out.aux_losses.values(), torch.zeros(()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return out

    one_pass(torch.randn(1, WARMUP_N, IN_DIM))
    baseline = current_rss_gib()
    x = torch.randn(1, spec["n"], IN_DIM)
    start = time.perf_counter()
    out = one_pass(x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"time_s": seconds, "peak_gib": max(peak - baseline, 0.0),
            "attention_sum": float(out.attention.detach().sum())}


def run_cell(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        killed = proc.returncode in (-9, 137)
        return {"status": "OOM" if killed else "failed", "error": proc.stderr.strip().splitlines()[-1:] or [""]}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def architectures() -> list[str]:
    import qgmil

    return [m for m in qgmil.list_models() if not m.startswith("qgmil_")]


def fmt(cell: dict | None, key: str, digits: int) -> str:
    if cell is None:
        return "-"
    return f"{cell[key]:.{digits}f}" if cell["status"] == "ok" else cell["status"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated (default: one preset per architecture)")
    parser.add_argument("--infer-sizes", default="1000,10000,50000")
    parser.add_argument("--train-sizes", default="1000,10000")
    parser.add_argument("--quick", action="store_true", help="N = 1k, 5k only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    models = args.models.split(",") if args.models else architectures()
    infer = [int(n) for n in ("1000,5000" if args.quick else args.infer_sizes).split(",")]
    train = [int(n) for n in ("1000,5000" if args.quick else args.train_sizes).split(",")]
    sizes = sorted(set(infer) | set(train))
    print(f"in_dim {IN_DIM}, one bag, float32, {args.threads} threads; peak = max RSS over the warmed-up model")
    results = []
    for model in models:
        for n in sizes:
            row = {"model": model, "n": n}
            for mode, wanted in (("infer", infer), ("train", train)):
                if n in wanted:
                    spec = {"model": model, "n": n, "mode": mode, "threads": args.threads}
                    row[mode] = run_cell(spec, args.timeout)
                    print(f"  {model:<16} N={n:>6} {mode:<5} {row[mode]}", file=sys.stderr, flush=True)
            results.append(row)

    print("\n| model | N | inference s | inference peak GiB | train step s | train peak GiB |")
    print("|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['model']} | {row['n']:,} | {fmt(row.get('infer'), 'time_s', 2)} | "
              f"{fmt(row.get('infer'), 'peak_gib', 2)} | {fmt(row.get('train'), 'time_s', 2)} | "
              f"{fmt(row.get('train'), 'peak_gib', 2)} |")
    checked = [r for r in results if r["n"] == LIMIT_N and "infer" in r]
    if checked:
        print(f"\ninference at N = {LIMIT_N:,} within {LIMIT_GIB:g} GiB:")
        for row in checked:
            cell = row["infer"]
            ok = cell["status"] == "ok" and cell["peak_gib"] < LIMIT_GIB
            print(f"  {row['model']:<16} {'PASS' if ok else 'MISS'} ({fmt(cell, 'peak_gib', 2)} GiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
