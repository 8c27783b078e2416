"""
Encode a split with a tokenizer into the memmaps train.py reads (format: data.py):
{encode_dir}/codes.npy (N, h, w, L), latents.npy (N, h, w, D) float16 (the z that SNCE's
targets are computed from), labels.npy (N,), meta.json (shapes, the tokenizer's content
fingerprint, its checkpoint path relative to encode_dir, the class list, complete=true last).
The tokenizer is this repo's (train_tokenizer.py's ckpt.pt) or a downloaded IBQ `.ckpt`, Emu3.5
`model.ckpt` or LlamaGen `vq_ds16_c2i.pt` (pretrained.py loads them; its EMA weights when complete).

    python -m support.encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=train   # -> out/tokenizer_mnist/encoded_train
    python -m support.encode --ckpt=out/tokenizer_mnist/ckpt.pt --split=val
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=out/tokenizer_imagenet/ckpt.pt \
        --split=train --encode_dir=/data/in256_tokens/train --device=cuda --num_workers=8 \
        --scan_images=True

    # a pretrained tokenizer: the file names no dataset or image size, so give them
    torchrun --standalone --nproc_per_node=8 -m support.encode --ckpt=/ckpt/imagenet256_262144.ckpt \
        --dataset=folder --data_root=/data/imagenet --image_size=256 --split=train \
        --encode_dir=/data/encoded/ibq262144/train --latents_dtype=int8 --device=cuda --num_workers=8
    # LlamaGen-style pre-extracted codes: the ten crops of a 1.1x center crop, each + mirror
    python -m support.encode --ckpt=/ckpt/vq_ds16_c2i.pt --dataset=folder --data_root=/data/imagenet \
        --image_size=256 --split=train --encode_dir=/data/encoded/vq16_tencrop/train --augment=tencrop

The model (levels, codebook_size, ...) and, for this repo's tokenizers, the dataset (name,
data_root, image_size) come from the checkpoint; --data_root overrides where the images are now.

latents_dtype: float16 (128 KB per image at D = 256, 16 x 16 tokens), or int8 with a float16
scale per vector (64.5 KB; latents.pack_latents). Codes: with float16 they are the nearest
codes of the stored (rounded) latents, so train.py's check that the codebooks reproduce them is
exact; with int8 they are the tokenizer's own codes of the float32 latents (the tokens its decoder
was trained on), and meta.json's stored_code_flips records the share of tokens whose nearest code
the int8 rounding changes (bench_pretrained.py measures it on random latents), which train.py's
check allows for.
augment: none | flip (each image + its mirror) | tencrop (four corners + center of a 1.1x center
crop, and their mirrors: LlamaGen's extraction); rows i * views + r hold the views of image i,
labels repeated, meta.json says "augment" and "views". For codes-only (ce) runs or small-D
tokenizers: ten views of D = 256 latents are 10x the disk. Running it again is a no-op when the
directory already holds this encoding (same tokenizer weights, same data); a different one
(e.g. a retrained tokenizer) is refused unless --overwrite=True, which starts over. An interrupted
run continues where it stopped: the images are encoded in blocks of BLOCK_IMAGES, and once a
block's rows are flushed a marker {encode_dir}/progress/<first>-<end>.json records it (with its
int8 code flips), so a kill loses at most one block per rank; the next run (with any number of
ranks) keeps the arrays and encodes only the blocks without a marker. Each run's ranks take the
remaining blocks round-robin, writing their rows of one memmap; at the end rank 0 sums the
markers into meta.json (complete=true) and removes progress/. One run at a time per directory:
rank 0 holds {encode_dir}/.lock (dirlock.py) from before the first write to the end, so a second
run of the same encode_dir stops at once with an error naming the first one's pid. The arrays'
disk space is reserved when they are created: a full disk is an error before any encoding.
From Python (tests): encode_split(ckpt, split, encode_dir, ...).
Tests: python -m pytest -q tests/test_tokenizer.py tests/test_data.py
"""

import os
import shutil
from contextlib import nullcontext
from dataclasses import fields

import torch
import torch.distributed as dist

from support import data
from support.common import ddp_initialized, read_json, setup_device, write_json
from support.dirlock import DirInUseError, lock_dir
from support.latents import pack_latents, unpack_latents
from support.pretrained import open_tokenizer
from support.views import AUGMENTS, augment_views, crop_size
from tokenizer import TokenizerConfig

