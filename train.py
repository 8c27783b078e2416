"""
Train the class-conditional generator (model.py) on a tokenizer's codes with CE, label smoothing
or SNCE (soft targets q(k | r_l) = softmax_k(-d(r_l, C_l[k]) / tau) from the tokenizer's own
geometry, Eq. 5, loss -sum_k q(k) log p(k), Eq. 8), every objective through
snce.fused_linear_snce_levels: all RQ levels in one call, the (tokens x K) logits never exist.
Data: an encoded training split and a held-out one (support/encode.py's memmaps, support/data.py) or,
with --data_source=images, the images encoded batch by batch as they are read. README.md's
"Generator" section describes the run directory, exact resume, the step-time split of each log
line, and how soft the SNCE target is (tau, or --target_perplexity).

    python train.py config/train_mnist.py                          # one process, CPU
    python train.py config/train_mnist.py --loss=ce --out_dir=out/train_mnist_ce
    python train.py config/train_mnist.py --init_from=resume       # continue a killed run exactly
    python train.py config/study/train.py --target_perplexity=95 --out_dir=out/study/p95
    python train.py config/train_mnist.py --data_dir=$ENC/train --val_dir=$ENC/val \
        --tokenizer_ckpt=imagenet_256_L.ckpt --token_groups=6,12 --tau=0.5   # LFQ codes, two heads
    python train.py config/train_mnist.py --data_source=images \
        --tokenizer_ckpt=out/tokenizer_mnist/ckpt.pt --out_dir=out/train_mnist_fly
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py config/train_mnist.py \
        --gradient_accumulation_steps=2 --out_dir=out/train_mnist_ddp    # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq262144.py
    # multi-node (on each of 4 nodes; NODE = 0..3, HOST = node 0's address):
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py config/imagenet_ibq262144.py
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

from model import MODELS, GPTConfig
from snce import fused_linear_snce_levels
from support import data
from support.checks import (SPLIT_KEYS, check_distinct_splits, check_encoding_tokenizer, check_finite_step,
                            check_replicas, check_resume_checkpoint, check_splits, check_train_config,
                            data_identity, resume_changes)
from support.common import (append_jsonl, batch_indices, batches_per_epoch, init_distributed,
                            load_checkpoint, lr_at, portable_path, prepare_run_dir, read_jsonl, resolve_path,
                            resume_decay_iters, rewrite_jsonl, save_checkpoint, setup_device, step_seed)
from support.config import configure
from support.factorized import TokenGroups, make_gpt
from support.geometry_control import control_generator, control_level_losses
from support.pretrained import load_any_tokenizer, open_tokenizer
from support.sample_metrics import load_scorer, real_feature_stats, score_samples
from support.snce_target import (report_target, sample_rows, saved_target_setting, snce_target,
                                 target_setting)
from support.step_timer import StepTimer
from tokenizer import residuals_from

# -----------------------------------------------------------------------------
# config (defaults: a small CPU run on MNIST-5k; config/*.py set real runs)
out_dir = "out/train"
data_dir = "out/tokenizer_mnist/encoded_train"  # encoded training split
val_dir = "out/tokenizer_mnist/encoded_val"      # held-out split, same tokenizer
tokenizer_ckpt = ""          # default: the one named in data_dir/meta.json; data_source=images: required
data_source = "encoded"      # encoded: encode.py's memmaps in data_dir / val_dir | images: encode batches as read
dataset = ""                 # images: mnist | folder; default: the one tokenizer_ckpt was trained on
data_root = ""               # images, folder: {data_root}/{split}/<class>/*; default: the tokenizer's
image_size = 0               # images: required for pretrained tokenizers (256 for the public releases)
train_split = "train"        # images: split names as data.get_dataset takes them
val_split = "val"            # images: the held-out split
random_flip = False          # images: mirror each training image with prob. 1/2, drawn from (seed, epoch)
num_workers = 0              # images: DataLoader workers reading batches ahead
init_from = "scratch"        # scratch | resume (from out_dir/ckpt.pt)
# model (model.py); sizes from MODELS
model_size = "mini"          # tiny | mini | S | B | IBQ-B
mode = "ar"                  # ar | maskgit
class_dropout = 0.1          # label -> null class, for classifier-free guidance
dropout = 0.0                # in the transformer blocks
bias = False                 # biases in Linear and LayerNorm
mask_schedule = "cosine"     # maskgit only
# objective
loss = "snce"                # ce | snce | ls | control (SNCE's softness on random codes: geometry_control.py)
tau = 1.0                    # SNCE temperature (Eq. 5), in the tokenizer's distance units (paper: 1, IBQ, dot)
target_perplexity = 0.0      # > 0: calibrate one tau per level so mean exp H(q) equals it, instead of tau
tau_scale = "none"           # none: tau as is | gap: level l uses tau x its median nearest-code gap
metric = ""                  # l2 | cos | dot; default: the tokenizer's (meta.json)
label_smoothing = 0.1        # eps of loss=ls
token_groups = ()            # implicit codes (LFQ / FSQ): sub-token sizes in dims, e.g. 6,12: a head each
# optimization
batch_size = 64              # per rank, per micro-step
gradient_accumulation_steps = 1  # global: divided by the world size
max_iters = 2000             # training steps
lr_decay_iters = 0           # cosine length; 0 = max_iters. Stored in ckpt.pt: a resume keeps it
learning_rate = 1e-3         # peak, after linear warmup
min_lr = 1e-4                # the cosine's floor
warmup_iters = 100           # linear warmup steps
weight_decay = 0.05          # on matrices only (model.configure_optimizers)
beta1 = 0.9                  # AdamW
beta2 = 0.95                 # AdamW
grad_clip = 1.0              # 0 = off
ema_decay = 0.0              # EMA of weights, e.g. 0.9999; 0 = off. Samples use the EMA.
# eval / logging
eval_interval = 250          # steps between evals (each writes ckpt.pt and a sample grid)
eval_iters = 0               # val batches per rank per eval; 0 = the whole val split
log_interval = 1             # steps between log lines / records
grid_classes = ()            # classes in the eval sample grid; () = the first min(10, C)
grid_per_class = 4           # grid columns
grid_cfg_scale = 2.0         # classifier-free guidance of the eval samples
grid_temperature = 1.0       # sampling temperature of the eval samples
grid_top_k = 0               # 0 = no top-k
grid_steps = 8               # maskgit decoding steps
eval_classifier = ""         # an MNIST classifier checkpoint: every eval scores eval_samples samples
eval_samples = 1000          # samples per eval for those metrics, class-balanced (grid_* settings)
eval_samples_at_start = True # False: no sample metrics at iter 0 (an untrained model's are chance)
# system
device = "cpu"               # cpu | cuda
dtype = "bfloat16"           # autocast dtype on CUDA (bfloat16 | float32); CPU runs in float32
compile = False              # torch.compile the model
seed = 1337                  # init, data order, dropout and masks all derive from it
config = configure(globals())
check_train_config(config, _explicit)  # noqa: F821 (configure sets it): bad values raise, ignored ones warn
# -----------------------------------------------------------------------------

# ---- processes and devices: DDP iff torchrun set RANK ----
ddp, rank, local_rank, world_size, device = init_distributed(device)
master = rank == 0
device_type, ptdtype, autocast = setup_device(device, dtype)
if gradient_accumulation_steps % world_size:  # the global micro-step count, split among the ranks
    raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the "
                     f"world size {world_size} (it counts micro-steps over all ranks): pass "
                     f"--gradient_accumulation_steps={-(-gradient_accumulation_steps // world_size) * world_size}")
accum = gradient_accumulation_steps // world_size
ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
prepare_run_dir(out_dir, init_from)  # every rank, before any work: lock out_dir, never overwrite another run

# ---- data: the encoded splits, or the images encoded batch by batch (on_the_fly.OnTheFlySplit) ----
if data_source == "encoded":
    meta, codes_mm, latents_mm, labels_mm = data.load_encoded(data_dir)
    val_meta, vcodes_mm, vlatents_mm, vlabels_mm = data.load_encoded(val_dir)
    train_name, val_name = data_dir, val_dir
    check_distinct_splits(data_dir, val_dir, meta, val_meta, labels_mm, vlabels_mm)
else:  # the tokenizer comes first: it makes the data (meta as encode.py's)
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
check_splits(meta, val_meta, codes_mm, vcodes_mm, train_name, val_name, on_the_fly=data_source == "images")
N, grid_h, grid_w, L = codes_mm.shape
K, D, num_classes = meta["codebook_size"], meta["code_dim"], meta["num_classes"]
metric = metric or meta["metric"]
if any(not 0 <= c < num_classes for c in grid_classes):
    raise ValueError(f"grid_classes: expected class ids in [0, {num_classes}), got {grid_classes}")
batch_indices(N, seed, 0, rank, world_size, batch_size)  # raises if N can't fill one batch per rank

# ---- the tokenizer: its codebooks give SNCE's targets, its decoder the sample grids. On the fly
# there is nothing to check: its codes are its own and the meta is made from it ----
if data_source == "encoded":
    tok_path = tokenizer_ckpt or resolve_path(meta["tokenizer_ckpt"], data_dir,
                                              f"tokenizer checkpoint named in {data_dir}/meta.json")
    tok = load_any_tokenizer(tok_path, device, meta.get("image_size"), verbose=master).requires_grad_(False)
    tok_fp = check_encoding_tokenizer(tok, tok_path, data_dir, meta, codes_mm, latents_mm)
soft = loss in ("snce", "control")  # targets from the latents: q of Eq. 5 (control: q permuted)
# factorised heads (support/factorized.py): each position's implicit code (L = 1) becomes G
# sub-tokens laid out as G levels (h, w, G), sub-token g's target the marginal q_g of Eq. 5
groups = TokenGroups(tok, token_groups, L, D, device) if token_groups else None
if groups:
    groups.check_options(loss, target_perplexity, tau_scale, metric)
    L = len(token_groups)
codebooks = tok.codebooks.detach().float() if soft and not groups else None  # (L, K, D)


def on_device(rows, np_dtype=None):
    """Rows of a memmap (numpy, cast to np_dtype) or of an on-the-fly split (tensors, already on
    the device and typed) -> a tensor on the device."""
    if not torch.is_tensor(rows):
        rows = torch.from_numpy(rows if np_dtype is None else rows.astype(np_dtype))
    return rows.to(device, non_blocking=True)


def get_batch(codes_src, latents_src, labels_src, idx):
    """-> codes (B, h, w, L) long, residuals (B, h*w*L, D) fp32 (snce only), labels (B,).
    On the fly (data_source=images) the three reads encode the batch once. token_groups: codes
    (B, h, w, G) sub-tokens and the latents z (B, h*w, D) themselves."""
    codes = on_device(codes_src[idx], np.int64)
    codes = groups.split(codes) if groups else codes
    labels = on_device(labels_src[idx], np.int64)
    res = None
    if soft:  # r_l = z - sum_{j<l} C_j[t_j] (a gather and an exclusive cumsum), token order (h, w, L)
        z = data.finite_rows(latents_src[idx], idx, latents_src)  # NaN would make q (Eq. 5) NaN
        z = on_device(z)
        res = (z if groups else residuals_from(z, codes, codebooks)).reshape(len(idx), -1, D)
    return codes, res, labels


def residual_sample():
    """The residuals (n, L, D) behind SNCE's taus and q statistics: every token of a fixed set of
    training images spread over the split (snce_target.sample_rows)."""
    return get_batch(codes_mm, latents_mm, labels_mm, sample_rows(N, grid_h * grid_w))[1].view(-1, L, D)


# ---- model, optimizer, and the checkpoint we continue from ----
model_args = dict(mode=mode, vocab_size=max(groups.level_vocab) if groups else K, levels=L,
                  **({"level_vocab": groups.level_vocab} if groups else {}), grid_h=grid_h, grid_w=grid_w,
                  num_classes=num_classes, class_dropout=class_dropout, dropout=dropout, bias=bias,
                  mask_schedule=mask_schedule, **MODELS[model_size])
# what the run learns from; on the fly also which images: another source, dataset or split is
# another run (data_root may change: the images moved)
data_id = {"tokenizer_fingerprint": tok_fp, "data_source": data_source, **{k: meta.get(k) for k in SPLIT_KEYS},
           **data_identity(meta, N, labels_mm if data_source == "encoded" else None)}
iter_num, decay_iters, eval_logged = 0, lr_decay_iters or max_iters, False
ck, same_target = None, False
if init_from == "resume":
    ck = load_checkpoint(ckpt_path, map_location=device, what="generator checkpoint")
    if mode == "ar":  # ar never masks: keep the checkpoint's mask_schedule whatever is set now
        model_args["mask_schedule"] = ck.get("model_args", {}).get("mask_schedule", mask_schedule)
    check_resume_checkpoint(ck, ckpt_path, asdict(GPTConfig(**model_args)), data_id, ema_decay, train_name)
    requested = decay_iters if "lr_decay_iters" in _explicit else None  # noqa: F821
    decay_iters, msg = resume_decay_iters(ck, requested, max_iters, ckpt_path)
    if msg and master:
        print(msg)
    same_target = ck["config"].get("loss") == loss and saved_target_setting(ck) == target_setting(config)
    changed = resume_changes(ck, config, world_size)
    if changed and master:
        print(f"note: resuming with changed settings (checkpoint, now): {changed}; from here the "
              "run differs from one trained with either setting throughout")
    iter_num = ck["iter"]
# ---- SNCE's target: per-level taus on a fixed sample of training residuals, and how soft q is
# at them (support/snce_target.py); a resume with the same setting reuses the stored taus ----
q_info, q_fresh = None, False
if soft and not groups:  # token_groups: tau as given, for every group
    if ck is not None and "taus" in ck and same_target:
        q_info = ck.get("q_info") or snce_target(residual_sample(), codebooks, metric, taus=ck["taus"], verbose=master)
    else:
        setting = dict(tau=tau, tau_scale=tau_scale, target_perplexity=target_perplexity)
        q_info, q_fresh = snce_target(residual_sample(), codebooks, metric, setting, verbose=master), True
taus = q_info["taus"] if q_info else [float(tau)] * L
gptconf = GPTConfig(**model_args)
model_args = asdict(gptconf)
torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
raw_model = make_gpt(gptconf).to(device)
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
          f"({grid_h}x{grid_w}x{L}), loss={loss}"
          + (f" tau={', '.join(f'{t:.3g}' for t in taus)} metric={metric}" if soft else "")
          + f", {N} train images{' (encoded on the fly)' if data_source == 'images' else ''}, "
          f"{tokens_per_iter} tokens/iter, world {world_size}, device {device}")
    if q_info:
        report_target(q_info, K)
if ddp:  # every rank must agree on whether the first eval is redone (it is a collective)
    flag = torch.tensor(int(eval_logged), device=device)
    dist.broadcast(flag, 0)
    eval_logged = bool(flag.item())
# ---- the DDP wrap (it all-reduces gradients in backward), then compile: compiling the wrapped
# model lets the all-reduce of each gradient bucket overlap the rest of the backward ----
ddp_model = None
if ddp:  # bucket views: the gradients live in the all-reduce buckets, no second copy
    ddp_model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None,
                    gradient_as_bucket_view=True)
model = torch.compile(ddp_model or raw_model) if compile else (ddp_model or raw_model)


# ---- the loss (Eq. 8 per RQ level), and the eval ----
def level_losses(hidden, codes, res, mask, kind=loss, gen=None):
    """Per-level loss sums (L,) and counted tokens (L,). hidden (B, T, H) is viewed as
    (B, h*w, L, H): level l's rows get q from r_l against codebook l (Eq. 5, kind='snce'), or
    hard targets from the stored codes (kind='ce', or 'ls' smoothed by label_smoothing); kind
    'control': q with its values moved to random codes drawn from gen (geometry_control.py).
    token_groups: level g is sub-token g, through its own head against q_g (factorized.py)."""
    B, H = hidden.shape[0], hidden.shape[-1]
    hid, cod = hidden.view(B, -1, L, H), codes.view(B, -1, L)
    msk = None if mask is None else mask.view(B, -1, L)
    counts = (torch.full((L,), hid.shape[0] * hid.shape[1], device=hidden.device) if msk is None
              else msk.sum((0, 1)))
    if groups:
        return groups.level_losses(raw_model, hid, cod, res, msk, kind, taus, label_smoothing), counts
    w, b = raw_model.head.weight, raw_model.head.bias   # under no_grad the loss does no grad work
    if kind == "control":  # materialised logits, per level: a measuring instrument, not for scale
        return control_level_losses(hid, w, b, res.view(B, -1, L, D), codebooks, taus, cod, metric, msk, gen), counts
    if kind == "snce":  # one call for all levels: one fp32 grad_weight accumulator (K, H), not L
        kw = dict(latents=res.view(B, -1, L, D), codebooks=codebooks, taus=taus, metric=metric)
    else:
        kw = dict(latents=None, codebooks=None, taus=0.0, targets=cod,
                  label_smoothing=label_smoothing if kind == "ls" else 0.0)
    # (L,) sums: the callers take the token mean over all levels (and ranks / batches) themselves
    sums = fused_linear_snce_levels(hid, w, bias=b, mask=msk, reduction="sum", **kw)
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


def max_over_ranks(x):
    if ddp:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def evaluate():
    """Held-out hard-label token NLL (CE on the stored codes: the same number whatever the
    training objective, so runs compare) and the training objective, per level too (token_groups:
    per sub-token, so a position's code costs the sum of val_nll_levels nats). All ranks
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
        gen = control_generator(seed + 7919 * (s + 1)) if loss == "control" else None
        obj, _ = level_losses(hidden, codes, res, mask, gen=gen) if loss != "ce" else (nll, n)
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
            images.append(tok.decode(groups.join(codes) if groups else codes).float().cpu())
    return torch.cat(images)


def save_sample_grid(path):
    """Class-conditional samples (rows = classes) from the EMA (or raw) model, decoded."""
    classes = list(grid_classes) or list(range(min(10, num_classes)))
    labels = torch.tensor(classes, device=device).repeat_interleave(grid_per_class)
    data.save_grid(generate_images(labels), path, nrow=grid_per_class)


# ---- sample metrics at every eval (MNIST): a classifier of the real digits scores generated ones ----
clf = load_scorer(eval_classifier, tok, num_classes, device, load=master) if eval_classifier else None
clf_ref = None  # (mu, sigma) of its features on the real val images, computed at the first eval


@torch.no_grad()
def sample_metrics():
    """eval_samples class-balanced samples (class i % C for sample i), the same noise at every
    eval; -> conditional accuracy (overall, per class), Frechet LeNet distance, seconds taken."""
    global clf_ref
    t0 = time.time()
    if clf_ref is None:
        clf_ref = real_feature_stats(clf, val_meta, tok.config.image_size)
    labels = torch.arange(eval_samples) % num_classes
    scores = score_samples(clf, generate_images(labels.to(device)), labels, clf_ref, num_classes)
    return {**scores, "sample_seconds": time.time() - t0}


def save():
    """The checkpoint (atomic): everything a resume needs. No RNG state: the global RNG is
    reseeded from (seed, step, rank) every step and the data order is a function of the step."""
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": None if ema is None else ema.state_dict(), "iter": iter_num,
                     "model_args": model_args, "config": config, "meta": meta, "data_id": data_id,
                     "tokenizer_ckpt": portable_path(tok_path, out_dir), "tokenizer_fingerprint": tok_fp,
                     "lr_decay_iters": decay_iters, "world_size": world_size, "taus": taus,
                     "q_info": q_info, "target_setting": target_setting(config) if soft else None},
                    ckpt_path)


