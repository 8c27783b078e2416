"""
Loading pretrained tokenizer files (IBQ, Emu3.5, LlamaGen: the architectures are in
pretrained_arch.py; Open-MAGVIT2's LFQ: implicit_arch.py; VQGAN-LC and FVQ: vqgan_arch.py) and
this repo's own, through one function: `open_tokenizer` /
`load_any_tokenizer` is the tokenizer loader of encode.py, train.py, sample.py and study.py.

The architecture is read from the tensor shapes of the file (`infer_config`), so one loader
serves every release size. Which weights: IBQ trains an EMA of its weights (Lightning `.ckpt`,
`state_dict` holds both; the EMA copy is stored as `model_ema.<name with its dots removed>`)
and evaluates under it, so its published rFIDs are the EMA's; LlamaGen's loaders take a
checkpoint's "ema" entry over "model". `load_pretrained` loads the EMA set when the file holds a
complete one and says which set it loaded (`select_weights`). Files are read with
weights_only=True; a file that also pickles training objects (hyper-parameters, argparse
namespaces) is read with those objects replaced by inert placeholders, so no code from the file
runs (`read_checkpoint`).

    from support.pretrained import load_any_tokenizer
    tok = load_any_tokenizer("imagenet256_262144.ckpt", "cuda", image_size=256)  # or a repo ckpt.pt
    z, codes = tok.encode(images)          # (B, 16, 16, 256) float32, (B, 16, 16, 1) int64

Tests: python -m pytest -q tests/test_pretrained.py tests/test_pretrained_pipeline.py
"""

import os

import torch

from support.common import load_checkpoint
from support.fsq_arch import is_fsq_path, load_fsq
from support.implicit_arch import is_lfq_state, load_lfq
from support.pretrained_arch import PretrainedConfig, PretrainedTokenizer, backbone_sizes
from support.upstream_files import IGNORED_PREFIXES, read_checkpoint, select_weights
from support.vqgan_arch import as_fvq, is_fvq_file, is_vqgan_lc_state, load_vqgan_lc
from tokenizer import Tokenizer, check_state

# the public files this loader reads, by their upstream file names: where each comes from
# (a missing file is something to download by hand, not a tokenizer to train)
PUBLIC_FILES = {
    **{f"imagenet256_{k}.ckpt": f"IBQ-Tokenizer-{k}, the SEED-Voken project's (TencentARC, "
       "formerly Open-MAGVIT2) release" for k in (1024, 8192, 16384, 262144)},
    "model.ckpt": "Emu3.5-VisionTokenizer, the Emu3.5 project's (BAAI) release (its config.yaml "
                  "is not needed)",
    "vq_ds16_c2i.pt": "LlamaGen's VQ-16 tokenizer, the LlamaGen project's (FoundationVision) release",
    **{name: f"Open-MAGVIT2's LFQ tokenizer ({what}), the SEED-Voken project's (TencentARC) release"
       for name, what in (("imagenet_256_L.ckpt", "ImageNet 256 px, 2^18 codes"),
                          ("imagenet_128_L.ckpt", "ImageNet 128 px, 2^18 codes"),
                          ("pretrain256_262144.ckpt", "pretrained 256 px, 2^18 codes"),
                          ("pretrain256_16384.ckpt", "pretrained 256 px, 2^14 codes"))},
    "vqgan-lc-100K-f16-dim8.pth": "VQGAN-LC-100K (f16, D = 8), the VQGAN-LC project's "
    "(zh460045050/VQGAN-LC on GitHub) release, linked from its README",
    "fullvq2vqgan_ds16_res2_16384_256.pt": "FVQ-16384 in VQGAN (LlamaGen) format, the FVQ "
    "project's (yfChang-cv/FVQ on GitHub) release, model page yfChang/FVQ",
}

# -----------------------------------------------------------------------------
# reading upstream checkpoints


def _layout(sd):
    """-> "ibq" | "llamagen" | "lfq" | "vqgan-lc" | None, from the encoder's module names
    (Open-MAGVIT2's LFQ encoder and VQGAN-LC's share IBQ's encoder.down.* names: told apart by
    is_lfq_state / is_vqgan_lc_state first). FVQ files have LlamaGen's names: open_tokenizer
    knows them by file name (vqgan_arch.is_fvq_file)."""
    if is_lfq_state(sd):
        return "lfq"
    if is_vqgan_lc_state(sd):
        return "vqgan-lc"
    if "encoder.down.0.block.0.conv1.weight" in sd:
        return "ibq"
    if "encoder.conv_blocks.0.res.0.conv1.weight" in sd:
        return "llamagen"
    return None


