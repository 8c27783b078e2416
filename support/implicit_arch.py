"""
Open-MAGVIT2's LFQ image tokenizer behind this repo's tokenizer interface
(tokenizer.TokenizerInterface), and its loader; the codebook is implicit (support/implicit.py).

Open-MAGVIT2 ("Open-MAGVIT2: An Open-Source Project Toward Democratizing Auto-regressive Visual
Generation", arXiv 2409.04410; TencentARC SEED-Voken, Apache-2.0): a MAGVIT-v2-style ResNet
encoder (no attention, bias-free convolutions, stride-2 convolutions to downsample) whose 18
output channels are the latent z (no quant_conv); lookup-free quantisation takes the sign of each
channel, so the code is one of K = 2^18 sign vectors with index sum_d (z_d > 0) 2^d, i.e. the
nearest code under metric l2 (||z - c||^2 = ||z||^2 - 2 z.c + 18 for every c). The decoder mirrors
the encoder with depth-to-space upsampling and an adaptive GroupNorm per level whose scale and
bias are linear maps of the per-channel std and mean of the quantised input. The public ImageNet
files (imagenet_256_L.ckpt, imagenet_128_L.ckpt, pretrain256_262144.ckpt, pretrain256_16384.ckpt:
K = 2^14 is the same model with 14 channels) are Lightning checkpoints whose state_dict holds the
weights and, for EMA training, `model_ema.<name without dots>` copies: the EMA set is loaded when
complete (pretrained.select_weights; Open-MAGVIT2's generator stage loads the EMA encoder and
decoder too). The architecture is read from the tensor shapes, so every size loads.

    from support.implicit_arch import load_lfq
    tok = load_lfq("imagenet_256_L.ckpt", "cuda", image_size=256)
    z, codes = tok.encode(images)          # (B, 16, 16, 18) float32, (B, 16, 16, 1) int64

Tests: python -m pytest -q tests/test_implicit.py
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.implicit import ImplicitCodes, lfq_levels
from support.pretrained_arch import check_backbone, count_indexed
from support.upstream_files import read_checkpoint, select_weights
from tokenizer import TokenizerInterface, check_state


@dataclass
class LFQConfig:
    family: str = "lfq"
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128                         # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 1, 2, 2, 4)      # downsample = 2^(len - 1)
    num_res_blocks: int = 4               # per level, encoder and decoder, and in each middle
    code_dim: int = 18                    # D = z channels = bits; K = 2^D
    levels: int = 1                       # the repo's tokenizer interface: one code per position
    metric: str = "l2"

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if self.family != "lfq" or self.metric != "l2" or self.levels != 1:
            raise ValueError(f"an LFQ tokenizer has family 'lfq', metric 'l2' and levels 1, got "
                             f"{self.family!r}, {self.metric!r}, {self.levels}")
        if not 1 <= self.code_dim <= 24:
            raise ValueError(f"expected 1 <= code_dim <= 24 (K = 2^code_dim), got {self.code_dim}")
        check_backbone(self)

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_size(self):
        return 2 ** self.code_dim

    @property
    def shared_codebook(self):
        return False


# imagenet_256_L / imagenet_128_L / pretrain256_262144 (the 128 px run also reads 256 px images)
OPEN_MAGVIT2 = {"lfq-262144": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, code_dim=18),
                "lfq-16384": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, code_dim=14)}

# -----------------------------------------------------------------------------
# modules (upstream names: improved_model.py's Encoder / Decoder, so state dicts load unchanged)


def _norm(c, affine=True):
    return nn.GroupNorm(32, c, eps=1e-6, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then scale gamma(std of z) and bias beta(mean of z), per channel
    of the quantised input z (B, D, h, w); std from the unbiased variance, as upstream."""

    def __init__(self, D, c):
        super().__init__()
        self.gn = _norm(c, affine=False)
        self.gamma, self.beta = nn.Linear(D, c), nn.Linear(D, c)

    def forward(self, x, z):
        flat = z.flatten(2)                                        # (B, D, h*w)
        scale = self.gamma((flat.var(dim=-1) + 1e-6).sqrt())       # (B, C)
        bias = self.beta(flat.mean(dim=-1))
        return scale[..., None, None] * self.gn(x) + bias[..., None, None]


