"""
Train the class-conditional generator (model.py) on tokenizer codes with CE, SNCE or label
smoothing. Reads the memmaps + meta.json of an encoded split (codes (N, h, w, L), latents
(N, h, w, D) float16 or int8 + scale, labels (N,); format in data.py), one for training and one
held out, or encodes the images batch by batch (data_source=images, below). The tokenizer (codebooks for SNCE, decoder for the grids) is this repo's or a
pretrained IBQ / Emu3.5 / LlamaGen file (pretrained.load_any_tokenizer).

    python train.py config/train_mnist.py                          # one process, CPU
    python train.py config/train_mnist.py --loss=ce --out_dir=out/train_mnist_ce
    python train.py config/train_mnist.py --init_from=resume       # continue a killed run exactly
    python train.py config/train_mnist.py --init_from=resume --max_iters=3000 --lr_decay_iters=3000
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py
    # multi-node (on each of 4 nodes; NODE = 0..3, HOST = node 0's address):
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py

Encoding on the fly (data_source=images; data.OnTheFlySplit): no memmaps; train.py reads the
images (data.get_dataset: mnist | folder, the dataset tokenizer_ckpt was trained on unless given)
and encodes each batch as it is read, under no_grad (bf16 autocast on CUDA, as encode.py): the
latents z in float32 are SNCE's target and the codes are the tokenizer's quantize(z). No disk, an
encoder forward per image per step instead; each rank encodes only its own rows, num_workers
DataLoader workers read the batches ahead, random_flip mirrors each training image with
probability 1/2 drawn anew each epoch from (seed, epoch, image index). Another data source,
dataset or split is another run to a resume (refused); moved images (data_root) are not.

    python train.py config/train_mnist.py --data_source=images \
        --tokenizer_ckpt=out/tokenizer_mnist/ckpt.pt --out_dir=out/train_mnist_fly
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq262144.py \
        --data_source=images --tokenizer_ckpt=/ckpt/imagenet256_262144.ckpt --dataset=folder \
        --data_root=/data/imagenet --image_size=256 --random_flip=True --num_workers=8 \
        --out_dir=out/imagenet_ibq262144_fly

Objectives (`--loss`; paper: "Geometry-Aware Supervision for Scalable Discrete Image
Generation"). Each token is a class over the K codes of its RQ level; per level l:
  ce    hard CE on the stored code t_l: -log p(t_l)
  ls    label smoothing: targets (1 - eps) one-hot + eps / K (the paper's Appendix 7.2 baseline)
  snce  soft targets q(k | r_l) = softmax_k(-d(r_l, C_l[k]) / tau) (Eq. 5), loss
        -sum_k q(k) log p(k) (Eq. 7-8), where r_l = z - sum_{j<l} C_j[t_j] is the residual level
        l quantized, rebuilt from the stored latents z and codes (tokenizer.residuals_from: a
        gather and an exclusive cumulative sum; no re-encoding), d the tokenizer's metric.
Every objective goes through snce.fused_linear_snce_levels (all RQ levels in one call), so (tokens x K) logits never exist. The
logged objective is the token mean over levels; the eval also logs the held-out hard-label NLL
(the same number whatever the objective, so runs compare).

SNCE's softness: tau is in the tokenizer's distance units, so by default (tau = 0) train.py
calibrates one tau per level at startup (calibrate.calibrate_tau, bisection on log tau) so that
the target's mean perplexity exp H(q) over a fixed sample of training residuals is
target_perplexity (the number of codes it spreads over; 25 unless given). Whatever sets tau
(calibrated, --tau, tau_scale=gap), the mean / median perplexity and mean top-1 mass of q per
level are printed, stored in ckpt.pt ("q_info") and logged as the first log.jsonl record
({"iter": 0, "snce_target": ...}); a resume reuses the stored taus.

    python train.py config/study/train.py --target_perplexity=95 --out_dir=out/study/p95
    python train.py config/study/train.py --eval_classifier=out/mnist_classifier/ckpt.pt

Sample metrics (MNIST): with eval_classifier (a mnist_classifier.py checkpoint), every eval also
generates eval_samples class-balanced samples (grid_* settings, fixed noise) and logs their
conditional accuracy and Frechet LeNet distance to the val digits (sample_accuracy,
sample_accuracy_per_class, sample_fld, sample_seconds).

Run directory (out_dir): ckpt.pt (written atomically at every eval, iteration 0 included),
log.jsonl (one JSON record per logged step or eval; pandas.read_json(path, lines=True)) and
samples_<iter>.png grids. A scratch run refuses a directory that already holds a run. A resume
cuts log.jsonl back to the checkpoint (atomically) and continues bit-exactly: the global RNG is
reseeded from (seed, step, rank) at every step and the data order is a function of (seed,
epoch, rank, position) (common.batch_indices), so no RNG state is saved. The tokenizer is
identified by a hash of its weights (meta.json's tokenizer_fingerprint, stored in ckpt.pt too),
and its path is stored relative to out_dir, so a run directory can be moved.

Step-time split: every log line and log record (ms_data, ms_forward, ms_loss, ms_backward,
ms_optimizer, beside ms_per_iter) carries ms per step spent in data loading, the transformer
forward, the loss, the backward and the optimizer (clip, AdamW, EMA); on the fly, data loading
includes reading the images and the tokenizer's encoder. The fused loss computes
its gradients chunk by chunk in its forward (snce.fused_linear_snce_levels), so "loss" is the loss's
whole cost and "backward" is the transformer's (DDP's all-reduce included). On CUDA the split
is measured on the logged steps only (it synchronizes the device between phases); on the CPU
on every step. Evals are not counted.
"""

