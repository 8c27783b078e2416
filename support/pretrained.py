"""
Pretrained image tokenizers from other projects, behind this repo's tokenizer interface, so the
paper's setting (large flat codebooks made elsewhere) runs through encode / train.py / sample.py.

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
architecture (widths, depths, attention levels, K, D) is read from the tensor shapes, so one
loader serves every size. SNCE's latent z is exactly the vector the upstream quantizer compares
with its codebook: after quant_conv, and after the l2 normalisation for LlamaGen.

Which weights: IBQ trains an EMA of its weights (Lightning `.ckpt`, `state_dict` holds both;
the EMA copy is stored as `model_ema.<name with its dots removed>`) and evaluates under it, so
its published rFIDs are the EMA's; LlamaGen's loaders take a checkpoint's "ema" entry over
"model". `load_pretrained` loads the EMA set when the file holds a complete one and says which
set it loaded. Files are read with weights_only=True; a file that also pickles training objects
(hyper-parameters, argparse namespaces) is read with those objects replaced by inert placeholders,
so no code from the file runs (`read_checkpoint`).

Also here: 1-byte storage of D = 256 latents for SNCE (`pack_latents`: int8 with a float16
scale per vector, half of float16's 128 KB per image), and the ADM / LlamaGen preprocessing
(`center_crop_arr`, the flip / ten-crop views LlamaGen pre-extracts codes for).

`open_tokenizer` / `load_any_tokenizer` is the one tokenizer loader of encode.py, train.py,
sample.py and study.py: this repo's checkpoints and the files above alike.

    tok = pretrained.load_any_tokenizer("imagenet256_262144.ckpt", "cuda", image_size=256)  # or a repo ckpt.pt
    z, codes = tok.encode(images)          # (B, 16, 16, 256) float32, (B, 16, 16, 1) int64

    python pretrained.py      # CPU benchmark: encode img/s, encoder FLOPs, latent storage error
    python pretrained.py --names="()" --rows=4096          # the storage table only
    python -m pytest -q tests/test_pretrained.py            # tiny configs (+ `-m slow`: full size)
"""

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.common import load_checkpoint
from snce import nearest_code
from tokenizer import TokenizerInterface

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
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths) or self.num_res_blocks < 1:
            raise ValueError(f"expected widths divisible by 32 (GroupNorm(32)) and num_res_blocks >= 1,"
                             f" got ch={self.ch}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size must be divisible by downsample={self.downsample}, "
                             f"got {self.image_size}")

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)


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
        z = latents.float() if latents.dtype in (torch.float16, torch.bfloat16) else latents
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

    @classmethod
    def from_checkpoint(cls, path, device="cpu", image_size=256, verbose=True):
        return load_pretrained(path, device, image_size, verbose)


# -----------------------------------------------------------------------------
# reading upstream checkpoints


def read_checkpoint(path, what="tokenizer checkpoint", verbose=True):
    """torch.load with weights_only=True. Lightning / argparse objects pickled beside the weights
    (hyper-parameters, loop state) are swapped for inert placeholder classes registered under
    their names with torch.serialization.safe_globals: the file's own classes and functions are
    never imported or called, so reading it cannot run code. An object the safe unpickler can't
    stand in for (e.g. a dict subclass) is an error that says how to extract the weights."""
    try:
        return load_checkpoint(path, map_location="cpu", what=what)
    except ValueError as e:
        first = e
    try:  # lists the GLOBALs the pickle references, without executing anything
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise first from None
    if not names:
        raise first
    stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {"pickled_as": n}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{what} {path!r} pickles Python objects ({', '.join(names)}) that cannot be read "
            f"safely ({type(e).__name__}: {str(e).splitlines()[0]}). If you trust the file, extract "
            "its weights once: python -c \"import torch; ck = torch.load('IN', weights_only=False); "
            "torch.save({k: ck[k] for k in ('state_dict', 'model', 'ema') if k in ck}, 'OUT')\"") from None
    if verbose:
        print(f"{path}: read with {len(names)} pickled Python type(s) left as inert placeholders "
              f"(not needed, no code run): {', '.join(names)}")
    return ck


class _Inert:
    """Stands in for a class or function pickled in a checkpoint: keeps the arguments and state
    it is given, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _layout(sd):
    """-> "ibq" | "llamagen" | None, from the encoder's module names."""
    if "encoder.down.0.block.0.conv1.weight" in sd:
        return "ibq"
    if "encoder.conv_blocks.0.res.0.conv1.weight" in sd:
        return "llamagen"
    return None


