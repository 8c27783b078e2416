"""
Sample a trained generator (train.py) and decode with its tokenizer: a class-conditional grid
PNG, an ADM-format .npz of N samples, and FID against the real dataset (support/fid.py).

    python sample.py config/sample_mnist.py                                  # grid only
    python sample.py config/sample_mnist.py --num_samples=1000 --fid_weights=$W
    torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb_sample.py \
        --ckpt=out/imagenet_ibqb_snce/ckpt.pt --cfg_scale=4.0 --fid_weights=$W
    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do torchrun ... sample.py ... --cfg_scale=$s; done  # CFG sweep
    # multi-node: torchrun --nnodes=2 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
    #   --nproc_per_node=8 sample.py ... (the same arguments)

W is a local Inception TorchScript (support/fid.py says which two kinds work and where to get them).
The npz (uint8 N x H x W x 3 under arr_0, class labels under arr_1; 1-channel MNIST repeated to
3 channels) is what ADM's evaluator reads; it is written atomically, and an existing .npz of
the same name (same directory, count and sampling settings) is never replaced unless
--overwrite=True: sample.py refuses before sampling (use another --out_dir, or move the old
file, to keep both). The grid PNG is replaced (also atomically). Ranks generate disjoint
slices of one memmap (support.common.shard_range), labels are class-balanced (i % num_classes).
FIDs are appended to {out_dir}/fid.jsonl.

The tokenizer is the one the generator was trained with (this repo's or a pretrained IBQ /
Emu3.5 / LlamaGen file, support/pretrained.py): found through the path train.py stored relative
to the run directory, and checked by the content fingerprint stored in the checkpoint (a tokenizer with
other weights decodes the codes into other images, so it is refused).
"""

import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPTConfig
from support import fid
from support.checks import check_seed, check_tokenizer_fits
from support.common import (append_jsonl, atomic_path, check_range, clean_stale_tmp, configure,
                    init_distributed, load_checkpoint, resolve_path, setup_device, shard_range,
                    warn_ignored)
from support.data import new_memmap, save_grid, to_uint8
from support.factorized import join_sub_tokens, make_gpt

# -----------------------------------------------------------------------------
# config
ckpt = "out/train/ckpt.pt"   # generator checkpoint written by train.py
tokenizer_ckpt = ""          # default: the tokenizer the generator was trained with
out_dir = ""                 # default: the checkpoint's directory
use_ema = True               # the EMA weights when the checkpoint has them
classes = ()                 # grid classes; () = the first min(10, num_classes)
per_class = 8                # grid columns
cfg_scale = 2.0              # classifier-free guidance; 1 = off, 0 = unconditional
temperature = 1.0            # softmax temperature; 0 = greedy
top_k = 0                    # 0 = off
top_p = 1.0                  # 1 = off
steps = 8                    # maskgit decoding steps (ignored for ar)
num_samples = 0              # > 0: write an ADM .npz of this many class-balanced samples
overwrite = False            # replace an existing .npz of the same name (else: refuse to run)
batch_size = 64              # per rank
fid_weights = ""             # Inception TorchScript for FID (needs num_samples > 0); "" = no FID
fid_split = "val"            # real split for the reference statistics
fid_cache_dir = "out/fid_refs"  # the real split's reference statistics are cached here
data_root = ""               # folder datasets: default from the encoding's meta.json
seed = 0                     # the grid uses seed, rank r's npz samples seed + 1 + r
device = "cpu"               # cpu | cuda
dtype = "bfloat16"           # autocast dtype on CUDA
config = configure(globals())
# -----------------------------------------------------------------------------

# ---- config checks: bad values are errors ----
for key, lo, lo_open in (("cfg_scale", 0, False), ("num_samples", 0, False), ("batch_size", 1, False),
                         ("per_class", 1, False), ("temperature", 0, True), ("top_k", 0, False),
                         ("top_p", 0, True), ("steps", 1, False)):
    check_range(config, key, lo, 1 if key == "top_p" else None, lo_open)
check_seed(config)
if fid_weights and num_samples == 0:
    raise ValueError("fid_weights needs num_samples > 0 (e.g. --num_samples=50000)")

# ---- the generator (EMA weights by default) ----
ddp, rank, _, world_size, dev = init_distributed(device)
master = rank == 0
_, _, autocast = setup_device(dev, dtype)
ck = load_checkpoint(ckpt, map_location=dev, what="generator checkpoint")
if "model_args" not in ck or "meta" not in ck or "tokenizer_ckpt" not in ck:
    raise ValueError(f"{ckpt} is not a train.py checkpoint (no model_args / meta / tokenizer_ckpt)")
model = make_gpt(GPTConfig(**ck["model_args"])).to(dev).eval()
weights = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
model.load_state_dict(weights)
maskgit = model.config.mode == "maskgit"
if not maskgit:
    warn_ignored(config, _explicit, ("steps",), "an ar generator decodes one token at a time")  # noqa: F821


# ---- its tokenizer, to decode the codes into images ----
def load_tokenizer(ck, dev, verbose=True):
    """The generator's tokenizer (this repo's or a pretrained file: pretrained.load_any_tokenizer),
    refused unless it is the one it was trained with."""
    from support.pretrained import load_any_tokenizer
    path = tokenizer_ckpt or resolve_path(ck["tokenizer_ckpt"], os.path.dirname(os.path.abspath(ckpt)),
                                          f"tokenizer checkpoint named in {ckpt}")
    tok = load_any_tokenizer(path, dev, ck["meta"].get("image_size"), verbose)
    a = ck["model_args"]
    want = {"K": a["vocab_size"], "L": a["levels"], "grid": (a["grid_h"], a["grid_w"])}
    if a.get("level_vocab"):  # train.py's token_groups: sub-tokens of one implicit code per position
        want.update(K=int(np.prod(a["level_vocab"])), L=1)
    check_tokenizer_fits(tok, path, "trained", ckpt, want,
                         ck.get("tokenizer_fingerprint") or ck["meta"].get("tokenizer_fingerprint"),
                         "pass --tokenizer_ckpt= the tokenizer that encoded the generator's training data")
    return tok