BLOCK_IMAGES = 1024  # images per block: a kill loses at most one block's work per rank
PROGRESS = "progress"  # {encode_dir}/progress/<lo>-<hi>.json: one marker per encoded block
SCAN_HINT = "pass --scan_images=True to find and skip unreadable images before encoding"


@torch.no_grad()
def encode_split(ckpt, split, encode_dir="", data_root="", overwrite=False, batch_size=64,
                 num_workers=0, device="cpu", dtype="bfloat16", scan_images=False, dataset=None,
                 dataset_name="", image_size=0, latents_dtype="float16", augment="none",
                 block_images=BLOCK_IMAGES):
    """Encode `split` of the checkpoint's dataset (or `dataset` = (torch Dataset, class list),
    e.g. in tests: images at crop_size(augment, image_size)) into encode_dir (default:
    encoded_{split} beside the checkpoint). dataset_name / image_size: required for a pretrained
    tokenizer file (it records neither), checked against a repo checkpoint's. block_images:
    images per resumable block (tests use small ones). Every rank of an initialized process
    group takes part. -> the encode dir."""
    if batch_size < 1 or num_workers < 0 or block_images < 1:
        raise ValueError(f"expected batch_size >= 1, num_workers >= 0 and block_images >= 1, got "
                         f"{batch_size}, {num_workers}, {block_images}")
    if latents_dtype not in data.LATENTS_DTYPES or augment not in AUGMENTS:
        raise ValueError(f"expected latents_dtype in {data.LATENTS_DTYPES} and augment in "
                         f"{tuple(AUGMENTS)}, got {latents_dtype!r}, {augment!r}")
    ddp = ddp_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    _, _, autocast = setup_device(device, dtype)
    model, info = open_tokenizer(ckpt, device, image_size or None, verbose=master)
    name, root = data.tokenizer_dataset(ckpt, info, dataset_name, data_root, need_name=dataset is None)
    views = AUGMENTS[augment]
    if dataset is None:
        ds, num_classes, _ = data.get_dataset(name, split, crop_size(augment, model.config.image_size),
                                              root, unreadable_hint=SCAN_HINT)
        classes = data.class_names(ds, num_classes)
    else:
        ds, classes = dataset
    out = encode_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"encoded_{split}")
    with lock_encode_dir(out, master, ddp):  # a second encode of out stops here, before any work
        skipped = data.scan_images(ds, num_workers) if scan_images else []
        if master and scan_images:
            print(f"scan: {len(skipped)} unreadable image(s) skipped, {len(ds)} left"
                  + "".join(f"\n  {m}" for m in skipped[:20]) + ("\n  ..." if len(skipped) > 20 else ""))
        extra = {"augment": augment, "views": views} if augment != "none" else {}
        meta = data.source_meta(model, info, ckpt, len(ds) * views, name, root, split, classes, out,
                                latents_dtype, **extra, **({"skipped_images": skipped} if scan_images else {}))
        state = data.existing_encoding(out, meta, overwrite)  # every rank decides before anyone writes
        if state == "done":
            if master:
                data.finish_encoded(out, meta)  # same content; record where the checkpoint is now
                _remove_progress(out)  # left behind if a run was killed right after finishing
                print(f"{out} already holds this encoding (tokenizer {meta['tokenizer_fingerprint']}); "
                      "nothing to do (--overwrite=True redoes it)")
            return out
        if ddp:
            dist.barrier()
        if master and state == "new":
            _remove_progress(out)  # markers of a replaced encoding would skip its blocks
            data.create_encoded(out, meta)
        if ddp:
            dist.barrier()
        layout = block_layout(len(ds), block_images)
        done = set(done_blocks(out, layout))
        if ddp:
            dist.barrier()  # every rank has listed the markers before any rank adds one
        if master and state == "resume":
            print(f"resuming {out}: {len(done)} of {len(layout)} blocks "
                  f"({sum(hi - lo for lo, hi in done)} of {len(ds)} images) already encoded")
        todo = [b for b in layout if b not in done]
        _encode_blocks(model, ds, rank_blocks(todo, rank, world), data.open_encoded(out, meta), out,
                       augment, latents_dtype, meta["codes_dtype"], autocast, batch_size, num_workers,
                       device, desc=f"encode {split} (rank 0)" if master else None)
        if ddp:
            dist.barrier()
        if master:
            flips, codes = _sum_markers(out, layout)
            data.finish_encoded(out, {**meta, "stored_code_flips": flips / max(codes, 1)})
            _remove_progress(out)
            print(f"encoded {len(ds)} images" + (f" x {views} views ({augment})" if views > 1 else "")
                  + f" with tokenizer {meta['tokenizer_fingerprint']} -> {out}")
        return out