def _count(sd, fmt):
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def infer_config(family, sd, image_size=256):
    """The architecture from the tensor shapes of an upstream state dict (every release size)."""
    enc, dec, res, _ = LAYOUTS[family]
    n = _count(sd, f"encoder.{enc}.{{}}.{res}.0.conv1.weight")
    ch = sd["encoder.conv_in.weight"].shape[0]
    run_to_res = (lambda k: k) if family == "ibq" else (lambda k: n - 1 - k)  # decoder index -> level
    K, D = sd["quantize.embedding.weight"].shape
    return PretrainedConfig(
        family=family, image_size=image_size, in_channels=sd["encoder.conv_in.weight"].shape[1], ch=ch,
        ch_mult=tuple(sd[f"encoder.{enc}.{i}.{res}.0.conv1.weight"].shape[0] // ch for i in range(n)),
        num_res_blocks=_count(sd, f"encoder.{enc}.0.{res}.{{}}.conv1.weight"),
        enc_attn=tuple(i for i in range(n) if f"encoder.{enc}.{i}.attn.0.q.weight" in sd),
        dec_attn=tuple(sorted(run_to_res(k) for k in range(n) if f"decoder.{dec}.{k}.attn.0.q.weight" in sd)),
        z_channels=sd["encoder.conv_out.weight"].shape[0], code_dim=D, codebook_size=K)


# keys an upstream file holds beside the tokenizer's own: IBQ's loss modules (discriminator,
# LPIPS) and EMA bookkeeping; LlamaGen's codebook-usage counter (training statistics)
IGNORED_PREFIXES = {"ibq": ("loss.", "model_ema."), "llamagen": ("quantize.codebook_used",)}


def select_weights(ck, names, family):
    """-> (state dict over `names`, "ema" | "main", a sentence saying why). The EMA set when it is
    complete: IBQ's `model_ema.<name without dots>` entries of the same state dict; LlamaGen's
    "ema" entry. Otherwise the main weights."""
    if "state_dict" in ck:   # Lightning (IBQ, and Emu3.5's file when wrapped)
        main = ck["state_dict"]
        flat = {n: "model_ema." + n.replace(".", "") for n in names}
        if len(set(flat.values())) != len(flat):
            raise ValueError("two parameter names collide once their dots are removed: cannot "
                             "tell the EMA weights apart")
        ema = {n: main[k] for n, k in flat.items() if k in main}
        where = "model_ema.*"
    elif "model" in ck:      # LlamaGen
        main, src = ck["model"], ck.get("ema") or {}
        ema = {n: src[n] for n in names if n in src}
        where = '"ema"'
    else:                    # a bare state dict
        main, ema, where = ck, {}, ""
    if len(ema) == len(names):
        return ema, "ema", f"loaded the EMA weights ({where}, all {len(names)} tensors)"
    missing = [n for n in names if n not in main]
    if missing:
        raise ValueError(f"{family} checkpoint lacks {len(missing)} of the {len(names)} tokenizer "
                         f"tensors (e.g. {missing[:3]}); EMA set: {len(ema)} of {len(names)}")
    why = (f"the EMA set is incomplete ({len(ema)} of {len(names)} tensors in {where})" if ema
           else "the file has no EMA weights")
    return {n: main[n] for n in names}, "main", f"loaded the main weights: {why}"


def _main_state(ck, path):
    for key in ("state_dict", "model"):
        if isinstance(ck.get(key), dict):
            return ck[key]
    if "encoder.conv_in.weight" in ck:
        return ck
    raise ValueError(f"{path}: expected an IBQ Lightning checkpoint (a 'state_dict' entry), a "
                     f"LlamaGen checkpoint (a 'model' entry) or a bare tokenizer state dict; found "
                     f"top-level keys {sorted(ck)[:10]}")


def load_pretrained(path, device="cpu", image_size=256, verbose=True, ck=None):
    """An IBQ / Emu3.5 / LlamaGen VQ checkpoint -> PretrainedTokenizer in eval mode, float32.
    `ck` = the already-read file (read_checkpoint), to avoid reading it twice."""
    ck = read_checkpoint(path, verbose=verbose) if ck is None else ck
    main = _main_state(ck, path)
    family = _layout(main)
    if family is None:
        raise ValueError(f"{path}: the state dict has neither IBQ's encoder.down.* nor LlamaGen's "
                         f"encoder.conv_blocks.* modules (first keys: {sorted(main)[:5]})")
    cfg = infer_config(family, main, image_size)
    with torch.device("meta"):                  # no random init of ~100M parameters
        model = PretrainedTokenizer(cfg)
    names = list(model.state_dict())
    extra = [k for k in main if k not in names and not k.startswith(IGNORED_PREFIXES[family])]
    if extra:
        raise ValueError(f"{path}: {len(extra)} keys this {family} architecture does not have "
                         f"(e.g. {extra[:3]}): a different model, not a supported tokenizer")
    sd, which, why = select_weights(ck, names, family)
    want = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)}, expected {tuple(want[k].shape)}" for k, v in sd.items()
           if tuple(v.shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"{path}: tensor shapes differ from the architecture read from the file: {bad[:3]}")
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.float().to(device).eval()
    model.weights = which
    if verbose:
        print(f"{path}: {family} tokenizer, K={cfg.codebook_size}, D={cfg.code_dim}, metric "
              f"{cfg.metric}, {cfg.image_size} px -> {model.grid}x{model.grid}; {why}")
    return model


