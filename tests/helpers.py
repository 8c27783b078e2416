"""Shared test fixtures: a tiny tokenizer checkpoint and its encoded splits, written by encode.py's
encode_split (the real encoder, on generated images; no MNIST, no network)."""

import os
import sys
from dataclasses import asdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tokenizer as tk  # noqa: E402
from support.common import save_checkpoint  # noqa: E402
from support.encode import encode_split  # noqa: E402

NUM_CLASSES = 3


def make_tokenizer_ckpt(path, seed=0, source=None, **cfg):
    """Save a randomly initialised tokenizer (8x8 one-channel images, 4x4 grid, L=2, K=16, D=4
    unless cfg says otherwise) with random codebooks as train_tokenizer.py would; `source` is
    the run config it records (dataset, data_root). -> the model."""
    torch.manual_seed(seed)
    base = dict(in_channels=1, image_size=8, channels=(8, 8), downsample=2, num_res_blocks=1,
                code_dim=4, levels=2, codebook_size=16)
    config = tk.TokenizerConfig(**{**base, **cfg})
    model = tk.Tokenizer(config)
    model.quantizer.books.normal_()
    save_checkpoint({"model": model.state_dict(), "model_config": asdict(config), "iter": 3,
                     "config": source or {"dataset": "synthetic", "data_root": ""}}, path)
    return model


def class_images(n, size=8, seed=0):
    """(n, 1, size, size) images in [-1, 1] whose brightness depends on the label (n % 3)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = (torch.rand(n, 1, size, size, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / NUM_CLASSES) * 2 - 1
    return x, y


def make_encoded(root, n_train=48, n_val=12, seed=0):
    """A tiny tokenizer checkpoint and its encoded train / val splits (encode.encode_split).
    -> (train_dir, val_dir, tok_ckpt)."""
    ckpt = os.path.join(root, "tok.pt")
    make_tokenizer_ckpt(ckpt, seed)
    for i, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        x, y = class_images(n, seed=seed + i)
        ds = torch.utils.data.TensorDataset(x, y)
        encode_split(ckpt, split, os.path.join(root, split), batch_size=16,
                     dataset=(ds, list(range(NUM_CLASSES))))
    return os.path.join(root, "train"), os.path.join(root, "val"), ckpt


def naive_codes(z, books):
    """The l2 residual codes of latents z (N, D) under codebooks (L, K, D), level by level in
    float64 Python: at level l, t_l = argmin_k ||r_l - C_l[k]||^2 and r_{l+1} = r_l - C_l[t_l].
    -> (N, L) list of lists."""
    out = []
    for r in z.double().tolist():
        row = []
        for book in books.double().tolist():
            t = min(range(len(book)), key=lambda k: sum((a - b) ** 2 for a, b in zip(r, book[k])))
            row.append(t)
            r = [a - b for a, b in zip(r, book[t])]
        out.append(row)
    return out


def make_image_folder(root, n_per_class=6, size=20):
    """{root}/{train,val}/{a,b}/<i>.png: random RGB images, size x (size + 4) (not square: the
    loader resizes the short side and centre crops)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.png"))
