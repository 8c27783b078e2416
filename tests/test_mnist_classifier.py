"""mnist_classifier.py: the shift augmentation, conditional accuracy and the Frechet LeNet
distance against naive per-sample references; reuse of a saved classifier; bad inputs. The
real training run (val accuracy >= 97%) is marked slow.

    .venv/bin/python -m pytest -q tests/test_mnist_classifier.py
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import mnist_classifier as mc  # noqa: E402
from test_fid import naive_fid  # noqa: E402


def tiny_clf(seed=0):
    torch.manual_seed(seed)
    return mc.LeNet().eval()


def images(n, seed=1):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def shifted(x, dy, dx):
    """Naive shift of one (1, H, W) image by (dy, dx), background -1 where nothing moves in."""
    out = torch.full_like(x, -1.0)
    H, W = x.shape[1:]
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[0, i, j] = x[0, i - dy, j - dx]
    return out


def test_random_shift_is_a_shift_within_range():
    x = images(6)[:, :, :8, :8].contiguous()
    out = mc.random_shift(x, 2, torch.Generator().manual_seed(0))
    seen = set()
    for b in range(len(x)):
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.equal(out[b], shifted(x[b], dy, dx))]
        assert len(hits) == 1, b  # exactly one shift in [-2, 2]^2 explains the output
        seen.add(hits[0])
    assert len(seen) > 1  # each image draws its own shift


def test_conditional_accuracy_matches_naive():
    clf, x = tiny_clf(), images(37)
    with torch.no_grad():
        pred = [int(clf(x[i:i + 1]).argmax()) for i in range(len(x))]  # one at a time
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 9, (len(x),), generator=g)  # class 9: no samples
    labels[::2] = torch.tensor(pred[::2]).clamp(max=8)  # make some of them right
    right, count = [0] * 10, [0] * 10
    for p, c in zip(pred, labels.tolist()):
        count[c] += 1
        right[c] += p == c
    got = mc.conditional_accuracy(clf, x, labels, batch_size=8)
    assert got["accuracy"] == pytest.approx(sum(right) / len(x), abs=1e-12)
    assert got["per_class"][:9] == pytest.approx([r / n for r, n in zip(right[:9], count[:9])], abs=1e-12)
    assert got["per_class"][9] is None
    assert 0 < got["accuracy"] < 1


def naive_features(clf, x):
    """The head's input, captured by a hook, one image at a time (float64)."""
    feats = []
    h = clf.head.register_forward_hook(lambda m, i, o: feats.append(i[0].double()))
    with torch.no_grad():
        for i in range(len(x)):
            clf(x[i:i + 1])
    h.remove()
    return torch.cat(feats).numpy()


def test_frechet_lenet_distance_matches_naive():
    clf, a, b = tiny_clf(), images(40, seed=4), images(30, seed=5) * 0.5
    fa, fb = naive_features(clf, a), naive_features(clf, b)
    ref = naive_fid(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert ref > 1e-3
    assert mc.frechet_lenet_distance(clf, a, b, batch_size=16) == pytest.approx(ref, rel=1e-6)
    stats_b = mc.feature_stats(clf, b)
    assert mc.frechet_lenet_distance(clf, a, stats_b) == pytest.approx(ref, rel=1e-6)
    cov = np.cov(fb, rowvar=False)  # float32 features: compare at float32 precision
    np.testing.assert_allclose(stats_b[1], cov, rtol=0, atol=1e-4 * np.abs(cov).max())


def test_saved_classifier_is_reused_not_retrained(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    info = {"val_accuracy": 0.5, "n_val": 500}
    mc.save_classifier(tiny_clf(), info, str(path))
    before = path.stat().st_mtime_ns, path.read_bytes()
    assert mc.main(["--out", str(tmp_path)]) == info  # no --force: nothing trained or written
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert "exists" in capsys.readouterr().out
    clf = mc.load_classifier(str(path))
    assert clf.info == info and not clf.training


def test_bad_inputs(tmp_path):
    clf = tiny_clf()
    with pytest.raises(FileNotFoundError, match="python -m support.mnist_classifier"):
        mc.load_classifier(str(tmp_path / "missing.pt"))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="'model' and 'info'"):
        mc.load_classifier(str(tmp_path / "foreign.pt"))
    for bad in (torch.rand(3, 32, 32), torch.rand(3, 1, 28, 28), torch.zeros(3, 1, 32, 32, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"images: expected a float tensor \(N, 1, 32, 32\)"):
            mc.conditional_accuracy(clf, bad, torch.zeros(3, dtype=torch.long))
    for labels in (torch.zeros(2, dtype=torch.long), torch.zeros(3), torch.tensor([0, 1, 10])):
        with pytest.raises(ValueError, match="labels"):
            mc.conditional_accuracy(clf, images(3), labels)
    with pytest.raises(ValueError, match="at least 2"):
        mc.frechet_lenet_distance(clf, images(1), images(5))


@pytest.mark.slow  # the real training run on the MNIST-5k train split
def test_trained_classifier_reaches_97_percent_on_val(tmp_path):
    info = mc.main(["--out", str(tmp_path)])
    assert info["val_accuracy"] >= 0.97 and info["n_train"] == 4500 and info["n_val"] == 500
    clf = mc.load_classifier(str(tmp_path / "ckpt.pt"))
    from support.data import load_mnist
    xv, yv = load_mnist("val")
    assert mc.conditional_accuracy(clf, xv, yv)["accuracy"] == pytest.approx(info["val_accuracy"], abs=1e-9)
