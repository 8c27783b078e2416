"""
Residual-VQ image tokenizer, the library: model, quantizer, k-means, residuals, metrics.
Importing it configures nothing; the scripts are support/train_tokenizer.py (training) and
support/encode.py (encoding a split into memmaps for train.py); evaluation over a dataset is
support/tokenizer_eval.py.

An encoder maps an image to latents z (h, w, D) (small D, as LlamaGen / ViT-VQGAN); a residual
quantizer with L levels ("Autoregressive Image Generation using Residual Quantization", RQ-VAE,
arXiv:2203.01941; used for discrete tokens in "CODA: Repurposing Continuous VAEs for Discrete
Tokenization", arXiv:2503.17760) codes them: level l picks t_l = argmin_k d(r_l, C_l[k]) on the
residual r_0 = z, r_l = z - sum_{j<l} C_j[t_j], with d the metric from snce.py (one source of
truth). L = 1 is plain VQ. Codebooks are learned by EMA with Laplace smoothing, initialised by
k-means on the first batches' latents (as DiGIT builds its codebook by k-means: "Stabilize the
Latent Space for Image Autoregressive Modeling: A Unified Perspective", arXiv:2410.12490), and
dead codes are restarted on high-error residuals, so large codebooks stay in use. SNCE's targets
come from the stored z and the codebooks: see `Tokenizer.residuals` / `residuals_from`.

    from tokenizer import Tokenizer
    tok = Tokenizer.from_checkpoint("out/tokenizer_mnist/ckpt.pt")
    z, codes = tok.encode(images)          # (B, 1, 32, 32) in [-1, 1] -> (B, 8, 8, 8), (B, 8, 8, 4)
    images = tok.decode(codes)

Tests: python -m pytest -q tests/test_tokenizer.py
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from support.calibrate import perplexity
from support.common import ddp_initialized, fingerprint, load_checkpoint
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
        if not (0 <= self.ema_decay < 1 and self.ema_eps >= 0 and self.commitment >= 0
                and self.restart_after >= 1):
            raise ValueError(f"expected ema_decay in [0, 1), ema_eps >= 0, commitment >= 0, "
                             f"restart_after >= 1; got {self.ema_decay}, {self.ema_eps}, "
                             f"{self.commitment}, {self.restart_after}")


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


def upcast(x):
    """float16 / bfloat16 (stored latents, autocast outputs) -> float32; float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def residuals_from(latents, codes, codebooks):
    """r_l = z - sum_{j<l} C_j[t_j]: (..., D), (..., L) int, (L, K, D) -> (..., L, D), at least
    float32. The vector level l quantized; SNCE's level-l target is q(. | r_l) against C_l."""
    z = upcast(latents).unsqueeze(-2)                           # (..., 1, D)
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
            codes, res = self.quantize(upcast(z.detach()))
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
        if ddp_initialized():
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
        if not ddp_initialized() or dist.get_rank() == 0:
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
        if ddp_initialized():
            for t in (self.books, self.ema_count, self.ema_sum):
                dist.broadcast(t, 0)
        return dead.sum(-1)

    @torch.no_grad()
    def kmeans_init(self, z, iters=10, steps=1, generator=None):
        """DiGIT-style init: k-means (Lloyd, the tokenizer's metric) on the first batches'
        latents z (N, D) (`steps` batches' worth), level by level on the residuals. Data gathered
        from all ranks; the result broadcast from rank 0. EMA cluster sizes start at the
        per-step average."""
        if ddp_initialized():
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
        if ddp_initialized():
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


