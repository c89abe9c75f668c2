"""How QG-MIL scales with bag size on CPU: time, peak memory and achieved FLOP rate.

Two implementations of the same math and the same weights (the `qgmil` preset, in_dim 1024, 2 classes):

* ours  - the model as shipped: attention through `F.scaled_dot_product_attention` (no N x N matrix)
          and, without gradients, the position-wise layers run in chunks of `model.inference_chunk`.
* eager - each block's `attn.attend` replaced on the instance by explicit
          softmax(q k^T / sqrt(hd)) v (the (B, H, N, N) matrix is materialised, softmax in float32)
          and `model.inference_chunk = None`: how the official code computes it.

For each bag size N (one bag, float32, `--threads` intra-op threads) and implementation it measures

* inference: model.eval(), torch.no_grad(), one forward pass;
* training step: model.train(), forward + cross-entropy + backward + AdamW step.

Every single measurement runs in a fresh subprocess (this script with a hidden `--child` mode), so
peak memory is that child's own: ru_maxrss (peak RSS) minus the RSS measured right after importing
torch and building the model (and optimizer) but before the input tensor is created, so the input
(0.4 GB at 100k instances) counts toward the peak. A child that is killed (out of memory) or runs past
`--timeout` shows as OOM / timeout / failed in its cell; the script itself never raises on that.
Inside a child: one warm-up pass at N = 1000, then one timed pass (median of 3 for N <= 5000).
Eager cells whose N x N matrices clearly cannot fit (estimate 2 x 8 x N^2 x 4 bytes for inference,
4 x 8 x N^2 x 4 bytes for training, > 14 GiB) are skipped.

FLOP rate: forward FLOPs are counted analytically (2 m n k per linear layer: input projection,
q/k/v/gate/o projections, SwiGLU, pooling and head; attention 4 N^2 heads head_dim per layer for
q k^T and attention @ v). A training step is counted as 3 x forward FLOPs (the usual convention; a
flash-style backward that recomputes q k^T does a little more real work). Rates are also shown as a
percentage of a plain 4096 x 4096 float32 matmul, measured in its own child at the start and at the
end of the run (reference = median of all those samples; the machine may be noisy).

Run:   python benchmarks/qgmil_scale.py                  (full run, N = 1000 ... 100000, ~20-30 min)
       python benchmarks/qgmil_scale.py --quick          (N = 1000, 5000 only)
       python benchmarks/qgmil_scale.py --sizes 10000,20000 --skip-train --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_SIZES = [1000, 5000, 10000, 20000, 50000, 100000]
QUICK_SIZES = [1000, 5000]
IMPLS = ("ours", "eager")
MODES = ("infer", "train")
MODEL_NAME, IN_DIM, NUM_CLASSES = "qgmil", 1024, 2
SKIP_ABOVE_GIB = 14.0
WARMUP_N = 1000
MATMUL_SIZE = 4096
GIB = 2**30


# --------------------------------------------------------------------------------------------
# Analytic cost model (parent side)


def forward_flops(n: int, cfg) -> tuple[float, float]:
    """(total, attention-only) FLOPs of one forward pass over a bag of n instances."""
    hd = cfg.head_dim or cfg.dim // cfg.heads
    kvh = cfg.kv_heads or cfg.heads
    ffn = cfg.ffn_dim or 4 * cfg.dim
    inner = cfg.heads * hd
    gate_out = {"headwise": cfg.heads, "elementwise": inner, "none": 0}[cfg.gate]

    def linear(m, k, out):  # (m x k) @ (k x out)
        return 2.0 * m * k * out

    total = linear(n, cfg.in_dim, cfg.dim)  # instance embedding
    attention = 0.0
    for _ in range(cfg.depth):
        total += linear(n, cfg.dim, inner) + 2 * linear(n, cfg.dim, kvh * hd)  # q, k, v
        total += linear(n, cfg.dim, gate_out) + linear(n, inner, cfg.dim)  # gate, o
        total += (3 if cfg.ffn == "swiglu" else 2) * linear(n, cfg.dim, ffn)
        attention += 4.0 * n * n * cfg.heads * hd  # q k^T and weights @ v
    half = cfg.dim // 2
    total += 2 * linear(n, cfg.dim, half) + linear(n, half, 1) + 2.0 * n * cfg.dim  # gated pool + weighted sum
    total += linear(1, cfg.dim, half) + linear(1, half, cfg.num_classes)  # classifier head
    return total + attention, attention


def eager_estimate_gib(n: int, mode: str, heads: int) -> float:
    """Rough size of the N x N attention buffers the eager implementation needs."""
    copies = 2 if mode == "infer" else 4
    return copies * heads * n * n * 4 / GIB


# --------------------------------------------------------------------------------------------
# Child side: one measurement per process


def eager_attend(self, q, k, v, attn_mask=None):
    """Explicit softmax(q k^T / sqrt(hd)) v, materialising (B, H, N, N); replaces attn.attend."""
    import torch

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if self.kv_heads != self.heads:
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
    scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.float().softmax(-1).to(q.dtype)
    del scores
    weights = torch.nn.functional.dropout(weights, self.attn_dropout, self.training)
    return (weights @ v).transpose(1, 2)


def build_model(impl: str):
    import types

    import torch

    import qgmil

    torch.manual_seed(0)  # same weights in every child
    model = qgmil.create_model(MODEL_NAME, in_dim=IN_DIM, num_classes=NUM_CLASSES)
    if impl == "eager":
        for block in model.blocks:
            block.attn.attend = types.MethodType(eager_attend, block.attn)
        model.inference_chunk = None
    return model


def current_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found")


def run_measurement(spec: dict) -> dict:
    """Body of a child: time one implementation/mode at one N; returns a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "matmul":
        a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
        a @ b
        samples = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            a @ b
            samples.append(2.0 * MATMUL_SIZE**3 / (time.perf_counter() - t0) / 1e9)
        return {"gflops_samples": samples}

    model = build_model(spec["impl"])
    train = spec["mode"] == "train"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model.train(train)
    baseline_kib = current_rss_kib()  # before any input exists: the input counts toward the peak
    label = torch.tensor([1])

    def one_pass(x):
        if not train:
            with torch.no_grad():
                return model(x).logits
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).logits, label)
        loss.backward()
        optimizer.step()
        return loss.detach()

    one_pass(torch.randn(1, WARMUP_N, IN_DIM))  # warm-up: kernels, thread pool, optimizer state
    torch.manual_seed(spec["n"])
    x = torch.randn(1, spec["n"], IN_DIM)
    times, cpu0 = [], time.process_time()
    for _ in range(3 if spec["n"] <= 5000 else 1):
        t0 = time.perf_counter()
        out = one_pass(x)
        times.append(time.perf_counter() - t0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "time_s": statistics.median(times),
        "times_s": times,
        # CPU seconds / (wall seconds x threads): well below 1 means other load shared the cores.
        "cpu_util": (time.process_time() - cpu0) / (sum(times) * spec["threads"]),
        "peak_gib": max(peak_kib - baseline_kib, 0) / 2**20,
        "baseline_gib": baseline_kib / 2**20,
        "output": out.flatten().tolist(),
    }


