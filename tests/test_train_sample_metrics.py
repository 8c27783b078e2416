"""train.py's sample metrics at every eval (eval_classifier, eval_samples): on a tiny 32x32
tokenizer (helpers.py) with tiny random classifiers saved in mnist_classifier.py's checkpoint
format, the logged conditional accuracy and Frechet LeNet distance equal
mnist_classifier's functions recomputed on the same samples against the val images (generated
here, standing in for the MNIST-5k val digits, so the suite needs no dataset); a
classifier that always says 0 scores 1/C; a tokenizer whose images it can't read is an error.

    python -m pytest -q tests/test_train_sample_metrics.py
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import data  # noqa: E402
from support import mnist_classifier as mc  # noqa: E402
from support.common import read_jsonl  # noqa: E402
from support.encode import encode_split  # noqa: E402
from helpers import NUM_CLASSES, class_images, make_encoded, make_tokenizer_ckpt  # noqa: E402
from test_train import base_args, run_train  # noqa: E402


@pytest.fixture(scope="module")
def enc32(tmp_path_factory):
    """A one-level tokenizer of 32x32 one-channel images (8x8 grid, K=16) recorded as trained
    on MNIST (so the val reference is the MNIST-5k val split), and generated images encoded."""
    root = str(tmp_path_factory.mktemp("enc32"))
    ckpt = os.path.join(root, "tok.pt")
    make_tokenizer_ckpt(ckpt, image_size=32, channels=(8, 8, 8), downsample=4, levels=1,
                        source={"dataset": "mnist", "data_root": ""})
    for i, (split, n) in enumerate((("train", 24), ("val", 12))):
        x, y = class_images(n, size=32, seed=i)
        encode_split(ckpt, split, os.path.join(root, split), batch_size=16,
                     dataset=(torch.utils.data.TensorDataset(x, y), list(range(NUM_CLASSES))))
    return os.path.join(root, "train"), os.path.join(root, "val"), ckpt


VAL_IMAGES = class_images(40, size=32, seed=7)  # the "real val digits" the FLD compares with


@pytest.fixture
def fake_mnist(monkeypatch):
    """data.get_dataset("mnist", ...) -> VAL_IMAGES, so the reference needs no MNIST download."""
    real = data.get_dataset

    def get_dataset(name, split, image_size, root=""):
        if name != "mnist":
            return real(name, split, image_size, root)
        return torch.utils.data.TensorDataset(*VAL_IMAGES), 10, 1
    monkeypatch.setattr(data, "get_dataset", get_dataset)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def classifier(path, always_zero=False):
    torch.manual_seed(0)
    clf = mc.LeNet()
    if always_zero:  # logits = bias: class 0 wins for every image
        with torch.no_grad():
            clf.head.weight.zero_()
            clf.head.bias.copy_(-torch.arange(10.0))
    mc.save_classifier(clf, {"val_accuracy": 0.0}, path)
    return path


def test_logged_metrics_equal_recomputed(enc32, tmp_path, fake_mnist):
    out = str(tmp_path / "o")
    clf_path = classifier(str(tmp_path / "clf.pt"))
    g = run_train(base_args(enc32, out, max_iters=1, eval_interval=1, eval_classifier=clf_path,
                            eval_samples=30, ema_decay=0.5))
    recs = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if "val_nll" in r]
    assert [r["iter"] for r in recs] == [0, 1]
    labels = torch.arange(30) % NUM_CLASSES  # class-balanced: 10 of each
    images = g["generate_images"](labels)   # the final model, the eval's fixed seed
    assert images.shape == (30, 1, 32, 32)
    clf = mc.load_classifier(clf_path)
    acc = mc.conditional_accuracy(clf, images, labels)
    val = VAL_IMAGES[0]
    last = recs[-1]
    assert last["sample_accuracy"] == acc["accuracy"]
    assert last["sample_accuracy_per_class"] == acc["per_class"][:NUM_CLASSES]
    assert last["sample_fld"] == pytest.approx(mc.frechet_lenet_distance(clf, images, val), rel=1e-6)
    assert last["sample_seconds"] > 0


def test_no_sample_metrics_at_start_when_asked(enc32, tmp_path, fake_mnist):
    out = str(tmp_path / "o")
    run_train(base_args(enc32, out, max_iters=1, eval_interval=1, eval_classifier=classifier(str(tmp_path / "c.pt")),
                        eval_samples=10, eval_samples_at_start=False))
    recs = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if "val_nll" in r]
    assert [("sample_fld" in r) for r in recs] == [False, True]  # iter 0: NLL only; iter 1: both


def test_always_zero_classifier_scores_one_over_c(enc32, tmp_path, fake_mnist):
    out = str(tmp_path / "o")
    run_train(base_args(enc32, out, max_iters=0, eval_classifier=classifier(str(tmp_path / "z.pt"), True),
                        eval_samples=12))
    rec = [r for r in read_jsonl(os.path.join(out, "log.jsonl")) if "val_nll" in r][0]
    assert rec["sample_accuracy"] == pytest.approx(1 / NUM_CLASSES)
    assert rec["sample_accuracy_per_class"] == [1.0, 0.0, 0.0]


def test_classifier_needs_32x32_digits(enc, enc32, tmp_path, capsys, fake_mnist):
    clf_path = classifier(str(tmp_path / "clf.pt"))
    with pytest.raises(ValueError, match=r"scores \(1, 32, 32\) images .* decodes \(1, 8, 8\) images"):
        run_train(base_args(enc, str(tmp_path / "o"), max_iters=0, eval_classifier=clf_path))
    with pytest.raises(FileNotFoundError, match="python -m support.mnist_classifier"):
        run_train(base_args(enc32, str(tmp_path / "p"), max_iters=0, eval_classifier=str(tmp_path / "none.pt")))
    capsys.readouterr()
    run_train(base_args(enc, str(tmp_path / "q"), max_iters=0, eval_samples=50))
    assert "eval_samples" in capsys.readouterr().out  # ignored without a classifier: a warning