def open_tokenizer(path, device="cpu", image_size=None, verbose=True):
    """A tokenizer checkpoint of any supported format -> (tokenizer, info). This repo's own
    (train_tokenizer.py's: a "model_config" entry) -> tokenizer.Tokenizer; anything else -> a
    PretrainedTokenizer. info = {"kind": "repo" | "ibq" | "llamagen", "weights": "main" | "ema",
    "config": the run config the file records ({} for pretrained files: dataset, data_root),
    "iter": its training iteration or None}. image_size: a pretrained file does not record it
    (256 for every public release), so it is required there; for a repo tokenizer it is checked
    against the checkpoint's when given."""
    try:
        ck = load_checkpoint(path, map_location="cpu", what="tokenizer checkpoint")
    except ValueError as e:  # pickled objects: tolerated in upstream files, never in ours
        ck = read_checkpoint(path, verbose=verbose)
        if "model_config" in ck:
            raise e from None
    if "model_config" in ck:
        from tokenizer import Tokenizer
        tok = Tokenizer.from_state(ck, device, path)
        if image_size not in (None, tok.config.image_size):
            raise ValueError(f"{path} is a {tok.config.image_size} px tokenizer, but {image_size} px "
                             "was asked for (--image_size, or the image size an encoding records): "
                             "use the tokenizer that matches, or leave --image_size unset")
        config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
        return tok, {"kind": "repo", "weights": "main", "config": config, "iter": ck.get("iter")}
    try:
        family = _layout(_main_state(ck, path))
    except ValueError:
        family = None
    if family is None:
        raise ValueError(f"{path} is not a tokenizer checkpoint: expected this repo's ('model' and "
                         "'model_config' entries, as train_tokenizer.py writes them) or an IBQ / "
                         "Emu3.5 / LlamaGen file (encoder.down.* / encoder.conv_blocks.* weights); "
                         f"found top-level keys {sorted(ck)[:10]}: a generator checkpoint from train.py?")
    if image_size is None:
        raise ValueError(f"{path} is a pretrained {family} tokenizer file, which does not record "
                         "the image size it was trained at: pass image_size (--image_size=256 for "
                         "the public ImageNet releases)")
    tok = load_pretrained(path, device, image_size, verbose, ck=ck)
    return tok, {"kind": tok.config.family, "weights": tok.weights, "config": {}, "iter": None}


def load_any_tokenizer(path, device="cpu", image_size=None, verbose=True):
    """open_tokenizer without the info: the one loader of encode.py, train.py, sample.py, study.py."""
    return open_tokenizer(path, device, image_size, verbose)[0]


# -----------------------------------------------------------------------------
# storing D = 256 latents for SNCE: a per-vector scaled 1-byte format halves fp16's 128 KB/image

LATENT_FORMATS = {  # name: (bytes per element, bytes of the per-vector float16 scale)
    "float32": (4, 0), "float16": (2, 0), "bfloat16": (2, 0), "int8": (1, 2), "float8_e4m3": (1, 2)}
_TOP = {"int8": 127.0, "float8_e4m3": 448.0}  # largest magnitude each 1-byte format holds


