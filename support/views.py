"""
Reading images and the views a tokenizer encodes: `ImageFolder`, the ImageNet-style folder
{root}/<class>/<image> that data.get_dataset("folder", ...) opens (and `scan_images`, which
drops its unreadable files before a run); ADM / LlamaGen's center crop of a PIL image
(`center_crop_arr`); and the augmented views LlamaGen pre-extracts codes for (encode.py
--augment): none (the image), flip (+ its mirror), tencrop (four corners and the center of a
1.1x center crop, and their mirrors).

    from support.views import AUGMENTS, ImageFolder, augment_views, crop_size
    ds = ImageFolder("/data/imagenet/train", 281)   # ds[i] = ((3, 281, 281) in [-1, 1], label)
    v = augment_views(x, "tencrop", 256)   # (B, C, 281, 281) -> (B, 10, C, 256, 256)

Tests: python -m pytest -q tests/test_data.py tests/test_pretrained.py tests/test_pretrained_pipeline.py
"""

import os

import numpy as np
import torch

from support.common import ddp_initialized, shard_range

UNREADABLE_HINT = ("remove or replace the file (train_tokenizer.py and encode.py skip unreadable "
                   "images with --scan_images=True)")

# -----------------------------------------------------------------------------
# image folders: {root}/<class>/<image>, read with Pillow


def image_extensions():
    """The file extensions (lower case, with the dot) of every format Pillow can open."""
    from PIL import Image
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _visible(folder):
    """Sorted names in folder, hidden ones (.thumbnails/, .DS_Store, ._x.JPEG) left out."""
    return sorted(f for f in os.listdir(folder) if not f.startswith("."))


class ImageFolder(torch.utils.data.Dataset):
    """{root}/<class>/*.JPEG -> ((3, S, S) float32 in [-1, 1], class index). Classes sorted;
    hidden (dot) folders and files are not data (.thumbnails/ would shift every label).
    unreadable_hint: what the error for an unreadable image tells the user to do (the option
    that exists in the running script)."""

    def __init__(self, root, image_size, unreadable_hint=UNREADABLE_HINT):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (expected "
                                    "root/<class>/*.JPEG)")
        self.classes = [d for d in _visible(root) if os.path.isdir(os.path.join(root, d))]
        exts, self.items, skipped, empty = image_extensions(), [], {}, []
        for i, c in enumerate(self.classes):
            files = [f for f in _visible(os.path.join(root, c))
                     if os.path.isfile(os.path.join(root, c, f))]
            images = [f for f in files if os.path.splitext(f)[1].lower() in exts]
            for f in set(files) - set(images):
                ext = os.path.splitext(f)[1].lower() or "no extension"
                skipped[ext] = skipped.get(ext, 0) + 1
            empty += [] if images else [c]
            self.items += [(os.path.join(root, c, f), i) for f in images]
        if not self.classes:
            raise ValueError(f"image folder {root!r} has no class folders: expected "
                             "root/<class>/*.JPEG")
        if empty:
            raise ValueError(f"image folder {root!r}: class folder(s) {empty[:5]} hold no images "
                             f"(of {len(self.classes)} classes): expected root/<class>/*.JPEG (any "
                             "format Pillow opens); remove the empty folders or add their images")
        if skipped:
            print(f"{root}: skipped {sum(skipped.values())} file(s) that are not images Pillow can "
                  "open: " + ", ".join(f"{n} x {e}" for e, n in sorted(skipped.items())))
        self.image_size, self.unreadable_hint = image_size, unreadable_hint

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = _to_rgb(im)
                s = self.image_size / min(im.size)  # short side -> image_size, then center crop
                im = im.resize((max(self.image_size, round(im.size[0] * s)),
                                max(self.image_size, round(im.size[1] * s))), Image.BICUBIC)
                left, top = (im.size[0] - self.image_size) // 2, (im.size[1] - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                x = np.array(im, dtype=np.uint8)  # a writable copy
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL raises these for truncated / non-image / absurdly large files
            raise ValueError(f"cannot read image {path!r}: {e} ({self.unreadable_hint})") from e
        return torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1.0, label

    def drop(self, indices):
        """Remove these items (e.g. unreadable files found by scan_images)."""
        bad = set(indices)
        self.items = [it for i, it in enumerate(self.items) if i not in bad]


def _to_rgb(im):
    """A PIL image -> RGB. 16/32-bit integer grayscale (modes I;16*, I: what Pillow makes of
    16-bit PNG / TIFF) holds 0..65535, which convert("RGB") would clip to 255 (all white):
    scale it to 0..255 first."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64) * (255 / 65535)
        im = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


class _Probe(torch.utils.data.Dataset):
    """Item j -> (index, error message or "") of reading ds[indices[j]]."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = int(self.indices[j])
        try:
            self.ds[i]
            return i, ""
        except ValueError as e:
            return i, str(e)


def _as_list(batch):
    return batch


def scan_images(ds, num_workers=0):
    """Read every image of an ImageFolder once (the same decode as training) and drop the ones
    that fail, so a corrupt file cannot stop a long run midway. Under torch.distributed each
    rank reads its share and all ranks drop the same files. -> [error message per dropped
    file]. Other datasets (mnist: tensors in memory) have nothing to scan: -> []."""
    if not isinstance(ds, ImageFolder):
        return []
    import torch.distributed as dist
    ddp = ddp_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    lo, hi = shard_range(len(ds), rank, world)
    loader = torch.utils.data.DataLoader(_Probe(ds, range(lo, hi)), batch_size=64,
                                         num_workers=num_workers, collate_fn=_as_list)
    bad = [(i, msg) for batch in loader for i, msg in batch if msg]
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, bad)
        bad = [b for part in parts for b in part]
    ds.drop([i for i, _ in bad])
    return [msg for _, msg in bad]



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