import copy
import os
import resource
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from support import data
from support.calibrate import calibrate_tau, q_stats
from support.common import (append_jsonl, batch_indices, batches_per_epoch, check_choice, check_range,
                    check_resume, config_diff, configure, init_distributed, lr_at, load_checkpoint,
                    portable_path, prepare_run_dir, read_jsonl, resolve_path, resume_decay_iters,
                    rewrite_jsonl, save_checkpoint, setup_device, step_seed, warn_ignored)
from model import GPT, MASK_SCHEDULES, MODELS, MODES, GPTConfig
from support.pretrained import load_any_tokenizer, open_tokenizer
from snce import METRICS, dissimilarity, fused_linear_snce_levels
from tokenizer import residuals_from

# -----------------------------------------------------------------------------
# config (defaults: a small CPU run on MNIST-5k; config/*.py set real runs)
out_dir = "out/train"
data_dir = "out/tokenizer_mnist/encoded_train"  # encoded training split
val_dir = "out/tokenizer_mnist/encoded_val"      # held-out split, same tokenizer
tokenizer_ckpt = ""          # default: the one named in data_dir/meta.json; data_source=images: required
data_source = "encoded"      # encoded: encode.py's memmaps in data_dir / val_dir; images: read the
                             # images and encode each batch with tokenizer_ckpt as it is read (no
                             # disk; the encoder's forward is counted in ms_data). The options below
                             # are for images
dataset = ""                 # mnist | folder; default: the one tokenizer_ckpt was trained on
                             # (pretrained files record none: required)
data_root = ""               # folder: {data_root}/{split}/<class>/*; default: the tokenizer's
image_size = 0               # pretrained files: required (256 for the public releases); this
                             # repo's tokenizers carry theirs
train_split = "train"        # split names as data.get_dataset takes them
val_split = "val"
random_flip = False          # mirror each training image with probability 1/2, drawn anew every
                             # epoch from (seed, epoch, image index): a resume mirrors the same ones
num_workers = 0              # DataLoader workers reading (decoding, resizing) batches ahead
init_from = "scratch"        # scratch | resume (from out_dir/ckpt.pt)
# model (model.py); sizes from MODELS
model_size = "mini"          # tiny | mini | S | B | IBQ-B
mode = "ar"                  # ar | maskgit
class_dropout = 0.1          # label -> null class, for classifier-free guidance
dropout = 0.0
bias = False
mask_schedule = "cosine"     # maskgit only
# objective
loss = "snce"                # ce | snce | ls
tau = 0.0                    # SNCE temperature (Eq. 5) in the tokenizer's distance units (the
                             # paper's best: 1.0 for its IBQ dot-product tokenizer); 0 = calibrate
                             # one tau per level to target_perplexity (calibrate.py)
target_perplexity = 25.0     # with tau = 0: the mean exp(H(q)) over a fixed sample of training
                             # residuals, i.e. how many codes a target spreads over (1 = CE, K =
                             # uniform). Unlike tau it transfers between tokenizers. On MNIST-5k
                             # with one VQ level of K = 16,384 (the README's Results, 400 steps)
                             # perplexity ~5 gave the best held-out NLL, ~95 (top-1 mass 0.20) the
                             # best FID, and ~25 (top-1 mass 0.44) was the one setting better than
                             # CE on both (NLL 6.125 vs 6.175, FID 161.6 vs 172.5)
tau_scale = "none"           # none: tau as is (the paper: one level); gap: level l uses tau times
                             # the median gap d(2nd nearest) - d(nearest) of its residuals, since
                             # RQ residuals shrink level by level and one absolute tau can't fit all
metric = ""                  # l2 | cos | dot; default: the tokenizer's (meta.json)
label_smoothing = 0.1        # eps of loss=ls
# optimization
batch_size = 64              # per rank, per micro-step
gradient_accumulation_steps = 1  # global: divided by the world size
max_iters = 2000
lr_decay_iters = 0           # cosine length; 0 = max_iters. Stored in ckpt.pt: a resume keeps it
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.05          # on matrices only (model.configure_optimizers)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0              # 0 = off
ema_decay = 0.0              # EMA of weights, e.g. 0.9999; 0 = off. Samples use the EMA.
# eval / logging
eval_interval = 250
eval_iters = 0               # val batches per rank per eval; 0 = the whole val split
log_interval = 1
grid_classes = ()            # classes in the eval sample grid; () = the first min(10, C)
grid_per_class = 4
grid_cfg_scale = 2.0
grid_temperature = 1.0
grid_top_k = 0               # 0 = no top-k
grid_steps = 8               # maskgit decoding steps
eval_classifier = ""         # an MNIST classifier checkpoint (mnist_classifier.py): at every eval,
                             # conditional accuracy and Frechet LeNet distance of generated samples
eval_samples = 1000          # samples per eval for those metrics, class-balanced (grid_* settings)
eval_samples_at_start = True # False: no sample metrics at iter 0 (an untrained model's are chance)
# system
device = "cpu"               # cpu | cuda
dtype = "bfloat16"           # autocast dtype on CUDA (bfloat16 | float32); CPU runs in float32
compile = False              # torch.compile the model
seed = 1337
config = configure(globals())
# -----------------------------------------------------------------------------