def lock_encode_dir(out, master, ddp):
    """Rank 0 locks out (dirlock.lock_dir) and tells the other ranks whether it could, so every
    rank of a second run raises the same DirInUseError at once. -> the held lock (rank 0) or a
    no-op context manager."""
    lock, err = nullcontext(), None
    if master:
        try:
            lock = lock_dir(out)
        except DirInUseError as e:
            err = str(e)
    if ddp:
        msg = [err]
        dist.broadcast_object_list(msg, src=0)
        err = msg[0]
    if err:
        raise DirInUseError(err)
    return lock


# -----------------------------------------------------------------------------
# blocks: the unit of work that a kill can lose and a resume skips


def block_layout(n, block_images):
    """[lo, hi) image ranges of the blocks of an n-image split."""
    return [(lo, min(n, lo + block_images)) for lo in range(0, n, block_images)]


def marker_path(out, block):
    """The file that records a block as encoded, named by its image range."""
    return os.path.join(out, PROGRESS, f"{block[0]:09d}-{block[1]:09d}.json")


def done_blocks(out, layout):
    """The blocks of layout whose marker exists. Markers are matched by name only, so those of
    another block size (a run with another block_images) match no block: their images are redone."""
    folder = os.path.join(out, PROGRESS)
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return [b for b in layout if os.path.basename(marker_path(out, b)) in names]


def rank_blocks(todo, rank, world):
    """This rank's share of the blocks still to do, round-robin: a function of the markers
    alone, so a resume under another world size also covers every block exactly once."""
    return todo[rank::world]


def _remove_progress(out):
    shutil.rmtree(os.path.join(out, PROGRESS), ignore_errors=True)


def _sum_markers(out, layout):
    """-> (codes changed by storage, codes) summed over every block's marker."""
    missing = [b for b in layout if not os.path.isfile(marker_path(out, b))]
    if missing:
        raise RuntimeError(f"{out}: expected a marker in {PROGRESS}/ for each of the {len(layout)} "
                           f"blocks once every rank finished, {len(missing)} missing (first: "
                           f"{marker_path(out, missing[0])}); re-run `python -m support.encode` to encode them")
    counts = [read_json(marker_path(out, b), "block marker") for b in layout]
    return sum(c["code_flips"] for c in counts), sum(c["codes"] for c in counts)


def _encode_blocks(model, ds, blocks, arr, out, augment, latents_dtype, codes_dtype, autocast,
                   batch_size, num_workers, device, desc=None):
    """Encode these blocks into the memmaps arr, batch by batch through one loader; after a
    block's last batch, flush the memmaps and then write its marker, so a marker always means
    rows on disk."""
    from tqdm import tqdm
    views = AUGMENTS[augment]
    batches = [(b, idx) for b in blocks for idx in torch.arange(*b).split(batch_size)]
    loader = data.batch_loader(ds, [idx for _, idx in batches], num_workers, device)
    flips = codes = 0
    bar = tqdm(total=len(batches), disable=desc is None, desc=desc)  # updated after each batch:
    for (block, idx), (x, y) in zip(batches, loader):  # wrapping the loader stopped it at n - 1
        rows = slice(int(idx[0]) * views, (int(idx[-1]) + 1) * views)
        f, n = _encode_batch(model, x, y, arr, rows, augment, latents_dtype, codes_dtype, autocast)
        flips, codes = flips + f, codes + n
        bar.update()
        if int(idx[-1]) + 1 == block[1]:
            for a in arr.values():
                a.flush()
            write_json(marker_path(out, block), {"images": list(block), "code_flips": flips,
                                                 "codes": codes})
            flips = codes = 0
    bar.close()


