"""
Encode a split with a trained tokenizer into the memmaps train.py reads (format: data.py):
{encode_dir}/codes.npy (N, h, w, L), latents.npy (N, h, w, D) float16 (the z that SNCE's
targets are computed from), labels.npy (N,), meta.json (shapes, the tokenizer's content
fingerprint, its checkpoint path relative to encode_dir, the class list, complete=true last).

    python encode.py --ckpt=out/tokenizer_mnist/ckpt.pt --split=train   # -> out/tokenizer_mnist/encoded_train
    python encode.py --ckpt=out/tokenizer_mnist/ckpt.pt --split=val
    torchrun --standalone --nproc_per_node=8 encode.py --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=train --encode_dir=/data/in256_tokens/train --device=cuda --num_workers=8 \
        --scan_images=True

The model (levels, codebook_size, ...) and the dataset (name, data_root) come from the
checkpoint; --data_root overrides where the images are now. Running it again is a no-op when the
directory already holds this encoding (same tokenizer weights, same data); a different one
(e.g. a retrained tokenizer) is refused unless --overwrite=True. Ranks write disjoint contiguous
slices of one memmap. From Python (tests): encode_split(ckpt, split, encode_dir, ...).
Tests: python -m pytest -q tests/test_tokenizer.py tests/test_data.py
"""

import os
from dataclasses import fields

import torch
import torch.distributed as dist

import data
from common import load_checkpoint, portable_path, setup_device, shard_range
from tokenizer import Tokenizer, TokenizerConfig


@torch.no_grad()
def encode_split(ckpt, split, encode_dir="", data_root="", overwrite=False, batch_size=64,
                 num_workers=0, device="cpu", dtype="bfloat16", scan_images=False, dataset=None):
    """Encode `split` of the checkpoint's dataset (or `dataset` = (torch Dataset, class list),
    e.g. in tests) into encode_dir (default: encoded_{split} beside the checkpoint). Every rank
    of an initialized process group takes part. -> the encode dir."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"expected batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    _, _, autocast = setup_device(device, dtype)
    ck = load_checkpoint(ckpt, map_location=device, what="tokenizer checkpoint")
    model = Tokenizer.from_state(ck, device, ckpt)
    c, src = model.config, ck.get("config", {})
    name, root = src.get("dataset", ""), data_root or src.get("data_root", "")
    if dataset is None:
        ds, num_classes, _ = data.get_dataset(name, split, c.image_size, root)
        classes = data.class_names(ds, num_classes)
    else:
        ds, classes = dataset
    skipped = data.scan_images(ds, num_workers) if scan_images else []
    if master and scan_images:
        print(f"scan: {len(skipped)} unreadable image(s) skipped, {len(ds)} left"
              + "".join(f"\n  {m}" for m in skipped[:20]) + ("\n  ..." if len(skipped) > 20 else ""))
    out = encode_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"encoded_{split}")
    meta = data.encoded_meta(
        len(ds), model.grid, c.levels, c.code_dim, c.codebook_size, metric=c.metric,
        shared_codebook=c.shared_codebook, image_size=c.image_size, dataset=name, data_root=root,
        split=split, num_classes=len(classes), classes=classes,
        tokenizer_fingerprint=model.fingerprint(), tokenizer_ckpt=portable_path(ckpt, out),
        tokenizer_iter=ck.get("iter"), **({"skipped_images": skipped} if scan_images else {}))
    if data.existing_encoding(out, meta, overwrite):  # every rank decides before anyone writes
        if master:
            data.finish_encoded(out, meta)  # same content; record where the checkpoint is now
            print(f"{out} already holds this encoding (tokenizer {meta['tokenizer_fingerprint']}); "
                  "nothing to do (--overwrite=True redoes it)")
        return out
    if ddp:
        dist.barrier()
    if master:
        data.create_encoded(out, meta)
    if ddp:
        dist.barrier()
    arr = data.open_encoded(out, meta)
    lo, hi = shard_range(len(ds), rank, world)
    from tqdm import tqdm
    batches = torch.arange(lo, hi).split(batch_size)
    for x, y in tqdm(data.batch_loader(ds, batches, num_workers, device), total=len(batches),
                     disable=not master, desc=f"encode {split} (rank 0 shard)"):
        with autocast:
            z = model.encode_latents(x)
        z = z.half()  # quantize what is stored: residuals rebuilt from the memmap match the codes
        sl = slice(lo, lo + len(x))
        arr["codes"][sl] = model.quantize(z.float()).cpu().numpy().astype(meta["codes_dtype"])
        arr["latents"][sl], arr["labels"][sl], lo = z.cpu().numpy(), y.cpu().numpy(), lo + len(x)
    for a in arr.values():
        a.flush()
    if ddp:
        dist.barrier()
    if master:
        data.finish_encoded(out, meta)
        print(f"encoded {len(ds)} images with tokenizer {meta['tokenizer_fingerprint']} -> {out}")
    return out


if __name__ == "__main__":
    import sys

    from common import check_range, configure, init_distributed

    ckpt = "out/tokenizer_mnist/ckpt.pt"  # tokenizer checkpoint (train_tokenizer.py's out_dir/ckpt.pt)
    split = "train"
    encode_dir = ""              # default: encoded_{split} beside the checkpoint
    data_root = ""               # default: the one the tokenizer was trained on
    overwrite = False            # replace an existing, different encoding (or redo the same one)
    scan_images = False          # read every image first and skip unreadable ones (folder data)
    batch_size = 64              # per rank
    num_workers = 0              # DataLoader workers (folder datasets)
    device = "cpu"
    dtype = "bfloat16"           # autocast dtype on CUDA (float32 to disable); CPU runs float32
    # model options belong to training: here they come from the checkpoint
    model_keys = {f.name for f in fields(TokenizerConfig)}
    given = [a[2:].partition("=")[0] for a in sys.argv[1:] if a.startswith("--")]
    if model_keys & set(given):
        raise ValueError(f"{', '.join(f'--{k}' for k in given if k in model_keys)}: encode.py takes the "
                         "model from the tokenizer checkpoint (--ckpt); model options are set when "
                         "training it (train_tokenizer.py)")
    del model_keys, given
    config = configure(globals())
    check_range(config, "batch_size", 1)
    check_range(config, "num_workers", 0)
    ddp, rank, _, _, device = init_distributed(device)
    encode_split(ckpt, split, encode_dir, data_root, overwrite, batch_size, num_workers, device,
                 dtype, scan_images)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