class TokenizerInterface:
    """What every tokenizer here exposes, this repo's and the pretrained ones (pretrained_arch.py):
    `config` (image_size, downsample, in_channels, levels, codebook_size, code_dim, metric),
    `codebooks` (L, K, D), `encode_latents`, `quantize` and `decode`. The shape checks, the
    residuals SNCE's targets come from and the content fingerprint live here, once."""

    @property
    def metric(self):
        return self.config.metric

    @property
    def grid(self):
        return self.config.image_size // self.config.downsample

    def _check_images(self, x):
        want = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"images: expected (B, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {tuple(x.shape)}")

    def _check_codes(self, codes):
        g, L, K = self.grid, self.config.levels, self.config.codebook_size
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (g, g, L):
            raise ValueError(f"codes: expected (B, {g}, {g}, {L}), got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.min() < 0 or codes.max() >= K:
            raise ValueError(f"codes: expected integers in [0, {K}), got {codes.dtype} in "
                             f"[{codes.min().item()}, {codes.max().item()}]")

    @torch.no_grad()
    def encode(self, images):
        """(B, C, S, S) -> latents z (B, h, w, D) float32, codes (B, h, w, L) int64."""
        z = self.encode_latents(images).float()
        return z, self.quantize(z)

    def residuals(self, latents, codes):
        """(..., D), (..., L) -> (..., L, D): r_0 = z, r_l = z - sum_{j<l} C_j[t_j]."""
        D, L = self.config.code_dim, self.config.levels
        if latents.shape[-1] != D or codes.shape[-1] != L or latents.shape[:-1] != codes.shape[:-1]:
            raise ValueError(f"residuals: expected latents (..., {D}) and codes (..., {L}) with the "
                             f"same leading dims, got {tuple(latents.shape)} and {tuple(codes.shape)}")
        return residuals_from(latents, codes, self.codebooks)

    def fingerprint(self):
        """16-hex hash of the weights and codebooks: the tokenizer's identity in meta.json."""
        return fingerprint(self.state_dict())


class Tokenizer(TokenizerInterface, nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, L); latents z are (B, h, w, D)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantizer = ResidualQuantizer(cfg)

    @property
    def codebooks(self):
        """(L, K, D) tensor: codebooks[l] is level l's codebook (the same one when shared)."""
        return self.quantizer.codebooks

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
        codes, _ = self.quantizer.quantize(upcast(latents.reshape(-1, latents.shape[-1])))
        return codes.view(*latents.shape[:-1], self.config.levels)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, L) -> images (B, C, S, S), roughly in [-1, 1]."""
        self._check_codes(codes)
        z_q = self.quantizer.lookup(codes.long()).sum(-2)        # (B, h, w, D)
        return self.decoder(z_q.permute(0, 3, 1, 2))

    @classmethod
    def from_state(cls, ckpt, device="cpu", path="checkpoint"):
        """A tokenizer from a loaded checkpoint dict (train_tokenizer.py's format), in eval mode."""
        missing = [k for k in ("model", "model_config") if k not in ckpt]
        if missing or not isinstance(ckpt["model_config"], dict) or "codebook_size" not in ckpt["model_config"]:
            raise ValueError(f"{path} is not a tokenizer checkpoint (expected 'model' and a "
                             f"'model_config' with codebook_size, as train_tokenizer.py writes; "
                             f"found keys {sorted(ckpt)}): a generator checkpoint from train.py?")
        try:
            cfg = TokenizerConfig(**ckpt["model_config"])
        except (TypeError, ValueError) as e:  # an unknown key, a value out of range
            raise ValueError(f"{path}: its model_config cannot build a tokenizer: {e}") from None
        model = cls(cfg)
        check_state(ckpt["model"], model.state_dict(), path, "its model_config")
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval()

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        return cls.from_state(load_checkpoint(path, map_location=device, what="tokenizer checkpoint"),
                              device, path)


def check_state(sd, expected, path, source):
    """A checkpoint's state dict sd against the state dict of the model built from `source`
    (its config, or the shapes read from the file): the same keys and shapes, and finite values
    in every floating tensor (one NaN code vector would win every nearest-code search and
    become every level-0 code, silently). -> None, or a ValueError naming path and the key."""
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    missing, extra = [k for k in expected if k not in sd], [k for k in sd if k not in expected]
    if missing or extra:
        raise ValueError(f"{path}: the weights do not match the model built from {source}: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in sd.items():
        want = tuple(expected[k].shape)
        if not torch.is_tensor(v) or tuple(v.shape) != want:
            found = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"{path}: tensor {k!r} has shape {found}, expected {want} (the model "
                             f"built from {source}): the weights belong to another model")
        if v.is_floating_point() and not torch.isfinite(v).all():
            n = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{path}: tensor {k!r} {want} holds {n} non-finite value(s) (NaN / "
                             "inf): the checkpoint is corrupt or its training diverged")


def psnr(x, y):
    """Per-image PSNR (dB) for images in [-1, 1] (peak-to-peak 2): (B, ...) -> (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def usage_stats(hist):
    """hist (L, K) code counts -> utilization (share of codes used), perplexity, per level."""
    p = hist / hist.sum(-1, keepdim=True).clamp_min(1)
    return (hist > 0).float().mean(-1), perplexity(p)