def _encode_batch(model, x, y, arr, rows, augment, latents_dtype, codes_dtype, autocast):
    """Write the rows of one batch of images (all their views). -> (codes the stored latents
    would not reproduce, codes): int8 storage only counts flips; float16 ones are exact."""
    views = AUGMENTS[augment]
    x = augment_views(x, augment, model.config.image_size).flatten(0, 1)   # (B * views, C, S, S)
    y = y.repeat_interleave(views)
    with autocast:
        z = model.encode_latents(x)
    if not torch.isfinite(z).all():  # NaN latents would become code 0 everywhere, silently
        bad = int(torch.isfinite(z).flatten(1).all(1).logical_not().nonzero()[0]) + rows.start
        raise ValueError(f"the tokenizer's latents of row {bad} (image {bad // views}) are not finite "
                         "(NaN / inf): check the image and the tokenizer's weights")
    flips = 0
    if latents_dtype == "float16":
        z = z.half()  # quantize what is stored: residuals rebuilt from the memmap match the codes
        codes = model.quantize(z.float())
        arr["latents"][rows] = z.cpu().numpy()
    else:  # the tokenizer's own codes; count those the stored latents would not reproduce
        z = z.float()
        codes = model.quantize(z)
        payload, scale = pack_latents(z, latents_dtype)
        flips = int((model.quantize(unpack_latents(payload, scale, latents_dtype)) != codes).sum())
        arr["latents"][rows], arr["latents_scale"][rows] = payload.cpu().numpy(), scale.cpu().numpy()
    arr["codes"][rows] = codes.cpu().numpy().astype(codes_dtype)
    arr["labels"][rows] = y.cpu().numpy()
    return flips, codes.numel()


if __name__ == "__main__":
    import sys

    from support.common import check_choice, check_range, configure, init_distributed

    ckpt = "out/tokenizer_mnist/ckpt.pt"  # tokenizer checkpoint: train_tokenizer.py's out_dir/ckpt.pt,
                                          # or an IBQ / Emu3.5 / LlamaGen file (pretrained.py)
    split = "train"
    encode_dir = ""              # default: encoded_{split} beside the checkpoint
    dataset = ""                 # mnist | folder; default: the one the tokenizer was trained on
                                 # (required for pretrained files)
    data_root = ""               # default: the one the tokenizer was trained on
    image_size = 0               # pretrained files: required (256 for the public releases);
                                 # this repo's tokenizers: from the checkpoint
    latents_dtype = "float16"    # float16 | int8 (+ a float16 scale per vector: half the disk)
    augment = "none"             # none | flip | tencrop: views per image stored as rows
    overwrite = False            # replace an existing, different encoding (or redo the same one)
    scan_images = False          # read every image first and skip unreadable ones (folder data)
    batch_size = 64              # per rank
    num_workers = 0              # DataLoader workers (folder datasets)
    device = "cpu"
    dtype = "bfloat16"           # autocast dtype on CUDA (float32 to disable); CPU runs float32
    # model options belong to training: here they come from the checkpoint (image_size: for
    # pretrained files, which do not record it; checked against a repo checkpoint's)
    model_keys = {f.name for f in fields(TokenizerConfig)} - {"image_size"}
    given = [a[2:].partition("=")[0] for a in sys.argv[1:] if a.startswith("--")]
    if model_keys & set(given):
        raise ValueError(f"{', '.join(f'--{k}' for k in given if k in model_keys)}: encode.py takes the "
                         "model from the tokenizer checkpoint (--ckpt); model options are set when "
                         "training it (train_tokenizer.py)")
    del model_keys, given
    config = configure(globals())
    check_range(config, "batch_size", 1)
    check_range(config, "num_workers", 0)
    check_range(config, "image_size", 0)
    check_choice(config, "latents_dtype", data.LATENTS_DTYPES)
    check_choice(config, "augment", tuple(AUGMENTS))
    check_choice(config, "dataset", ("", "mnist", "folder"))
    ddp, rank, _, _, device = init_distributed(device)
    encode_split(ckpt, split, encode_dir, data_root, overwrite, batch_size, num_workers, device,
                 dtype, scan_images, dataset_name=dataset, image_size=image_size,
                 latents_dtype=latents_dtype, augment=augment)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
