"""
Benchmark of the SNCE losses in snce.py against the peers a user would pick instead: forward +
backward median time, ratios measured side by side in one run, peak extra memory, max error.

    python -m support.bench_snce                     # CPU fp32: N=4096 H=256 K=65536 and N=2048 H=128
                                             # K=16384 (D=8), every metric, median of 3
    python -m support.bench_snce --sizes=2048x128x16384x8 --metrics=l2 --reps=5
    python -m support.bench_snce --device=cuda --dtype=bf16 --sizes=16384x1024x131072x8   # GPU target
    OMP_NUM_THREADS=1 python -m support.bench_snce --sizes=2048x128x4096x8 --metrics=l2 --busy=2
                                             # a busy machine: 2 competing busy-loop processes

Rows (each timed as loss + backward to the hidden states and the head weight):
    (1)  F.linear + F.cross_entropy on the hard codes (materialises the (N, K) logits)
    (2)  naive dense SNCE: snce.dense_snce on the materialised q of snce.neighbor_probs (Eq. 5,
         8); the error reference of the soft rows (hard rows are compared with (1))
    (3)  snce_loss on materialised logits
    (4)  fused_linear_snce, eager path (compile=False): the readable reference and fallback
    (5)  fused_linear_snce, compiled chunk kernel (compile=True)
    (6)  fused_linear_snce with the hard codes given (targets=): the repo's hard-label path,
         what train.py --loss=ce runs; the column "x repo hard" divides by it
    (7)  torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (chunked)
    (8)  Apple's Cut Cross-Entropy, torch.compile implementation    (optional install)
    (9)  Liger-Kernel's chunked fused-linear distillation loss (forward KL to SNCE's q through
         a linear teacher on [z, 1]), eager and compiled              (optional install)
Peak extra memory is the rise of the process's peak resident set (CPU; needs Linux /proc) or
of torch.cuda.max_memory_allocated (GPU) over the inputs. The optional peers install with
`pip install --no-deps cut-cross-entropy liger-kernel` (see README); without them their rows
say "not installed".
"""

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from snce import (METRICS, dense_snce, fused_linear_snce, linear_teacher, nearest_code,
                  neighbor_probs, snce_loss)
from support.calibrate import row_entropy


# -----------------------------------------------------------------------------
# the peers (optional imports)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:   # noqa: BLE001  not installed, or installed without what it needs
        return None, f"not installed ({type(e).__name__})"
    return linear_cross_entropy, None


def _liger():
    try:
        from liger_kernel.chunked_loss.fused_linear_distillation import \
            LigerFusedLinearDistillationBase
    except Exception as e:   # noqa: BLE001
        return None, f"not installed ({type(e).__name__})"

    class ForwardKL(LigerFusedLinearDistillationBase):
        """Liger's chunked distillation with the forward KL(q || p) summed over a chunk's rows
        (Liger divides by the row count): the same gradient as SNCE, since SNCE = KL(q || p)
        + H(q) and H(q) does not depend on the model."""

        @staticmethod
        def distillation_loss_fn(student_logits, teacher_logits, **_):
            logp = F.log_softmax(student_logits.float(), -1)
            logq = F.log_softmax(teacher_logits.float(), -1)
            return (logq.exp() * (logq - logp)).sum()

        @classmethod
        def forward(cls, ctx, s_in, s_w, t_in, t_w, target, compiled):
            return LigerFusedLinearDistillationBase.forward(
                cls, ctx, s_in, s_w, t_in, t_w, target, weight_hard_loss=0.0,
                weight_soft_loss=1.0, compute_ce_loss=False, compiled=compiled)

        @staticmethod
        def backward(ctx, grad_output):   # (input, weight, 4 x None)
            return LigerFusedLinearDistillationBase.backward(ctx, grad_output)

    return ForwardKL, None


# -----------------------------------------------------------------------------
# the rows


def methods(h, W, z, C, tau, metric, codes, peers):
    cce, liger = peers
    zt, A = linear_teacher(z, C, tau, metric)     # Liger's teacher: softmax(zt @ A^T) = q

    def ce():
        return F.cross_entropy((h @ W.t()).float(), codes)

    def naive():
        return dense_snce((h @ W.t()).float(), neighbor_probs(z, C, tau, metric)).mean()

    def torch_lce():
        return F.linear_cross_entropy(h, W, codes, options=torch.nn.LinearCrossEntropyOptions())

    rows = {
        "(1) linear + F.cross_entropy": (ce, "hard"),
        "(2) naive dense SNCE": (naive, "soft"),
        "(3) snce_loss(logits)": (lambda: snce_loss(h @ W.t(), z, C, tau, metric), "soft"),
        "(4) fused_linear_snce, eager": (
            lambda: fused_linear_snce(h, W, z, C, tau, metric, compile=False), "soft"),
        "(5) fused_linear_snce, compiled": (
            lambda: fused_linear_snce(h, W, z, C, tau, metric, compile=True), "soft"),
        "(6) fused_linear_snce, hard codes given": (
            lambda: fused_linear_snce(h, W, None, None, 0.0, targets=codes), "hard"),
        "(7) torch linear_cross_entropy, chunked": (torch_lce, "hard"),
        "(8) Cut Cross-Entropy (torch_compile)": (
            (lambda: cce(h, W, codes, impl="torch_compile")) if callable(cce) else cce, "hard"),
    }
    # Liger's loss is the mean KL(q || p); SNCE's is that + the mean entropy H(q): add it back
    # so both rows report the same number (a constant: the gradients are untouched)
    kl_gap = (0.0 if isinstance(liger, str)
              else row_entropy(z, C, tau, metric).double().mean().item())
    for compiled in (False, True):
        name = f"(9) Liger fused linear distillation, {'compiled' if compiled else 'eager'}"
        rows[name] = ((lambda c=compiled: liger.apply(h, W, zt, A, codes, c) + kl_gap)
                      if not isinstance(liger, str) else liger, "soft")
    return rows


