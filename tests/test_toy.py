"""toy.py: the quantizer and the exact cell probabilities against naive references, and a
fast end-to-end run that writes the figure and the metrics file."""

import json
import subprocess
import sys
from pathlib import Path

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


def test_toy_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "toy.py", "--seeds", "2", "--steps", "30",
                          "--tau", "0.1", "0.3", "--out_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "toy_metrics.json").read_text())
    for obj in ("ce", "snce"):
        assert len(m[obj]["nll"]) == len(m[obj]["tv"]) == 2
        assert all(0 <= v <= 1 for v in m[obj]["tv"])
    assert len(m["l2"]["mode_dist"]) == 2 and m["config"]["vocab"] >= 4096
    assert set(m["tau_sweep"]) == {"0.1", "0.3"}
    for name in ("toy.png", "toy_tau.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_toy_rejects_bad_arguments(tmp_path):
    out = subprocess.run([sys.executable, "toy.py", "--tau", "-1", "--out_dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "every --tau > 0" in out.stderr
