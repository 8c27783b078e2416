"""toy.py: the grid codebook and quantizer against a brute-force nearest-centre search, the exact
cell probabilities against a numerical integration of the mixture density, the nll / tv
evaluation against naive loops, and a fast end-to-end run that checks the toy's claim (SNCE's
token distribution is closer to the truth than CE's) and that a plain run leaves assets/ alone.

    .venv/bin/python -m pytest -q tests/test_toy.py
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import toy  # noqa: E402


def test_grid_centres_are_row_major_cell_midpoints():
    c, codebook = toy.grid_centers()
    w = 6.0 / 64  # [-3, 3]^2 in 64 x 64 cells
    assert codebook.shape == (4096, 2) and codebook.dtype == torch.float64
    for t in (0, 1, 63, 64, 65, 2080, 4095):   # token = iy * 64 + ix
        iy, ix = divmod(t, 64)
        assert codebook[t].tolist() == pytest.approx([-3 + w * (ix + 0.5), -3 + w * (iy + 0.5)], abs=1e-12)
    assert c.tolist() == pytest.approx([-3 + w * (i + 0.5) for i in range(64)], abs=1e-12)


def test_quantize_is_brute_force_nearest_centre():
    g = torch.Generator().manual_seed(0)
    _, codebook = toy.grid_centers()
    w = 6.0 / 64
    x = torch.cat([toy.sample(1000, g) * 1.5,                                 # some fall off the square
                   torch.rand(500, 2, generator=g, dtype=torch.float64) * 16 - 8,  # far outside too
                   # just either side of cell edges (the edges at +-3 included)
                   -3 + w * torch.randint(0, 65, (500, 2), generator=g) + (torch.rand(500, 2, generator=g) - 0.5) * 1e-3])
    d = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)               # (n, K) float64
    assert torch.equal(toy.quantize(x), d.argmin(1))


def mixture_density(x, y):
    """The ground truth written out: 0.5 N((-1.2, -1.2), 0.25 I) + 0.5 N((1.2, 1.2), 0.25 I)."""
    s2 = 0.5 ** 2
    return sum(0.5 * torch.exp(-((x - m) ** 2 + (y - m) ** 2) / (2 * s2)) / (2 * math.pi * s2) for m in (-1.2, 1.2))


def test_true_cell_probs_match_numerical_integration():
    """Midpoint rule on 4 x 4 points per cell over [-3 - R, 3 + R]^2 (R = 54 cells, past 13 std
    from either mode): the points beyond the square count for the edge cells, as quantize says."""
    P = toy.true_cell_probs()
    assert P.shape == (4096,) and P.dtype == torch.float64
    w, sub, R = 6.0 / 64, 4, 54
    h = w / sub
    n = (64 + 2 * R) * sub
    t = -3 - R * w + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    mass = mixture_density(xx, yy).reshape(-1) * h * h
    cells = toy.quantize(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))   # tested above
    ref = torch.zeros(4096, dtype=torch.float64).index_add_(0, cells, mass)
    assert abs(P.sum().item() - 1) < 1e-12 and abs(ref.sum().item() - 1) < 1e-6
    assert 0.5 * (P - ref).abs().sum() < 1e-4
    big = P > 1e-8   # all but the far corners: the two corners by the modes (tails) included
    assert big[[0, 4095]].all()
    # the midpoint rule's error is ~2e-3 at most; leaving out the edge cells' tails would be ~0.5
    assert ((P - ref).abs()[big] / P[big]).max() < 5e-3


def test_evaluate_matches_naive_loops():
    """nll = mean over eval samples of -log p(cell); tv = half the L1 distance over all cells."""
    g = torch.Generator().manual_seed(2)
    K = toy.GRID**2
    logits = (torch.randn(K, generator=g, dtype=torch.float64) * 3).tolist()
    lse = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
    logp = torch.tensor([v - lse for v in logits], dtype=torch.float64)
    P = torch.rand(K, generator=g, dtype=torch.float64)
    P /= P.sum()
    tokens = torch.randint(0, K, (500,), generator=g)
    nll = sum(lse - logits[t] for t in tokens.tolist()) / len(tokens)
    tv = sum(abs(math.exp(logits[k] - lse) - P[k].item()) for k in range(K)) / 2
    got = toy.evaluate(logp, P, tokens)
    assert got["nll"] == pytest.approx(nll, rel=1e-12)
    assert got["tv"] == pytest.approx(tv, rel=1e-10)
    assert toy.evaluate(P.log(), P, tokens)["tv"] == pytest.approx(0, abs=1e-12)
    disjoint = torch.zeros(K, dtype=torch.float64)
    disjoint[:K // 2] = 2.0 / K
    Q = torch.zeros(K, dtype=torch.float64)
    Q[K // 2:] = 2.0 / K
    assert toy.evaluate(disjoint.log(), Q, tokens)["tv"] == pytest.approx(1.0, abs=1e-12)


def test_toy_end_to_end_snce_beats_ce(tmp_path):
    """A plain `python toy.py` (no --out_dir) from another directory: its files go under out/toy/
    there, none to assets/. After 30 steps SNCE's TV to the true cell probabilities is far below
    CE's on every seed (over seeds 0-11: SNCE 0.19-0.26 at tau 0.1 and 0.3, CE 0.85-0.87)."""
    assets = {p.name: p.read_bytes() for p in (ROOT / "assets").glob("toy*")}
    out = subprocess.run([sys.executable, str(ROOT / "toy.py"), "--seeds", "2", "--steps", "30", "--tau", "0.1", "0.3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    d = tmp_path / "out" / "toy"
    m = json.loads((d / "toy_metrics.json").read_text())
    for obj in ("ce", "snce"):
        assert len(m[obj]["nll"]) == len(m[obj]["tv"]) == 2
    assert len(m["l2"]["mode_dist"]) == 2
    assert set(m["tau_sweep"]) == {"0.1", "0.3"} and m["tau_sweep"]["0.1"] == m["snce"]
    for tau in ("0.1", "0.3"):
        for snce, ce in zip(m["tau_sweep"][tau]["tv"], m["ce"]["tv"]):
            assert 0 <= snce < ce - 0.3 and ce <= 1, (tau, snce, ce)
    for name in ("toy.png", "toy_tau.png"):
        assert (d / name).stat().st_size > 10_000
    assert {p.name: p.read_bytes() for p in (ROOT / "assets").glob("toy*")} == assets


def test_toy_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy.main(["--tau", "-1", "--out_dir", str(tmp_path)])
    assert "every --tau > 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
