"""
A small MNIST CNN and the two cheap sample metrics built on it, for MNIST-5k generators:

- conditional accuracy: the share of samples generated for class c that the classifier labels c
- Frechet LeNet distance (FLD): the Frechet distance (the FID formula) between Gaussians fitted
  to the classifier's penultimate features (128-d) of generated samples and of the val digits

The classifier is trained by this file on the MNIST-5k train split only (4,500 digits, data.py;
small random shifts as augmentation) and checked on the val split (500 digits); the
checkpoint is written once (atomically, loadable with weights_only=True) and reused:

    python -m support.mnist_classifier                       # -> out/mnist_classifier/ckpt.pt
    python -m support.mnist_classifier --epochs 20 --seed 1 --out out/mnist_classifier_s1
    python -m support.mnist_classifier --force               # retrain over an existing checkpoint

Library use (images: (N, 1, 32, 32) floats in [-1, 1], as data.load_mnist and the tokenizer's
decoder give them; values outside are clamped, as saving them as an image would):

    from support.mnist_classifier import load_classifier, conditional_accuracy, frechet_lenet_distance
    clf = load_classifier("out/mnist_classifier/ckpt.pt")
    acc = conditional_accuracy(clf, images, labels)           # {"accuracy": .., "per_class": [..]}
    fld = frechet_lenet_distance(clf, images, val_images)     # or a (mu, sigma) pair for the reference
"""

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from support.common import load_checkpoint, save_checkpoint

DEFAULT_CKPT = os.path.join("out", "mnist_classifier", "ckpt.pt")
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 32, 32)
FEATURE_DIM = 128