# --------------------------------------------------------------------------------------------
# Parent side


def run_child(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter; failures become a status, never an exception."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode == 0:
        try:
            return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
        except (ValueError, IndexError):
            pass
    err = proc.stderr.strip()
    # SIGKILL is what the kernel OOM killer sends; the others are torch/Python allocation failures.
    oom = proc.returncode == -9 or any(s in err for s in ("can't allocate memory", "MemoryError", "out of memory"))
    print(f"    child rc={proc.returncode}: {err[-500:]}", file=sys.stderr, flush=True)
    return {"status": "OOM" if oom else "failed", "returncode": proc.returncode}


def measure_matmul(threads: int, timeout: float) -> list[float]:
    res = run_child({"kind": "matmul", "threads": threads, "repeats": 7}, timeout)
    return res.get("gflops_samples", [])


def fmt_cell(res: dict | None, key: str, fmt: str) -> str:
    if res is None:
        return "-"
    if res["status"] == "skip":
        return f"skip (needs ~{res['needs_gib']:.0f} GiB)" if key == "time_s" else "-"
    if res["status"] != "ok":
        return res["status"] if key == "time_s" else "-"
    return format(res[key], fmt)


def fmt_rate(res: dict | None, matmul: float) -> str:
    if res is None or res["status"] != "ok":
        return "-"
    pct = f" ({100 * res['gflops'] / matmul:.0f}%)" if matmul else ""
    return f"{res['gflops']:.1f}{pct}"


def print_table(sizes, results, matmul):
    header = ["N", "impl", "infer s", "infer peak GiB", "train-step s", "train peak GiB",
              "infer GFLOP/s (% mm)", "train GFLOP/s (% mm)"]
    rows = []
    for n in sizes:
        for impl in IMPLS:
            inf, tr = results.get((impl, "infer", n)), results.get((impl, "train", n))
            if inf is None and tr is None:
                continue
            rows.append([str(n), impl, fmt_cell(inf, "time_s", ".2f"), fmt_cell(inf, "peak_gib", ".2f"),
                         fmt_cell(tr, "time_s", ".2f"), fmt_cell(tr, "peak_gib", ".2f"),
                         fmt_rate(inf, matmul), fmt_rate(tr, matmul)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def print_summary(results, matmul):
    """PASS / MISS / n/a for each target, with the numbers behind it."""

    def ok(impl, mode, n):
        r = results.get((impl, mode, n))
        return r if r is not None and r["status"] == "ok" else None

    def verdict(cond):
        return "n/a " if cond is None else ("PASS" if cond else "MISS")

    print("\nTargets:")
    r = ok("ours", "infer", 100000)
    print(f"  [{verdict(r and r['peak_gib'] < 2)}] inference at N=100k, peak < 2 GiB (ours): "
          + (f"{r['peak_gib']:.2f} GiB" if r else "not measured"))
    r = ok("ours", "train", 50000)
    print(f"  [{verdict(r and r['peak_gib'] < 5)}] training step at N=50k, peak < 5 GiB (ours): "
          + (f"{r['peak_gib']:.2f} GiB" if r else "not measured"))
    for mode in MODES:
        cells = {n: r for (impl, m, n), r in results.items() if impl == "ours" and m == mode and n >= 20000}
        pcts = {n: 100 * r["gflops"] / matmul for n, r in sorted(cells.items()) if r["status"] == "ok" and matmul}
        cond = None if not pcts else (all(p >= 80 for p in pcts.values()) and len(pcts) == len(cells))
        detail = ", ".join(f"{n}: {p:.0f}%" for n, p in pcts.items()) or "not measured"
        bad = [f"{n}: {r['status']}" for n, r in sorted(cells.items()) if r["status"] != "ok"]
        print(f"  [{verdict(cond)}] {mode} at N>=20k reaches >= 80% of matmul {matmul:.0f} GFLOP/s (ours): "
              + ", ".join([detail] + bad))
    for mode in MODES:
        o, e = ok("ours", mode, 10000), ok("eager", mode, 10000)
        if o and e:
            mem_x, speed_x = e["peak_gib"] / max(o["peak_gib"], 1e-9), e["time_s"] / o["time_s"]
            cond = mem_x >= 5 and o["time_s"] <= e["time_s"]
            detail = (f"peak {o['peak_gib']:.2f} vs {e['peak_gib']:.2f} GiB ({mem_x:.1f}x less), "
                      f"time {o['time_s']:.2f} vs {e['time_s']:.2f} s (eager/ours = {speed_x:.2f})")
        else:
            cond, detail = None, "not measured"
        print(f"  [{verdict(cond)}] {mode} at N=10k, ours >= 5x less peak memory than eager and no slower: {detail}")


def print_consistency(sizes, results):
    """Same weights and inputs, so both implementations must give the same logits."""
    diffs = []
    for n in sizes:
        o, e = results.get(("ours", "infer", n)), results.get(("eager", "infer", n))
        if o and e and o["status"] == e["status"] == "ok":
            diffs.append(f"N={n}: {max(abs(a - b) for a, b in zip(o['output'], e['output'])):.1e}")
    if diffs:
        print("\nmax |logit difference| ours vs eager (inference): " + ", ".join(diffs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", help="comma-separated bag sizes N (default %s)" % ",".join(map(str, DEFAULT_SIZES)))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--skip-train", action="store_true", help="inference only")
    p.add_argument("--skip-eager", action="store_true", help="only the shipped implementation")
    p.add_argument("--quick", action="store_true", help="N = 1000, 5000 only")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a child is killed (default 900)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # the only output of a child is one JSON line
        print(json.dumps(run_measurement(json.loads(args.child))))
        return

    import qgmil

    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    impls = ["ours"] if args.skip_eager else list(IMPLS)
    modes = ["infer"] if args.skip_train else list(MODES)
    cfg = qgmil.create_model(MODEL_NAME, in_dim=IN_DIM, num_classes=NUM_CLASSES).config

    print(f"QG-MIL scaling benchmark: preset {MODEL_NAME!r}, in_dim {IN_DIM}, one bag, float32 CPU, "
          f"{args.threads} threads, child timeout {args.timeout:.0f} s")
    print("FLOPs per forward (training step counted as 3x forward):")
    for n in sizes:
        total, attn = forward_flops(n, cfg)
        print(f"  N={n:>6}: {total / 1e9:9.1f} GFLOP, attention {100 * attn / total:4.1f}%")

    mm_samples = measure_matmul(args.threads, args.timeout)
    print(f"matmul {MATMUL_SIZE}^3 float32 (start): median "
          f"{statistics.median(mm_samples) if mm_samples else float('nan'):.1f} GFLOP/s", flush=True)

    results: dict[tuple, dict] = {}
    for n in sizes:
        for impl in impls:
            for mode in modes:
                needs = eager_estimate_gib(n, mode, cfg.heads)
                if impl == "eager" and needs > SKIP_ABOVE_GIB:
                    results[(impl, mode, n)] = {"status": "skip", "needs_gib": needs}
                    continue
                t0 = time.perf_counter()
                spec = {"kind": "model", "impl": impl, "mode": mode, "n": n, "threads": args.threads}
                res = run_child(spec, args.timeout)
                if res["status"] == "ok":
                    total, _ = forward_flops(n, cfg)
                    res["gflops"] = (3 if mode == "train" else 1) * total / res["time_s"] / 1e9
                results[(impl, mode, n)] = res
                summary = (f"{res['time_s']:.2f} s, peak {res['peak_gib']:.2f} GiB, {res['gflops']:.1f} GFLOP/s, "
                           f"cpu util {res['cpu_util']:.2f}"
                           if res["status"] == "ok" else res["status"])
                print(f"  done N={n} {impl} {mode}: {summary} (child wall {time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)

    mm_end = measure_matmul(args.threads, args.timeout)
    all_mm = mm_samples + mm_end
    matmul = statistics.median(all_mm) if all_mm else 0.0
    print(f"matmul {MATMUL_SIZE}^3 float32 (end): median "
          f"{statistics.median(mm_end) if mm_end else float('nan'):.1f} GFLOP/s; "
          f"reference for % = median of all {len(all_mm)} samples = {matmul:.1f} GFLOP/s "
          f"(range {min(all_mm, default=0):.0f}-{max(all_mm, default=0):.0f})\n")

    print_table(sizes, results, matmul)
    print_consistency(sizes, results)
    low = [f"{n} {i} {m} ({r['cpu_util']:.2f})" for (i, m, n), r in results.items()
           if r["status"] == "ok" and r["cpu_util"] < 0.85]
    if low:
        print(f"\ncpu utilisation < 0.85 of {args.threads} threads (other load or memory stalls?): " + ", ".join(low))
    print_summary(results, matmul)

    if args.json:
        payload = {
            "model": MODEL_NAME, "in_dim": IN_DIM, "threads": args.threads, "sizes": sizes,
            "matmul_gflops": matmul, "matmul_samples": all_mm, "train_flops_factor": 3,
            "cells": [{"impl": i, "mode": m, "n": n, **r} for (i, m, n), r in results.items()],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
