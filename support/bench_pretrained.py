"""
Benchmark of the pretrained tokenizers (pretrained_arch.py) on the CPU, with random weights:
speed and storage error need no real ones. Prints, per named size, the encoder's parameters,
FLOPs per image, CPU encode throughput and the GPU time those FLOPs imply at a stated
utilisation; then, for each latent storage format (latents.py), the bytes per token / image /
dataset, the share of nearest codes the rounding flips, and the total variation it causes in
SNCE's target q (Eq. 5) at a tau calibrated (calibrate.calibrate_tau) to each perplexity, next
to the yardstick of a 10% change of tau. Measured figures belong in README.md with the command.

    python -m support.bench_pretrained
    python -m support.bench_pretrained --names="()" --rows=4096    # the storage table only
Tests: python -m pytest -q tests/test_pretrained.py
"""

import math
import time

import torch

from snce import nearest_code, neighbor_probs
from support.calibrate import calibrate_tau
from support.latents import LATENT_FORMATS, pack_latents, unpack_latents
from support.pretrained_arch import PRETRAINED, PretrainedConfig, PretrainedTokenizer

# -----------------------------------------------------------------------------
# what storing latents in a format does to SNCE's target and to the codes


def storage_error(z, C, tau, fmt, metric="dot"):
    """Total variation 0.5 * sum_k |q_k - q'_k| between SNCE's target q from the latents and q'
    from them stored in `fmt`: (mean, max) over the rows."""
    q = neighbor_probs(z, C, tau, metric)
    q2 = neighbor_probs(unpack_latents(*pack_latents(z, fmt), fmt), C, tau, metric)
    tv = 0.5 * (q - q2).abs().sum(-1)
    return tv.mean().item(), tv.max().item()


def code_flips(z, C, fmt, metric="dot"):
    """Share of latents whose nearest code changes once stored in `fmt`."""
    stored = unpack_latents(*pack_latents(z, fmt), fmt)
    return (nearest_code(z, C, metric) != nearest_code(stored, C, metric)).float().mean().item()


def encoder_flops(model, image_size):
    """FLOPs (2 x multiply-adds) of encode_latents for one image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_latents(torch.zeros(1, model.config.in_channels, image_size, image_size))
    return fc.get_total_flops()


# -----------------------------------------------------------------------------
# the benchmark


def bench(names, batch, image_size, reps, rows, K, D, perplexities, formats, gpu_tflops, gpu_util,
          n_images, seed):
    torch.manual_seed(seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; encode at {image_size} px, "
          f"batch {batch}, best of {reps}")
    for name in names:
        cfg = PretrainedConfig(**{**PRETRAINED[name], "image_size": image_size})
        m = PretrainedTokenizer(cfg).eval()
        flops = encoder_flops(m, image_size)
        x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            m.encode(x)
            best = min(best, time.perf_counter() - t0)
        gpu_s = flops / (gpu_tflops * 1e12 * gpu_util)
        print(f"{name}: encoder {sum(p.numel() for p in m.encoder.parameters()) / 1e6:.1f}M params, "
              f"{flops / 1e9:.0f} GFLOP/image | CPU {batch / best:.2f} img/s | GPU at "
              f"{gpu_util:.0%} of {gpu_tflops:.0f} TFLOP/s: {gpu_s * 1e3:.2f} ms/image, "
              f"{1 / gpu_s:.0f} img/s, {n_images * gpu_s / 3600:.2f} GPU-h per pass over {n_images} images")
        del m
    C = torch.randn(K, D)
    z = torch.randn(rows, D)
    tokens = (image_size // 16) ** 2
    print(f"latent storage, D={D}, {tokens} tokens/image, {n_images} images; SNCE target error "
          f"on random z, C ~ N(0, I) (K={K}, {rows} rows), dot metric, tau set for each perplexity:")
    # one tau per target mean perplexity, the calibration train.py uses (tight rtol: a table row
    # compares formats at the same softness, so tau must not carry calibration slack)
    taus = [calibrate_tau(z, C, p, "dot", rtol=1e-6)[0] for p in perplexities]
    print("format        B/token  KB/image  GB total  code flips  " + "  ".join(
        f"TV@ppl{p:g} (mean/max)" for p in perplexities))
    for fmt in formats:
        per_el, scale = LATENT_FORMATS[fmt]
        b = D * per_el + scale
        errs = "  ".join(f"{m_:.1e}/{x_:.1e}".ljust(len(f"TV@ppl{p:g} (mean/max)"))
                         for p, (m_, x_) in zip(perplexities, (storage_error(z, C, t, fmt) for t in taus)))
        print(f"{fmt:12s}  {b:7d}  {b * tokens / 1024:8.1f}  {b * tokens * n_images / 1e9:8.0f}  "
              f"{code_flips(z, C, fmt):10.1e}  {errs}")
    # yardstick: the same TV from a 10% change of tau
    tv = [0.5 * (neighbor_probs(z, C, t) - neighbor_probs(z, C, 1.1 * t)).abs().sum(-1) for t in taus]
    print("tau -> 1.1 tau (yardstick)                       " + "  ".join(
        f"{v.mean().item():.1e}/{v.max().item():.1e}".ljust(len(f"TV@ppl{p:g} (mean/max)"))
        for p, v in zip(perplexities, tv)))


if __name__ == "__main__":
    from support.common import configure
    names = ("ibq-16384", "llamagen-vq16")   # PRETRAINED sizes to time
    batch = 4                      # images per encode call
    image_size = 256
    reps = 2                       # timed repetitions (best kept)
    rows = 2048                    # random latents for the storage error
    codebook_size = 16384          # K of the random codebook for the storage error
    code_dim = 256                 # D (IBQ's)
    perplexities = (3.0, 30.0, 300.0)
    formats = ("float16", "bfloat16", "float8_e4m3", "int8")
    gpu_tflops = 989.0             # H100 / H200 SXM dense bf16 peak
    gpu_util = 0.4                 # a conv net at batch 64+ under bf16 autocast: a stated assumption
    n_images = 1281167             # ImageNet-1k train
    seed = 0
    configure(globals())
    bench(names, batch, image_size, reps, rows, codebook_size, code_dim, perplexities, formats,
          gpu_tflops, gpu_util, n_images, seed)