class LeNet(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool stages (32 -> 16 -> 8 -> 4), a 128-d ReLU layer (the
    features the Frechet distance uses), dropout, and the 10-way linear head."""

    def __init__(self, widths=(16, 32, 64), feature_dim=FEATURE_DIM, dropout=0.3):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(c * (32 // 2 ** len(widths)) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)  # training only: eval-mode features are deterministic
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x):
        """(B, 1, 32, 32) -> penultimate features (B, feature_dim)."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


# -----------------------------------------------------------------------------
# training


def random_shift(x, max_shift, generator):
    """Shift each image by its own (dy, dx) in [-max_shift, max_shift]^2, filling with the
    background (-1): (B, 1, H, W) -> (B, 1, H, W)."""
    B, _, H, W = x.shape
    s = max_shift
    d = torch.randint(0, 2 * s + 1, (2, B), generator=generator)
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    rows = (d[0][:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (d[1][:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def _batched(fn, clf, images, batch_size):
    """fn(batch on clf's device) over images in eval mode, batch by batch; -> list of outputs."""
    images = _check_images(images)
    clf.eval()
    dev = next(clf.parameters()).device
    return [fn(images[i:i + batch_size].to(dev)) for i in range(0, len(images), batch_size)]


def predict(clf, images, batch_size=500):
    """Class logits (N, 10) in eval mode, batched."""
    return torch.cat([y.float().cpu() for y in _batched(clf, clf, images, batch_size)])


def train_classifier(epochs=25, batch_size=64, lr=2e-3, weight_decay=1e-4, max_shift=2, seed=0,
                     log=print):
    """Train a LeNet on MNIST-5k train (AdamW, cosine decay, random shifts); -> (model, info)
    with info["val_accuracy"] measured on the 500 val digits, which training never sees."""
    from support.data import load_mnist

    x, y = load_mnist("train")
    xv, yv = load_mnist("val")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = LeNet()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for epoch in range(epochs):
        clf.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(clf(random_shift(x[idx], max_shift, g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = (predict(clf, xv).argmax(1) == yv).double().mean().item()  # exact share, as conditional_accuracy
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}, val accuracy {acc:.4f} "
            f"({time.time() - t0:.0f} s)")
    info = dict(val_accuracy=acc, n_train=len(x), n_val=len(xv), epochs=epochs, batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, max_shift=max_shift, seed=seed,
                train_seconds=round(time.time() - t0, 1))
    return clf, info


def save_classifier(clf, info, path):
    save_checkpoint({"model": clf.state_dict(), "info": info}, path)


def load_classifier(path=DEFAULT_CKPT, map_location="cpu"):
    """The trained classifier in eval mode; its training record is `clf.info`. A missing file
    says how to make it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST classifier {path!r} not found: train it once with "
                                f"`python -m support.mnist_classifier --out {os.path.dirname(path) or '.'}`")
    ck = load_checkpoint(path, map_location, what="MNIST classifier")
    if not isinstance(ck, dict) or "model" not in ck or "info" not in ck:
        raise ValueError(f"MNIST classifier {path!r}: expected a dict with 'model' and 'info' "
                         f"(written by mnist_classifier.py), got keys {sorted(ck) if isinstance(ck, dict) else type(ck)}")
    clf = LeNet()
    clf.load_state_dict(ck["model"])
    clf.info = ck["info"]
    return clf.eval()


# -----------------------------------------------------------------------------
# the metrics


def _check_images(images):
    if not torch.is_tensor(images) or not images.dtype.is_floating_point or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images: expected a float tensor (N, 1, 32, 32) in [-1, 1], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}"
                         f"{' ' + str(images.dtype) if torch.is_tensor(images) else ''}")
    return images.float().clamp(-1, 1)


def conditional_accuracy(clf, images, labels, batch_size=500):
    """Share of samples the classifier labels with the class they were generated for.
    -> {"accuracy": over all samples, "per_class": [share for class c, or None if no sample]}."""
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.dtype.is_floating_point:
        raise ValueError(f"labels: expected ({len(images)},) integer class ids, got "
                         f"{tuple(labels.shape)} {labels.dtype}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels: expected at least one id in [0, {NUM_CLASSES}), got {labels.tolist()[:10]}...")
    right = (predict(clf, images, batch_size).argmax(1) == labels).double()
    per = torch.zeros(NUM_CLASSES, dtype=torch.float64).index_add_(0, labels, right)
    n = torch.bincount(labels, minlength=NUM_CLASSES)
    return {"accuracy": right.mean().item(),
            "per_class": [(per[c] / n[c]).item() if n[c] else None for c in range(NUM_CLASSES)]}


@torch.no_grad()
def feature_stats(clf, images, batch_size=500):
    """Mean (128,) and unbiased covariance (128, 128) of the penultimate features, float64."""
    from support.fid import FeatureStats

    stats = FeatureStats(FEATURE_DIM)
    for f in _batched(clf.features, clf, images, batch_size):
        stats.add(f.cpu())
    return stats.mu_sigma()


def frechet_lenet_distance(clf, images, reference, batch_size=500):
    """Frechet distance between the features of `images` and of `reference` (images, or the
    (mu, sigma) that feature_stats returned for them, to reuse across calls)."""
    if len(images) < 2:
        raise ValueError(f"images: a covariance needs at least 2 samples, got {len(images)}")
    from support.fid import frechet_distance

    ref = reference if isinstance(reference, (tuple, list)) else feature_stats(clf, reference, batch_size)
    return frechet_distance(*feature_stats(clf, images, batch_size), *ref)


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--out", default=os.path.dirname(DEFAULT_CKPT), help="where ckpt.pt goes")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if out/ckpt.pt exists")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error(f"--epochs: expected >= 1, got {a.epochs}")
    path = os.path.join(a.out, "ckpt.pt")
    if os.path.exists(path) and not a.force:
        info = load_classifier(path).info
        print(f"{path} exists (val accuracy {info['val_accuracy']:.4f}); --force retrains it")
        return info
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # a small CNN: more threads only contend
    clf, info = train_classifier(a.epochs, seed=a.seed)
    save_classifier(clf, info, path)
    print(f"wrote {path}: val accuracy {info['val_accuracy']:.4f} on {info['n_val']} digits, "
          f"{info['train_seconds']:.0f} s")
    return info


if __name__ == "__main__":
    main()
