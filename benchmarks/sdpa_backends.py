"""Which scaled_dot_product_attention backend runs for QG-MIL's attention, and how close it gets to the chip's peak.

    python benchmarks/sdpa_backends.py [--device cuda] [--sizes 10000,25000,50000,100000] [--peak-tflops 989]

For each bag size N, QG-MIL's default attention shape (1 bag, 8 heads, head_dim 64) in bf16 (float32 on CPU):
  * the backend PyTorch dispatches to by default, read from the kernel names a profiler records;
  * every backend forced in turn (flash, cuDNN, memory-efficient; math only up to 16k, it builds the N x N
    matrix), forward and forward+backward time and achieved TFLOP/s;
  * a whole QG-MIL training step (forward, backward, fused AdamW) at the same N under bf16 autocast, and the
    share of it the attention forward+backward takes, which says what limits the model's FLOP rate.
FLOPs: attention forward 4 N^2 d_head heads, backward 2.5x forward (the FlashAttention papers' accounting).
The peak is the device's dense bf16 rate (looked up by name for common datacenter GPUs, else --peak-tflops).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qgmil import create_model
from qgmil.train.loop import adamw

HEADS, HEAD_DIM, IN_DIM = 8, 64, 1024
MATH_LIMIT = 16_384
DENSE_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
KERNEL_HINTS = [("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "mem_eff"), ("efficient", "efficient"),
                ("efficient", "fmha"), ("math", "bmm")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernel selection, autotuning, allocator
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def qkv(n: int, device: torch.device, dtype: torch.dtype, grad: bool):
    return [torch.randn(1, HEADS, n, HEAD_DIM, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def default_backend(n: int, device: torch.device, dtype: torch.dtype) -> str:
    """The backend the default dispatch picks, named from the kernels the profiler saw."""
    q, k, v = qkv(n, device, dtype, grad=False)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        F.scaled_dot_product_attention(q, k, v)
        sync(device)
    names = " ".join(event.key.lower() for event in prof.key_averages())
    for backend, hint in KERNEL_HINTS:
        if hint in names:
            return backend
    return "unknown"


def attention_row(n: int, backend: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    flops_fwd = 4 * n * n * HEAD_DIM * HEADS
    row = {"N": n, "backend": backend}
    if backend == "math" and n > MATH_LIMIT:
        return {**row, "status": f"skipped (N x N matrix past {MATH_LIMIT})"}
    q, k, v = qkv(n, device, dtype, grad=True)
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad(), sdpa_kernel([BACKENDS[backend]]):
            F.scaled_dot_product_attention(q, k, v)

    def train():
        with sdpa_kernel([BACKENDS[backend]]):
            F.scaled_dot_product_attention(q, k, v).backward(grad_out)

    try:
        fwd = timed(forward, device, repeats)
        both = timed(train, device, repeats)
    except RuntimeError as error:  # this backend does not support the shape, dtype or device
        return {**row, "status": f"unavailable ({str(error).splitlines()[0][:70]})"}
    return {**row, "status": "ok", "fwd_ms": fwd * 1e3, "fwd_tflops": flops_fwd / fwd / 1e12,
            "fwdbwd_ms": both * 1e3, "fwdbwd_tflops": 3.5 * flops_fwd / both / 1e12}


def model_step(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    model = create_model("qgmil", in_dim=IN_DIM, num_classes=2).to(device)
    optimizer = adamw([{"params": list(model.parameters())}], lr=1e-4, weight_decay=1e-4)
    x = torch.randn(1, n, IN_DIM, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x).logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(step, device, repeats)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="10000,25000,50000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device (default: by name)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [int(s) for s in args.sizes.split(",")]
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; heads {HEADS} x head_dim {HEAD_DIM}; "
          f"dense peak {peak or 'unknown'} TFLOP/s")

    print("\n| N | default backend | forced backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|")
    best_share = {}
    for n in sizes:
        chosen = default_backend(n, device, dtype)
        for backend in BACKENDS:
            row = attention_row(n, backend, device, dtype, args.repeats)
            if row["status"] != "ok":
                print(f"| {n} | {chosen} | {backend} | {row['status']} | | | | |")
                continue
            share = row["fwdbwd_tflops"] / peak if peak else None
            best_share[n] = max(best_share.get(n, 0.0), share or 0.0)
            print(f"| {n} | {chosen} | {backend} | {row['fwd_ms']:.2f} | {row['fwd_tflops']:.1f} | "
                  f"{row['fwdbwd_ms']:.2f} | {row['fwdbwd_tflops']:.1f} | "
                  f"{f'{share:.0%}' if share is not None else '-'} |")

    print("\n| N | QG-MIL train step ms | attention fwd+bwd ms (default) | attention share |")
    print("|---|---|---|---|")
    for n in sizes:
        step = model_step(n, device, dtype, args.repeats)
        q, k, v = qkv(n, device, dtype, grad=True)
        grad_out = torch.randn_like(q)
        attn = timed(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad_out), device, args.repeats)
        print(f"| {n} | {step * 1e3:.1f} | {attn * 1e3:.1f} | {attn / step:.0%} |")
    if peak:
        for n, share in best_share.items():
            if n >= 50_000:
                print(f"  [{'PASS' if share >= 0.5 else 'MISS'}] N={n}: best attention fwd+bwd at {share:.0%} "
                      f"of the dense bf16 peak (target 50%)")


if __name__ == "__main__":
    main()
