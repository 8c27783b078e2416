"""
The architectures of pretrained image tokenizers from other projects, behind this repo's
tokenizer interface (tokenizer.TokenizerInterface), so the paper's setting (large flat codebooks
made elsewhere) runs through encode / train.py / sample.py. Loading their files: pretrained.py.

- IBQ ("Taming Scalable Visual Tokenizer for Autoregressive Image Generation", arXiv 2412.02692;
  TencentARC SEED-Voken, Apache-2.0): a VQGAN-style ResNet encoder / decoder (taming-transformers
  layout), codes of dimension D = 256 assigned by dot product, t = argmax_k z . c_k (metric
  "dot"). ImageNet 256 px releases with K = 1,024 / 8,192 / 16,384 / 262,144; Emu3.5's vision
  tokenizer ("Emu3.5: Native Multimodal Models are World Learners", arXiv 2510.26583) is an IBQ
  with K = 131,072 in the same module layout.
- LlamaGen VQ-16 ("Autoregressive Model Beats Diffusion", arXiv 2406.06525; MIT): the same kind
  of encoder / decoder in LlamaGen's own module layout, K = 16,384, D = 8, latents and codes
  l2-normalised before the nearest-code search, i.e. metric "cos".

The modules carry the upstream parameter names, so an upstream state dict loads as is; the
architecture (widths, depths, attention levels, K, D) is read from the tensor shapes
(pretrained.infer_config), so one module set serves every size. SNCE's latent z is exactly the
vector the upstream quantizer compares with its codebook: after quant_conv, and after the l2
normalisation for LlamaGen.

    from support.pretrained_arch import PRETRAINED, PretrainedConfig, PretrainedTokenizer
    tok = PretrainedTokenizer(PretrainedConfig(**PRETRAINED["ibq-16384"])).eval()  # random weights
    z, codes = tok.encode(images)          # (B, 16, 16, 256) float32, (B, 16, 16, 1) int64

Tests: python -m pytest -q tests/test_pretrained.py   (+ `-m slow`: full size)
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from snce import nearest_code
from tokenizer import TokenizerInterface, upcast

# -----------------------------------------------------------------------------
# configuration; named sizes of the public releases (the loader reads sizes from the weights)


@dataclass
class PretrainedConfig:
    family: str = "ibq"                   # ibq | llamagen (module names and metric)
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128                         # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 1, 2, 2, 4)      # one entry per resolution: downsample = 2^(len - 1)
    num_res_blocks: int = 4               # per encoder level; decoder levels have one more
    enc_attn: tuple = (4,)                # levels (0 = full resolution) with self-attention
    dec_attn: tuple = (4,)
    z_channels: int = 256                 # encoder output, before quant_conv
    code_dim: int = 256                   # D
    codebook_size: int = 16384            # K
    levels: int = 1                       # the repo's tokenizer interface: L = 1 (plain VQ)
    shared_codebook: bool = False
    metric: str = ""                      # set by family: ibq -> dot, llamagen -> cos

    def __post_init__(self):
        self.ch_mult, self.enc_attn, self.dec_attn = (tuple(self.ch_mult), tuple(self.enc_attn),
                                                      tuple(self.dec_attn))
        if self.family not in FAMILY_METRIC:
            raise ValueError(f"family must be one of {tuple(FAMILY_METRIC)}, got {self.family!r}")
        want = FAMILY_METRIC[self.family]
        if self.metric not in ("", want):
            raise ValueError(f"family {self.family!r} assigns codes by {want!r}, got metric={self.metric!r}")
        self.metric = want
        if self.levels != 1 or self.shared_codebook:
            raise ValueError(f"pretrained tokenizers are plain VQ: expected levels=1, shared_codebook="
                             f"False, got {self.levels}, {self.shared_codebook}")
        check_backbone(self)

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)


def check_backbone(cfg):
    """The conv backbone's rules, for every family's config (ch, ch_mult, num_res_blocks,
    image_size, downsample): widths divisible by 32 (GroupNorm(32)), num_res_blocks >= 1, and
    an image size the downsampling divides."""
    widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
    if any(w % 32 for w in widths) or cfg.num_res_blocks < 1:
        raise ValueError(f"expected widths divisible by 32 (GroupNorm(32)) and num_res_blocks >= 1,"
                         f" got ch={cfg.ch}, ch_mult={cfg.ch_mult}, num_res_blocks={cfg.num_res_blocks}")
    if cfg.image_size % cfg.downsample:
        raise ValueError(f"image_size must be divisible by downsample={cfg.downsample}, "
                         f"got {cfg.image_size}")


FAMILY_METRIC = {"ibq": "dot", "llamagen": "cos"}
_IBQ = dict(family="ibq", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, enc_attn=(4,),
            dec_attn=(4,), z_channels=256, code_dim=256)
PRETRAINED = {  # the public ImageNet 256 px releases (Emu3.5's: sizes come from its file)
    **{f"ibq-{K}": dict(_IBQ, codebook_size=K) for K in (1024, 8192, 16384, 262144)},
    "llamagen-vq16": dict(family="llamagen", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          enc_attn=(4,), dec_attn=(4,), z_channels=256, code_dim=8,
                          codebook_size=16384),
}
# upstream module names: (encoder levels, decoder levels, res blocks in a level, middle blocks).
# IBQ indexes decoder levels by resolution (up[0] = full size, run last); LlamaGen by run order.
LAYOUTS = {"ibq": ("down", "up", "block", ("block_1", "attn_1", "block_2")),
           "llamagen": ("conv_blocks", "conv_blocks", "res", ("0", "1", "2"))}


def count_indexed(sd, fmt):
    """How many of fmt.format(0), fmt.format(1), .. are keys of the state dict, in a row."""
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def backbone_sizes(sd, family):
    """The encoder / decoder sizes of an upstream state dict named as `family`'s (LAYOUTS; taming
    names are "ibq"): PretrainedConfig's in_channels, ch, ch_mult, num_res_blocks, enc_attn,
    dec_attn and z_channels, read from the tensor shapes (every release size)."""
    enc, dec, res, _ = LAYOUTS[family]
    n = count_indexed(sd, f"encoder.{enc}.{{}}.{res}.0.conv1.weight")
    ch = sd["encoder.conv_in.weight"].shape[0]
    run_to_res = (lambda k: k) if family == "ibq" else (lambda k: n - 1 - k)  # decoder index -> level
    return dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1], ch=ch,
        ch_mult=tuple(sd[f"encoder.{enc}.{i}.{res}.0.conv1.weight"].shape[0] // ch for i in range(n)),
        num_res_blocks=count_indexed(sd, f"encoder.{enc}.0.{res}.{{}}.conv1.weight"),
        enc_attn=tuple(i for i in range(n) if f"encoder.{enc}.{i}.attn.0.q.weight" in sd),
        dec_attn=tuple(sorted(run_to_res(k) for k in range(n) if f"decoder.{dec}.{k}.attn.0.q.weight" in sd)),
        z_channels=sd["encoder.conv_out.weight"].shape[0])


# -----------------------------------------------------------------------------
# modules (VQGAN's ResNet encoder / decoder; names as upstream so state dicts load unchanged)


def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)            # (B, 1, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(a.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # VQGAN pads right / bottom only: (0, 1, 0, 1)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: n res blocks (attention after each if `attn`), then an optional resample.
    The res-block list is stored under the upstream name (`block` or `res`)."""

    def __init__(self, res_name, cin, cout, n, attn, resample=None):
        super().__init__()
        self.res_name = res_name
        setattr(self, res_name, nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout)
                                              for i in range(n)))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n if attn else 0))
        if resample is not None:
            setattr(self, resample.__name__.lower(), resample(cout))

    def forward(self, h):
        for i, block in enumerate(getattr(self, self.res_name)):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