# ---- config checks: bad values are errors, options this run ignores are warnings ----
check_choice(config, "loss", ("ce", "snce", "ls"))
check_choice(config, "init_from", ("scratch", "resume"))
check_choice(config, "model_size", tuple(MODELS))
check_choice(config, "mode", MODES)
check_choice(config, "mask_schedule", MASK_SCHEDULES)
check_choice(config, "tau_scale", ("none", "gap"))
check_choice(config, "metric", ("",) + METRICS)
check_choice(config, "data_source", ("encoded", "images"))
for key, lo, hi, lo_open, hi_open in (
        ("batch_size", 1, None, False, False), ("gradient_accumulation_steps", 1, None, False, False),
        ("max_iters", 0, None, False, False), ("lr_decay_iters", 0, None, False, False),
        ("warmup_iters", 0, None, False, False), ("learning_rate", 0, None, True, False),
        ("min_lr", 0, None, False, False), ("weight_decay", 0, None, False, False),
        ("beta1", 0, 1, False, True), ("beta2", 0, 1, False, True), ("grad_clip", 0, None, False, False),
        ("ema_decay", 0, 1, False, True), ("eval_interval", 1, None, False, False),
        ("eval_iters", 0, None, False, False), ("log_interval", 1, None, False, False),
        ("grid_per_class", 1, None, False, False), ("grid_top_k", 0, None, False, False),
        ("grid_steps", 1, None, False, False), ("grid_temperature", 0, None, True, False),
        ("grid_cfg_scale", 0, None, False, False), ("tau", 0, None, False, False),
        ("target_perplexity", 0, None, False, False), ("eval_samples", 2, None, False, False),
        ("label_smoothing", 0, 1, False, True), ("class_dropout", 0, 1, False, False),
        ("dropout", 0, 1, False, True), ("image_size", 0, None, False, False),
        ("num_workers", 0, None, False, False)):
    check_range(config, key, lo, hi, lo_open, hi_open)
SNCE_KEYS = ("tau", "target_perplexity", "tau_scale", "metric")  # what sets the SNCE target
if loss == "ce":
    warn_ignored(config, _explicit, SNCE_KEYS + ("label_smoothing",),  # noqa: F821
                 "loss=ce trains on the stored codes (hard labels)")
elif loss == "ls":
    warn_ignored(config, _explicit, SNCE_KEYS,  # noqa: F821
                 "loss=ls smooths the stored codes uniformly (label_smoothing is its eps)")
else:
    warn_ignored(config, _explicit, ("label_smoothing",), "loss=snce takes soft targets from tau")  # noqa: F821
    if tau > 0 and target_perplexity > 0 and "target_perplexity" in _explicit:  # noqa: F821
        raise ValueError(f"tau={tau} and target_perplexity={target_perplexity}: give one (tau=0 "
                         "calibrates tau to target_perplexity; target_perplexity=0 with tau > 0 uses tau)")
    if tau == 0 and not target_perplexity > 1:
        raise ValueError(f"tau=0 calibrates tau to target_perplexity, which must be > 1 (1 = CE's "
                         f"one-hot target), got {target_perplexity}")
    if tau == 0 and tau_scale != "none":
        raise ValueError(f"tau_scale={tau_scale!r} scales a given tau per level; with tau=0 each "
                         "level's tau is calibrated to target_perplexity: set tau_scale=none")
if not eval_classifier:
    warn_ignored(config, _explicit, ("eval_samples", "eval_samples_at_start"), "no eval_classifier to score samples with")  # noqa: F821
if mode == "ar":
    warn_ignored(config, _explicit, ("mask_schedule", "grid_steps"), "mode=ar never masks")  # noqa: F821
IMAGE_KEYS = ("dataset", "data_root", "image_size", "train_split", "val_split", "random_flip", "num_workers")
if data_source == "encoded":
    warn_ignored(config, _explicit, IMAGE_KEYS, "data_source=encoded reads data_dir / val_dir")  # noqa: F821
else:
    warn_ignored(config, _explicit, ("data_dir", "val_dir"), "data_source=images encodes the images on the fly")  # noqa: F821
    check_choice(config, "dataset", ("", "mnist", "folder"))
    if not tokenizer_ckpt:
        raise ValueError("data_source=images: expected tokenizer_ckpt, the tokenizer that encodes each "
                         "batch (a train_tokenizer.py ckpt.pt or a pretrained IBQ / Emu3.5 / LlamaGen "
                         "file), got ''")

ddp, rank, local_rank, world_size, device = init_distributed(device)
master = rank == 0
device_type, ptdtype, autocast = setup_device(device, dtype)
if gradient_accumulation_steps % world_size:
    raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a "
                     f"multiple of the world size {world_size}")
accum = gradient_accumulation_steps // world_size
ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
if master:  # first, before any work: never train into (and later overwrite) another run
    prepare_run_dir(out_dir, init_from)

# ---- data: the encoded splits (or the images, encoded batch by batch as they are read), checked
# against each other and against the tokenizer ----
if data_source == "encoded":
    meta, codes_mm, latents_mm, labels_mm = data.load_encoded(data_dir)
    val_meta, vcodes_mm, vlatents_mm, vlabels_mm = data.load_encoded(val_dir)
    train_name, val_name = data_dir, val_dir
else:  # the tokenizer comes first: it makes the data (data.OnTheFlySplit; meta as encode.py's)
    tok_path = tokenizer_ckpt
    tok, tok_info = open_tokenizer(tok_path, device, image_size or None, verbose=master)
    tok_fp = tok.requires_grad_(False).fingerprint()
    ds_name, ds_root = data.tokenizer_dataset(tok_path, tok_info, dataset, data_root)
    fly = dict(device=device, autocast=autocast, num_workers=num_workers, fingerprint=tok_fp,
               relative_to=out_dir)
    meta, codes_mm, latents_mm, labels_mm = data.open_on_the_fly(
        tok, tok_info, tok_path, ds_name, train_split, ds_root, flip_seed=seed if random_flip else None, **fly)
    val_meta, vcodes_mm, vlatents_mm, vlabels_mm = data.open_on_the_fly(
        tok, tok_info, tok_path, ds_name, val_split, ds_root, **fly)
    train_name, val_name = (f"{ds_name} split {s!r} (encoded on the fly)" for s in (train_split, val_split))


