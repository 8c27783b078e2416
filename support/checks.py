"""
Input checks of train.py, sample.py and support/train_tokenizer.py, kept out of the scripts so
they read top to bottom: bad values are errors that name the key and what was expected; options
a run ignores are warnings.

    check_train_config(config, explicit)    train.py's config: ranges, choices, combinations
    check_splits(...)                       train and val were encoded alike (same tokenizer)
    check_encoding_tokenizer(...)           the tokenizer is the one that encoded the data
    check_tokenizer_fits(...)               a tokenizer is the one the data / generator was made with
    check_distinct_splits(...)              the held-out split is not the training split itself
    data_identity(...)                      what a checkpoint records of its training data
    check_resume_checkpoint(...)            a checkpoint can continue this run; resume_changes: what differs
    check_seed(config)                      a seed every derived RNG seed accepts
    check_finite_step(...)                  stop a diverged run at its first non-finite loss
    check_replicas(...)                     DDP ranks ended with identical weights
"""

import hashlib
import os

import numpy as np
import torch
import torch.distributed as dist

from model import MASK_SCHEDULES, MODELS, MODES
from snce import METRICS
from support import data
from support.common import check_resume, config_diff
from support.config import check_choice, check_range, warn_ignored
from support.snce_target import SETTING_KEYS, saved_target_setting, target_setting

# train.py's numeric keys: (key, lo, hi, lo_open, hi_open), None = unbounded (config.check_range)
TRAIN_RANGES = (
    ("batch_size", 1, None, False, False), ("gradient_accumulation_steps", 1, None, False, False),
    ("max_iters", 0, None, False, False), ("lr_decay_iters", 0, None, False, False),
    ("warmup_iters", 0, None, False, False), ("learning_rate", 0, None, True, False),
    ("min_lr", 0, None, False, False), ("weight_decay", 0, None, False, False),
    ("beta1", 0, 1, False, True), ("beta2", 0, 1, False, True), ("grad_clip", 0, None, False, False),
    ("ema_decay", 0, 1, False, True), ("eval_interval", 1, None, False, False),
    ("eval_iters", 0, None, False, False), ("log_interval", 1, None, False, False),
    ("grid_per_class", 1, None, False, False), ("grid_top_k", 0, None, False, False),
    ("grid_steps", 1, None, False, False), ("grid_temperature", 0, None, True, False),
    ("grid_cfg_scale", 0, None, False, False), ("tau", 0, None, False, False),
    ("target_perplexity", 0, None, False, False), ("eval_samples", 2, None, False, False),
    ("label_smoothing", 0, 1, False, True), ("class_dropout", 0, 1, False, False),
    ("dropout", 0, 1, False, True), ("image_size", 0, None, False, False),
    ("num_workers", 0, None, False, False))
SEED_MAX = 2**32 - 1  # derived seeds (seed * 1_000_003 + step, seed + epoch, ...) stay in torch's 64 bits
IMAGE_KEYS = ("dataset", "data_root", "image_size", "train_split", "val_split", "random_flip", "num_workers")
SPLIT_KEYS = ("codebook_size", "levels", "code_dim", "metric", "num_classes", "classes")  # meta.json
CONTENT_KEYS = ("n", "dataset", "split", "labels_sha256")  # which images: data_identity