class Upsampler(nn.Module):
    """conv to 4C channels, then depth-to-space in upstream's DCR order: the 4C channels are read
    as (2, 2, C), not pixel_shuffle's (C, 2, 2)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 4 * c, 3, padding=1)

    def forward(self, x):
        B, C, h, w = x.shape
        y = self.conv1(x).view(B, 2, 2, C, h, w).permute(0, 3, 4, 1, 5, 2)
        return y.reshape(B, C, 2 * h, 2 * w)


class Encoder(nn.Module):
    """(B, 3, S, S) -> z (B, D, S/f, S/f)."""

    def __init__(self, cfg):
        super().__init__()
        w = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip([cfg.ch] + w, w)):
            level = nn.Module()
            level.block = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout)
                                        for j in range(cfg.num_res_blocks))
            if i < len(w) - 1:
                level.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1)
            self.down.append(level)
        self.mid_block = nn.ModuleList(ResBlock(w[-1], w[-1]) for _ in range(cfg.num_res_blocks))
        self.norm_out, self.conv_out = _norm(w[-1]), nn.Conv2d(w[-1], cfg.code_dim, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_q (B, D, h, w) -> (B, 3, h*f, w*f); up[i] and adaptive[i] are resolution i (0 = full
    size), run from the lowest resolution up."""

    def __init__(self, cfg):
        super().__init__()
        w = [cfg.ch * m for m in cfg.ch_mult]
        n = len(w)
        self.conv_in = nn.Conv2d(cfg.code_dim, w[-1], 3, padding=1)
        self.mid_block = nn.ModuleList(ResBlock(w[-1], w[-1]) for _ in range(cfg.num_res_blocks))
        cin = [w[min(i + 1, n - 1)] for i in range(n)]             # channels entering level i
        self.adaptive = nn.ModuleList(AdaptiveGroupNorm(cfg.code_dim, cin[i]) for i in range(n))
        self.up = nn.ModuleList()
        for i in range(n):
            level = nn.Module()
            level.block = nn.ModuleList(ResBlock(cin[i] if j == 0 else w[i], w[i])
                                        for j in range(cfg.num_res_blocks))
            if i > 0:
                level.upsample = Upsampler(w[i])
            self.up.append(level)
        self.norm_out, self.conv_out = _norm(w[0]), nn.Conv2d(w[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, z)
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQTokenizer(ImplicitCodes, TokenizerInterface, nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, 1) in [0, 2^D); latents z (B, h, w, D).
    The same interface as tokenizer.Tokenizer with L = 1; the codebook is enumerated only when
    `codebooks` is asked for (flat-head SNCE; a factorised head uses support.implicit)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.weights = "init"     # which set load_lfq loaded: "ema" | "main"

    @property
    def level_values(self):
        """Per-dimension level values for support.implicit: -1, +1 in each of the D dimensions."""
        return lfq_levels(self.config.code_dim)

    @property
    def code_device(self):
        return self.decoder.conv_in.weight.device

    def encode_latents(self, images):
        """(B, C, S, S) -> z (B, h, w, D): the encoder output whose signs are the code."""
        self._check_images(images)
        return self.encoder(images).permute(0, 2, 3, 1)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, 1) -> images (B, C, S, S)."""
        self._check_codes(codes)
        bits = (codes.long() >> torch.arange(self.config.code_dim, device=codes.device)) & 1
        z_q = bits.to(self.decoder.conv_in.weight.dtype) * 2 - 1             # (B, h, w, D)
        return self.decoder(z_q.permute(0, 3, 1, 2).contiguous())


# -----------------------------------------------------------------------------
# loading an Open-MAGVIT2 file


def is_lfq_state(sd):
    """Open-MAGVIT2's module names: encoder.down.* levels with encoder.mid_block.* (IBQ's encoder
    also has encoder.down.*, but encoder.mid.* and a quant_conv)."""
    return "encoder.down.0.block.0.conv1.weight" in sd and "encoder.mid_block.0.conv1.weight" in sd


def infer_lfq_config(sd, image_size=256):
    """The architecture from the tensor shapes of an upstream state dict."""
    n = count_indexed(sd, "encoder.down.{}.block.0.conv1.weight")
    ch = sd["encoder.conv_in.weight"].shape[0]
    return LFQConfig(image_size=image_size, in_channels=sd["encoder.conv_in.weight"].shape[1],
                     ch=ch, num_res_blocks=count_indexed(sd, "encoder.down.0.block.{}.conv1.weight"),
                     ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch
                                   for i in range(n)),
                     code_dim=sd["encoder.conv_out.weight"].shape[0])


IGNORED_PREFIXES = ("loss.", "model_ema.")   # discriminator / LPIPS, EMA bookkeeping


def load_lfq(path, device="cpu", image_size=256, verbose=True, ck=None):
    """An Open-MAGVIT2 LFQ checkpoint (Lightning: a 'state_dict' entry; or a bare state dict) ->
    LFQTokenizer in eval mode, float32, EMA weights when the file holds a complete set. `ck` = the
    already-read file (pretrained.read_checkpoint). image_size: the files do not record it."""
    ck = read_checkpoint(path, verbose=verbose) if ck is None else ck
    main = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(main, dict) or not is_lfq_state(main):
        keys = sorted(main)[:5] if isinstance(main, dict) else type(ck).__name__
        raise ValueError(f"{path}: not an Open-MAGVIT2 LFQ tokenizer (expected encoder.down.* and "
                         f"encoder.mid_block.* weights); first keys: {keys}")
    try:
        cfg = infer_lfq_config(main, image_size)
    except KeyError as e:
        raise ValueError(f"{path}: an LFQ state dict needs the tensor {e.args[0]!r} to read its "
                         "architecture from; the file has none: truncated or another model?"
                         ) from None
    except ValueError as e:
        raise ValueError(f"{path}: the LFQ architecture its tensor shapes describe is not "
                         f"supported: {e}") from None
    with torch.device("meta"):                  # no random init of the parameters
        model = LFQTokenizer(cfg)
    names = list(model.state_dict())
    extra = [k for k in main if k not in names and not k.startswith(IGNORED_PREFIXES)]
    if extra:
        raise ValueError(f"{path}: {len(extra)} keys this LFQ architecture does not have "
                         f"(e.g. {extra[:3]}): a different model, not a supported tokenizer")
    sd, which, why = select_weights(ck, names, "lfq")
    check_state(sd, model.state_dict(), path, "the LFQ architecture read from the file")
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.float().to(device).eval()
    model.weights = which
    if verbose:
        print(f"{path}: lfq tokenizer, K=2^{cfg.code_dim}, D={cfg.code_dim}, metric l2, "
              f"{cfg.image_size} px -> {model.grid}x{model.grid}; {why}")
    return model
