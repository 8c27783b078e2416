"""
NVIDIA Cosmos-Tokenizer's discrete image tokenizers (FSQ) behind this repo's tokenizer interface
(tokenizer.TokenizerInterface), read from their TorchScript release files; the codebook is
implicit (support/implicit.py).

Cosmos-Tokenizer ("Cosmos Tokenizer: A suite of image and video neural tokenizers", NVIDIA,
Apache-2.0 code; Cosmos-Tokenizer-DI8x8 / DI16x16, Cosmos-0.1-Tokenizer-DI8x8 / DI16x16): a
Haar-wavelet patcher, a ResNet encoder with attention, a 1x1 `quant_conv` to D = 6 channels and
finite scalar quantisation with levels (8, 8, 8, 5, 5, 5), K = 64,000 codes. The releases are
TorchScript only: a model folder holds encoder.jit, decoder.jit and autoencoder.jit, made by
torch.jit.trace of two nn.Sequential wrappers (NVIDIA's exporter, traced in bfloat16 on CUDA by
default):

    encoder.jit = Sequential(encoder, quant_conv, quantizer): images -> (indices, codes, loss)
    decoder.jit = Sequential(inv_quant, post_quant_conv, decoder): indices (B, h, w) -> images

A traced module keeps its named submodules and each one's traced forward, so this loader calls
`encoder` and `quant_conv` of encoder.jit itself and reads the continuous latent the quantizer
rounds, which SNCE needs (the file's own output holds only the rounded codes). FSQ (module
docstring of support/implicit.py) bounds each channel with tanh, rounds it to one of L_d levels
and numbers the code mixed radix with channel 0 least significant (the quantizer's basis
cumprod((1, L_0, L_1, ..)), the convention of support.implicit), so

    z (B, h, w, D) = fsq_bound(quant_conv(encoder(x)), levels)   the SNCE latent, in ~[-1, 1]
    codes          = implicit_quantize(z, fsq_levels(levels))       the nearest code (l2)

The loader checks this against the file's own quantizer at load time (latents at the centre of
every level of every channel, digits drawn at random) and decodes with the file's decoder.jit,
whose input is the indices. Precision: a traced module repeats the dtype casts it was traced with
(the Haar patcher casts to the input's dtype as a constant), so a file runs in its own dtype
(bfloat16 for the releases; `dtype` to try another: refused with a clear error when the trace
does not allow it); the bound and rounding are then done here in float32, so at a few positions
sitting on a rounding boundary the codes can differ from the file's own bfloat16 rounding.

    from support.fsq_arch import load_fsq
    tok = load_fsq("pretrained_ckpts/Cosmos-0.1-Tokenizer-DI16x16", "cuda", image_size=256)
    z, codes = tok.encode(images)          # (B, 16, 16, 6) float32, (B, 16, 16, 1) int64

Reading a TorchScript file runs no Python from it (TorchScript is interpreted, not unpickled into
arbitrary objects), but it does run the traced graph: open files you trust.

Tests: python -m pytest -q tests/test_fsq.py
"""

import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from support.implicit import ImplicitCodes, fsq_bound, fsq_levels, implicit_quantize
from tokenizer import TokenizerInterface, upcast

ENCODER_FILE, DECODER_FILE = "encoder.jit", "decoder.jit"
RELEASES = ("Cosmos-Tokenizer-DI8x8", "Cosmos-Tokenizer-DI16x16", "Cosmos-0.1-Tokenizer-DI8x8",
            "Cosmos-0.1-Tokenizer-DI16x16")


