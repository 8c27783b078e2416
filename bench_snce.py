"""
Benchmark of the SNCE losses in snce.py: forward + backward median time and peak extra memory.

    python bench_snce.py                                   # N=4096 H=256 D=8 K=65536 fp32, CPU
    python bench_snce.py --device=cuda --dtype=bf16 --N=16384 --H=1024 --K=131072   # GPU target
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from snce import METRICS, fused_linear_snce, nearest_code, neighbor_probs, snce_loss



def _bench_methods(h, W, z, C, tau, metric, codes):
    def ce():
        return F.cross_entropy((h @ W.t()).float(), codes)

    def naive():
        q = neighbor_probs(z, C, tau, metric)
        return -(q * (h @ W.t()).float().log_softmax(-1)).sum(-1).mean()

    return {
        "(1) linear + F.cross_entropy": ce,
        "(2) naive dense SNCE": naive,
        "(3) snce_loss(logits)": lambda: snce_loss(h @ W.t(), z, C, tau, metric),
        "(4) fused_linear_snce": lambda: fused_linear_snce(h, W, z, C, tau, metric),
        "(5) fused_linear_snce tau=0": lambda: fused_linear_snce(h, W, z, C, 0.0, metric),
        "(6) fused_linear_snce, hard codes given": lambda: fused_linear_snce(
            h, W, None, None, 0.0, targets=codes),
    }


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM (peak resident set)
        f.write("5")
    return _proc_status("VmRSS")


def _peak_read(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status("VmHWM")


def _proc_status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))


def _bench(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    N, H, K, D = args.N, args.H, args.K, args.D
    C = torch.randn(K, D, generator=g)
    codes = torch.randint(0, K, (N,), generator=g)
    z = C[codes] + 0.3 * torch.randn(N, D, generator=g)   # latents near their codes
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    W = (0.02 * torch.randn(K, H, generator=g)).to(device, dtype).requires_grad_()
    z, C, codes = z.to(device), C.to(device), nearest_code(z, C, args.metric).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, results = [], {}
    for name, fn in _bench_methods(h, W, z, C, args.tau, args.metric, codes).items():
        h.grad = W.grad = None
        base = _peak_reset(device)
        loss = fn()
        loss.backward()
        peak = _peak_read(device) - base
        results[name] = (loss.detach().double(), h.grad.double(), W.grad.double())
        times = []
        for _ in range(args.reps):
            h.grad = W.grad = None
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times), peak))
    t_ce, m_ce = rows[0][1], rows[0][2]
    print(f"\nSNCE fwd+bwd on {device.type} ({torch.get_num_threads()} threads), {args.dtype}, "
          f"N={N} H={H} K={K} D={D} tau={args.tau} metric={args.metric}, median of {args.reps}")
    print("| method | fwd+bwd ms | x (1) | peak extra MB | KB/row | max abs err |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, peak in rows:
        hard = name.startswith(("(5)", "(6)"))
        ref = results[rows[0][0] if hard else rows[1][0]]
        err = max((a - b).abs().max().item() for a, b in zip(results[name], ref))
        err = "-" if name.startswith(("(1)", "(2)")) else f"{err:.1e}" + (" vs (1)" if hard else "")
        print(f"| {name} | {1e3 * t:.0f} | {t / t_ce:.2f} | {peak / 2**20:.0f} | "
              f"{peak / N / 1024:.1f} | {err} |")
    t4, t5, t6, m4 = rows[3][1], rows[4][1], rows[5][1], rows[3][2]
    print(f"\nfused vs (1): time {t4 / t_ce:.2f}x, peak extra memory {m4 / max(m_ce, 1):.3f}x; "
          f"fused SNCE vs its own tau=0 path: {t4 / t5:.2f}x, vs hard codes given: {t4 / t6:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="benchmark the SNCE losses (fwd+bwd time, peak memory)")
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--D", type=int, default=8)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--metric", default="l2", choices=METRICS)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="default: cpu, then cuda when present")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed blocks < 32 MB in the heap, so the resident set would remember
        # earlier methods' buffers; a fixed mmap threshold returns them, making VmHWM honest.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable] + sys.argv)
    devices = [args.device] if args.device else ["cpu"] + ["cuda"] * torch.cuda.is_available()
    for dev in devices:
        args.device = dev
        _bench(args)