def pack_latents(z, fmt):
    """z (..., D) -> (payload (..., D), scale (..., 1) float16 or None). The 1-byte formats divide
    each vector by s = max|z| / top (top = 127 for int8, 448 for e4m3) and round: int8 to the
    nearest integer (error <= s / 2), float8_e4m3 to 3 mantissa bits (relative error <= 2^-4)."""
    if fmt not in LATENT_FORMATS:
        raise ValueError(f"latent format must be one of {tuple(LATENT_FORMATS)}, got {fmt!r}")
    if fmt not in _TOP:
        return z.to(getattr(torch, fmt)), None
    s = (z.float().abs().amax(-1, keepdim=True) / _TOP[fmt]).half()   # stored: quantize with it
    inv = torch.where(s > 0, 1 / s.float(), torch.zeros_like(s, dtype=torch.float))
    y = (z.float() * inv).clamp(-_TOP[fmt], _TOP[fmt])
    return (y.round().to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)), s


def unpack_latents(payload, scale, fmt):
    """-> float32 latents (..., D): the inverse of pack_latents (up to its rounding)."""
    if fmt not in LATENT_FORMATS:
        raise ValueError(f"latent format must be one of {tuple(LATENT_FORMATS)}, got {fmt!r}")
    x = payload.float()
    return x if scale is None else x * scale.float()


# -----------------------------------------------------------------------------
# LlamaGen / ADM image preprocessing and the augmented views LlamaGen pre-extracts codes for


def center_crop_arr(im, size):
    """ADM's center crop of a PIL image to size x size: halve with a box filter while the short
    side is >= 2 * size (anti-aliasing), resize the short side to `size` (bicubic), crop the middle."""
    from PIL import Image
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def ten_crop(x, size):
    """(..., C, H, W) -> (..., 10, C, size, size): the four corners and the center (top-left,
    top-right, bottom-left, bottom-right, center), then the same five of the mirrored image (the
    order of torchvision's TenCrop, which LlamaGen's code extraction uses)."""
    H, W = x.shape[-2:]
    if size > min(H, W):
        raise ValueError(f"ten_crop: crop {size} is larger than the image {H}x{W}")
    t, l = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    corners = [(0, 0), (0, W - size), (H - size, 0), (H - size, W - size), (t, l)]
    return torch.stack([im[..., i:i + size, j:j + size] for im in (x, x.flip(-1)) for i, j in corners], -4)


AUGMENTS = {"none": 1, "flip": 2, "tencrop": 10}   # views per image


def crop_size(augment, image_size):
    """The center-crop size an image is loaded at: LlamaGen's ten-crop cuts 256 px views from a
    1.1x center crop (281 px); the other modes use the image size itself."""
    return int(image_size * 1.1) if augment == "tencrop" else image_size


def augment_views(x, augment, image_size):
    """Center-cropped images (B, C, S', S') at crop_size -> (B, A, C, S, S) views to encode: the
    image itself, + its mirror ("flip": LlamaGen's default), or the ten crops ("tencrop")."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {tuple(AUGMENTS)}, got {augment!r}")
    want = crop_size(augment, image_size)
    if tuple(x.shape[-2:]) != (want, want):
        raise ValueError(f"augment={augment!r} expects images center-cropped to {want} px, "
                         f"got {tuple(x.shape[-2:])}")
    if augment == "tencrop":
        return ten_crop(x, image_size)
    return torch.stack([x, x.flip(-1)], 1) if augment == "flip" else x.unsqueeze(1)


# -----------------------------------------------------------------------------
# benchmark: `python pretrained.py` (random weights: speed and storage error need no real ones)


def tau_for_perplexity(z, C, target, metric="dot", iters=30):
    """Bisection (log scale) on tau so that the mean perplexity exp(H(q)) of q = softmax(-d/tau)
    over the rows of z equals `target` (perplexity grows with tau)."""
    from snce import neighbor_probs
    lo, hi = -12.0, 12.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        q = neighbor_probs(z, C, math.exp(mid), metric)
        ppl = torch.exp(-(q * q.clamp_min(1e-30).log()).sum(-1)).mean().item()
        lo, hi = (mid, hi) if ppl < target else (lo, mid)
    return math.exp((lo + hi) / 2)


def storage_error(z, C, tau, fmt, metric="dot"):
    """Total variation 0.5 * sum_k |q_k - q'_k| between SNCE's target q from the latents and q'
    from them stored in `fmt`: (mean, max) over the rows."""
    from snce import neighbor_probs
    q = neighbor_probs(z, C, tau, metric)
    q2 = neighbor_probs(unpack_latents(*pack_latents(z, fmt), fmt), C, tau, metric)
    tv = 0.5 * (q - q2).abs().sum(-1)
    return tv.mean().item(), tv.max().item()


def code_flips(z, C, fmt, metric="dot"):
    """Share of latents whose nearest code changes once stored in `fmt`."""
    stored = unpack_latents(*pack_latents(z, fmt), fmt)
    return (nearest_code(z, C, metric) != nearest_code(stored, C, metric)).float().mean().item()


def encoder_flops(model, image_size):
    """FLOPs (2 x multiply-adds) of encode_latents for one image, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.encode_latents(torch.zeros(1, model.config.in_channels, image_size, image_size))
    return fc.get_total_flops()