@dataclass
class FSQConfig:
    family: str = "fsq"
    image_size: int = 256
    in_channels: int = 3
    downsample: int = 16                   # patch size * 2^(downsampling convolutions)
    fsq_levels: tuple = (8, 8, 8, 5, 5, 5)  # L_d per channel; K = prod L_d
    levels: int = 1                        # the repo's tokenizer interface: one code per position
    metric: str = "l2"

    def __post_init__(self):
        self.fsq_levels = tuple(int(L) for L in self.fsq_levels)
        fsq_levels(self.fsq_levels)        # ints >= 2, one per channel
        if self.family != "fsq" or self.metric != "l2" or self.levels != 1:
            raise ValueError(f"an FSQ tokenizer has family 'fsq', metric 'l2' and levels 1, got "
                             f"{self.family!r}, {self.metric!r}, {self.levels}")
        if self.image_size <= 0 or self.image_size % self.downsample:
            raise ValueError(f"image_size must be a positive multiple of downsample="
                             f"{self.downsample} (the tokenizer's patch size times its "
                             f"downsampling), got {self.image_size}")

    @property
    def code_dim(self):
        return len(self.fsq_levels)

    @property
    def codebook_size(self):
        return math.prod(self.fsq_levels)

    @property
    def shared_codebook(self):
        return False


class FSQTokenizer(ImplicitCodes, TokenizerInterface, nn.Module):
    """Images (B, C, S, S) in [-1, 1] <-> codes (B, h, w, 1) in [0, K); latents z (B, h, w, D):
    the bounded encoder output, whose nearest code (l2) is the token. `enc` / `dec` are the
    loaded encoder.jit / decoder.jit; the codebook is enumerated only when `codebooks` is asked
    for (flat-head SNCE; a factorised head uses support.implicit with `level_values`)."""

    def __init__(self, cfg, enc, dec):
        super().__init__()
        self.config = cfg
        self.enc, self.dec = enc, dec
        self.weights = "main"     # a TorchScript release holds one set of weights

    @property
    def dtype(self):
        return self.enc.quant_conv.weight.dtype

    @property
    def level_values(self):
        """Per-channel level values (j - L // 2) / (L // 2), the codes' coordinates."""
        return fsq_levels(self.config.fsq_levels)

    @property
    def code_device(self):
        return self.enc.quant_conv.weight.device

    def raw_latents(self, images):
        """(B, C, S, S) -> quant_conv(encoder(x)) (B, D, h, w) in the file's dtype: what the
        quantizer bounds and rounds."""
        self._check_images(images)
        z = self.enc.quant_conv(self.enc.encoder(images.to(self.dtype)))
        g = self.grid
        if tuple(z.shape[1:]) != (self.config.code_dim, g, g):
            raise ValueError(f"encoder.jit gave latents {tuple(z.shape)} for "
                             f"{tuple(images.shape)} images, expected (B, {self.config.code_dim},"
                             f" {g}, {g}): the downsampling read from the file is wrong")
        return z

    def encode_latents(self, images):
        """(B, C, S, S) -> z (B, h, w, D) = fsq_bound of the raw latents (|z| < 1.001)."""
        z = upcast(self.raw_latents(images)).permute(0, 2, 3, 1)
        return fsq_bound(z, self.config.fsq_levels)

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w, 1) -> images (B, C, S, S) float32, through decoder.jit (indices in)."""
        self._check_codes(codes)
        out = self.dec(codes[..., 0].to(torch.int32))
        return out.float() if out.dtype != torch.float64 else out


# -----------------------------------------------------------------------------
# loading a Cosmos-Tokenizer DI model folder


def is_fsq_path(path):
    """A TorchScript file (*.jit) or a folder holding encoder.jit: open_tokenizer's route here."""
    path = str(path)
    return path.endswith(".jit") or os.path.isfile(os.path.join(path, ENCODER_FILE))


def _paths(path, decoder_path):
    path = str(path)
    if os.path.isdir(path):
        enc = os.path.join(path, ENCODER_FILE)
    else:
        enc = path
        if os.path.basename(path) in (DECODER_FILE, "autoencoder.jit"):
            raise ValueError(f"{path}: the FSQ loader needs the model folder or its {ENCODER_FILE}"
                             f" (with {DECODER_FILE} beside it), got {os.path.basename(path)}")
    dec = decoder_path or os.path.join(os.path.dirname(enc), DECODER_FILE)
    for p in (enc, dec):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p!r} not found: expected a Cosmos-Tokenizer discrete image model folder "
                f"holding {ENCODER_FILE} and {DECODER_FILE} (as the model pages of "
                f"{', '.join(RELEASES)} ship them: download the folder and pass its path)")
    return enc, str(dec)


