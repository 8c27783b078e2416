"""
SNCE's target for train.py: the per-level temperatures of Eq. 5 and how soft q is at them.

tau is a temperature in the tokenizer's distance units (q(k | r_l) = softmax_k(-d(r_l, C_l[k]) /
tau), Eq. 5), so the same tau means different targets on different tokenizers (the paper's tau = 1
is for its IBQ tokenizer, dot metric, D = 256). train.py turns its settings into one tau per RQ
level (level_taus) in one of three ways:

  target_perplexity > 0   calibrate one tau per level (calibrate.calibrate_tau, bisection on log
                          tau) so that the mean perplexity exp H(q) over a fixed sample of
                          training residuals equals it: how many codes a target spreads over
                          (1 = CE's one-hot, K = uniform); unlike tau it transfers between tokenizers
  tau_scale = "gap"       tau x each level's median gap d(2nd nearest code) - d(nearest code):
                          RQ residuals shrink level by level, and the softmax of Eq. 5 only sees
                          differences of d, so the gap is each level's natural unit
  otherwise               tau as given, on every level (the paper: one level)

Whatever sets the taus, the mean / median perplexity and the mean top-1 mass of q per level
(calibrate.q_stats) are printed (report_target), stored in ckpt.pt and logged, so a reader sees
how soft the target really was. The sample of residuals is fixed (sample_rows: not drawn from the
seed), so every rank and every seed of a study gets the same taus.
"""

import time

import numpy as np
import torch

from snce import dissimilarity
from support.calibrate import calibrate_tau, q_stats

Q_ROWS = 4096  # training residuals per level behind the calibrated taus and the q statistics
SETTING_KEYS = ("tau", "target_perplexity", "tau_scale", "metric")  # the config keys that set q


def sample_rows(n_images, tokens_per_image, n_rows=Q_ROWS):
    """Indices of ceil(n_rows / tokens_per_image) training images spread evenly over the split
    (encoded splits may be sorted by class, MNIST-5k is): their tokens are the residual sample."""
    n_img = min(n_images, -(-n_rows // tokens_per_image))
    return np.unique(np.linspace(0, n_images - 1, n_img).round().astype(np.int64))


def target_setting(config):
    """What decides the taus, as a dict that compares equal exactly when two runs get the same
    target: the target perplexity when calibrating (tau is then unused), else tau and tau_scale."""
    if config["target_perplexity"] > 0:
        return {"target_perplexity": config["target_perplexity"], "metric": config["metric"]}
    return {"tau": config["tau"], "tau_scale": config["tau_scale"], "metric": config["metric"]}


def saved_target_setting(ck):
    """target_setting of a train.py checkpoint. Checkpoints from before target_perplexity was its
    own switch stored none: there tau = 0 meant "calibrate to target_perplexity"."""
    if "target_setting" in ck:
        return ck["target_setting"]
    cfg = ck["config"]
    if cfg.get("tau") == 0:
        return {"target_perplexity": cfg.get("target_perplexity", 25.0), "metric": cfg.get("metric")}
    return {"tau": cfg.get("tau"), "tau_scale": cfg.get("tau_scale"), "metric": cfg.get("metric")}


def level_taus(res, codebooks, metric, tau, tau_scale, target_perplexity, chunk=256):
    """Per-level temperatures [L floats] for the residual sample res (n, L, D) against codebooks
    (L, K, D), and a phrase saying how they were set (see the module docstring)."""
    L, K = codebooks.shape[:2]
    if target_perplexity > 0:
        if target_perplexity >= K:
            raise ValueError(f"target_perplexity={target_perplexity}: expected a value below K={K} "
                             f"(K = a uniform target over the codebook)")
        return ([calibrate_tau(res[:, l], codebooks[l], target_perplexity, metric)[0] for l in range(L)],
                f"calibrated to mean perplexity {target_perplexity:g}")
    if tau_scale == "none":
        return [float(tau)] * L, "given"
    gaps = []
    for l in range(L):
        top2 = torch.cat([dissimilarity(r, codebooks[l], metric).topk(2, largest=False).values
                          for r in res[:, l].split(chunk)])
        gaps.append(float(tau * (top2[:, 1] - top2[:, 0]).median().clamp_min(1e-12)))
    return gaps, f"tau_scale=gap: {tau:g} x each level's median gap"


def snce_target(res, codebooks, metric, setting=None, taus=None, verbose=True):
    """-> {"taus", "how", "rows", "levels": per level calibrate.q_stats (mean / median
    perplexity exp H(q), mean top-1 mass)} on the residual sample res (n, L, D). setting:
    level_taus's keyword arguments (tau, tau_scale, target_perplexity); or taus given (a resume
    of a checkpoint without stored statistics): only the statistics are computed."""
    t0 = time.time()
    taus, how = (taus, "from the checkpoint") if taus else level_taus(res, codebooks, metric, **setting)
    levels = [q_stats(res[:, l], codebooks[l], taus[l], metric) for l in range(len(taus))]
    if verbose:
        print(f"snce target: {time.time() - t0:.1f} s for the taus and q statistics")
    return {"taus": taus, "how": how, "rows": len(res), "levels": levels}


def report_target(info, K):
    """Print q's softness per level; warn when it is nearly uniform or nearly one-hot."""
    print(f"snce target q ({info['how']}; statistics over {info['rows']} training residuals per level):")
    for l, (t, st) in enumerate(zip(info["taus"], info["levels"])):
        print(f"  level {l}: tau {t:.4g} | perplexity exp H(q) mean {st['perplexity_mean']:.1f} median "
              f"{st['perplexity_median']:.1f} (K={K}) | top-1 mass mean {st['top1_mass_mean']:.3f}")
        if st["perplexity_mean"] > K / 4:
            print(f"warning: level {l}: q is nearly uniform (mean perplexity {st['perplexity_mean']:.0f} "
                  f"of K={K} codes at tau={t:.4g}): SNCE then teaches little about the data; tau is in "
                  "the tokenizer's distance units, so use a smaller one, or --target_perplexity=25 instead of --tau")
        elif st["top1_mass_mean"] > 0.99:
            print(f"warning: level {l}: q is nearly one-hot (mean top-1 mass {st['top1_mass_mean']:.3f} "
                  f"at tau={t:.4g}): SNCE is then CE; use a larger tau, or --target_perplexity=25 instead of --tau")
