"""toy.py: the quantizer, the exact cell probabilities and the nll / tv evaluation against
naive references, and a fast end-to-end run that writes the figure and the metrics file.

    .venv/bin/python -m pytest -q tests/test_toy.py
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy
from snce import nearest_code

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_is_nearest_grid_centre():
    x = toy.sample(500, torch.Generator().manual_seed(0)) * 1.5   # some fall off the square
    _, codebook = toy.grid_centers()
    assert torch.equal(toy.quantize(x), nearest_code(x, codebook, "l2"))
    assert codebook.shape == (toy.GRID**2, 2)


def test_true_cell_probs_match_monte_carlo():
    P = toy.true_cell_probs()
    assert P.shape == (toy.GRID**2,) and abs(P.sum().item() - 1) < 1e-12 and (P >= 0).all()
    n = 400_000
    counts = torch.bincount(toy.quantize(toy.sample(n, torch.Generator().manual_seed(1))),
                            minlength=toy.GRID**2).double() / n
    assert 0.5 * (counts - P).abs().sum() < 0.03   # TV of the empirical histogram


def test_evaluate_matches_naive_loops():
    """nll = mean over eval samples of -log p(cell); tv = half the L1 distance over all cells."""
    g = torch.Generator().manual_seed(2)
    K = toy.GRID**2
    logp = (torch.randn(K, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    P = torch.rand(K, generator=g, dtype=torch.float64)
    P /= P.sum()
    tokens = torch.randint(0, K, (500,), generator=g)
    nll = 0.0
    for t in tokens.tolist():
        nll -= math.log(math.exp(logp[t].item()))
    tv = 0.0
    for k in range(K):
        tv += abs(math.exp(logp[k].item()) - P[k].item())
    got = toy.evaluate(logp, P, tokens)
    assert got["nll"] == pytest.approx(nll / len(tokens), rel=1e-12)
    assert got["tv"] == pytest.approx(tv / 2, rel=1e-10)


def test_toy_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "toy.py", "--seeds", "2", "--steps", "30",
                          "--tau", "0.1", "0.3", "--out_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "toy_metrics.json").read_text())
    for obj in ("ce", "snce"):
        assert len(m[obj]["nll"]) == len(m[obj]["tv"]) == 2
        assert all(0 <= v <= 1 for v in m[obj]["tv"])
    assert len(m["l2"]["mode_dist"]) == 2
    assert set(m["tau_sweep"]) == {"0.1", "0.3"}
    for name in ("toy.png", "toy_tau.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_toy_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy.main(["--tau", "-1", "--out_dir", str(tmp_path)])
    assert "every --tau > 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