def tokenizer_id(m, encode_dir):
    """Which tokenizer encoded a split: the hash of its weights (meta 'tokenizer_fingerprint');
    encodings that predate it only name a checkpoint path and iteration."""
    if "tokenizer_fingerprint" in m:
        return m["tokenizer_fingerprint"]
    return os.path.normpath(os.path.join(encode_dir, m.get("tokenizer_ckpt", ""))), m.get("tokenizer_iter")


same = ("codebook_size", "levels", "code_dim", "metric", "num_classes", "classes")
split_diff = config_diff(meta, val_meta, same)
if tokenizer_id(meta, train_name) != tokenizer_id(val_meta, val_name):
    split_diff["tokenizer"] = (tokenizer_id(meta, train_name), tokenizer_id(val_meta, val_name))
if split_diff or codes_mm.shape[1:] != vcodes_mm.shape[1:]:
    raise ValueError(f"{train_name} and {val_name} were encoded differently (train, val): {split_diff}"
                     f"{'' if split_diff else f', codes {codes_mm.shape[1:]} vs {vcodes_mm.shape[1:]}'}. "
                     + ("Encode both splits with the same tokenizer checkpoint and dataset"
                        if data_source == "encoded" else "Both splits need the same classes"))
N, grid_h, grid_w, L = codes_mm.shape
K, D, num_classes = meta["codebook_size"], meta["code_dim"], meta["num_classes"]
metric = metric or meta["metric"]
if any(not 0 <= c < num_classes for c in grid_classes):
    raise ValueError(f"grid_classes: expected class ids in [0, {num_classes}), got {grid_classes}")
batch_indices(N, seed, 0, rank, world_size, batch_size)  # raises if N can't fill one batch per rank

# ---- the tokenizer: its codebooks give SNCE's targets, its decoder the sample grids. On the fly
# there is nothing to check: its codes are its own and the meta is made from it ----
if data_source == "encoded":
    for name, c, y in (("train", codes_mm, labels_mm), ("val", vcodes_mm, vlabels_mm)):
        c_max = max(int(c[i:i + 65536].max()) for i in range(0, len(c), 65536))  # chunks: bounded memory
        if c_max >= K or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
            raise ValueError(f"{name} data: expected codes in [0, {K}) and labels in [0, {num_classes}) "
                             f"(meta.json), got max code {c_max}, labels in [{y.min()}, {y.max()}]")
    tok_path = tokenizer_ckpt or resolve_path(meta["tokenizer_ckpt"], data_dir,
                                              f"tokenizer checkpoint named in {data_dir}/meta.json")
    tok = load_any_tokenizer(tok_path, device, meta.get("image_size"), verbose=master).requires_grad_(False)
    tok_fp = tok.fingerprint()
    tc, where = tok.config, f"tokenizer {tok_path} vs {data_dir}/meta.json"
    if (tc.codebook_size, tc.levels, tc.code_dim, tok.grid, tok.grid) != (K, L, D, grid_h, grid_w):
        raise ValueError(f"{where}: the tokenizer has K={tc.codebook_size} L={tc.levels} D={tc.code_dim} "
                         f"grid {tok.grid}x{tok.grid}, the data K={K} L={L} D={D} grid {grid_h}x{grid_w}: "
                         "point --tokenizer_ckpt at the tokenizer that encoded the data")
    if meta.get("tokenizer_fingerprint", tok_fp) != tok_fp:
        raise ValueError(f"{where}: the data was encoded by another tokenizer (fingerprint "
                         f"{meta['tokenizer_fingerprint']}, this one's {tok_fp}): re-encode, or point "
                         "--tokenizer_ckpt at the tokenizer that encoded it")
    # encode quantized the float16 latents, so these codebooks must give the codes; int8 storage keeps
    # the tokenizer's own codes and records the share its rounding flips (stored_code_flips, ~1.7% at
    # D = 256): allow twice that (64 images of 256 tokens measure it to about +-0.1%). Another
    # tokenizer's codebooks agree on ~1/K of the codes, so the check still catches a wrong one.
    n_check = min(64, N)
    z_check = torch.from_numpy(np.array(latents_mm[:n_check])).float().to(device)
    agree = (tok.quantize(z_check).cpu() == torch.from_numpy(np.asarray(codes_mm[:n_check]).astype(np.int64))).float().mean()
    need = 0.99 - 2 * meta.get("stored_code_flips", 0.0)
    if agree < need:
        raise ValueError(f"{where}: the tokenizer's codebooks reproduce only {agree:.1%} of the stored "
                         f"codes (expected >= {need:.1%}): wrong tokenizer checkpoint?")
codebooks = tok.codebooks.detach().float() if loss == "snce" else None  # (L, K, D)


def on_device(rows, np_dtype=None):
    """Rows of a memmap (numpy, cast to np_dtype) or of an on-the-fly split (tensors, already on
    the device and typed) -> a tensor on the device."""
    if not torch.is_tensor(rows):
        rows = torch.from_numpy(rows if np_dtype is None else rows.astype(np_dtype))
    return rows.to(device, non_blocking=True)