def _mid(names, c):
    return nn.Sequential(OrderedDict(zip(names, (ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)))))


class Encoder(nn.Module):
    """(B, 3, S, S) -> (B, z_channels, S/f, S/f)."""

    def __init__(self, cfg):
        super().__init__()
        self.levels_name, _, res_name, mid_names = LAYOUTS[cfg.family]
        w = [cfg.ch * m for m in cfg.ch_mult]
        n = len(w)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        setattr(self, self.levels_name, nn.ModuleList(
            Level(res_name, ([cfg.ch] + w)[i], w[i], cfg.num_res_blocks, i in cfg.enc_attn,
                  Downsample if i < n - 1 else None) for i in range(n)))
        self.mid = _mid(mid_names, w[-1])
        self.norm_out, self.conv_out = _norm(w[-1]), nn.Conv2d(w[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in getattr(self, self.levels_name):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f): lowest resolution first."""

    def __init__(self, cfg):
        super().__init__()
        _, self.levels_name, res_name, mid_names = LAYOUTS[cfg.family]
        w = [cfg.ch * m for m in cfg.ch_mult]
        n = len(w)
        self.conv_in = nn.Conv2d(cfg.z_channels, w[-1], 3, padding=1)
        self.mid = _mid(mid_names, w[-1])
        run = [Level(res_name, w[min(r + 1, n - 1)], w[r], cfg.num_res_blocks + 1, r in cfg.dec_attn,
                     Upsample if r > 0 else None) for r in reversed(range(n))]   # run order
        self.by_resolution = cfg.family == "ibq"
        setattr(self, self.levels_name, nn.ModuleList(run[::-1] if self.by_resolution else run))
        self.norm_out, self.conv_out = _norm(w[0]), nn.Conv2d(w[0], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        levels = getattr(self, self.levels_name)
        for level in (reversed(levels) if self.by_resolution else levels):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantize(nn.Module):
    """The codebook (upstream name `quantize.embedding`) and the nearest-code search under the
    family's metric: latents (..., D) -> codes (..., 1) int64 (the repo's L = 1 code layout)."""

    def __init__(self, K, D, metric):
        super().__init__()
        self.metric = metric
        self.embedding = nn.Embedding(K, D)

    @property
    def codebook(self):  # (K, D): what latents are compared with and what decode looks up
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.metric == "cos" else w

    @torch.no_grad()
    def forward(self, latents):
        z = upcast(latents)
        return nearest_code(z, self.codebook.to(z.dtype), self.metric).unsqueeze(-1)


class PretrainedTokenizer(TokenizerInterface, nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, 1); latents z are (B, h, w, D).
    The same interface as tokenizer.Tokenizer with L = 1."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Quantize(cfg.codebook_size, cfg.code_dim, cfg.metric)  # quantize(z) -> codes
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.weights = "init"     # which set load_pretrained loaded: "ema" | "main"

    @property
    def codebooks(self):
        """(1, K, D); unit vectors for the cos metric (LlamaGen normalises before the search)."""
        return self.quantize.codebook.unsqueeze(0)

    def encode_latents(self, images):
        """(B, C, S, S) -> z (B, h, w, D): what the quantizer compares with the codebook."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)
        return F.normalize(z, dim=-1) if self.metric == "cos" else z

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, 1) -> images (B, C, S, S), roughly in [-1, 1]."""
        self._check_codes(codes)
        z_q = self.quantize.codebook[codes[..., 0].long()]          # (B, h, w, D)
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2)))
