"""bench_snce.py: every row it times computes the same loss and gradients (the soft rows as the
dense SNCE reference, the hard rows as F.cross_entropy), so its table compares like with like;
it reaches snce.py through public names only.

    .venv/bin/python -m pytest -q tests/test_bench_snce.py
"""

import argparse

import pytest
import torch

from support import bench_snce
from snce import compile_available


@pytest.mark.skipif(not compile_available("cpu"), reason="row (5) compiles: needs a C++ compiler")
def test_bench_rows_agree(capsys, metric="cos"):
    args = argparse.Namespace(device="cpu", dtype="fp32", tau=0.5, reps=1, busy=0)
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


def test_bench_uses_public_names_only():
    """snce's private helpers may change at will: the benchmark imports none of them."""
    import ast
    tree = ast.parse(open(bench_snce.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("snce", "support.snce_kernels"):
            assert not [a.name for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert not (node.value.id == "snce" and node.attr.startswith("_"))


def test_competing_processes_run_during_the_block_only():
    """--busy=N: N busy-loop processes while the benchmark runs, none left behind."""
    with bench_snce.competing_processes(2) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