def get_batch(codes_src, latents_src, labels_src, idx):
    """-> codes (B, h, w, L) long, residuals (B, h*w*L, D) fp32 (snce only), labels (B,).
    On the fly (data_source=images) the three reads encode the batch once."""
    codes = on_device(codes_src[idx], np.int64)
    labels = on_device(labels_src[idx], np.int64)
    res = None
    if loss == "snce":  # r_l = z - sum_{j<l} C_j[t_j], token order (h, w, L) like the model's
        z = on_device(latents_src[idx])
        res = residuals_from(z, codes, codebooks).reshape(len(idx), -1, D)
    return codes, res, labels


Q_ROWS = 4096  # training residuals per level behind the calibrated taus and the q statistics


def q_sample(n_rows=Q_ROWS):
    """Residuals (n, L, D) fp32 of every token of ceil(n_rows / (h*w)) training images spread
    evenly over the split (encoded splits may be sorted by class, MNIST-5k is). Fixed rows, not
    drawn from `seed`: every rank, and every seed of a study, gets the same taus."""
    n_img = min(N, -(-n_rows // (grid_h * grid_w)))
    idx = np.unique(np.linspace(0, N - 1, n_img).round().astype(np.int64))
    return get_batch(codes_mm, latents_mm, labels_mm, idx)[1].view(-1, L, D)


def level_taus(res, chunk=256):
    """Per-level temperatures (L,) floats from the residual sample res (n, L, D), and a phrase
    saying how. tau = 0: calibrate.calibrate_tau per level (bisection on log tau until the mean
    perplexity is target_perplexity). tau_scale=gap: tau * the median of d(r_l, 2nd nearest
    code) - d(r_l, nearest code); the softmax of Eq. 5 only sees differences of d, so this gap
    is the natural unit. Otherwise tau on every level."""
    if tau == 0:
        if target_perplexity >= K:
            raise ValueError(f"target_perplexity={target_perplexity}: expected a value below K={K} "
                             f"(K = a uniform target over the codebook of {train_name})")
        return ([calibrate_tau(res[:, l], codebooks[l], target_perplexity, metric)[0] for l in range(L)],
                f"calibrated to mean perplexity {target_perplexity:g}")
    if tau_scale == "none":
        return [float(tau)] * L, "given"
    gaps = []
    for l in range(L):
        top2 = torch.cat([dissimilarity(r, codebooks[l], metric).topk(2, largest=False).values
                          for r in res[:, l].split(chunk)])
        gaps.append(float(tau * (top2[:, 1] - top2[:, 0]).median().clamp_min(1e-12)))
    return gaps, f"tau_scale=gap: {tau:g} x each level's median gap"


def snce_target(taus=None):
    """-> {"taus", "how", "rows", "levels": per level calibrate.q_stats (mean / median
    perplexity exp H(q), mean top-1 mass)} on the fixed residual sample. taus given (a resume
    of a checkpoint without stored statistics): only the statistics are computed."""
    t0, res = time.time(), q_sample()
    taus, how = (taus, "from the checkpoint") if taus else level_taus(res)
    levels = [q_stats(res[:, l], codebooks[l], taus[l], metric) for l in range(L)]
    if master:
        print(f"snce target: {time.time() - t0:.1f} s for the taus and q statistics")
    return {"taus": taus, "how": how, "rows": len(res), "levels": levels}


def report_target(info):
    """Print q's softness per level; warn when it is nearly uniform or nearly one-hot."""
    print(f"snce target q ({info['how']}; statistics over {info['rows']} training residuals per level):")
    for l, (t, st) in enumerate(zip(info["taus"], info["levels"])):
        print(f"  level {l}: tau {t:.4g} | perplexity exp H(q) mean {st['perplexity_mean']:.1f} median "
              f"{st['perplexity_median']:.1f} (K={K}) | top-1 mass mean {st['top1_mass_mean']:.3f}")
        if st["perplexity_mean"] > K / 4:
            print(f"warning: level {l}: q is nearly uniform (mean perplexity {st['perplexity_mean']:.0f} "
                  f"of K={K} codes at tau={t:.4g}): SNCE then teaches little about the data; tau is in "
                  "the tokenizer's distance units, so use a smaller one or --tau=0 --target_perplexity=25")
        elif st["top1_mass_mean"] > 0.99:
            print(f"warning: level {l}: q is nearly one-hot (mean top-1 mass {st['top1_mass_mean']:.3f} "
                  f"at tau={t:.4g}): SNCE is then CE; use a larger tau or --tau=0 --target_perplexity=25")

# ---- model, optimizer, and the checkpoint we continue from ----
model_args = dict(mode=mode, vocab_size=K, levels=L, grid_h=grid_h, grid_w=grid_w,
                  num_classes=num_classes, class_dropout=class_dropout, dropout=dropout, bias=bias,
                  mask_schedule=mask_schedule, **MODELS[model_size])
# what the run learns from; on the fly also which images: another source, dataset or split is
# another run (data_root may change: the images moved)
data_id = {"tokenizer_fingerprint": tok_fp, "data_source": data_source, **{k: meta.get(k) for k in same},
           **({"dataset": meta["dataset"], "split": meta["split"]} if data_source == "images" else {})}
iter_num, decay_iters, eval_logged = 0, lr_decay_iters or max_iters, False
ck = None
if init_from == "resume":
    ck = load_checkpoint(ckpt_path, map_location=device, what="generator checkpoint")
    missing = [k for k in ("model", "optimizer", "iter", "model_args", "meta", "config") if k not in ck]
    if missing:
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint (missing {missing})")
    if mode == "ar":  # ar never masks: keep the checkpoint's mask_schedule whatever is set now
        model_args["mask_schedule"] = ck["model_args"].get("mask_schedule", mask_schedule)
    # older checkpoints: compare the meta keys they have (a re-encoding may add "classes")
    saved_id = ck.get("data_id") or {k: ck["meta"][k] for k in same if k in ck["meta"]}
    saved_id = {"data_source": "encoded", **saved_id}  # checkpoints from before data_source
    diff = config_diff(ck["model_args"], asdict(GPTConfig(**model_args)), ck["model_args"])
    diff.update(config_diff(saved_id, data_id, saved_id))
    check_resume(ckpt_path, diff)
    if (ck.get("ema") is None) != (ema_decay == 0):
        raise ValueError(f"init_from=resume: ema_decay={ema_decay} but the checkpoint {ckpt_path} "
                         f"{'has no' if ck.get('ema') is None else 'has an'} EMA")
    requested = decay_iters if "lr_decay_iters" in _explicit else None  # noqa: F821
    decay_iters, msg = resume_decay_iters(ck, requested, max_iters, ckpt_path)
    if msg and master:
        print(msg)
    changed = config_diff({"random_flip": False, **ck["config"]}, config, ("seed", "loss") + SNCE_KEYS + (
        "label_smoothing", "batch_size", "learning_rate", "random_flip"))
    if ck.get("world_size") != world_size:
        changed["world_size"] = (ck.get("world_size"), world_size)
    if changed and master:
        print(f"note: resuming with changed settings (checkpoint, now): {changed}; from here the "
              "run differs from one trained with either setting throughout")
    iter_num = ck["iter"]
# ---- SNCE's target: per-level taus and how soft q is at them; a resume reuses the stored ones ----
q_info, q_fresh = None, False
if loss == "snce":
    if (ck is not None and "taus" in ck and ck["config"].get("loss") == "snce"
            and not config_diff(ck["config"], config, SNCE_KEYS)):
        q_info = ck.get("q_info") or snce_target(ck["taus"])
    else:
        q_info, q_fresh = snce_target(), True
taus = q_info["taus"] if q_info else [float(tau)] * L
gptconf = GPTConfig(**model_args)
model_args = asdict(gptconf)
torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
raw_model = GPT(gptconf).to(device)
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
ema = copy.deepcopy(raw_model).requires_grad_(False) if ema_decay > 0 else None
if ck is not None:
    raw_model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if ema is not None:
        ema.load_state_dict(ck["ema"])
    del ck
if master:
    if init_from == "resume":  # the log continues from the checkpoint: later records are redone
        records = read_jsonl(log_path)
        keep = [r for r in records if r.get("iter", 0) <= iter_num  # q_fresh: a new target
                and not (q_fresh and r.get("iter") == iter_num and "snce_target" in r)]  # record
        rewrite_jsonl(log_path, keep)  # atomic, and drops a partial last line a kill left
        eval_logged = any(r["iter"] == iter_num and "val_nll" in r for r in keep)
    q_record = {"iter": iter_num, "snce_target": q_info} if q_fresh else None
    if q_record and init_from == "resume":  # the target from iter_num on; a scratch run logs it
        append_jsonl(log_path, q_record)    # after its first checkpoint (a run dir starts with it)
        q_record = None
    tokens_per_iter = gradient_accumulation_steps * batch_size * gptconf.seq_len
    print(f"{mode} {model_size}: {raw_model.num_params() / 1e6:.2f}M params, K={K}, T={gptconf.seq_len} "
          f"({grid_h}x{grid_w}x{L}), loss={loss}" + (f" tau={', '.join(f'{t:.3g}' for t in taus)} metric={metric}" if loss == "snce" else "")
          + f", {N} train images{' (encoded on the fly)' if data_source == 'images' else ''}, {tokens_per_iter} tokens/iter, world {world_size}, device {device}")
    if q_info:
        report_target(q_info)
if ddp:  # every rank must agree on whether the first eval is redone (it is a collective)
    flag = torch.tensor(int(eval_logged), device=device)
    dist.broadcast(flag, 0)
    eval_logged = bool(flag.item())
model = torch.compile(raw_model) if compile else raw_model
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def level_losses(hidden, codes, res, mask, kind=loss):
    """Per-level loss sums (L,) and counted tokens (L,). hidden (B, T, H) is viewed as
    (B, h*w, L, H): level l's rows get q from r_l against codebook l (Eq. 5, kind='snce'), or
    hard targets from the stored codes (kind='ce', or 'ls' smoothed by label_smoothing)."""
    B, H = hidden.shape[0], hidden.shape[-1]
    hid, cod = hidden.view(B, -1, L, H), codes.view(B, -1, L)
    msk = None if mask is None else mask.view(B, -1, L)
    w, b = raw_model.head.weight, raw_model.head.bias   # under no_grad the loss does no grad work
    if kind == "snce":  # one call for all levels: one fp32 grad_weight accumulator (K, H), not L
        kw = dict(latents=res.view(B, -1, L, D), codebooks=codebooks, taus=taus, metric=metric)
    else:
        kw = dict(latents=None, codebooks=None, taus=0.0, targets=cod,
                  label_smoothing=label_smoothing if kind == "ls" else 0.0)
    sums = fused_linear_snce_levels(hid, w, bias=b, mask=msk, reduction="sum", **kw)
    counts = (torch.full((L,), hid.shape[0] * hid.shape[1], device=hidden.device) if msk is None
              else msk.sum((0, 1)))
    return sums, counts


def hidden_states(net, codes, labels, mask):
    """The transformer's last hidden states (B, T, H) under autocast. The fused loss turns
    autocast off and runs its (rows x K) matmuls in the dtype of `hidden`, so `.to(ptdtype)` is
    what makes them bf16 on CUDA (its softmax statistics stay fp32 inside); a no-op in fp32."""
    with autocast:
        return net(codes, labels, mask, return_hidden=True).to(ptdtype)


def all_sum(x):
    if ddp:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def evaluate():
    """Held-out hard-label token NLL (CE on the stored codes: the same number whatever the
    training objective, so runs compare) and the training objective, per level too. All ranks
    take part on disjoint val batches; maskgit masks are seeded per batch so evals repeat."""
    raw_model.eval()
    n_val, totals = len(vcodes_mm), torch.zeros(3, L, device=device, dtype=torch.float64)
    order = torch.randperm(n_val, generator=torch.Generator().manual_seed(seed)).numpy()  # a fixed
    starts = list(range(rank * batch_size, n_val, world_size * batch_size))[: eval_iters or None]
    batches = [np.sort(order[s:s + batch_size]) for s in starts]  # a fixed subset when eval_iters
    if data_source == "images":
        vcodes_mm.source.prefetch(batches)
    for s, idx in zip(starts, batches):
        codes, res, labels = get_batch(vcodes_mm, vlatents_mm, vlabels_mm, idx)
        mask = None
        if mode == "maskgit":
            g = torch.Generator(device).manual_seed(seed + 7919 * (s + 1))
            mask = raw_model.sample_mask(len(idx), generator=g)
        hidden = hidden_states(raw_model, codes, labels, mask)
        nll, n = level_losses(hidden, codes, None, mask, kind="ce")
        obj, _ = level_losses(hidden, codes, res, mask) if loss != "ce" else (nll, n)
        totals += torch.stack([nll, obj, n.to(nll.dtype)]).double()
    totals = all_sum(totals)
    n = totals[2].clamp_min(1)  # (L,) counted tokens per level
    raw_model.train()
    return {"val_nll": (totals[0].sum() / n.sum()).item(), "val_loss": (totals[1].sum() / n.sum()).item(),
            "val_nll_levels": (totals[0] / n).tolist()}


@torch.no_grad()
def generate_images(labels, chunk=500):
    """Samples for labels (B,) from the EMA (or raw) model at the grid_* settings, decoded:
    (B, C, S, S) fp32 on the CPU. The generator is seeded with `seed`, so every eval draws the
    same noise; `chunk` samples per call bound the KV cache (chunk x T x layers)."""
    g = torch.Generator(device).manual_seed(seed)
    net = ema if ema is not None else raw_model
    images = []
    for lab in labels.split(chunk):
        with autocast:
            codes = net.generate(lab, cfg_scale=grid_cfg_scale, temperature=grid_temperature,
                                 top_k=grid_top_k or None, steps=grid_steps if mode == "maskgit" else None,
                                 generator=g)
            images.append(tok.decode(codes).float().cpu())
    return torch.cat(images)


def save_sample_grid(path):
    """Class-conditional samples (rows = classes) from the EMA (or raw) model, decoded."""
    classes = list(grid_classes) or list(range(min(10, num_classes)))
    labels = torch.tensor(classes, device=device).repeat_interleave(grid_per_class)
    data.save_grid(generate_images(labels), path, nrow=grid_per_class)


# ---- sample metrics at every eval: a classifier of the real digits scores generated ones ----
clf, clf_ref = None, None  # the classifier; (mu, sigma) of its features on the val images
if eval_classifier:
    from support.mnist_classifier import IMAGE_SHAPE, NUM_CLASSES, conditional_accuracy, feature_stats, \
        frechet_lenet_distance, load_classifier
    decoded = (tok.config.in_channels, tok.config.image_size, tok.config.image_size)
    if decoded != IMAGE_SHAPE or num_classes > NUM_CLASSES:
        raise ValueError(f"eval_classifier={eval_classifier!r} scores {IMAGE_SHAPE} images of at most "
                         f"{NUM_CLASSES} classes (MNIST); this tokenizer decodes {decoded} images of "
                         f"{num_classes} classes")
    if master:
        clf = load_classifier(eval_classifier, device)


@torch.no_grad()
def sample_metrics():
    """eval_samples class-balanced samples (class i % C for sample i), the same noise at every
    eval; -> conditional accuracy (overall, per class) and the Frechet LeNet distance to the
    images of the val split (real images, from the dataset val_dir was encoded from; their
    feature statistics are computed at the first call and kept)."""
    global clf_ref
    t0 = time.time()
    if clf_ref is None:
        ds, _, _ = data.get_dataset(val_meta["dataset"], val_meta.get("split", "val"), tok.config.image_size,
                                    val_meta.get("data_root", ""))
        clf_ref = feature_stats(clf, torch.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.arange(eval_samples) % num_classes
    images = generate_images(labels.to(device))
    acc = conditional_accuracy(clf, images, labels)
    return {"sample_accuracy": acc["accuracy"], "sample_accuracy_per_class": acc["per_class"][:num_classes],
            "sample_fld": frechet_lenet_distance(clf, images, clf_ref),
            "sample_seconds": time.time() - t0}


def save():
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": None if ema is None else ema.state_dict(), "iter": iter_num,
                     "model_args": model_args, "config": config, "meta": meta, "data_id": data_id,
                     "tokenizer_ckpt": portable_path(tok_path, out_dir), "tokenizer_fingerprint": tok_fp,
                     "lr_decay_iters": decay_iters, "world_size": world_size, "taus": taus,
                     "q_info": q_info},
                    ckpt_path)


PHASES = ("data", "forward", "loss", "backward", "optimizer")


class StepTimer:
    """Wall time per phase of a training step, summed over the steps it measured. CUDA runs
    asynchronously, so a phase boundary must synchronize: done only on the steps it measures."""

    def __init__(self):
        self.ms, self.steps, self.on = dict.fromkeys(PHASES, 0.0), 0, False

    def start(self, on):
        self.on = on
        self.steps += on
        self.t = self._now()

    def _now(self):
        if self.on and device_type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase):
        if self.on:
            t = self._now()
            self.ms[phase] += 1000 * (t - self.t)
            self.t = t

    def pop(self):
        """-> {phase: ms per measured step} since the last pop."""
        out = {k: v / max(1, self.steps) for k, v in self.ms.items()}
        self.__init__()
        return out


