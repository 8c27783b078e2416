"""
The statistics of the codebook-size study's v2 report (support/study_report2.py): relative
scales, the seed bootstrap and its percentile intervals, the slope of a gain against log K.

A comparison A vs B at one K is made per seed (tokenizer S and generator S trained together), on a
relative scale so that K's with very different error levels can be compared:
  error ratio  (1 - acc_A) / (1 - acc_B)   < 1: A makes fewer class errors
  FLD ratio    FLD_A / FLD_B               < 1: A's samples are closer to the val digits
averaged over seeds as a mean of logs (a geometric mean). The interval resamples the seeds with
replacement (each seed carries its tokenizer and its generator runs, so both sources of variation
are in it), BOOT_N times from a fixed generator, and takes the 2.5 / 97.5 percentiles.

    python -m pytest -q tests/test_study.py -k "bootstrap or slope or ratio"
"""

import numpy as np

BOOT_N = 4000
BOOT_SEED = 0
ACC_CLIP = 1e-3   # an accuracy of exactly 1 (or 0) would make an error ratio infinite


def log_error_ratio(acc_a, acc_b):
    """log((1 - acc_a) / (1 - acc_b)), elementwise; accuracies clipped to [ACC_CLIP, 1 - ACC_CLIP]."""
    ea = 1 - np.clip(np.asarray(acc_a, dtype=float), ACC_CLIP, 1 - ACC_CLIP)
    eb = 1 - np.clip(np.asarray(acc_b, dtype=float), ACC_CLIP, 1 - ACC_CLIP)
    return np.log(ea) - np.log(eb)


def log_ratio(a, b):
    """log(a / b), elementwise (FLD, steps)."""
    return np.log(np.asarray(a, dtype=float)) - np.log(np.asarray(b, dtype=float))


def boot_indices(n, n_boot=BOOT_N, seed=BOOT_SEED):
    """(n_boot, n) resampled seed positions, from a fixed generator."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_mean(x, n_boot=BOOT_N, seed=BOOT_SEED):
    """-> (mean, lo, hi): the mean of per-seed values x and its 95% percentile interval."""
    x = np.asarray(x, dtype=float)
    means = x[boot_indices(len(x), n_boot, seed)].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def slope(log_ks, means):
    """Least-squares slope of means against log_ks (natural log of K)."""
    x, y = np.asarray(log_ks, dtype=float), np.asarray(means, dtype=float)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc ** 2).sum())


def bootstrap_slope(per_k, n_boot=BOOT_N, seed=BOOT_SEED):
    """per_k {K: per-seed values}: the slope of the per-K mean against ln K, resampling the seeds
    within each K (each K its own draws, from one generator, K in increasing order).
    -> (slope, lo, hi), per unit of ln K."""
    ks = sorted(per_k)
    xs = np.log(np.array(ks, dtype=float))
    rng = np.random.default_rng(seed)
    boots = np.stack([np.asarray(per_k[K], dtype=float)[rng.integers(0, len(per_k[K]), size=(n_boot, len(per_k[K])))]
                      .mean(1) for K in ks], axis=1)   # (n_boot, len(ks))
    xc = xs - xs.mean()
    slopes = ((boots - boots.mean(1, keepdims=True)) * xc).sum(1) / (xc ** 2).sum()
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    return slope(xs, [np.mean(per_k[K]) for K in ks]), float(lo), float(hi)


def below_one(mean, lo, hi):
    """A log-scale interval entirely below 0: the ratio is < 1 with the interval excluding 1."""
    return hi < 0


def fmt_ratio(mean, lo, hi):
    """A mean log ratio and its interval as ratios: '0.62 [0.55, 0.70]'."""
    return f"{np.exp(mean):.2f} [{np.exp(lo):.2f}, {np.exp(hi):.2f}]"
