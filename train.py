"""
Train the class-conditional generator (model.py) on tokenizer codes with CE, SNCE or label
smoothing. Reads the memmaps + meta.json of an encoded split (codes (N, h, w, L), latents
(N, h, w, D) float16 or int8 + scale, labels (N,); format in data.py), one for training and one
held out. The tokenizer (codebooks for SNCE, decoder for the grids) is this repo's or a
pretrained IBQ / Emu3.5 / LlamaGen file (pretrained.load_any_tokenizer).

    python train.py config/train_mnist.py                          # one process, CPU
    python train.py config/train_mnist.py --loss=ce --out_dir=out/train_mnist_ce
    python train.py config/train_mnist.py --init_from=resume       # continue a killed run exactly
    python train.py config/train_mnist.py --init_from=resume --max_iters=3000 --lr_decay_iters=3000
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py
    # multi-node (on each of 4 nodes; NODE = 0..3, HOST = node 0's address):
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py

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
forward, the loss, the backward and the optimizer (clip, AdamW, EMA). The fused loss computes
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

import data
from common import (append_jsonl, batch_indices, check_choice, check_range, check_resume,
                    config_diff, configure, fingerprint, init_distributed, lr_at, load_checkpoint,
                    portable_path, prepare_run_dir, read_jsonl, resolve_path, rewrite_jsonl,
                    save_checkpoint, setup_device, step_seed, warn_ignored)
from model import GPT, MASK_SCHEDULES, MODELS, MODES, GPTConfig
from pretrained import load_any_tokenizer
from snce import METRICS, dissimilarity, fused_linear_snce_levels
from tokenizer import residuals_from

# -----------------------------------------------------------------------------
# config (defaults: a small CPU run on MNIST-5k; config/*.py set real runs)
out_dir = "out/train"
data_dir = "out/tokenizer_mnist/encoded_train"  # encoded training split
val_dir = "out/tokenizer_mnist/encoded_val"      # held-out split, same tokenizer
tokenizer_ckpt = ""          # default: the one named in data_dir/meta.json
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
tau = 1.0                    # SNCE temperature (Eq. 5); the paper's best on ImageNet is 1.0
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
        ("grid_cfg_scale", 0, None, False, False), ("tau", 0, None, True, False),
        ("label_smoothing", 0, 1, False, True), ("class_dropout", 0, 1, False, False),
        ("dropout", 0, 1, False, True)):
    check_range(config, key, lo, hi, lo_open, hi_open)
if loss == "ce":
    warn_ignored(config, _explicit, ("tau", "tau_scale", "metric", "label_smoothing"),  # noqa: F821
                 "loss=ce trains on the stored codes (hard labels)")
elif loss == "ls":
    warn_ignored(config, _explicit, ("tau", "tau_scale", "metric"),  # noqa: F821
                 "loss=ls smooths the stored codes uniformly (label_smoothing is its eps)")
else:
    warn_ignored(config, _explicit, ("label_smoothing",), "loss=snce takes soft targets from tau")  # noqa: F821
if mode == "ar":
    warn_ignored(config, _explicit, ("mask_schedule", "grid_steps"), "mode=ar never masks")  # noqa: F821

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

# ---- data: the encoded splits, checked against each other and against the tokenizer ----
meta, codes_mm, latents_mm, labels_mm = data.load_encoded(data_dir)
val_meta, vcodes_mm, vlatents_mm, vlabels_mm = data.load_encoded(val_dir)


def tokenizer_id(m, encode_dir):
    """Which tokenizer encoded a split: the hash of its weights (meta 'tokenizer_fingerprint');
    encodings that predate it only name a checkpoint path and iteration."""
    if "tokenizer_fingerprint" in m:
        return m["tokenizer_fingerprint"]
    return os.path.normpath(os.path.join(encode_dir, m.get("tokenizer_ckpt", ""))), m.get("tokenizer_iter")


same = ("codebook_size", "levels", "code_dim", "metric", "num_classes", "classes")
split_diff = config_diff(meta, val_meta, same)
if tokenizer_id(meta, data_dir) != tokenizer_id(val_meta, val_dir):
    split_diff["tokenizer"] = (tokenizer_id(meta, data_dir), tokenizer_id(val_meta, val_dir))
if split_diff or codes_mm.shape[1:] != vcodes_mm.shape[1:]:
    raise ValueError(f"{data_dir} and {val_dir} were encoded differently (train, val): {split_diff}"
                     f"{'' if split_diff else f', codes {codes_mm.shape[1:]} vs {vcodes_mm.shape[1:]}'}. "
                     "Encode both splits with the same tokenizer checkpoint and dataset")
N, grid_h, grid_w, L = codes_mm.shape
K, D, num_classes = meta["codebook_size"], meta["code_dim"], meta["num_classes"]
metric = metric or meta["metric"]
for name, c, y in (("train", codes_mm, labels_mm), ("val", vcodes_mm, vlabels_mm)):
    c_max = max(int(c[i:i + 65536].max()) for i in range(0, len(c), 65536))  # chunks: bounded memory
    if c_max >= K or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
        raise ValueError(f"{name} data: expected codes in [0, {K}) and labels in [0, {num_classes}) "
                         f"(meta.json), got max code {c_max}, labels in [{y.min()}, {y.max()}]")
if any(not 0 <= c < num_classes for c in grid_classes):
    raise ValueError(f"grid_classes: expected class ids in [0, {num_classes}), got {grid_classes}")
batch_indices(N, seed, 0, rank, world_size, batch_size)  # raises if N can't fill one batch per rank

# ---- the tokenizer: its codebooks give SNCE's targets, its decoder the sample grids ----
tok_path = tokenizer_ckpt or resolve_path(meta["tokenizer_ckpt"], data_dir,
                                          f"tokenizer checkpoint named in {data_dir}/meta.json")
tok = load_any_tokenizer(tok_path, device, meta.get("image_size"), verbose=master).requires_grad_(False)
tok_fp = fingerprint(tok.state_dict())
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


def get_batch(codes_src, latents_src, labels_src, idx):
    """-> codes (B, h, w, L) long, residuals (B, h*w*L, D) fp32 (snce only), labels (B,)."""
    codes = torch.from_numpy(codes_src[idx].astype(np.int64)).to(device, non_blocking=True)
    labels = torch.from_numpy(labels_src[idx].astype(np.int64)).to(device, non_blocking=True)
    res = None
    if loss == "snce":  # r_l = z - sum_{j<l} C_j[t_j], token order (h, w, L) like the model's
        z = torch.from_numpy(latents_src[idx]).to(device, non_blocking=True)
        res = residuals_from(z, codes, codebooks).reshape(len(idx), -1, D)
    return codes, res, labels


def level_taus(n_rows=2048, chunk=256):
    """Per-level temperatures (L,) floats. 'gap': tau * median over the first training rows of
    d(r_l, 2nd nearest code) - d(r_l, nearest code); the softmax of Eq. 5 only sees differences
    of d, so this gap is the natural unit. Same rows on every rank, so the same taus."""
    if loss != "snce" or tau_scale == "none":
        return [float(tau)] * L
    _, res, _ = get_batch(codes_mm, latents_mm, labels_mm, np.arange(min(N, -(-n_rows // (grid_h * grid_w)))))
    res = res.view(-1, L, D)
    gaps = []
    for l in range(L):
        top2 = torch.cat([dissimilarity(r, codebooks[l], metric).topk(2, largest=False).values
                          for r in res[:, l].split(chunk)])
        gaps.append(float(tau * (top2[:, 1] - top2[:, 0]).median().clamp_min(1e-12)))
    return gaps


taus = level_taus()

# ---- model, optimizer, and the checkpoint we continue from ----
model_args = dict(mode=mode, vocab_size=K, levels=L, grid_h=grid_h, grid_w=grid_w,
                  num_classes=num_classes, class_dropout=class_dropout, dropout=dropout, bias=bias,
                  mask_schedule=mask_schedule, **MODELS[model_size])
data_id = {"tokenizer_fingerprint": tok_fp, **{k: meta.get(k) for k in same}}  # what the run learns
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
    diff = config_diff(ck["model_args"], asdict(GPTConfig(**model_args)), ck["model_args"])
    diff.update(config_diff(saved_id, data_id, saved_id))
    check_resume(ckpt_path, diff)
    if (ck.get("ema") is None) != (ema_decay == 0):
        raise ValueError(f"init_from=resume: ema_decay={ema_decay} but the checkpoint {ckpt_path} "
                         f"{'has no' if ck.get('ema') is None else 'has an'} EMA")
    saved_decay = ck.get("lr_decay_iters") or ck["config"].get("lr_decay_iters") or ck["config"]["max_iters"]
    if "lr_decay_iters" not in _explicit:  # noqa: F821
        decay_iters = saved_decay  # the schedule the run started with, whatever max_iters is now
        if master and max_iters > saved_decay:
            print(f"note: the cosine schedule of {ckpt_path} ends at iter {saved_decay} (kept; lr = "
                  f"min_lr after it); pass --lr_decay_iters=N to stretch it")
    elif decay_iters != saved_decay and master:
        print(f"warning: lr_decay_iters={decay_iters} changes the run's cosine schedule (it was "
              f"{saved_decay}) at iter {ck['iter']}: the learning rate jumps")
    changed = config_diff(ck["config"], config, ("seed", "loss", "tau", "tau_scale", "metric",
                                                 "label_smoothing", "batch_size", "learning_rate"))
    if ck.get("world_size") != world_size:
        changed["world_size"] = (ck.get("world_size"), world_size)
    if changed and master:
        print(f"note: resuming with changed settings (checkpoint, now): {changed}; from here the "
              "run differs from one trained with either setting throughout")
    iter_num = ck["iter"]
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
        keep = [r for r in records if r.get("iter", 0) <= iter_num]
        rewrite_jsonl(log_path, keep)  # atomic, and drops a partial last line a kill left
        eval_logged = any(r["iter"] == iter_num and "val_nll" in r for r in keep)
    tokens_per_iter = gradient_accumulation_steps * batch_size * gptconf.seq_len
    print(f"{mode} {model_size}: {raw_model.num_params() / 1e6:.2f}M params, K={K}, T={gptconf.seq_len} "
          f"({grid_h}x{grid_w}x{L}), loss={loss}" + (f" tau={', '.join(f'{t:.3g}' for t in taus)} metric={metric}" if loss == "snce" else "")
          + f", {N} train images, {tokens_per_iter} tokens/iter, world {world_size}, device {device}")
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
    starts = list(range(rank * batch_size, n_val, world_size * batch_size))  # subset when eval_iters
    for s in starts[: eval_iters or None]:
        idx = np.sort(order[s:s + batch_size])
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


def save_sample_grid(path):
    """Class-conditional samples (rows = classes) from the EMA (or raw) model, decoded."""
    classes = list(grid_classes) or list(range(min(10, num_classes)))
    labels = torch.tensor(classes, device=device).repeat_interleave(grid_per_class)
    g = torch.Generator(device).manual_seed(seed)
    net = ema if ema is not None else raw_model
    with autocast:
        codes = net.generate(labels, cfg_scale=grid_cfg_scale, temperature=grid_temperature,
                             top_k=grid_top_k or None, steps=grid_steps if mode == "maskgit" else None,
                             generator=g)
        images = tok.decode(codes).float()
    data.save_grid(images, path, nrow=grid_per_class)


def save():
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": None if ema is None else ema.state_dict(), "iter": iter_num,
                     "model_args": model_args, "config": config, "meta": meta, "data_id": data_id,
                     "tokenizer_ckpt": portable_path(tok_path, out_dir), "tokenizer_fingerprint": tok_fp,
                     "lr_decay_iters": decay_iters, "world_size": world_size, "taus": taus},
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
while True:
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and not (iter_num == start_iter and eval_logged):
        t_eval = time.time()
        ev = evaluate()
        if master:
            grid_path = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
            save_sample_grid(grid_path)
            print(f"eval {iter_num}: val nll {ev['val_nll']:.4f} | val {loss} {ev['val_loss']:.4f} | "
                  f"per level {' '.join(f'{x:.3f}' for x in ev['val_nll_levels'])} | {grid_path}")
            if iter_num != start_iter or init_from == "scratch":  # else the checkpoint is this state
                save()
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
        codes, res, labels = get_batch(codes_mm, latents_mm, labels_mm, batch_indices(
            N, seed, iter_num * accum + micro, rank, world_size, batch_size))
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