def check_train_config(config, explicit):
    """Raise on bad values and combinations of train.py's config; warn about the options set
    explicitly (a config file or --key=) that this run ignores. SNCE's target is a temperature
    tau > 0 (Eq. 5), or, with target_perplexity > 0, one tau per level calibrated to it: give one."""
    for key, allowed in (("loss", ("ce", "snce", "ls", "control")), ("init_from", ("scratch", "resume")),
                         ("model_size", tuple(MODELS)), ("mode", MODES), ("mask_schedule", MASK_SCHEDULES),
                         ("tau_scale", ("none", "gap")), ("metric", ("",) + METRICS),
                         ("data_source", ("encoded", "images"))):
        check_choice(config, key, allowed)
    for key, lo, hi, lo_open, hi_open in TRAIN_RANGES:
        check_range(config, key, lo, hi, lo_open, hi_open)
    c = config
    check_seed(c)
    check_lr_floor(c)
    if c["loss"] == "ce":
        warn_ignored(c, explicit, SETTING_KEYS + ("label_smoothing",),
                     "loss=ce trains on the stored codes (hard labels)")
    elif c["loss"] == "ls":
        warn_ignored(c, explicit, SETTING_KEYS,
                     "loss=ls smooths the stored codes uniformly (label_smoothing is its eps)")
    else:
        warn_ignored(c, explicit, ("label_smoothing",), f"loss={c['loss']} takes soft targets from tau")
        tau, p = c["tau"], c["target_perplexity"]
        if p > 0 and "tau" in explicit:
            raise ValueError(f"tau={tau} and target_perplexity={p}: give one (tau is the temperature; "
                             "target_perplexity > 0 calibrates one tau per level instead; "
                             "--target_perplexity=0 uses tau)")
        if p > 0 and not p > 1:
            raise ValueError(f"target_perplexity={p}: expected 0 (use tau) or a value > 1 (1 = CE's "
                             "one-hot target)")
        if p > 0 and c["tau_scale"] != "none":
            raise ValueError(f"tau_scale={c['tau_scale']!r} scales a given tau per level; with "
                             "target_perplexity > 0 each level's tau is calibrated to it: set tau_scale=none")
        if p == 0 and not tau > 0:
            raise ValueError(f"tau={tau}: loss={c['loss']} needs a temperature tau > 0 (Eq. 5), or "
                             "target_perplexity > 0; hard labels (the tau -> 0 limit) are --loss=ce")
    if not c["eval_classifier"]:
        warn_ignored(c, explicit, ("eval_samples", "eval_samples_at_start"), "no eval_classifier to score samples with")
    if c["mode"] == "ar":
        warn_ignored(c, explicit, ("mask_schedule", "grid_steps"), "mode=ar never masks")
    if c["data_source"] == "encoded":
        warn_ignored(c, explicit, IMAGE_KEYS, "data_source=encoded reads data_dir / val_dir")
    else:
        warn_ignored(c, explicit, ("data_dir", "val_dir"), "data_source=images encodes the images on the fly")
        check_choice(c, "dataset", ("", "mnist", "folder"))
        if c["train_split"] == c["val_split"]:
            raise ValueError(f"train_split = val_split = {c['train_split']!r}: the held-out loss would be "
                             "measured on the training images; set --val_split to a split not trained on")
        if not c["tokenizer_ckpt"]:
            raise ValueError("data_source=images: expected tokenizer_ckpt, the tokenizer that encodes each "
                             "batch (a train_tokenizer.py ckpt.pt or a pretrained IBQ / Emu3.5 / LlamaGen "
                             "file), got ''")


def check_seed(config):
    """Raise unless the seed is an integer in [0, SEED_MAX]: the scripts derive further seeds
    from it (per step, rank, epoch), which torch's generators take as 64-bit integers."""
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"config key 'seed': expected an integer in [0, {SEED_MAX}] (2**32 - 1), got {seed!r}")


def check_lr_floor(config):
    """Raise if min_lr > learning_rate: the cosine (common.lr_at) would rise past the peak."""
    if config["min_lr"] > config["learning_rate"]:
        raise ValueError(f"min_lr={config['min_lr']} > learning_rate={config['learning_rate']}: min_lr is "
                         "the floor the cosine decays to from the peak learning_rate; set min_lr <= learning_rate")


def check_finite_step(loss, grad_norm, step, ckpt_path, ckpt_iter, reduce=None):
    """Raise (on every rank alike) if this step's training loss or gradient norm is not finite,
    before the optimizer step makes the weights non-finite: a diverged run stops at once, naming
    the step and the last checkpoint written (ckpt_iter None: none yet), which stays as it was.
    reduce: a collective taking the (1,) flag tensor to its max over ranks (DDP), so all stop."""
    bad = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(grad_norm.detach().float())).reshape(1)
    bad = bad.to(torch.float32)
    if reduce is not None:
        reduce(bad)
    if bad.item() > 0:
        last = (f"the last checkpoint, {ckpt_path} (iter {ckpt_iter}), was written before it and is unchanged: "
                "resume from it with --init_from=resume and a lower --learning_rate"
                if ckpt_iter is not None else f"no checkpoint was written yet ({ckpt_path})")
        raise FloatingPointError(f"step {step}: the training loss ({loss.item():.4g}) or gradient norm "
                                 f"({grad_norm.item():.4g}) is not finite on some rank: the run diverged "
                                 f"(learning rate too high?); stopping. {last}")


def tokenizer_id(meta, encode_dir):
    """Which tokenizer encoded a split: the hash of its weights (meta 'tokenizer_fingerprint');
    encodings that predate it only name a checkpoint path and iteration."""
    if "tokenizer_fingerprint" in meta:
        return meta["tokenizer_fingerprint"]
    return os.path.normpath(os.path.join(encode_dir, meta.get("tokenizer_ckpt", ""))), meta.get("tokenizer_iter")