# -----------------------------------------------------------------------------
# measuring


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


def problem(N, H, K, D, device, dtype, metric):
    g = torch.Generator(device="cpu").manual_seed(0)
    C = torch.randn(K, D, generator=g)
    codes = torch.randint(0, K, (N,), generator=g)
    z = C[codes] + 0.3 * torch.randn(N, D, generator=g)   # latents near their codes
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    W = (0.02 * torch.randn(K, H, generator=g)).to(device, dtype).requires_grad_()
    z, C = z.to(device), C.to(device)
    return h, W, z, C, nearest_code(z, C, metric)


def bench(N, H, K, D, metric, args, peers):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    h, W, z, C, codes = problem(N, H, K, D, device, dtype, metric)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = methods(h, W, z, C, args.tau, metric, codes, peers)
    peak, result, first = {}, {}, {}
    for name, (fn, _) in rows.items():              # first call: compile, memory, results
        if isinstance(fn, str):
            continue
        h.grad = W.grad = None
        base = _peak_reset(device)
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        sync()
        first[name] = time.perf_counter() - t0
        peak[name] = _peak_read(device) - base
        result[name] = (loss.detach().double(), h.grad.double(), W.grad.double())
    times = {name: [] for name in peak}
    for _ in range(args.reps):                      # interleaved: every row sees the same load
        for name in times:
            h.grad = W.grad = None
            sync()
            t0 = time.perf_counter()
            rows[name][0]().backward()
            sync()
            times[name].append(time.perf_counter() - t0)
    t = {name: statistics.median(v) for name, v in times.items()}
    one, hard = "(1) linear + F.cross_entropy", "(6) fused_linear_snce, hard codes given"
    errs = {}
    busy = f", {args.busy} busy-loop processes beside" if args.busy else ""
    print(f"\nN={N} H={H} K={K} D={D} tau={args.tau} metric={metric}: {device.type} "
          f"({torch.get_num_threads()} threads{busy}), {args.dtype}, median of {args.reps}")
    print("| method | fwd+bwd ms | x (1) | x repo hard | peak extra MB | max abs err | first call s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (fn, kind) in rows.items():
        if isinstance(fn, str):
            print(f"| {name} | {fn} | | | | | |")
            continue
        ref = one if kind == "hard" else "(2) naive dense SNCE"
        err = errs[name] = max((a - b).abs().max().item()
                               for a, b in zip(result[name], result[ref]))
        err = "-" if name == ref else f"{err:.1e}" + (" vs (1)" if kind == "hard" else "")
        print(f"| {name} | {1e3 * t[name]:.0f} | {t[name] / t[one]:.2f} | {t[name] / t[hard]:.2f} "
              f"| {peak[name] / 2**20:.0f} | {err} | {first[name]:.1f} |")
    return t, peak, errs


def main():
    p = argparse.ArgumentParser(description="benchmark the SNCE losses against their peers")
    p.add_argument("--sizes", default="4096x256x65536x8,2048x128x16384x8",
                   help="comma-separated NxHxKxD")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--busy", type=int, default=0,
                   help="start this many busy-loop processes for the run (a shared machine)")
    args = p.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc keeps freed blocks < 32 MB in the heap, so the resident set would remember
        # earlier methods' buffers; a fixed mmap threshold returns them, making VmHWM honest.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, "-m", "support.bench_snce"] + sys.argv[1:])
    peers = tuple(f() for f in (_cce, _liger))
    peers = tuple(mod if mod is not None else why for mod, why in peers)
    with competing_processes(args.busy):
        run_sizes(args, peers)


@contextlib.contextmanager
def competing_processes(n):
    """n busy-loop processes for the duration: a machine shared with other jobs, where OpenMP
    threads that wait for a descheduled peer stall every parallel op."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_sizes(args, peers):
    summary = []
    for size in args.sizes.split(","):
        N, H, K, D = (int(x) for x in size.lower().split("x"))
        for metric in args.metrics.split(","):
            t, peak, _ = bench(N, H, K, D, metric, args, peers)
            one = "(1) linear + F.cross_entropy"
            summary.append((size, metric, t["(5) fused_linear_snce, compiled"]
                            / t["(6) fused_linear_snce, hard codes given"],
                            peak["(5) fused_linear_snce, compiled"] / max(peak[one], 1)))
    print("\n| size NxHxKxD | metric | compiled SNCE x repo hard | peak extra x (1) |")
    print("|---|---|---:|---:|")
    for size, metric, r, m in summary:
        print(f"| {size} | {metric} | {r:.2f} | {m:.3f} |")


if __name__ == "__main__":
    main()
