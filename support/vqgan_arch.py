"""
Two more large-codebook VQ tokenizer families behind this repo's tokenizer interface
(tokenizer.TokenizerInterface), with what their release files need to load. Both assign codes by
squared Euclidean distance (metric "l2"), so SNCE's Eq. 5 uses d = ||z - c||^2 on the raw
latent z = quant_conv(encoder(x)) (no normalisation).

- VQGAN-LC ("Scaling the Codebook Size of VQ-GAN to 100,000 with a Utilization Rate of 99%",
  arXiv 2406.11837; github zh460045050/VQGAN-LC): the taming-transformers encoder / decoder (the
  module names pretrained_arch.py uses for IBQ), a frozen codebook E (K, 768) of K = 100,000
  CLIP ViT-L/14 feature centroids (`tok_embeddings.weight`) and a learned projector P
  (`codebook_projection`: Linear(768, D), or Linear-ReLU-Linear with 256 hidden units) that maps
  it to the code space: the codebook the quantizer compares with and decode looks up is
  C = P(E) (K, D). The release (vqgan-lc-100K-f16-dim8.pth: f = 16, D = 8) is a torch.save dict
  with the model's state dict under "state_dict" ("model" in its *-last.pth files), optimizer
  states and a pickled argparse Namespace; the state dict carries E itself (the separate
  codebook-100K.pth is only the training initialisation) and the discriminator / LPIPS weights
  (ignored). Training keeps no EMA of the weights: the main weights are the model. Upstream
  also l2-normalises z when D = 768 (its CLIP-width variant); kept here (`unit_latents`).
  Its "ema" quantizer option (cluster_size / embed_avg) decodes with E unprojected: no release
  uses it, and such a file is refused.
- FVQ / FullVQ ("Scalable Training for Vector-Quantized Networks with 100% Codebook
  Utilization", arXiv 2509.10140; github yfChang-cv/FVQ): trained with a VQBridge network that
  generates the codebook; released after conversion (its convert_fullvq2vq.py) in LlamaGen's VQ
  format: {"model": state dict} with the generated codebook as quantize.embedding.weight
  (K, 256), K = 16,384 / 65,536 / 262,144, the VQ-16 module layout (pretrained_arch.py's
  "llamagen" names). Unlike LlamaGen's releases it is run with codebook_l2_norm False: codes by
  l2 on the raw latent, not cos. The file does not record that, so the loader knows an FVQ file
  by its upstream name (fullvq2vqgan_*.pt, fvq2vqgan_*.pt; `is_fvq_file`) and loads it through
  pretrained.load_pretrained (EMA choice, checks) before `as_fvq` switches the metric.
  FVQ-format training checkpoints (quantize.qbridge.* weights) need the VQBridge to build their
  codebook: convert them upstream first.

    from support.pretrained import open_tokenizer
    tok, info = open_tokenizer("vqgan-lc-100K-f16-dim8.pth", "cuda", image_size=256)
    z, codes = tok.encode(images)          # (B, 16, 16, 8) float32, (B, 16, 16, 1) int64

Tests: python -m pytest -q tests/test_vqgan_loaders.py
"""

import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from snce import nearest_code
from support.pretrained_arch import Decoder, Encoder, PretrainedConfig, PretrainedTokenizer, backbone_sizes
from support.upstream_files import read_checkpoint, select_weights
from tokenizer import TokenizerInterface, check_state, upcast

# -----------------------------------------------------------------------------
# VQGAN-LC: configuration and modules (upstream names, so its state dict loads unchanged)


@dataclass
class VQGANLCConfig:
    family: str = "vqgan-lc"
    image_size: int = 256
    in_channels: int = 3
    ch: int = 128                         # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 1, 2, 2, 4)      # downsample = 2^(len - 1)
    num_res_blocks: int = 2               # per encoder level; decoder levels have one more
    enc_attn: tuple = (4,)                # levels (0 = full resolution) with self-attention
    dec_attn: tuple = (4,)
    z_channels: int = 256                 # encoder output, before quant_conv
    code_dim: int = 8                     # D: quant_conv output = projector output
    codebook_size: int = 100000           # K
    feature_dim: int = 768                # width of the stored (CLIP) codebook E
    projector: str = "linear"             # linear | mlp (Linear-ReLU-Linear) | none (C = E)
    proj_hidden: int = 256                # the MLP projector's hidden width
    levels: int = 1                       # the repo's tokenizer interface: L = 1 (plain VQ)
    shared_codebook: bool = False
    metric: str = "l2"

    def __post_init__(self):
        self.ch_mult, self.enc_attn, self.dec_attn = (tuple(self.ch_mult), tuple(self.enc_attn),
                                                      tuple(self.dec_attn))
        if (self.family != "vqgan-lc" or self.metric != "l2" or self.levels != 1
                or self.shared_codebook):
            raise ValueError(f"a VQGAN-LC tokenizer has family 'vqgan-lc', metric 'l2', levels 1 "
                             f"and no shared codebook, got {self.family!r}, {self.metric!r}, "
                             f"{self.levels}, {self.shared_codebook}")
        if self.projector not in ("linear", "mlp", "none"):
            raise ValueError(f"projector must be 'linear', 'mlp' or 'none', got {self.projector!r}")
        if self.projector == "none" and self.feature_dim != self.code_dim:
            raise ValueError(f"without a projector the codebook width {self.feature_dim} must equal "
                             f"code_dim {self.code_dim}")
        _ = self.backbone           # PretrainedConfig checks the widths and the image size

    @property
    def backbone(self):
        """The encoder / decoder sizes as pretrained_arch's config: family "ibq" = the
        taming-transformers module names (its metric and codebook fields are unused here)."""
        return PretrainedConfig(family="ibq", image_size=self.image_size,
                                in_channels=self.in_channels, ch=self.ch, ch_mult=self.ch_mult,
                                num_res_blocks=self.num_res_blocks, enc_attn=self.enc_attn,
                                dec_attn=self.dec_attn, z_channels=self.z_channels,
                                code_dim=self.code_dim, codebook_size=self.codebook_size)

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def unit_latents(self):
        """Upstream's encode divides z by its norm when D = 768 (the CLIP width)."""
        return self.code_dim == 768


