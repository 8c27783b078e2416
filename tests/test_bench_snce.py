"""bench_snce.py: every row it times computes the same loss and gradients (the soft rows as the
dense SNCE reference, the hard rows as F.cross_entropy), so its table compares like with like."""

import argparse

import pytest
import torch

from support import bench_snce
from snce import compile_available


@pytest.mark.skipif(not compile_available("cpu"), reason="row (5) compiles: needs a C++ compiler")
def test_bench_rows_agree(capsys, metric="cos"):
    args = argparse.Namespace(device="cpu", dtype="fp32", tau=0.5, reps=1)
    peers = ("not installed", "not installed")      # the optional peers are not in the test env
    t, peak, errs = bench_snce.bench(48, 8, 300, 4, metric, args, peers)
    out = capsys.readouterr().out
    assert "| (8) Cut Cross-Entropy (torch_compile) | not installed |" in out
    ran = {name for name, (fn, _) in bench_snce.methods(*bench_snce.problem(
        48, 8, 300, 4, "cpu", torch.float32, metric)[:4], 0.5, metric, None, peers).items()
        if not isinstance(fn, str)}
    assert set(errs) == ran == set(t) and len(ran) == 7
    for name, err in errs.items():
        assert err < 1e-5, (name, err)


def test_linear_teacher_gives_snces_q():
    """The Liger row's teacher: softmax([z, 1] @ A^T) is q of Eq. 5, and H(q) its mean entropy."""
    g = torch.Generator().manual_seed(0)
    z, C = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g,
                                                                             dtype=torch.float64)
    zt, A = bench_snce._linear_teacher(z, C, 0.4, "l2")
    q = torch.softmax(-((z[:, None] - C) ** 2).sum(-1) / 0.4, -1)
    torch.testing.assert_close(torch.softmax(zt @ A.t(), -1), q)
    want = -(q * q.log()).sum(-1).mean().item()
    assert abs(bench_snce._mean_entropy(zt, A, chunk=7) - want) < 1e-9
