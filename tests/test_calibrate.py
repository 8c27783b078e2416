"""calibrate.py: entropy / perplexity and the q statistics against a naive float64 per-row
computation, and the bisection against a brute-force scan over a tau grid.

    .venv/bin/python -m pytest -q tests/test_calibrate.py
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from support.calibrate import (calibrate_tau, entropy, perplexity, q_stats,  # noqa: E402
                               row_entropy, row_stats)


def naive_row(z, codebook, tau, metric):
    """Eq. 5 for one latent, written out: d to every code, q = exp(-d / tau) / sum, float64."""
    d = []
    for c in codebook:
        if metric == "l2":
            d.append(sum((a - b) ** 2 for a, b in zip(z.tolist(), c.tolist())))
        elif metric == "dot":
            d.append(-float(z @ c))
        else:
            d.append(-float(z @ c) / (float(z.norm()) * float(c.norm())))
    m = min(d)
    w = [math.exp(-(x - m) / tau) for x in d]
    q = [x / sum(w) for x in w]
    h = -sum(p * math.log(p) for p in q if p > 0)
    return math.exp(h), q[d.index(m)]


def naive_stats(z, codebook, tau, metric):
    rows = [naive_row(r, codebook, tau, metric) for r in z]
    ppl = sorted(p for p, _ in rows)
    n = len(ppl)
    return {"perplexity_mean": sum(ppl) / n, "perplexity_median": ppl[(n - 1) // 2],  # torch: lower median
            "top1_mass_mean": sum(t for _, t in rows) / n}


def data(N=13, K=29, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("metric,tau", [("l2", 0.05), ("l2", 2.0), ("dot", 0.3), ("cos", 0.1)])
def test_q_stats_match_naive_rows(metric, tau):
    z, book = data()
    got = q_stats(z, book, tau, metric, chunk_rows=4)  # 13 rows: chunks of 4, 4, 4, 1
    ref = naive_stats(z, book, tau, metric)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-10), k


def test_entropy_and_perplexity_of_any_distribution():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4], dtype=torch.float64)
    want = [-sum(x * math.log(x) for x in row if x > 0) for row in p.tolist()]   # 0 log 0 = 0
    torch.testing.assert_close(entropy(p), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(perplexity(p), torch.tensor(want, dtype=torch.float64).exp())
    assert perplexity(p)[1].item() == 1.0 and perplexity(p)[2].item() == pytest.approx(4.0)
    assert entropy(p[None]).shape == (1, 3)                         # any leading dims


@pytest.mark.parametrize("metric,tau", [("l2", 0.05), ("dot", 0.3), ("cos", 0.1)])
def test_row_entropy_matches_naive_rows(metric, tau):
    z, book = data()
    want = [math.log(naive_row(r, book, tau, metric)[0]) for r in z]
    torch.testing.assert_close(row_entropy(z, book, tau, metric, chunk_rows=4),
                               torch.tensor(want, dtype=torch.float64))


def test_row_stats_limits():
    z, book = data()
    ppl, top1 = row_stats(z, book, 0.0, "l2")  # tau 0: CE's one-hot target
    assert torch.equal(ppl, torch.ones(len(z), dtype=z.dtype)) and torch.equal(top1, ppl)
    ppl, top1 = row_stats(z, book, 1e6, "l2")  # huge tau: nearly uniform over the K codes
    torch.testing.assert_close(ppl, torch.full_like(ppl, len(book)), rtol=1e-4, atol=0)
    torch.testing.assert_close(top1, torch.full_like(top1, 1 / len(book)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("metric,target,tau0", [("l2", 4.0, 1.0), ("l2", 20.0, 1e-3), ("cos", 2.5, 50.0)])
def test_calibrate_tau_matches_grid_scan(metric, target, tau0):
    z, book = data(N=17, K=40)
    tau, stats = calibrate_tau(z, book, target, metric, rtol=1e-4, chunk_rows=5, tau0=tau0)
    assert stats["perplexity_mean"] == pytest.approx(target, rel=1e-4)
    assert stats == pytest.approx(q_stats(z, book, tau, metric), rel=1e-12)  # the stats at that tau
    # brute force: the mean perplexity on a fine log grid; the target is crossed between two
    # neighbouring grid taus, and the calibrated tau must lie between them
    grid = torch.logspace(-4, 3, 701, dtype=torch.float64).tolist()
    means = [naive_stats(z, book, t, metric)["perplexity_mean"] for t in grid[::10]]
    i = next(j for j, m in enumerate(means) if m > target)
    fine = grid[10 * (i - 1): 10 * i + 1]
    fmeans = [naive_stats(z, book, t, metric)["perplexity_mean"] for t in fine]
    j = next(j for j, m in enumerate(fmeans) if m > target)
    assert fine[j - 1] <= tau <= fine[j]


def test_calibrate_errors():
    z, book = data()
    for bad in (1.0, 0.5, len(book), 1e9):
        with pytest.raises(ValueError, match="perplexity"):
            calibrate_tau(z, book, bad)
    with pytest.raises(ValueError, match=r"latents \(N, D\)"):
        q_stats(z[:, :2], book, 1.0)
    # latents halfway between two codes: q has at least two equal top codes, perplexity >= 2
    book = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [5.0, 5.0], [-5.0, 5.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not reached"):
        calibrate_tau(torch.zeros(3, 2, dtype=torch.float64), book, 1.5, "l2")
    with pytest.raises(ValueError, match="not finite|not reached|too small"):  # fp32: overflow first
        calibrate_tau(torch.zeros(3, 2), book.float(), 1.5, "l2")


@pytest.mark.parametrize("metric", ["l2", "dot", "cos"])
def test_q_stats_ignore_autocast(metric):
    """Calibration inside a bf16 autocast (a training loop's) measures the fp32 target: the same
    statistics bit for bit (q computed in bf16 would move them)."""
    g = torch.Generator().manual_seed(0)
    z, book = torch.randn(256, 8, generator=g), torch.randn(4096, 8, generator=g)
    want = q_stats(z, book, 0.05, metric)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q_stats(z, book, 0.05, metric) == want