# the public release the README names (f = 16, D = 8, linear projector)
VQGAN_LC = {"vqgan-lc-100K-f16-dim8": dict(ch_mult=(1, 1, 2, 2, 4), enc_attn=(4,), dec_attn=(4,),
                                           code_dim=8)}


class VQGANLCTokenizer(TokenizerInterface, nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, 1); latents z are (B, h, w, D), the
    vector the quantizer compares with the projected codebook C = P(E) (K, D) by l2."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg.backbone), Decoder(cfg.backbone)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        self.tok_embeddings = nn.Embedding(cfg.codebook_size, cfg.feature_dim)      # E
        if cfg.projector == "linear":
            self.codebook_projection = nn.Linear(cfg.feature_dim, cfg.code_dim)     # P
        elif cfg.projector == "mlp":
            self.codebook_projection = nn.Sequential(
                nn.Linear(cfg.feature_dim, cfg.proj_hidden), nn.ReLU(),
                nn.Linear(cfg.proj_hidden, cfg.code_dim))
        self.weights = "init"     # which set load_vqgan_lc loaded ("main": no EMA upstream)

    @property
    @torch.no_grad()
    def codebooks(self):
        """(1, K, D): C = P(E), recomputed from the weights on each call (the projection is one
        (K, 768) x (768, D) product)."""
        E = self.tok_embeddings.weight
        return (self.codebook_projection(E) if hasattr(self, "codebook_projection") else E)[None]

    def encode_latents(self, images):
        """(B, C, S, S) -> z (B, h, w, D): quant_conv(encoder(x)), unit length when D = 768."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)
        return F.normalize(z, dim=-1) if self.config.unit_latents else z

    @torch.no_grad()
    def quantize(self, latents):
        """(..., D) -> codes (..., 1) int64: argmin_k ||z - C_k||^2."""
        z = upcast(latents)
        return nearest_code(z, self.codebooks[0].to(z.dtype), "l2").unsqueeze(-1)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, 1) -> images (B, C, S, S): C[codes] -> post_quant_conv -> decoder."""
        self._check_codes(codes)
        z_q = self.codebooks[0][codes[..., 0].long()]                     # (B, h, w, D)
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2)))


# -----------------------------------------------------------------------------
# loading a VQGAN-LC file


def is_vqgan_lc_state(sd):
    """VQGAN-LC's module names: the taming encoder (encoder.down.*, as IBQ) and the stored
    codebook tok_embeddings (IBQ's codebook is quantize.embedding)."""
    return "tok_embeddings.weight" in sd and "encoder.down.0.block.0.conv1.weight" in sd


def infer_vqgan_lc_config(sd, image_size=256):
    """The architecture from the tensor shapes of an upstream state dict (every size): the
    backbone in taming names, as IBQ's, then the codebook and its projector."""
    K, width = sd["tok_embeddings.weight"].shape
    if "codebook_projection.weight" in sd:
        projector, hidden = "linear", 256
    elif "codebook_projection.0.weight" in sd:
        projector, hidden = "mlp", sd["codebook_projection.0.weight"].shape[0]
    else:
        projector, hidden = "none", 256
    return VQGANLCConfig(image_size=image_size, **backbone_sizes(sd, "ibq"),
                         code_dim=sd["quant_conv.weight"].shape[0], codebook_size=K, feature_dim=width,
                         projector=projector, proj_hidden=hidden)


# the training-only modules a VQGAN-LC state dict holds beside the tokenizer's own
IGNORED_PREFIXES = ("discriminator.", "perceptual_loss.")