# ---- the training loop ----
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
timer = StepTimer(cuda=device_type == "cuda")  # ms per phase: measured every step on the CPU, logged ones on CUDA
t_last, tok_seen, start_iter, last_log = time.time(), 0, iter_num, iter_num
ckpt_iter = iter_num if init_from == "resume" else None  # the step of the last checkpoint written
if data_source == "images":  # workers read the training batches ahead, in the loop's order
    codes_mm.source.prefetch(batch_indices(N, seed, s, rank, world_size, batch_size)
                             for s in range(iter_num * accum, max_iters * accum))
while True:
    # evaluate, write a sample grid and checkpoint (iteration 0 too: a killed run resumes from it)
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not (iter_num == start_iter and eval_logged):
        t_eval = time.time()
        ev = evaluate()
        write_ckpt = iter_num != start_iter or init_from == "scratch"  # else the checkpoint is this state
        if write_ckpt:  # rank 0 writes it below; every rank names it if the run diverges
            ckpt_iter = iter_num
        if master:
            grid_path = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
            save_sample_grid(grid_path)
            if clf is not None and (iter_num > 0 or eval_samples_at_start):
                ev.update(sample_metrics())
            print(f"eval {iter_num}: val nll {ev['val_nll']:.4f} | val {loss} {ev['val_loss']:.4f} | "
                  f"per level {' '.join(f'{x:.3f}' for x in ev['val_nll_levels'])} | {grid_path}"
                  + (f" | {eval_samples} samples: accuracy {ev['sample_accuracy']:.3f}, FLD "
                     f"{ev['sample_fld']:.2f} ({ev['sample_seconds']:.1f} s)" if "sample_fld" in ev else ""))
            if write_ckpt:
                save()
            if q_record:  # the first record of a scratch run's log
                append_jsonl(log_path, q_record)
                q_record = None
            append_jsonl(log_path, {"iter": iter_num, **ev, "grid": portable_path(grid_path, out_dir)})
        t_last += time.time() - t_eval  # eval time is not training throughput
    if iter_num >= max_iters:
        break
    # the learning rate of this step: linear warmup, then cosine down to min_lr at decay_iters
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, decay_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(step_seed(seed, iter_num, rank, world_size))  # class dropout, masks, dropout
    logged = (iter_num + 1) % log_interval == 0 or iter_num + 1 == max_iters
    timer.start(on=device_type == "cpu" or logged)
    objective = torch.zeros((), device=device)  # this step's training objective, token mean
    for micro in range(accum):
        # the batch: rows fixed by (seed, step, rank), so a resume reads the same ones
        step = iter_num * accum + micro  # batches counted over the run
        if data_source == "images":  # the epoch decides which images random_flip mirrors
            codes_mm.source.set_epoch(step // batches_per_epoch(N, world_size, batch_size))
        codes, res, labels = get_batch(codes_mm, latents_mm, labels_mm,
                                       batch_indices(N, seed, step, rank, world_size, batch_size))
        mask = raw_model.sample_mask(batch_size) if mode == "maskgit" else None
        timer.lap("data")
        if ddp:  # all-reduce gradients only on the last micro-step
            ddp_model.require_backward_grad_sync = micro == accum - 1
        # forward to the last hidden states (B, T, H); the fused loss applies the head itself
        hidden = hidden_states(model, codes, labels, mask)
        timer.lap("forward")
        gen = control_generator(step_seed(seed, step, rank, world_size)) if loss == "control" else None
        sums, n = level_losses(hidden, codes, res, mask, gen=gen)
        micro_objective = sums.sum() / n.sum() / accum  # DDP averages over ranks: / accum per rank
        timer.lap("loss")
        micro_objective.backward()  # the loss's gradients (Eq. 11: p - q) were made in its forward
        objective += micro_objective.detach()
        timer.lap("backward")
    # clip, step, EMA
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # a diverged step stops the run (every rank) before its update: the weights stay finite
    check_finite_step(objective, grad_norm, iter_num + 1, ckpt_path, ckpt_iter, reduce=max_over_ranks)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
    timer.lap("optimizer")
    iter_num += 1
    tok_seen += accum * batch_size * gptconf.seq_len
    # one log line and record per log_interval steps: objective averaged over ranks, ms split
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
if ddp:
    check_replicas(raw_model, master)  # DDP keeps the ranks' weights identical: one cheap check
    del model, ddp_model  # the DDP reducer holds the process group: free it first (clean gloo teardown)
    dist.barrier()
    dist.destroy_process_group()
