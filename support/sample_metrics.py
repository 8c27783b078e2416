"""
Sample metrics of train.py's evals (MNIST): with eval_classifier (a checkpoint of
support/mnist_classifier.py, a classifier of the real digits), every eval generates class-balanced
samples and logs their conditional accuracy (does a sample of class c look like a c?) and the
Frechet LeNet distance of their classifier features to those of the real val images.

    clf = load_scorer(path, tok, num_classes, device)       # refuses a tokenizer that is not MNIST's
    ref = real_feature_stats(clf, val_meta, image_size)      # (mu, sigma) of the real val digits
    score_samples(clf, images, labels, ref, num_classes)     # {"sample_accuracy", ..., "sample_fld"}
"""

import torch

from support import data
from support.mnist_classifier import (IMAGE_SHAPE, NUM_CLASSES, conditional_accuracy, feature_stats,
                                      frechet_lenet_distance, load_classifier)


def load_scorer(path, tok, num_classes, device, load=True):
    """The classifier at path (None unless load: only rank 0 scores), after checking that the
    tokenizer decodes MNIST-shaped images of at most its number of classes."""
    decoded = (tok.config.in_channels, tok.config.image_size, tok.config.image_size)
    if decoded != IMAGE_SHAPE or num_classes > NUM_CLASSES:
        raise ValueError(f"eval_classifier={path!r} scores {IMAGE_SHAPE} images of at most "
                         f"{NUM_CLASSES} classes (MNIST); this tokenizer decodes {decoded} images of "
                         f"{num_classes} classes")
    return load_classifier(path, device) if load else None


def real_feature_stats(clf, meta, image_size):
    """(mu, sigma) of clf's features on the real images of the split an encoding's meta names
    (the dataset val_dir was encoded from)."""
    ds, _, _ = data.get_dataset(meta["dataset"], meta.get("split", "val"), image_size, meta.get("data_root", ""))
    return feature_stats(clf, torch.stack([ds[i][0] for i in range(len(ds))]))


def score_samples(clf, images, labels, ref, num_classes):
    """Generated images (B, C, S, S) of classes labels (B,) -> conditional accuracy (overall, per
    class) and the Frechet LeNet distance to the reference statistics ref."""
    acc = conditional_accuracy(clf, images, labels)
    return {"sample_accuracy": acc["accuracy"], "sample_accuracy_per_class": acc["per_class"][:num_classes],
            "sample_fld": frechet_lenet_distance(clf, images, ref)}