tok = load_tokenizer(ck, dev, verbose=master)

# ---- where the outputs go: names carry the sampling settings ----
meta, nc = ck["meta"], model.config.num_classes
out = out_dir or os.path.dirname(os.path.abspath(ckpt))
tag = f"cfg{cfg_scale:g}_t{temperature:g}_k{top_k}_p{top_p:g}" + (
    f"_s{steps}" if maskgit else "") + f"_{'ema' if weights is ck.get('ema') else 'raw'}"
kw = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k or None,
          top_p=top_p if top_p < 1 else None, steps=steps if maskgit else None)
if any(not 0 <= c < nc for c in classes):
    raise ValueError(f"classes: expected ids in [0, {nc}), got {classes}")
npz = os.path.join(out, f"samples_{num_samples}_{tag}.npz")


def check_npz_free(npz):
    """Refuse, before any sampling, to replace a previous run's samples unless --overwrite=True."""
    if os.path.exists(npz) and not overwrite:
        raise FileExistsError(
            f"{npz!r} already exists (samples of this checkpoint directory with the same count and "
            "settings); it is not replaced unless asked: pass --overwrite=True to replace it, or "
            "--out_dir=<another directory> (or move the file away) to keep it")


if num_samples:
    check_npz_free(npz)  # every rank: all of them stop, none waits at a barrier
else:
    warn_ignored(config, _explicit, ("overwrite",), "num_samples=0 writes no .npz")  # noqa: F821


def generate(labels, g):
    """Class labels (b,) -> decoded images (b, C, S, S) in [-1, 1]."""
    with autocast:
        codes = model.generate(labels.to(dev), generator=g, **kw)
        if model.config.level_vocab:  # (b, h, w, G) sub-tokens -> (b, h, w, 1) codes
            codes = join_sub_tokens(codes, model.config.level_vocab)
        return tok.decode(codes).float()


# ---- the grid: one row per class (rank 0) ----
if master:
    cls = list(classes) or list(range(min(10, nc)))
    g = torch.Generator(dev).manual_seed(seed)
    path = os.path.join(out, f"grid_{tag}.png")
    save_grid(generate(torch.tensor(cls).repeat_interleave(per_class), g), path, per_class)
    print(f"wrote {path} (classes {cls}, {per_class} each)")

# ---- num_samples > 0: class-balanced samples into the .npz, each rank its slice, then FID ----
if num_samples:
    features = fid.load_inception(fid_weights, dev) if fid_weights else None  # fail before sampling
    if features:
        fid.check_num_samples(num_samples, features.dim)
    S = tok.config.image_size
    tmp = npz + ".tmp.npy"  # one name all ranks open; a killed run's is overwritten
    err = None
    if master:
        os.makedirs(out, exist_ok=True)
        clean_stale_tmp(npz)
        shape = (num_samples, S, S, 3)  # and room for the .npz copied from it (uncompressed)
        try:  # space reserved up front: a full disk is an error now, not a SIGBUS midway
            new_memmap(tmp, shape, np.uint8, f"{num_samples} samples and {npz}",
                       extra_bytes=int(np.prod(shape)) + 8 * num_samples)
        except OSError as e:
            err = e
    if ddp:  # every rank learns whether rank 0 could make the file: no rank waits forever
        flag = torch.tensor(int(err is not None), device=dev)
        dist.broadcast(flag, 0)
        if flag.item() and err is None:
            raise SystemExit(f"rank {rank}: rank 0 could not create {tmp} (its error says why)")
    if err is not None:
        raise err
    if ddp:
        dist.barrier()
    arr = np.load(tmp, mmap_mode="r+")
    labels = torch.arange(num_samples) % nc  # class-balanced
    lo, hi = shard_range(num_samples, rank, world_size)
    g = torch.Generator(dev).manual_seed(seed + 1 + rank)
    stats = fid.FeatureStats(features.dim, dev) if features else None
    for i in tqdm(range(lo, hi, batch_size), disable=not master, desc=f"sampling (rank 0: {hi - lo})"):
        x = to_uint8(generate(labels[i:min(i + batch_size, hi)], g))  # (b, S, S, 3)
        arr[i:i + len(x)] = x.cpu().numpy()
        if stats is not None:
            stats.add(features(x))
    arr.flush()
    if ddp:
        dist.barrier()
    if master:  # np.savez streams a memmap into the zip in chunks: bounded memory at 50k x 256^2
        with atomic_path(npz) as part, open(part, "wb") as f:
            np.savez(f, arr_0=arr, arr_1=labels.numpy())
        os.remove(tmp)
        print(f"wrote {npz}: arr_0 {arr.shape} uint8, arr_1 labels")
    if features:
        mu, sigma = stats.all_reduce().mu_sigma()
        ref = fid.reference_stats(features, meta["dataset"], fid_split, S, data_root or meta.get("data_root", ""),
                                  fid_weights, fid_cache_dir, batch_size, rank, world_size, dev)
        value = fid.frechet_distance(mu, sigma, *ref)
        if master:
            print(f"FID {value:.3f} ({num_samples} samples vs {meta['dataset']} {fid_split}, {tag})")
            append_jsonl(os.path.join(out, "fid.jsonl"), {"fid": value, "num_samples": num_samples, "ckpt": ckpt,
                                                          "iter": ck["iter"], "split": fid_split, **kw})
    if ddp:
        dist.destroy_process_group()