def check_splits(meta, val_meta, codes, val_codes, train_name, val_name, on_the_fly=False):
    """Raise unless the training and held-out splits were encoded alike: the same tokenizer,
    codebook shape, metric and class list (meta.json), and codes of one shape (N, h, w, L)."""
    diff = config_diff(meta, val_meta, SPLIT_KEYS)
    if tokenizer_id(meta, train_name) != tokenizer_id(val_meta, val_name):
        diff["tokenizer"] = (tokenizer_id(meta, train_name), tokenizer_id(val_meta, val_name))
    if diff or codes.shape[1:] != val_codes.shape[1:]:
        raise ValueError(f"{train_name} and {val_name} were encoded differently (train, val): {diff}"
                         f"{'' if diff else f', codes {codes.shape[1:]} vs {val_codes.shape[1:]}'}. "
                         + ("Both splits need the same classes" if on_the_fly
                            else "Encode both splits with the same tokenizer checkpoint and dataset"))


def labels_hash(labels):
    """A short content hash of a split's labels (N,), as int64: the same images in the same order
    give the same hash wherever the directory is (a moved copy), another split almost surely not."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(labels), dtype=np.int64).tobytes()).hexdigest()[:16]


def check_distinct_splits(train_dir, val_dir, meta, val_meta, labels, val_labels):
    """Raise if the held-out split is the training split itself: the same directory (real path),
    or a copy of it (meta.json alike but for where the tokenizer is, and the same labels): its loss
    would measure memorization, not generalization."""
    same_dir = os.path.realpath(train_dir) == os.path.realpath(val_dir)
    strip = lambda m: {k: v for k, v in m.items() if k != "tokenizer_ckpt"}  # noqa: E731 (a relative path)
    if not same_dir and strip(meta) == strip(val_meta) and len(labels) == len(val_labels):
        same_dir = labels_hash(labels) == labels_hash(val_labels)
    if same_dir:
        raise ValueError(f"val_dir {val_dir!r} holds the same encoded split as data_dir {train_dir!r} "
                         f"(split {meta.get('split')!r}, {len(labels)} rows): the held-out loss would be "
                         "measured on the training data; point --val_dir at the held-out split "
                         "(`python -m support.encode ... --split=val`)")


def data_identity(meta, n, labels=None):
    """What a checkpoint records of the images it was trained on (CONTENT_KEYS): their count,
    dataset and split (meta.json) and, for encoded memmaps, a hash of their labels. Not their
    directory: a moved copy is the same data."""
    return {"n": int(n), "dataset": meta.get("dataset"), "split": meta.get("split"),
            "labels_sha256": None if labels is None else labels_hash(labels)}


def check_tokenizer_fits(tok, tok_path, made, source, want, fingerprint, fix):
    """Raise unless tokenizer tok (loaded from tok_path) is the one `source` was `made` with
    ("encoded": an encoded split's meta.json; "trained": a generator checkpoint): the shapes
    source records (want: {"K", "L", "grid": (h, w)}, "D" too where recorded) and the content
    fingerprint (common.fingerprint of its weights; a tokenizer with other weights decodes the
    codes into other images). fingerprint None (files from before fingerprints): the shapes only,
    with a warning. fix: what to do instead. -> the tokenizer's fingerprint."""
    c = tok.config
    have = {"K": c.codebook_size, "L": c.levels, "D": c.code_dim, "grid": (tok.grid, tok.grid)}
    have = {k: have[k] for k in want}
    if have != want:
        show = lambda d, g: " ".join(f"{k}={v}" for k, v in d.items() if k != "grid") + f" grid {g}"  # noqa: E731
        raise ValueError(f"tokenizer {tok_path} ({show(have, tok.grid)}) does not fit the "
                         f"{'data' if made == 'encoded' else 'generator'} {source} "
                         f"({show(want, 'x'.join(map(str, want['grid'])))}): {fix}")
    fp = tok.fingerprint()
    if fingerprint is None:
        print(f"warning: {source} predates tokenizer fingerprints: only the shapes of {tok_path} were checked")
    elif fp != fingerprint:
        raise ValueError(f"tokenizer {tok_path} is not the one {source} was {made} with (fingerprint "
                         f"{fp}, expected {fingerprint}): {fix}")
    return fp


def check_encoding_tokenizer(tok, tok_path, data_dir, meta, codes, latents, n_check=64):
    """Raise unless tok is the tokenizer that encoded data_dir (codes (N, h, w, L), latents
    (N, h, w, D)): it fits (check_tokenizer_fits) and its codebooks reproduce the stored codes of
    the first n_check images. encode.py quantized the float16 latents, so these codebooks must
    give the codes; int8 storage keeps the tokenizer's own codes and records the share its
    rounding flips (meta "stored_code_flips"): twice that is allowed. Another tokenizer's
    codebooks agree on ~1/K of the codes, so the check still catches a wrong one. -> the
    tokenizer's fingerprint."""
    N, h, w, L = codes.shape
    source, fix = f"{data_dir}/meta.json", "re-encode, or point --tokenizer_ckpt at the tokenizer that encoded the data"
    want = {"K": meta["codebook_size"], "L": L, "D": meta["code_dim"], "grid": (h, w)}
    fp = check_tokenizer_fits(tok, tok_path, "encoded", source, want, meta.get("tokenizer_fingerprint"), fix)
    n = min(n_check, N)
    z = data.finite_rows(np.array(latents[:n]), np.arange(n), latents)  # NaN would look like a wrong tokenizer
    z = torch.from_numpy(z).float().to(tok.codebooks.device)
    agree = (tok.quantize(z).cpu() == torch.from_numpy(np.asarray(codes[:n]).astype(np.int64))).float().mean()
    need = 0.99 - 2 * meta.get("stored_code_flips", 0.0)
    if agree < need:
        raise ValueError(f"tokenizer {tok_path} vs {source}: the tokenizer's codebooks reproduce only "
                         f"{agree:.1%} of the stored codes (expected >= {need:.1%}): wrong tokenizer checkpoint?")
    return fp


def check_resume_checkpoint(ck, ckpt_path, model_args, data_id, ema_decay, data_name):
    """Raise unless the train.py checkpoint ck can continue this run: the same model (model_args
    as GPTConfig's asdict), the same data (data_id; older checkpoints: the keys they have, a
    re-encoding may add "classes"; no data_source meant encoded), EMA on or off alike. Other
    images (CONTENT_KEYS differ: another split, say) are an error naming the checkpoint's data
    and data_name, this run's."""
    missing = [k for k in ("model", "optimizer", "iter", "model_args", "meta", "config") if k not in ck]
    if missing:
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint (missing {missing})")
    saved_id = ck.get("data_id") or {k: ck["meta"][k] for k in SPLIT_KEYS if k in ck["meta"]}
    saved_id = {"data_source": "encoded", **saved_id}
    other = config_diff(saved_id, data_id, [k for k in ("data_source",) + CONTENT_KEYS if k in saved_id])
    if other:
        was = ck["config"].get("data_dir") if saved_id["data_source"] == "encoded" else "images encoded on the fly"
        show = lambda d: f"{d.get('dataset')!r} split {d.get('split')!r}, n={d.get('n')}"  # noqa: E731
        raise ValueError(f"init_from=resume: {ckpt_path} is incompatible with this run's data: it was trained "
                         f"on {was} ({show(saved_id)}), this run reads {data_name} ({show(data_id)}); "
                         f"(key: (checkpoint, now)): {other}. Point --data_dir (or the image split) at the "
                         "data the run was trained on; a moved copy of it is fine")
    diff = config_diff(ck["model_args"], model_args, ck["model_args"])
    diff.update(config_diff(saved_id, data_id, saved_id))
    check_resume(ckpt_path, diff)
    if (ck.get("ema") is None) != (ema_decay == 0):
        raise ValueError(f"init_from=resume: ema_decay={ema_decay} but the checkpoint {ckpt_path} "
                         f"{'has no' if ck.get('ema') is None else 'has an'} EMA")


def resume_changes(ck, config, world_size):
    """{setting: (checkpoint, now)} for what a resume may change but that changes the run's
    course: seed, objective, SNCE's target (snce_target.target_setting), batch size, learning
    rate, random_flip, world size. train.py prints them as a note."""
    changed = config_diff({"random_flip": False, **ck["config"]}, config, (
        "seed", "loss", "label_smoothing", "batch_size", "learning_rate", "random_flip"))
    if config["loss"] == ck["config"].get("loss") in ("snce", "control") and saved_target_setting(ck) != target_setting(config):
        changed["snce_target"] = (saved_target_setting(ck), target_setting(config))
    if ck.get("world_size") != world_size:
        changed["world_size"] = (ck.get("world_size"), world_size)
    return changed


def check_replicas(model, verbose):
    """Print the largest weight difference between DDP ranks (a collective: every rank calls it).
    DDP keeps replicas identical; checking once at the end means a silent divergence can't hide."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if verbose:
        print(f"ddp: max |weight difference| between ranks = {diff.item():.3g}")