def bench(names, batch, image_size, reps, rows, K, D, perplexities, formats, gpu_tflops, gpu_util,
          n_images, seed):
    torch.manual_seed(seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; encode at {image_size} px, "
          f"batch {batch}, best of {reps}")
    for name in names:
        cfg = PretrainedConfig(**{**PRETRAINED[name], "image_size": image_size})
        m = PretrainedTokenizer(cfg).eval()
        flops = encoder_flops(m, image_size)
        x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            m.encode(x)
            best = min(best, time.perf_counter() - t0)
        gpu_s = flops / (gpu_tflops * 1e12 * gpu_util)
        print(f"{name}: encoder {sum(p.numel() for p in m.encoder.parameters()) / 1e6:.1f}M params, "
              f"{flops / 1e9:.0f} GFLOP/image | CPU {batch / best:.2f} img/s | GPU at "
              f"{gpu_util:.0%} of {gpu_tflops:.0f} TFLOP/s: {gpu_s * 1e3:.2f} ms/image, "
              f"{1 / gpu_s:.0f} img/s, {n_images * gpu_s / 3600:.2f} GPU-h per pass over {n_images} images")
        del m
    C = torch.randn(K, D)
    z = torch.randn(rows, D)
    tokens = (image_size // 16) ** 2
    print(f"latent storage, D={D}, {tokens} tokens/image, {n_images} images; SNCE target error "
          f"on random z, C ~ N(0, I) (K={K}, {rows} rows), dot metric, tau set for each perplexity:")
    taus = [tau_for_perplexity(z, C, p) for p in perplexities]
    print("format        B/token  KB/image  GB total  code flips  " + "  ".join(
        f"TV@ppl{p:g} (mean/max)" for p in perplexities))
    for fmt in formats:
        per_el, scale = LATENT_FORMATS[fmt]
        b = D * per_el + scale
        errs = "  ".join(f"{m_:.1e}/{x_:.1e}".ljust(len(f"TV@ppl{p:g} (mean/max)"))
                         for p, (m_, x_) in zip(perplexities, (storage_error(z, C, t, fmt) for t in taus)))
        print(f"{fmt:12s}  {b:7d}  {b * tokens / 1024:8.1f}  {b * tokens * n_images / 1e9:8.0f}  "
              f"{code_flips(z, C, fmt):10.1e}  {errs}")
    from snce import neighbor_probs  # yardstick: the same TV from a 10% change of tau
    tv = [0.5 * (neighbor_probs(z, C, t) - neighbor_probs(z, C, 1.1 * t)).abs().sum(-1) for t in taus]
    print("tau -> 1.1 tau (yardstick)                       " + "  ".join(
        f"{v.mean().item():.1e}/{v.max().item():.1e}".ljust(len(f"TV@ppl{p:g} (mean/max)"))
        for p, v in zip(perplexities, tv)))


if __name__ == "__main__":
    from support.common import configure
    names = ("ibq-16384", "llamagen-vq16")   # PRETRAINED sizes to time
    batch = 4                      # images per encode call
    image_size = 256
    reps = 2                       # timed repetitions (best kept)
    rows = 2048                    # random latents for the storage error
    codebook_size = 16384          # K of the random codebook for the storage error
    code_dim = 256                 # D (IBQ's)
    perplexities = (3.0, 30.0, 300.0)
    formats = ("float16", "bfloat16", "float8_e4m3", "int8")
    gpu_tflops = 989.0             # H100 / H200 SXM dense bf16 peak
    gpu_util = 0.4                 # a conv net at batch 64+ under bf16 autocast: a stated assumption
    n_images = 1281167             # ImageNet-1k train
    seed = 0
    configure(globals())
    bench(names, batch, image_size, reps, rows, codebook_size, code_dim, perplexities, formats,
          gpu_tflops, gpu_util, n_images, seed)