def _read_jit(path, device):
    try:
        with warnings.catch_warnings():    # newer torch deprecates TorchScript; the files are it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise ValueError(f"{path}: not a TorchScript file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected Cosmos-Tokenizer's "
                         f"{ENCODER_FILE} / {DECODER_FILE}") from None


def _children(m):
    return {name: child for name, child in m.named_children()}


def _levels_of(quantizer, path):
    if quantizer.original_name != "FSQuantizer":
        raise ValueError(f"{path}: the quantizer is a {quantizer.original_name}, not an "
                         "FSQuantizer: only Cosmos's plain FSQ image tokenizers (DI) are supported")
    if any(True for _ in quantizer.parameters()):
        raise ValueError(f"{path}: the FSQ quantizer has weights (project_in / project_out): "
                         "not a Cosmos DI release layout")
    if not hasattr(quantizer, "_levels"):
        raise ValueError(f"{path}: the FSQ quantizer has no _levels buffer to read its levels from")
    return tuple(int(L) for L in quantizer._levels.tolist())


def check_encoder(enc, path):
    """-> (levels, downsample, in_channels) of a Cosmos DI encoder.jit, or a clear error."""
    ch = _children(enc)
    if "distribution" in ch:
        raise ValueError(f"{path} is a continuous (CI) Cosmos tokenizer: it has no codes; use a "
                         "discrete image (DI) release")
    if "inv_quant" in ch or "post_quant_conv" in ch:
        raise ValueError(f"{path} is a decoder (or full autoencoder) file; pass {ENCODER_FILE} "
                         "or the model folder")
    if not {"encoder", "quant_conv", "quantizer"} <= set(ch):
        raise ValueError(f"{path}: expected a Cosmos-Tokenizer encoder.jit with submodules "
                         f"encoder, quant_conv, quantizer; found {sorted(ch)}")
    w = getattr(ch["quant_conv"], "weight", None)
    if w is None or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1):
        raise ValueError(f"{path}: quant_conv is not a 1x1 Conv2d (a video tokenizer? only the "
                         "image (DI) releases are supported)")
    levels = _levels_of(ch["quantizer"], path)
    if w.shape[0] != len(levels):
        raise ValueError(f"{path}: quant_conv gives {w.shape[0]} channels, the FSQ levels "
                         f"{levels} describe {len(levels)}")
    sd = ch["encoder"].state_dict()
    conv_in = sd.get("conv_in.weight")
    if conv_in is None or "down.0.block.0.conv1.weight" not in sd:
        raise ValueError(f"{path}: the encoder lacks conv_in / down.* weights: not Cosmos's "
                         "image encoder")
    n_down = sum(1 for k in sd if k.startswith("down.") and k.endswith("downsample.conv.weight"))
    # the patcher turns C channels into C * p^2 (Haar or rearrange), then stride-2 convolutions
    patch = round(math.sqrt(conv_in.shape[1] / 3)) if conv_in.shape[1] % 3 == 0 else 1
    in_channels = conv_in.shape[1] // patch ** 2
    return levels, patch * 2 ** n_down, in_channels


def check_decoder(dec, levels, path):
    ch = _children(dec)
    if not {"inv_quant", "post_quant_conv", "decoder"} <= set(ch):
        raise ValueError(f"{path}: expected a Cosmos-Tokenizer decoder.jit with submodules "
                         f"inv_quant, post_quant_conv, decoder; found {sorted(ch)}")
    q = _children(ch["inv_quant"]).get("quantizer")
    dec_levels = _levels_of(q, path) if q is not None else None
    if dec_levels != levels:
        raise ValueError(f"{path}: its FSQ levels {dec_levels} differ from the encoder's {levels}"
                         ": encoder.jit and decoder.jit come from different models")