# ---- the loop ----
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t_last, tok_seen, start_iter, last_log, timer = time.time(), 0, iter_num, iter_num, StepTimer()
if data_source == "images":  # workers read the training batches ahead, in the loop's order
    codes_mm.source.prefetch(batch_indices(N, seed, s, rank, world_size, batch_size)
                             for s in range(iter_num * accum, max_iters * accum))
while True:
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not (iter_num == start_iter and eval_logged):
        t_eval = time.time()
        ev = evaluate()
        if master:
            grid_path = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
            save_sample_grid(grid_path)
            if clf is not None and (iter_num > 0 or eval_samples_at_start):
                ev.update(sample_metrics())
            print(f"eval {iter_num}: val nll {ev['val_nll']:.4f} | val {loss} {ev['val_loss']:.4f} | "
                  f"per level {' '.join(f'{x:.3f}' for x in ev['val_nll_levels'])} | {grid_path}"
                  + (f" | {eval_samples} samples: accuracy {ev['sample_accuracy']:.3f}, FLD "
                     f"{ev['sample_fld']:.2f} ({ev['sample_seconds']:.1f} s)" if "sample_fld" in ev else ""))
            if iter_num != start_iter or init_from == "scratch":  # else the checkpoint is this state
                save()
            if q_record:  # the first record of a scratch run's log
                append_jsonl(log_path, q_record)
                q_record = None
            append_jsonl(log_path, {"iter": iter_num, **ev, "grid": portable_path(grid_path, out_dir)})
        t_last += time.time() - t_eval  # eval time is not training throughput
    if iter_num >= max_iters:
        break
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(step_seed(seed, iter_num, rank, world_size))  # class dropout, masks, dropout
    logged = (iter_num + 1) % log_interval == 0 or iter_num + 1 == max_iters
    timer.start(on=device_type == "cpu" or logged)
    objective = torch.zeros((), device=device)  # this step's training objective, token mean
    for micro in range(accum):
        step = iter_num * accum + micro  # batches counted over the run
        if data_source == "images":  # the epoch decides which images random_flip mirrors
            codes_mm.source.set_epoch(step // batches_per_epoch(N, world_size, batch_size))
        codes, res, labels = get_batch(codes_mm, latents_mm, labels_mm,
                                       batch_indices(N, seed, step, rank, world_size, batch_size))
        mask = raw_model.sample_mask(batch_size) if mode == "maskgit" else None
        timer.lap("data")
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        hidden = hidden_states(model, codes, labels, mask)
        timer.lap("forward")
        sums, n = level_losses(hidden, codes, res, mask)
        micro_objective = sums.sum() / n.sum() / accum  # DDP averages over ranks: / accum per rank
        timer.lap("loss")
        micro_objective.backward()
        objective += micro_objective.detach()
        timer.lap("backward")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
    timer.lap("optimizer")
    iter_num += 1
    tok_seen += accum * batch_size * gptconf.seq_len
    if logged:
        train_objective = all_sum(objective.clone()).item() / world_size
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt, t_last = time.time() - t_last, time.time()
        tok_s = tok_seen * world_size / dt  # all ranks
        tok_seen, split, ms_per_iter = 0, timer.pop(), dt * 1000 / (iter_num - last_log)
        if master:
            mem = (torch.cuda.max_memory_allocated() if device_type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
            mfu = f" | mfu {100 * raw_model.estimate_mfu(tok_s / world_size):.1f}%" if device_type == "cuda" else ""
            print(f"iter {iter_num} | loss {train_objective:.4f} | lr {lr:.2e} | gnorm {grad_norm.item():.2f} | "
                  f"{ms_per_iter:.0f} ms/it ("
                  + " ".join(f"{k} {v:.0f}" for k, v in split.items())
                  + f") | {tok_s:,.0f} tok/s{mfu} | peak mem {mem:.2f} GB")
            append_jsonl(log_path, {"iter": iter_num, "loss": train_objective, "lr": lr,
                                    "grad_norm": grad_norm.item(), "tok_per_s": tok_s, "peak_mem_gb": mem,
                                    "ms_per_iter": ms_per_iter, **{f"ms_{k}": v for k, v in split.items()}})
        last_log = iter_num

if data_source == "images":  # stop the loader workers
    codes_mm.source.close()
    vcodes_mm.source.close()
if ddp:  # DDP keeps replicas identical; check it (cheap, once), so a silent divergence can't hide
    flat = torch.cat([p.detach().flatten().float() for p in raw_model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if master:
        print(f"ddp: max |weight difference| between ranks = {diff.item():.3g}")
    del model  # the DDP reducer holds the process group: free it first (clean gloo teardown)
    dist.barrier()
    dist.destroy_process_group()