def load_vqgan_lc(path, device="cpu", image_size=256, verbose=True, ck=None):
    """A VQGAN-LC checkpoint ("state_dict" or "model" entry, or a bare state dict) ->
    VQGANLCTokenizer in eval mode, float32. `ck` = the already-read file (read_checkpoint).
    image_size: the file does not record it (256 for the release)."""
    ck = read_checkpoint(path, verbose=verbose) if ck is None else ck
    if not isinstance(ck, dict):   # e.g. codebook-100K.pth: the bare (K, 768) initial codebook
        raise ValueError(f"{path}: expected a VQGAN-LC checkpoint (a dict with a 'state_dict' or "
                         f"'model' entry), got a {type(ck).__name__}: the codebook file alone is "
                         "not a tokenizer")
    main = next((ck[k] for k in ("state_dict", "model") if isinstance(ck.get(k), dict)), ck)
    if not is_vqgan_lc_state(main):
        raise ValueError(f"{path}: not a VQGAN-LC tokenizer (expected encoder.down.* and "
                         f"tok_embeddings.weight); first keys: {sorted(main)[:5]}")
    if "cluster_size" in main or "embed_avg" in main:
        raise ValueError(f"{path}: a VQGAN-LC file trained with its 'ema' quantizer (cluster_size / "
                         "embed_avg tensors), which decodes with the unprojected codebook: not a "
                         "released variant, not supported")
    try:
        cfg = infer_vqgan_lc_config(main, image_size)
    except KeyError as e:
        raise ValueError(f"{path}: a VQGAN-LC state dict needs the tensor {e.args[0]!r} to read its "
                         "architecture from; the file has none: truncated or another model?") from None
    except ValueError as e:
        raise ValueError(f"{path}: the VQGAN-LC architecture its tensor shapes describe is not "
                         f"supported: {e}") from None
    with torch.device("meta"):                  # no random init of the parameters
        model = VQGANLCTokenizer(cfg)
    names = list(model.state_dict())
    extra = [k for k in main if k not in names and not k.startswith(IGNORED_PREFIXES)]
    if extra:
        raise ValueError(f"{path}: {len(extra)} keys this VQGAN-LC architecture does not have "
                         f"(e.g. {extra[:3]}): a different model, not a supported tokenizer")
    sd, which, why = select_weights(ck, names, "vqgan-lc")
    check_state(sd, model.state_dict(), path, "the VQGAN-LC architecture read from the file")
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.float().to(device).eval()
    model.weights = which
    if verbose:
        print(f"{path}: vqgan-lc tokenizer, K={cfg.codebook_size}, D={cfg.code_dim} (codebook = "
              f"{cfg.projector} projector of a ({cfg.codebook_size}, {cfg.feature_dim}) one), metric "
              f"l2, {cfg.image_size} px -> {model.grid}x{model.grid}; {why}")
    return model


# -----------------------------------------------------------------------------
# FVQ: LlamaGen's VQ module layout with the l2 metric


@dataclass
class FVQConfig(PretrainedConfig):
    """pretrained_arch's LlamaGen config (module names from family "llamagen") whose quantizer
    compares raw latents and codes (metric "l2"); LlamaGen's own releases use "cos"."""
    family: str = "llamagen"
    num_res_blocks: int = 2
    code_dim: int = 256
    metric: str = "l2"

    def __post_init__(self):
        if self.family != "llamagen" or self.metric not in ("", "l2"):
            raise ValueError(f"an FVQ tokenizer has the 'llamagen' module layout and metric 'l2', "
                             f"got {self.family!r}, {self.metric!r}")
        self.metric = ""
        super().__post_init__()     # the layout's size checks (it sets LlamaGen's metric)
        self.metric = "l2"


FVQ = {f"fvq-{K}": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, enc_attn=(4,),
                        dec_attn=(4,), z_channels=256, code_dim=256, codebook_size=K)
       for K in (16384, 65536, 262144)}
FVQ_PREFIXES = ("fullvq2vqgan", "fvq2vqgan")   # the converter's and the eval script's file names


def is_fvq_file(path):
    """FVQ's releases are LlamaGen-format files; only their name says they use the l2 metric."""
    return os.path.basename(path).lower().startswith(FVQ_PREFIXES)


def as_fvq(tok):
    """A LlamaGen-layout PretrainedTokenizer (pretrained.load_pretrained of an FVQ file) -> the
    same weights (shared, not copied) under FVQ's metric l2: z is not normalised, codes are
    argmin ||z - c||^2, decode looks up the raw codebook."""
    if tok.config.family != "llamagen":
        raise ValueError(f"FVQ files have LlamaGen's module layout; got a {tok.config.family} one")
    keep = {f.name: getattr(tok.config, f.name) for f in fields(PretrainedConfig)
            if f.name not in ("family", "metric")}
    with torch.device("meta"):
        model = PretrainedTokenizer(FVQConfig(**keep))
    model.load_state_dict(tok.state_dict(), strict=True, assign=True)
    model.weights = tok.weights
    return model.eval()
