"""
Train the class-conditional generator (model.py) on tokenizer codes with CE, SNCE or label
smoothing. Reads the memmaps + meta.json that `python tokenizer.py --mode=encode` wrote.

    python train.py config/train_mnist.py                          # one process, CPU
    python train.py config/train_mnist.py --loss=ce --out_dir=out/train_mnist_ce
    python train.py config/train_mnist.py --init_from=resume --max_iters=3000
    torchrun --standalone --nproc_per_node=8 train.py config/imagenet_ibqb.py
    # multi-node (on each of 4 nodes; NODE = 0..3, HOST = node 0's address):
    torchrun --nnodes=4 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 train.py config/imagenet_ibqb.py

Loss (DESIGN.md section 2): `ce` = hard CE on the stored codes; `ls` = (1 - eps) one-hot + eps/K
(paper Appendix 7.2); `snce` = q(k | r_l) = softmax_k(-d(r_l, C_l[k]) / tau) (Eq. 5, 7-8), where
r_l is the RQ residual level l quantized, rebuilt from the stored latents z and codes (a gather
and an exclusive cumulative sum, tokenizer.residuals_from; no re-encoding). Every loss goes
through snce.fused_linear_snce, so (tokens x K) logits are never materialized.

Randomness: the global RNG is reseeded from (seed, step, rank) at every step and the data order
is a function of (seed, epoch, rank, position), so `init_from=resume` continues bit-exactly
(same world size and batch) with no RNG state to save. Logs: one line per step on the master,
{out_dir}/log.jsonl for plots (tools: `python -c "import json; ..."` or pandas.read_json(lines=True)).
"""

import copy
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from common import configure, init_distributed, load_checkpoint, resolve_path, save_checkpoint
from model import GPT, MODELS, GPTConfig
from snce import dissimilarity, fused_linear_snce
from tokenizer import ResidualQuantizer, Tokenizer, TokenizerConfig, residuals_from

# -----------------------------------------------------------------------------
# config (defaults: a small CPU run on MNIST-5k; config/*.py set real runs)
out_dir = "out/train"
data_dir = "out/tokenizer_mnist/encoded_train"  # tokenizer.py --mode=encode output (training)
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
# loss
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
lr_decay_iters = 0           # cosine length; 0 = max_iters (set it to stop early and resume)
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

ddp, rank, local_rank, world_size, device = init_distributed(device)
master = rank == 0
device_type = "cuda" if str(device).startswith("cuda") else "cpu"
if gradient_accumulation_steps % world_size:
    raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a "
                     f"multiple of the world size {world_size}")
accum = gradient_accumulation_steps // world_size
for key, allowed in (("loss", ("ce", "snce", "ls")), ("init_from", ("scratch", "resume")),
                     ("model_size", tuple(MODELS)), ("tau_scale", ("none", "gap")), ("dtype", ("bfloat16", "float32"))):
    if config[key] not in allowed:
        raise ValueError(f"{key} must be one of {allowed}, got {config[key]!r}")
ptdtype = torch.bfloat16 if device_type == "cuda" and dtype == "bfloat16" else torch.float32
autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
lr_decay_iters = lr_decay_iters or max_iters

# ---- data: memmaps + meta.json from the tokenizer's encode step ----
meta, codes_mm, latents_mm, labels_mm = data.load_encoded(data_dir)
val_meta, vcodes_mm, vlatents_mm, vlabels_mm = data.load_encoded(val_dir)
same = ("tokenizer_fingerprint", "tokenizer_iter", "codebook_size", "levels", "code_dim", "metric")
if any(meta.get(k) != val_meta.get(k) for k in same) or codes_mm.shape[1:] != vcodes_mm.shape[1:]:
    raise ValueError(f"{data_dir} and {val_dir} were encoded differently: "
                     f"{ {k: (meta.get(k), val_meta.get(k)) for k in same} }")
N, grid_h, grid_w, L = codes_mm.shape
K, num_classes = meta["codebook_size"], meta["num_classes"]
metric = metric or meta["metric"]
for name, c, y in (("train", codes_mm, labels_mm), ("val", vcodes_mm, vlabels_mm)):
    c_max = max(int(c[i:i + 65536].max()) for i in range(0, len(c), 65536))  # chunks: bounded memory
    if c_max >= K or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
        raise ValueError(f"{name} data: expected codes in [0, {K}) and labels in [0, {num_classes}) "
                         f"(meta.json), got max code {c_max}, labels in [{y.min()}, {y.max()}]")
