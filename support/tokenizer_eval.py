"""
Evaluation of a tokenizer (tokenizer.py) on a dataset: reconstruction PSNR, latent power,
per-level quantization error and code usage, the numbers train_tokenizer.py logs at every
eval_interval and writes to metrics.json. Apart from tokenizer.py because it reads data
(data.batch_loader) and runs under torch.distributed; tokenizer.py holds the per-batch metrics
(psnr, usage_stats) it sums.

    from support.tokenizer_eval import evaluate
    metrics, (x, recon) = evaluate(tok, val_ds, batch_size=64, max_images=2000)

Tests: python -m pytest -q tests/test_tokenizer.py
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist

from support.common import ddp_initialized, shard_range
from support.data import batch_loader
from tokenizer import psnr, usage_stats


@torch.no_grad()
def evaluate(model, ds, batch_size, max_images=None, device="cpu", autocast=nullcontext(),
             num_workers=0):
    """Reconstruction and code usage on (up to max_images of) ds: PSNR (mean over images), the
    latent power E||z||^2 and per-level quantization error E||r_{l+1}||^2 (means over latent
    positions; the error should fall with l), and utilization / perplexity of each level's
    histogram over all codes. The images are a fixed random subset (seed 0: class-sorted
    datasets still give mixed recon grids), split across ranks, sums all-reduced.
    -> (metrics dict, (x, recon) of this rank's first batch or None)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp_initialized() else (0, 1)
    model.eval()
    L, K = model.config.levels, model.config.codebook_size
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:max_images]
    lo, hi = shard_range(len(order), rank, world)
    # sums over images: [psnr, images, ||z||^2 per image] + ||r_{l+1}||^2 per image, per level
    tot, hist, first = torch.zeros(3 + L, device=device), torch.zeros(L * K, device=device), None
    for x, _ in batch_loader(ds, order[lo:hi].split(batch_size), num_workers, device):
        with autocast:
            recon, _, codes, res = model(x)
        after = res - model.quantizer.lookup(codes)               # r_{l+1} = r_l - C_l[t_l]
        per_image = len(codes) // len(x)                          # h * w latent positions
        tot[:3] += torch.stack([psnr(recon, x).sum(), x.new_tensor(float(len(x))),
                                res[:, 0].float().pow(2).sum() / per_image])
        tot[3:] += after.float().pow(2).sum(-1).sum(0) / per_image
        hist += torch.bincount((codes + torch.arange(L, device=device) * K).flatten(), minlength=L * K)
        first = (x, recon) if first is None else first
    if ddp_initialized():
        dist.all_reduce(tot), dist.all_reduce(hist)
    util, ppl = usage_stats(hist.view(L, K))
    model.train()
    n = tot[1].clamp_min(1)
    return {"psnr": (tot[0] / n).item(), "latent_power": (tot[2] / n).item(), "images": int(tot[1]),
            "qerr": (tot[3:] / n).tolist(), "util": util.tolist(), "ppl": ppl.tolist()}, first