@torch.no_grad()
def check_convention(quantizer, levels, dtype, device, n=512, path=""):
    """The file's own quantizer against implicit_quantize(fsq_bound(.)) on latents at the centre of
    random levels (no rounding ambiguity, even in bfloat16): a wrong level set, digit order or
    bound fails here, before any image is encoded."""
    g = torch.Generator().manual_seed(0)
    L = torch.tensor(levels, dtype=torch.float64)
    digits = torch.stack([torch.randint(0, int(l), (n,), generator=g) for l in levels], -1)
    digits[:max(levels)] = torch.arange(max(levels))[:, None] % L.long()   # every level once
    half_l = (L - 1) * (1 + 1e-3) / 2
    offset = (L % 2 == 0).double() / 2
    code_units = digits - torch.div(L, 2, rounding_mode="floor")            # round(bound(z))
    z = torch.atanh((code_units + offset) / half_l) - torch.atanh(offset / half_l)
    theirs = quantizer(z.T.reshape(1, len(levels), 1, n).to(device, dtype))[0]
    ours = implicit_quantize(fsq_bound(z, levels), fsq_levels(levels))
    if not torch.equal(theirs.reshape(-1).long().cpu(), ours):
        raise ValueError(f"{path}: the file's FSQ quantizer numbers codes differently from "
                         "implicit_quantize(fsq_bound(z)) (mixed radix, channel 0 least "
                         "significant); codes read from it would be wrong")


def load_fsq(path, device="cpu", image_size=None, decoder_path=None, dtype=None, verbose=True):
    """A Cosmos-Tokenizer discrete image (DI) release -> FSQTokenizer in eval mode. path: the
    downloaded model folder (holding encoder.jit and decoder.jit) or its encoder.jit (decoder.jit
    is taken from beside it unless decoder_path is given). image_size: the files do not record it
    (the tokenizers are convolutional; a multiple of the downsampling). dtype: None runs the files
    in their own dtype (bfloat16 for the releases)."""
    if image_size is None:
        raise ValueError(f"{path}: a Cosmos-Tokenizer file does not record an image size: pass "
                         "image_size (--image_size=256 for ImageNet 256 px)")
    enc_path, dec_path = _paths(path, decoder_path)
    enc, dec = _read_jit(enc_path, device), _read_jit(dec_path, device)
    levels, downsample, in_channels = check_encoder(enc, enc_path)
    check_decoder(dec, levels, dec_path)
    cfg = FSQConfig(image_size=image_size, in_channels=in_channels, downsample=downsample,
                    fsq_levels=levels)
    if dtype is not None:
        enc, dec = enc.to(dtype), dec.to(dtype)
    tok = FSQTokenizer(cfg, enc, dec).eval()
    try:   # the quantizer, then one image of the asked size through both files: a dtype or an
        # image size the trace does not allow fails here, not in the middle of an encoding
        check_convention(enc.quantizer, levels, tok.dtype, device, path=enc_path)
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, image_size, image_size, device=device)
            zq = enc.quant_conv(enc.encoder(probe.to(tok.dtype)))
            dec(torch.zeros(zq.shape[:1] + zq.shape[2:], dtype=torch.int32, device=device))
    except RuntimeError as e:
        raise ValueError(f"{enc_path}: the traced files do not run on a {image_size} px image in "
                         f"{tok.dtype} ({str(e).strip().splitlines()[-1][:200]}): a trace repeats "
                         "the dtype casts it was recorded with (load with dtype=None, the file's "
                         "own) and may fix shapes it saw (use the image size it was exported at)"
                         ) from None
    if tuple(zq.shape[2:]) != (tok.grid, tok.grid):
        raise ValueError(f"{enc_path}: a {image_size} px image gave a {tuple(zq.shape[2:])} latent "
                         f"grid, not ({tok.grid}, {tok.grid}): the downsampling read from the file "
                         f"({downsample}) is wrong (an input that is not 3-channel?)")
    if verbose:
        print(f"{path}: fsq tokenizer (Cosmos-Tokenizer DI), levels {levels}, "
              f"K={cfg.codebook_size}, D={cfg.code_dim}, metric l2, {tok.dtype}, "
              f"{image_size} px -> {tok.grid}x{tok.grid}")
    return tok