per_rank = N // world_size
batches_per_epoch = per_rank // batch_size
if batches_per_epoch == 0:
    raise ValueError(f"{N} training images are too few for batch_size={batch_size} x {world_size} ranks")


def load_codebooks(path):
    """(L, K, D) codebooks from a tokenizer checkpoint, building only the quantizer (the
    encoder/decoder are not needed for targets). Checked against the encoding: the codes the
    memmap holds must be what these codebooks give for the stored latents."""
    ck = load_checkpoint(path)
    if ck.get("iter") != meta.get("tokenizer_iter"):
        raise ValueError(f"tokenizer {path} is at iter {ck.get('iter')} but {data_dir} was encoded "
                         f"at iter {meta.get('tokenizer_iter')}: re-encode, or point tokenizer_ckpt at "
                         "the checkpoint that encoded it")
    rq = ResidualQuantizer(TokenizerConfig(**ck["model_config"]))
    rq.load_state_dict({k[len("quantizer."):]: v for k, v in ck["model"].items() if k.startswith("quantizer.")})
    books = rq.codebooks.float()
    if tuple(books.shape) != (L, K, meta["code_dim"]):
        raise ValueError(f"tokenizer {path} has codebooks {tuple(books.shape)}, data expects "
                         f"{(L, K, meta['code_dim'])}")
    n = min(64, N)  # encode quantized the float16 latents, so the codes must come out the same
    z = torch.from_numpy(np.array(latents_mm[:n])).float().reshape(-1, books.shape[-1])
    agree = (rq.quantize(z)[0] == torch.from_numpy(np.asarray(codes_mm[:n]).astype(np.int64)).reshape(-1, L)).float().mean()
    if agree < 0.99:
        raise ValueError(f"codebooks of {path} reproduce only {agree:.1%} of the stored codes in "
                         f"{data_dir}: wrong tokenizer checkpoint?")
    return books


tok_path = tokenizer_ckpt or resolve_path(meta["tokenizer_ckpt"], data_dir, "tokenizer checkpoint")
codebooks = load_codebooks(tok_path).to(device) if loss == "snce" else None  # (L, K, D)

_perms = {}


def train_indices(micro):
    """Rows of micro-batch number `micro` (counted over the whole run) for this rank: epoch e is
    a permutation seeded by (seed, e), split into contiguous per-rank shards. Stateless, so the
    data position is just the step and resume is exact."""
    epoch, pos = divmod(micro, batches_per_epoch)
    if epoch not in _perms:
        _perms.clear()
        _perms[epoch] = torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    idx = _perms[epoch][rank * per_rank + pos * batch_size:][:batch_size]
    return np.sort(idx)  # sorted: sequential memmap reads; order within a batch is irrelevant


def get_batch(codes_src, latents_src, labels_src, idx):
    """-> codes (B, h, w, L) long, residuals (B, h*w*L, D) fp32 (snce only), labels (B,)."""
    codes = torch.from_numpy(codes_src[idx].astype(np.int64)).to(device, non_blocking=True)
    labels = torch.from_numpy(labels_src[idx].astype(np.int64)).to(device, non_blocking=True)
    res = None
    if loss == "snce":  # r_l = z - sum_{j<l} C_j[t_j], token order (h, w, L) like the model's
        z = torch.from_numpy(latents_src[idx]).to(device, non_blocking=True)
        res = residuals_from(z, codes, codebooks).reshape(len(idx), -1, codebooks.shape[-1])
    return codes, res, labels