def infer_config(family, sd, image_size=256):
    """The architecture from the tensor shapes of an upstream state dict (every release size)."""
    K, D = sd["quantize.embedding.weight"].shape
    return PretrainedConfig(family=family, image_size=image_size, **backbone_sizes(sd, family),
                            code_dim=D, codebook_size=K)


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
    if family in ("lfq", "vqgan-lc"):
        what, loader = {"lfq": ("an Open-MAGVIT2 LFQ", "implicit_arch.load_lfq"),
                        "vqgan-lc": ("a VQGAN-LC", "vqgan_arch.load_vqgan_lc")}[family]
        raise ValueError(f"{path} is {what} tokenizer: load it with open_tokenizer or "
                         f"support.{loader}")
    if family is None:
        raise ValueError(f"{path}: the state dict has neither IBQ's encoder.down.* nor LlamaGen's "
                         f"encoder.conv_blocks.* modules (first keys: {sorted(main)[:5]})")
    try:
        cfg = infer_config(family, main, image_size)
    except KeyError as e:
        raise ValueError(f"{path}: a {family} state dict needs the tensor {e.args[0]!r} to read its "
                         "architecture from; the file has none: truncated or another model?") from None
    except ValueError as e:  # PretrainedConfig's checks, on shapes read from the file
        raise ValueError(f"{path}: the {family} architecture its tensor shapes describe is not "
                         f"supported: {e}") from None
    with torch.device("meta"):                  # no random init of ~100M parameters
        model = PretrainedTokenizer(cfg)
    names = list(model.state_dict())
    extra = [k for k in main if k not in names and not k.startswith(IGNORED_PREFIXES[family])]
    if extra:
        raise ValueError(f"{path}: {len(extra)} keys this {family} architecture does not have "
                         f"(e.g. {extra[:3]}): a different model, not a supported tokenizer")
    sd, which, why = select_weights(ck, names, family)
    check_state(sd, model.state_dict(), path, f"the {family} architecture read from the file")
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
    PretrainedTokenizer (LFQ: implicit_arch.LFQTokenizer; VQGAN-LC: vqgan_arch.VQGANLCTokenizer).
    info = {"kind": "repo" | "ibq" | "llamagen" | "lfq" | "vqgan-lc" | "fvq" | "fsq",
    "weights": "main" | "ema",
    "config": the run config the file records ({} for pretrained files: dataset, data_root),
    "iter": its training iteration or None}. image_size: a pretrained file does not record it
    (256 for every public release), so it is required there; for a repo tokenizer it is checked
    against the checkpoint's when given."""
    if is_fsq_path(path):  # Cosmos-Tokenizer DI: a model folder or its encoder.jit (fsq_arch.py)
        tok = load_fsq(path, device, image_size, verbose=verbose)
        return tok, {"kind": "fsq", "weights": tok.weights, "config": {}, "iter": None}
    if not os.path.isfile(path) and os.path.basename(path) in PUBLIC_FILES:
        raise FileNotFoundError(f"tokenizer checkpoint {path!r} not found: {os.path.basename(path)} "
                                f"is the upstream name of {PUBLIC_FILES[os.path.basename(path)]}: download "
                                "it from there (README.md, 'Pretrained tokenizers') and pass its path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer checkpoint {path!r} not found: expected this repo's "
                                "(train_tokenizer.py writes out_dir/ckpt.pt) or a downloaded IBQ / "
                                f"Emu3.5 / LlamaGen file ({', '.join(sorted(PUBLIC_FILES))})")
    try:
        ck = load_checkpoint(path, map_location="cpu", what="tokenizer checkpoint")
    except ValueError as e:  # pickled objects: tolerated in upstream files, never in ours
        ck = read_checkpoint(path, verbose=verbose)
        if "model_config" in ck:
            raise e from None
    if "model_config" in ck:
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
    if family == "lfq":
        tok = load_lfq(path, device, image_size, verbose, ck=ck)
        return tok, {"kind": "lfq", "weights": tok.weights, "config": {}, "iter": None}
    if family == "vqgan-lc":
        tok = load_vqgan_lc(path, device, image_size, verbose, ck=ck)
        return tok, {"kind": "vqgan-lc", "weights": tok.weights, "config": {}, "iter": None}
    if family == "llamagen" and is_fvq_file(path):  # LlamaGen's layout, l2 metric: by its name
        tok = as_fvq(load_pretrained(path, device, image_size, False, ck=ck))
        if verbose:
            print(f"{path}: fvq tokenizer (LlamaGen layout), K={tok.config.codebook_size}, "
                  f"D={tok.config.code_dim}, metric l2, {image_size} px -> {tok.grid}x{tok.grid}; "
                  f"loaded the {tok.weights} weights")
        return tok, {"kind": "fvq", "weights": tok.weights, "config": {}, "iter": None}
    D = _main_state(ck, path).get("quantize.embedding.weight", torch.empty(0, 8)).shape[-1]
    if family == "llamagen" and D != 8:  # never guess a metric: the codes would differ silently
        raise ValueError(f"{path} has LlamaGen's layout with D = {D} codes: LlamaGen's VQ-16 release "
                         "has D = 8 (metric cos), FVQ's converted releases D = 256 (metric l2), and "
                         "the file does not say which it is. An FVQ file: keep its upstream name "
                         "(fullvq2vqgan*.pt / fvq2vqgan*.pt)")
    tok = load_pretrained(path, device, image_size, verbose, ck=ck)
    return tok, {"kind": tok.config.family, "weights": tok.weights, "config": {}, "iter": None}


def load_any_tokenizer(path, device="cpu", image_size=None, verbose=True):
    """open_tokenizer without the info: the one loader of encode.py, train.py, sample.py, study.py."""
    return open_tokenizer(path, device, image_size, verbose)[0]