def level_taus(n_rows=2048, chunk=256):
    """Per-level temperatures (L,) floats. 'gap': tau * median over the first training rows of
    d(r_l, 2nd nearest code) - d(r_l, nearest code); the softmax of Eq. 5 only sees differences
    of d, so this gap is the natural unit. Same rows on every rank, so the same taus."""
    if loss != "snce" or tau_scale == "none":
        return [float(tau)] * L
    _, res, _ = get_batch(codes_mm, latents_mm, labels_mm, np.arange(min(N, -(-n_rows // (grid_h * grid_w)))))
    res = res.view(-1, L, res.shape[-1])
    gaps = []
    for l in range(L):
        top2 = torch.cat([dissimilarity(r, codebooks[l], metric).topk(2, largest=False).values
                          for r in res[:, l].split(chunk)])
        gaps.append(float(tau * (top2[:, 1] - top2[:, 0]).median().clamp_min(1e-12)))
    return gaps


taus = level_taus()

# ---- model ----
model_args = dict(mode=mode, vocab_size=K, levels=L, grid_h=grid_h, grid_w=grid_w,
                  num_classes=num_classes, class_dropout=class_dropout, dropout=dropout, bias=bias,
                  mask_schedule=mask_schedule, **MODELS[model_size])
gptconf = GPTConfig(**model_args)
model_args = asdict(gptconf)
torch.manual_seed(seed)  # the same init on every rank (DDP also broadcasts rank 0's)
raw_model = GPT(gptconf).to(device)
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
ema = copy.deepcopy(raw_model).requires_grad_(False) if ema_decay > 0 else None
ckpt_path, log_path, iter_num = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl"), 0
if init_from == "resume":
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"init_from=resume: no checkpoint at {ckpt_path} (train with "
                                f"init_from=scratch first, or set out_dir to the run to continue)")
    ck = load_checkpoint(ckpt_path, map_location=device)
    missing = [k for k in ("model", "optimizer", "iter", "model_args", "meta") if k not in ck]
    if missing:
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint (missing {missing})")
    diff = {k: (ck["model_args"].get(k), v) for k, v in model_args.items() if ck["model_args"].get(k) != v}
    diff.update({k: (ck["meta"].get(k), meta.get(k)) for k in same if ck["meta"].get(k) != meta.get(k)})
    if diff:
        raise ValueError(f"init_from=resume: {ckpt_path} is incompatible with this config "
                         f"(checkpoint, now): {diff}")
    if (ema is None) != (ck.get("ema") is None):
        raise ValueError(f"init_from=resume: ema_decay={ema_decay} but the checkpoint "
                         f"{'has no' if ck.get('ema') is None else 'has an'} EMA")
    if (ck["config"]["batch_size"], ck["world_size"]) != (batch_size, world_size) and master:
        print("note: batch size or world size changed; the data order differs from the original run")
    raw_model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if ema is not None:
        ema.load_state_dict(ck["ema"])
    iter_num = ck["iter"]
    del ck
if master:
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isfile(log_path):  # keep the log consistent with the checkpoint we continue from
        with open(log_path) as f:
            keep = [l for l in f if init_from == "resume" and json.loads(l)["iter"] <= iter_num]
        with open(log_path, "w") as f:
            f.writelines(keep)
    tokens_per_iter = gradient_accumulation_steps * batch_size * gptconf.seq_len
    print(f"{mode} {model_size}: {raw_model.num_params() / 1e6:.2f}M params, K={K}, T={gptconf.seq_len} "
          f"({grid_h}x{grid_w}x{L}), loss={loss}" + (f" tau={', '.join(f'{t:.3g}' for t in taus)} metric={metric}" if loss == "snce" else "")
          + f", {N} train images, {tokens_per_iter} tokens/iter, world {world_size}, device {device}")
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
    sums = []
    for l in range(L):
        if kind == "snce":
            kw = dict(latents=res.view(B, -1, L, res.shape[-1])[:, :, l], codebook=codebooks[l],
                      tau=taus[l], metric=metric)
        else:
            kw = dict(latents=None, codebook=None, tau=0.0, targets=cod[:, :, l],
                      label_smoothing=label_smoothing if kind == "ls" else 0.0)
        sums.append(fused_linear_snce(hid[:, :, l], w, bias=b,
                                      mask=None if msk is None else msk[:, :, l], reduction="sum", **kw))
    counts = (torch.full((L,), hid.shape[0] * hid.shape[1], device=hidden.device) if msk is None
              else msk.sum((0, 1)))
    return torch.stack(sums), counts


def all_sum(x):
    if ddp:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def evaluate():
    """Held-out hard-label token NLL (CE on the stored codes: the same number whatever the
    training loss, so runs compare) and the training objective, per level too. All ranks take
    part on disjoint val batches; maskgit masks are seeded per batch so evals are repeatable."""
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
        with autocast:
            hidden = raw_model(codes, labels, mask, return_hidden=True).to(ptdtype)
        nll, n = level_losses(hidden, codes, None, mask, kind="ce")
        obj, _ = level_losses(hidden, codes, res, mask) if loss != "ce" else (nll, n)
        totals += torch.stack([nll, obj, n.to(nll.dtype)]).double()
    totals = all_sum(totals)
    n = totals[2].clamp_min(1)  # (L,) counted tokens per level
    raw_model.train()
    return {"val_nll": (totals[0].sum() / n.sum()).item(), "val_loss": (totals[1].sum() / n.sum()).item(),
            "val_nll_levels": (totals[0] / n).tolist()}


_tokenizer = None


def save_sample_grid(path):
    """Class-conditional samples (rows = classes) from the EMA (or raw) model, decoded."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = Tokenizer.from_checkpoint(tok_path, device)
    classes = list(grid_classes) or list(range(min(10, num_classes)))
    labels = torch.tensor(classes, device=device).repeat_interleave(grid_per_class)
    g = torch.Generator(device).manual_seed(seed)
    net = ema if ema is not None else raw_model
    with autocast:
        codes = net.generate(labels, cfg_scale=grid_cfg_scale, temperature=grid_temperature,
                             top_k=grid_top_k or None, steps=grid_steps if mode == "maskgit" else None,
                             generator=g)
        images = _tokenizer.decode(codes).float()
    data.save_grid(images, path, nrow=grid_per_class)


def get_lr(it):
    """Linear warmup, then cosine from learning_rate down to min_lr at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def log_json(rec):
    with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def save():
    save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "ema": None if ema is None else ema.state_dict(), "iter": iter_num,
                     "model_args": model_args, "config": config, "meta": meta,
                     "tokenizer_ckpt": os.path.abspath(tok_path), "world_size": world_size, "taus": taus},
                    ckpt_path)


# ---- the loop ----
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats()
t_last, tok_seen, start_iter = time.time(), 0, iter_num
last_log = iter_num
while True:
    resumed_here = init_from == "resume" and iter_num == start_iter  # evaluated before saving
    if (iter_num % eval_interval == 0 and not resumed_here) or iter_num >= max_iters:
        t_eval = time.time()
        ev = evaluate()
        if master:
            grid_path = os.path.join(out_dir, f"samples_{iter_num:06d}.png")
            save_sample_grid(grid_path)
            print(f"eval {iter_num}: val nll {ev['val_nll']:.4f} | val {loss} {ev['val_loss']:.4f} | "
                  f"per level {' '.join(f'{x:.3f}' for x in ev['val_nll_levels'])} | {grid_path}")
            log_json({"iter": iter_num, **ev, "grid": grid_path})
            if iter_num > 0:
                save()
        t_last += time.time() - t_eval  # eval time is not training throughput
    if iter_num >= max_iters:
        break
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(seed * 1_000_003 + iter_num * world_size + rank)  # class dropout, masks
    loss_sum = torch.zeros((), device=device)
    for micro in range(accum):
        codes, res, labels = get_batch(codes_mm, latents_mm, labels_mm,
                                       train_indices(iter_num * accum + micro))
        mask = raw_model.sample_mask(batch_size) if mode == "maskgit" else None
        if ddp:  # all-reduce gradients only on the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            hidden = model(codes, labels, mask, return_hidden=True).to(ptdtype)
        sums, n = level_losses(hidden, codes, res, mask)
        micro_loss = sums.sum() / n.sum() / accum  # DDP averages over ranks: / accum per rank
        micro_loss.backward()
        loss_sum += micro_loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
    iter_num += 1
    tok_seen += accum * batch_size * gptconf.seq_len
    if iter_num % log_interval == 0 or iter_num == max_iters:
        train_loss = all_sum(loss_sum.clone()).item() / world_size
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt, t_last = time.time() - t_last, time.time()
        tok_s = tok_seen * world_size / dt  # all ranks
        tok_seen = 0
        if master:
            mem = (torch.cuda.max_memory_allocated() if device_type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
            mfu = f" | mfu {100 * raw_model.estimate_mfu(tok_s / world_size):.1f}%" if device_type == "cuda" else ""
            print(f"iter {iter_num} | loss {train_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm.item():.2f} | "
                  f"{dt * 1000 / (iter_num - last_log):.0f} ms/it | {tok_s:,.0f} tok/s{mfu} | peak mem {mem:.2f} GB")
            log_json({"iter": iter_num, "loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                      "tok_per_s": tok_s, "peak_mem_gb": mem})
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
