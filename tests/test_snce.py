"""snce.py in float64: the dense form (Eq. 5, 8, 11) against naive loops over rows and codes;
every fast form (snce_chunk, the compiled chunk kernel, snce_loss, fused_linear_snce(_levels))
against the dense form: values, gradients, masks, reductions, every metric, all levels; errors.
The eager path is the default here (SNCE_COMPILE=0): tests of the compiled kernel ask for it
with compile=True and share a few shapes, so it compiles once.

    .venv/bin/python -m pytest -q tests/test_snce.py
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snce import (METRICS, compile_available, dense_snce, dense_snce_grad, dissimilarity,
                  fused_linear_snce, fused_linear_snce_levels, linear_teacher, nearest_code,
                  neighbor_probs, snce_chunk, snce_loss)
from support import snce_kernels

f64 = torch.float64
needs_compiler = pytest.mark.skipif(not compile_available("cpu"),
                                    reason="torch.compile needs a C++ compiler on the CPU")


@pytest.fixture(autouse=True)
def eager_by_default(monkeypatch):
    monkeypatch.setenv("SNCE_COMPILE", "0")


# --- references: naive definitions (paper Eq. 5, 7-8) and the dense form with masks -------

def naive_d(z, C, metric):
    if metric == "l2":
        return ((z[..., None, :] - C) ** 2).sum(-1)
    if metric == "dot":
        return -(z[..., None, :] * C).sum(-1)
    return -F.cosine_similarity(z[..., None, :], C, dim=-1)


def naive_q(z, C, tau, metric):
    return torch.softmax(-naive_d(z, C, metric) / tau, dim=-1)


def dense_loss(logits, q, mask=None, reduction="mean"):
    """snce.dense_snce (Eq. 8) with a mask (True = counts) and a reduction."""
    rows = dense_snce(logits, q)
    if mask is not None:
        rows = rows * mask
    n = rows.numel() if mask is None else mask.sum()
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / max(int(n), 1)


def problem(lead=(3, 5), K=11, D=4, H=6, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(K, D, generator=g, dtype=dtype)
    z = torch.randn(*lead, D, generator=g, dtype=dtype)
    h = torch.randn(*lead, H, generator=g, dtype=dtype)
    W = torch.randn(K, H, generator=g, dtype=dtype)
    b = torch.randn(K, generator=g, dtype=dtype)
    mask = torch.rand(*lead, generator=g) < 0.5
    return z, C, h, W, b, mask


def grads(loss, tensors, weights=None):
    if weights is not None:       # a non-uniform grad_output exercises the per-row backward
        loss = (loss * weights).sum()
    return torch.autograd.grad(loss, tensors)


# --- the metric definitions ----------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_dissimilarity_and_nearest_code(metric):
    z, C, *_ = problem(lead=(2, 7))
    torch.testing.assert_close(dissimilarity(z, C, metric), naive_d(z, C, metric))
    want = naive_d(z, C, metric).argmin(-1)
    assert torch.equal(nearest_code(z, C, metric), want)
    assert torch.equal(nearest_code(z, C, metric, chunk_size=3), want)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("tau", [0.1, 1.0, 7.0])
def test_neighbor_probs(metric, tau):
    z, C, *_ = problem()
    q = neighbor_probs(z, C, tau, metric)
    assert q.shape == (3, 5, 11)
    torch.testing.assert_close(q, naive_q(z, C, tau, metric))


def test_neighbor_probs_limits():
    z, C, *_ = problem()
    one_hot = F.one_hot(naive_d(z, C, "l2").argmin(-1), 11).to(f64)
    torch.testing.assert_close(neighbor_probs(z, C, 0.0), one_hot)
    torch.testing.assert_close(neighbor_probs(z, C, 1e-4), one_hot)
    torch.testing.assert_close(neighbor_probs(z, C, 1e6), torch.full_like(one_hot, 1 / 11),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("metric", METRICS)
def test_code_assignment_and_q_ignore_autocast(metric):
    """The tokenizer assigns codes inside its training autocast, encoding assigns them in fp32:
    under a CPU bf16 autocast the codes, d, q (Eq. 5) and the loss's target side must be the
    fp32 numbers exactly (bf16 distances move about 1-2% of the codes at D = 8, K = 4096)."""
    g = torch.Generator().manual_seed(0)
    C, z = torch.randn(4096, 8, generator=g), torch.randn(2048, 8, generator=g)
    logits = torch.randn(64, 4096, generator=g)

    def run():
        return (nearest_code(z, C, metric), dissimilarity(z, C, metric),
                neighbor_probs(z, C, 0.5, metric), neighbor_probs(z, C, 0.0, metric),
                snce_loss(logits, z[:64], C, 0.5, metric, reduction="none"),
                snce_loss(logits, z[:64], C, 0.0, metric, reduction="none"))

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


# --- the dense form against naive loops; one chunk against the dense form -------------------

@pytest.mark.parametrize("metric", METRICS)
def test_dense_forms_match_naive_loops(metric):
    """Eq. 5, 8, 11 written as loops over rows i and codes k in python floats."""
    z, C, h, W, *_ = problem(lead=(4,), K=5, D=3)
    logits, tau = h @ W.t(), 0.3
    q = neighbor_probs(z, C, tau, metric)
    loss, grad = dense_snce(logits, q), dense_snce_grad(logits, q)
    for i in range(4):
        zi = z[i].tolist()
        d = []
        for k in range(5):
            ck = C[k].tolist()
            dot = sum(a * b for a, b in zip(zi, ck))
            if metric == "l2":
                d.append(sum((a - b) ** 2 for a, b in zip(zi, ck)))
            elif metric == "dot":
                d.append(-dot)
            else:
                d.append(-dot / math.sqrt(sum(a * a for a in zi) * sum(b * b for b in ck)))
        w = [math.exp(-dk / tau) for dk in d]
        qi = [wk / sum(w) for wk in w]                              # Eq. 5
        e = [math.exp(sk) for sk in logits[i].tolist()]
        pi = [ek / sum(e) for ek in e]
        li = -sum(qk * math.log(pk) for qk, pk in zip(qi, pi))      # Eq. 8
        for k in range(5):
            assert dissimilarity(z, C, metric)[i, k].item() == pytest.approx(d[k], abs=1e-12)
            assert q[i, k].item() == pytest.approx(qi[k], rel=1e-9, abs=1e-15)
            assert grad[i, k].item() == pytest.approx(pi[k] - qi[k], abs=1e-12)   # Eq. 11
        assert loss[i].item() == pytest.approx(li, rel=1e-9)
    s = logits.clone().requires_grad_()
    (g,) = torch.autograd.grad(dense_snce(s, q).sum(), [s])
    torch.testing.assert_close(g, grad)


@pytest.mark.parametrize("metric", METRICS)
def test_linear_teacher_is_minus_d_over_tau_up_to_a_row_constant(metric):
    z, C, *_ = problem(lead=(6,))
    zt, A = linear_teacher(z, C, 0.4, metric)
    diff = zt @ A.t() + naive_d(z, C, metric) / 0.4                 # (6, K): constant per row
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff))
    assert not (zt.requires_grad or A.requires_grad)


def chunk_problem(dtype=f64, c=6, K=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(c, K, generator=g, dtype=dtype)
    t = 3 * torch.randn(c, K, generator=g, dtype=dtype)
    scale = torch.rand(c, 1, generator=g, dtype=dtype)
    return s, t, scale


def test_snce_chunk_is_the_dense_form():
    """Soft q = softmax(t); hard q = (1 - eps) one-hot + eps / K: loss rows and (p - q) * scale."""
    s, t, scale = chunk_problem()
    q = t.softmax(-1)
    for sc in (None, scale):
        buf, tb = s.clone(), t.clone()
        torch.testing.assert_close(snce_chunk(buf, sc, t=tb), dense_snce(s, q))
        if sc is not None:
            torch.testing.assert_close(buf, dense_snce_grad(s, q) * sc)
    codes = torch.tensor([0, 3, 10, 3, 5, 1])
    for eps in (0.0, 0.2):
        q = (1 - eps) * F.one_hot(codes, 11).to(f64) + eps / 11
        buf = s.clone()
        torch.testing.assert_close(snce_chunk(buf, scale, target=codes, eps=eps), dense_snce(s, q))
        torch.testing.assert_close(buf, dense_snce_grad(s, q) * scale)


def test_rowdot_is_the_row_sum_of_products(monkeypatch):
    """snce_kernels.rowdot (the sum_k q_k s_k of Eq. 8 in the eager chunk) against float64
    sums, in blocks of 3 rows and in one block: (a * b).sum(1) exactly, in a's dtype."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(10, 37, generator=g), torch.randn(10, 37, generator=g)
    ref = (a.double() * b.double()).sum(1, keepdim=True)
    for nbytes in (3 * 37 * 4, snce_kernels.ROWDOT_BYTES):
        monkeypatch.setattr(snce_kernels, "ROWDOT_BYTES", nbytes)
        got = snce_kernels.rowdot(a, b)
        assert got.shape == (10, 1) and got.dtype == torch.float32
        torch.testing.assert_close(got, ref.float())
        assert torch.equal(got, (a * b).sum(1, keepdim=True))


def test_default_chunk_is_sized_for_the_device(monkeypatch):
    """CPU: two fp32 (rows, K) buffers within 128 MiB, multiples of 8. CUDA: rows as many as
    min(4 GiB, memory / 16) allows, multiples of 128, at least 256 (device memory faked here)."""
    MiB, GiB = 2**20, 2**30
    assert snce_kernels.default_chunk(4096) == 128 * MiB // (8 * 4096) == 4096
    assert snce_kernels.default_chunk(262144, 4 * 1024) == 56   # a CPU's size: IBQ-B's head
    assert snce_kernels.default_chunk(10**9) == 8

    class Props:
        total_memory = 80 * GiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    cuda = torch.device("cuda", 0)
    assert snce_kernels.chunk_budget(cuda) == 4 * GiB
    assert snce_kernels.default_chunk(262144, 4 * 1024, cuda) == (4 * GiB // (8 * 262144 + 4096)) // 128 * 128 == 1920
    assert snce_kernels.default_chunk(131072, 4 * 1024, "cuda") == 3968
    Props.total_memory = 16 * GiB     # 1 GiB budget
    assert snce_kernels.default_chunk(262144, 4 * 1024, cuda) == 384
    assert snce_kernels.default_chunk(10**9, 0, cuda) == 256
    assert snce_kernels.chunk_budget("cpu") == snce_kernels.CHUNK_BYTES


def test_accumulate_mm_adds_the_product_in_fp32():
    """acc += a @ b for bf16 a, b into an fp32 acc, against float64 (the CPU has no
    addmm(out_dtype) and takes the fallback; test_cuda.py checks the in-place path)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(40, 9, generator=g).bfloat16(), torch.randn(9, 16, generator=g).bfloat16()
    acc = torch.randn(40, 16, generator=g)
    ref = acc.double() + a.double() @ b.double()
    out = snce_kernels.accumulate_mm(acc, a, b)
    assert out is None and acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), ref, rtol=0, atol=0.05)   # the bf16 product's rounding
    assert snce_kernels.ADDMM_OUT_DTYPE["cpu"] is False


def test_eager_chunk_op_count_does_not_grow_with_rows():
    """The eager soft chunk is a fixed number of batched ops, not one call per row (per-row
    BLAS calls each wait on the thread pool, which stalls on a busy CPU)."""
    def n_ops(c):
        s, t, scale = chunk_problem(c=c, K=64)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            snce_chunk(s, scale, t=t)
        return sum(e.count for e in prof.key_averages())
    assert n_ops(256) == n_ops(4)


@needs_compiler
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_compiled_chunk_is_snce_chunk(dtype):
    """support.snce_kernels.compiled_soft_chunk computes snce_chunk's soft form: same loss rows,
    same (p - q) * scale, on full chunks and a shorter one."""
    tol = {} if dtype == f64 else dict(rtol=1e-5, atol=1e-6)
    for c in (6, 4):
        s, t, scale = chunk_problem(dtype, c=c)
        for sc in (None, scale):
            a, ta, b, tb = s.clone(), t.clone(), s.clone(), t.clone()
            got = snce_kernels.compiled_soft_chunk(a, tb, sc)
            assert got is not None
            torch.testing.assert_close(got, snce_chunk(b, sc, t=ta), **tol)
            if sc is not None:
                torch.testing.assert_close(a, b, **tol)
                torch.testing.assert_close(a.double(), dense_snce_grad(s.double(), t.double()
                                                                       .softmax(-1)) * sc.double(),
                                           **tol)
    assert_compiled_ran()


# --- snce_loss and fused_linear_snce against the dense reference ---------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compiler)])
def test_snce_loss_matches_dense(metric, reduction, masked, compile):
    z, C, h, W, b, mask = problem()
    mask = mask if masked else None
    logits = (h @ W.t()).requires_grad_()
    q = neighbor_probs(z, C, 0.7, metric)
    ref = dense_loss(logits, q, mask, reduction)
    w = torch.rand(3, 5, dtype=f64) if reduction == "none" else None
    want = grads(ref, [logits], w)
    for chunk_size in (None, 1, 4):
        got = snce_loss(logits, z, C, 0.7, metric, mask=mask, chunk_size=chunk_size,
                        reduction=reduction, compile=compile)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(grads(got, [logits], w), want)
    if compile:
        assert_compiled_ran()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compiler)])
def test_snce_loss_bf16_logits_with_a_mask(reduction, compile):
    """bf16 logits (a model's output under autocast) with a mask: the gradient comes back in
    bf16, within bf16 rounding of the float64 reference; masked-out rows get exactly 0."""
    z, C, h, W, b, mask = problem(lead=(4, 6), K=13)
    logits64 = h @ W.t()
    logits = logits64.to(torch.bfloat16).requires_grad_()
    q = neighbor_probs(z, C, 0.7, "l2")
    ref = dense_loss(logits.detach().double().requires_grad_(), q, mask, reduction)
    got = snce_loss(logits, z, C, 0.7, "l2", mask=mask, reduction=reduction, compile=compile)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    w = torch.rand(4, 6, dtype=f64) if reduction == "none" else None
    (g,) = grads(got, [logits], None if w is None else w.float())
    assert g.dtype == torch.bfloat16 and torch.all(g[~mask] == 0)
    lg = logits.detach().double().requires_grad_()
    (want,) = grads(dense_loss(lg, q, mask, reduction), [lg], w)
    torch.testing.assert_close(g.double(), want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compiler)])
def test_fused_matches_dense(metric, reduction, masked, use_bias, compile):
    """Eager path and compiled chunk kernel; chunk sizes 1 and 4 over 15 rows (or the masked
    ones) give full chunks and a shorter tail, None one chunk."""
    z, C, h, W, b, mask = problem()
    mask = mask if masked else None
    h, W, b = (t.clone().requires_grad_() for t in (h, W, b))
    bias = b if use_bias else None
    params = [h, W] + ([b] if use_bias else [])
    logits = h @ W.t() + (b if use_bias else 0)
    ref = dense_loss(logits, neighbor_probs(z, C, 0.7, metric), mask, reduction)
    w = torch.rand(3, 5, dtype=f64) if reduction == "none" else None
    want = grads(ref, params, w)
    for chunk_size in (None, 1, 4):
        got = fused_linear_snce(h, W, z, C, 0.7, metric, bias=bias, mask=mask,
                                chunk_size=chunk_size, reduction=reduction, compile=compile)
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(grads(got, params, w), want)
    if compile:
        assert_compiled_ran()


def test_gradient_is_p_minus_q():
    """Eq. 11: dL/ds = p - q for the summed loss."""
    z, C, h, W, *_ = problem(lead=(9,))
    logits = (h @ W.t()).requires_grad_()
    (g,) = grads(snce_loss(logits, z, C, 0.5, reduction="sum"), [logits])
    torch.testing.assert_close(g, dense_snce_grad(logits, neighbor_probs(z, C, 0.5, "l2")))


def test_kl_plus_entropy():
    z, C, h, W, *_ = problem(lead=(9,))
    logits = h @ W.t()
    q, logp = neighbor_probs(z, C, 0.5, "l2"), logits.log_softmax(-1)
    kl = (q * (q.log() - logp)).sum(-1)
    ent = -(q * q.log()).sum(-1)
    torch.testing.assert_close(snce_loss(logits, z, C, 0.5, reduction="none"), kl + ent)


@pytest.mark.parametrize("metric", METRICS)
def test_tau_zero_is_cross_entropy_on_nearest_code(metric):
    z, C, h, W, b, _ = problem()
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    code = naive_d(z, C, metric).argmin(-1)
    ref = F.cross_entropy((h @ W.t()).reshape(-1, 11), code.reshape(-1))
    want = torch.autograd.grad(ref, [h, W], retain_graph=True)
    for got in (snce_loss(h @ W.t(), z, C, 0.0, metric),
                fused_linear_snce(h, W, z, C, 0.0, metric, chunk_size=4)):
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(grads(got, [h, W]), want)
    # a tiny tau is CE too, up to exp(-gap / tau)
    torch.testing.assert_close(fused_linear_snce(h, W, z, C, 1e-4, metric), ref)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hard_targets_and_label_smoothing(eps):
    z, C, h, W, b, mask = problem()
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    codes = torch.randint(0, 11, (3, 5))
    ref = F.cross_entropy((h @ W.t())[mask], codes[mask], label_smoothing=eps)
    got = fused_linear_snce(h, W, None, None, 0.0, mask=mask, targets=codes,
                            label_smoothing=eps, chunk_size=2)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(grads(got, [h, W]), grads(ref, [h, W]))
    got = snce_loss(h @ W.t(), None, None, 0.0, mask=mask, targets=codes, label_smoothing=eps)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_mask_gives_zero_loss_and_zero_grads(reduction):
    z, C, h, W, b, _ = problem()
    h, W, b = (t.clone().requires_grad_() for t in (h, W, b))
    none = torch.zeros(3, 5, dtype=torch.bool)
    for loss in (fused_linear_snce(h, W, z, C, bias=b, mask=none, reduction=reduction),
                 snce_loss(h @ W.t() + b, z, C, mask=none, reduction=reduction)):
        assert torch.all(loss == 0)
        for g in torch.autograd.grad(loss.sum(), [h, W, b]):
            assert torch.all(g == 0)


def test_no_gradient_into_latents_or_codebook():
    z, C, h, W, *_ = problem()
    z, C, W = z.clone().requires_grad_(), C.clone().requires_grad_(), W.clone().requires_grad_()
    for loss in (fused_linear_snce(h, W, z, C), snce_loss(h @ W.t(), z, C)):
        gz, gC = torch.autograd.grad(loss, [z, C], allow_unused=True)
        assert gz is None and gC is None


def test_low_precision_accumulates_in_fp32():
    z, C, h, W, b, mask = problem(lead=(64,), K=300, H=32, dtype=torch.float32)
    ref = dense_loss((h @ W.t()).double(), neighbor_probs(z.double(), C.double(), 1.0, "l2"), mask)
    hb, Wb = h.bfloat16().requires_grad_(), W.bfloat16().requires_grad_()
    got = fused_linear_snce(hb, Wb, z, C, 1.0, mask=mask, chunk_size=16)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.05 * abs(ref.item())
    gh, gW = grads(got, [hb, Wb])
    assert gh.dtype == gW.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):   # train.py's setting: fp32 weight
        W32 = W.clone().requires_grad_()
        got = fused_linear_snce(h.bfloat16(), W32, z, C, 1.0, mask=mask)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 0.05 * abs(ref.item())
    (gW,) = grads(got, [W32])
    assert gW.dtype == torch.float32 and torch.isfinite(gW).all()


def test_large_vocab_chunking_is_invariant():
    z, C, h, W, b, mask = problem(lead=(50,), K=3000, H=16, dtype=torch.float32)
    h, W = h.requires_grad_(), W.requires_grad_()
    outs = []
    for chunk_size in (7, 50, None):
        loss = fused_linear_snce(h, W, z, C, 0.3, "dot", mask=mask, chunk_size=chunk_size)
        outs.append((loss, *grads(loss, [h, W])))
    for a, b_ in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b_)
    for a, b_ in zip(outs[0], outs[2]):
        torch.testing.assert_close(a, b_)


# --- bad input: a clear ValueError saying what was expected ---------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=-1.0), "tau must be"),
    (dict(tau=float("nan")), "tau must be"),
    (dict(metric="cosine"), "metric must be one of"),
    (dict(reduction="avg"), "reduction must be"),
    (dict(C=torch.randn(10, 4, dtype=f64)), r"codebook must be \(K, D\) with K = 11"),
    (dict(z=torch.randn(3, 5, 3, dtype=f64)), r"latents must be \(3, 5, 4\)"),
    (dict(z=torch.full((3, 5, 4), float("nan"), dtype=f64)), "NaN or inf"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), "mask must be a bool tensor of shape"),
    (dict(mask=torch.ones(3, 5)), "mask must be a bool tensor"),
    (dict(tau=0.0, targets=torch.full((3, 5), 11)), r"codes in \[0, 11\)"),
    (dict(tau=0.0, targets=torch.zeros(15, dtype=torch.long)), "targets must have shape"),
    (dict(targets=torch.zeros(3, 5, dtype=torch.long)), "only used with tau == 0"),
    (dict(tau=0.0, label_smoothing=1.0), "label_smoothing must be in"),
    (dict(tau=1.0, label_smoothing=0.1), "it needs tau == 0"),
    (dict(tau=torch.tensor([0.5, 0.5])), "tau must be a number or a 0-d tensor"),
    (dict(tau="0.5"), "tau must be a finite number"),
    (dict(tau=True), "tau must be a finite number"),
    (dict(C=torch.full((11, 4), float("inf"), dtype=f64)), "codebook contains NaN or inf"),
    (dict(C=torch.randn(11, 4, dtype=f64).index_fill_(0, torch.tensor([3]), float("nan"))),
     "codebook contains NaN or inf"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=-4), "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), "chunk_size must be a positive int"),
    (dict(mask=[[True] * 5] * 3), r"mask must be a bool tensor of shape \(3, 5\), got list"),
    (dict(z=np.zeros((3, 5, 4))), "latents must be a torch.Tensor"),
    (dict(targets=[0] * 15, tau=0.0, C=None, z=None), "targets must be a torch.Tensor"),
])
def test_bad_input(kwargs, match):
    z, C, h, W, b, mask = problem()
    z, C = kwargs.pop("z", z), kwargs.pop("C", C)
    with pytest.raises(ValueError, match=match):
        snce_loss(h @ W.t(), z, C, **kwargs)
    with pytest.raises(ValueError, match=match):
        fused_linear_snce(h, W, z, C, **kwargs)


def test_bad_weight_and_bias_shapes():
    z, C, h, W, b, _ = problem()
    with pytest.raises(ValueError, match=r"weight must be \(K, H\) with K >= 1 and H = 6"):
        fused_linear_snce(h, W[:, :5], z, C)
    with pytest.raises(ValueError, match=r"bias must be \(11,\)"):
        fused_linear_snce(h, W, z, C, bias=b[:3])
    with pytest.raises(ValueError, match="latents and codebook are required"):
        fused_linear_snce(h, W, None, None, tau=0.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_grad_eval_gives_the_same_loss(reduction):
    z, C, h, W, b, mask = problem()
    h = h.clone().requires_grad_()
    want = fused_linear_snce(h, W, z, C, 0.5, mask=mask, reduction=reduction)
    with torch.no_grad():
        got = fused_linear_snce(h, W, z, C, 0.5, mask=mask, reduction=reduction)
        got2 = snce_loss(h @ W.t(), z, C, 0.5, mask=mask, reduction=reduction)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    torch.testing.assert_close(got2, want.detach())


def test_metric_helpers_reject_bad_shapes():
    z, C, *_ = problem()
    with pytest.raises(ValueError, match=r"need latents \(..., D\) and codebook \(K, D\)"):
        nearest_code(z[..., :3], C)
    with pytest.raises(ValueError, match="metric must be one of"):
        dissimilarity(z, C, "L2")


def test_tau_as_tensor_or_numpy_scalar_is_a_number():
    z, C, h, W, b, mask = problem()
    want = fused_linear_snce(h, W, z, C, 0.5, mask=mask)
    for tau in (torch.tensor(0.5), np.float32(0.5), np.float64(0.5), np.array(0.5)):
        torch.testing.assert_close(fused_linear_snce(h, W, z, C, tau, mask=mask), want)
        torch.testing.assert_close(snce_loss(h @ W.t(), z, C, tau, mask=mask), want)
    torch.testing.assert_close(neighbor_probs(z, C, torch.tensor(0.5)), naive_q(z, C, 0.5, "l2"))


def test_tiny_tau_is_an_error_in_fp32_and_cross_entropy_in_fp64():
    """1 / tau overflowing (or the target logits -d / tau overflowing) used to give NaN."""
    z, C, h, W, b, _ = problem(dtype=torch.float32)
    for tau in (1e-39, 1e-37):
        with pytest.raises(ValueError, match="too small"):
            fused_linear_snce(h, W, z, C, tau)
        with pytest.raises(ValueError, match="too small"):
            snce_loss(h @ W.t(), z, C, tau)
        with pytest.raises(ValueError, match="too small"):
            neighbor_probs(z, C, tau)
    z, C, h, W, b, _ = problem()    # fp64 holds 1 / 1e-300: q is one-hot, the loss is CE
    code = naive_d(z, C, "l2").argmin(-1)
    ref = F.cross_entropy((h @ W.t()).reshape(-1, 11), code.reshape(-1))
    torch.testing.assert_close(fused_linear_snce(h, W, z, C, 1e-300), ref)


def test_bad_logits_and_hidden():
    z, C, h, W, b, _ = problem()
    with pytest.raises(ValueError, match=r"logits must be a torch.Tensor \(..., K\), got ndarray"):
        snce_loss((h @ W.t()).numpy(), z, C)
    with pytest.raises(ValueError, match="K >= 1"):
        snce_loss(torch.zeros(3, 5, 0, dtype=f64), z, C[:0])
    with pytest.raises(ValueError, match="K >= 1"):
        fused_linear_snce(h, W[:0], z, C[:0])
    with pytest.raises(ValueError, match="hidden must be a torch.Tensor"):
        fused_linear_snce(h.numpy(), W, z, C)
    with pytest.raises(ValueError, match="weight must be a torch.Tensor"):
        fused_linear_snce(h, W.numpy(), z, C)
    with pytest.raises(ValueError, match="compile must be None, True or False"):
        fused_linear_snce(h, W, z, C, compile="yes")
    with pytest.raises(ValueError, match=r"need latents \(..., D\) and codebook \(K, D\) with K >= 1"):
        nearest_code(z, C[:0])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        nearest_code(z, C, chunk_size=0)


# --- one call for L levels: one grad_weight accumulator ---------------------------------------

def levels_problem(L=3, lead=(2, 5), K=11, D=4, H=6, dtype=f64):
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(*lead, L, H, generator=g, dtype=dtype)
    lat = torch.randn(*lead, L, D, generator=g, dtype=dtype)
    cbs = torch.randn(L, K, D, generator=g, dtype=dtype)
    W = torch.randn(K, H, generator=g, dtype=dtype)
    b = torch.randn(K, generator=g, dtype=dtype)
    mask = torch.rand(*lead, L, generator=g) < 0.6
    codes = torch.randint(0, K, (*lead, L), generator=g)
    return hid, lat, cbs, W, b, mask, codes


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("soft", [True, False])
def test_levels_match_per_level_calls(reduction, soft):
    hid, lat, cbs, W, b, mask, codes = levels_problem()
    taus = [0.3, 0.7, 2.0] if soft else 0.0
    params = [t.clone().requires_grad_() for t in (hid, W, b)]
    h, W_, b_ = params
    kw = dict(metric="cos", bias=b_, reduction=reduction, chunk_size=3)
    if soft:
        got = fused_linear_snce_levels(h, W_, lat, cbs, taus, mask=mask, **kw)
        per = [fused_linear_snce(h[..., l, :], W_, lat[..., l, :], cbs[l], taus[l],
                                 mask=mask[..., l], **kw) for l in range(3)]
    else:
        got = fused_linear_snce_levels(h, W_, None, None, taus, mask=mask, targets=codes,
                                       label_smoothing=0.1, **kw)
        per = [fused_linear_snce(h[..., l, :], W_, None, None, 0.0, mask=mask[..., l],
                                 targets=codes[..., l], label_smoothing=0.1, **kw)
               for l in range(3)]
    want = torch.stack(per, -1)
    torch.testing.assert_close(got, want)
    # uniform weights (train.py's sum over levels) and per-level / per-row weights
    for w in (torch.ones(got.shape, dtype=f64), torch.rand(got.shape, dtype=f64)):
        torch.testing.assert_close(torch.autograd.grad((got * w).sum(), params, retain_graph=True),
                                   torch.autograd.grad((want * w).sum(), params, retain_graph=True))


def test_levels_shared_codebook_and_dense_reference():
    hid, lat, cbs, W, b, mask, _ = levels_problem(L=2)
    h, W_ = hid.clone().requires_grad_(), W.clone().requires_grad_()
    got = fused_linear_snce_levels(h, W_, lat, cbs[0], 0.5, "l2", mask=mask, reduction="sum")
    logits = h @ W_.t()
    q = neighbor_probs(lat, cbs[0], 0.5, "l2")
    rows = -(q * logits.log_softmax(-1)).sum(-1) * mask
    want = rows.sum((0, 1))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads(got.sum(), [h, W_]), grads(want.sum(), [h, W_]))
    as_tensor = fused_linear_snce_levels(hid, W, lat, cbs[0], torch.tensor([0.5, 0.5]), "l2",
                                         mask=mask, reduction="sum")
    torch.testing.assert_close(as_tensor, want.detach())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compiler)])
def test_levels_match_dense(metric, reduction, compile):
    """Each level l: dense SNCE of hid[..., l, :] @ W^T + b against q of lat[..., l, :] with
    codebook l at tau l, masked; per-level / per-row weights on the result."""
    hid, lat, cbs, W, b, mask, _ = levels_problem()
    taus = [0.3, 0.7, 2.0]
    params = [t.clone().requires_grad_() for t in (hid, W, b)]
    h, W_, b_ = params
    logits = h @ W_.t() + b_                                            # (2, 5, 3, K)
    want = torch.stack([dense_loss(logits[..., l, :], neighbor_probs(lat[..., l, :], cbs[l],
                                                                     taus[l], metric),
                                   mask[..., l], reduction) for l in range(3)], -1)
    got = fused_linear_snce_levels(h, W_, lat, cbs, taus, metric, bias=b_, mask=mask,
                                   chunk_size=3, reduction=reduction, compile=compile)
    torch.testing.assert_close(got, want)
    for w in (torch.ones(got.shape, dtype=f64), torch.rand(got.shape, dtype=f64)):
        torch.testing.assert_close(torch.autograd.grad((got * w).sum(), params, retain_graph=True),
                                   torch.autograd.grad((want * w).sum(), params, retain_graph=True))
    if compile:
        assert_compiled_ran()


def test_every_loss_defaults_to_the_mean():
    hid, lat, cbs, W, b, mask, _ = levels_problem()
    z, C, h, W1, b1, mask1 = problem()
    torch.testing.assert_close(fused_linear_snce_levels(hid, W, lat, cbs, 0.5, mask=mask),
                               fused_linear_snce_levels(hid, W, lat, cbs, 0.5, mask=mask,
                                                        reduction="mean"))
    want = dense_loss(h @ W1.t(), neighbor_probs(z, C, 1.0), mask1, "mean")
    torch.testing.assert_close(fused_linear_snce(h, W1, z, C, mask=mask1), want)
    torch.testing.assert_close(snce_loss(h @ W1.t(), z, C, mask=mask1), want)


def test_levels_bad_input():
    hid, lat, cbs, W, b, mask, codes = levels_problem()
    with pytest.raises(ValueError, match="taus must be one number or L = 3"):
        fused_linear_snce_levels(hid, W, lat, cbs, [0.5, 0.5])
    with pytest.raises(ValueError, match=r"codebooks must be \(L = 3, K, D\)"):
        fused_linear_snce_levels(hid, W, lat, cbs[:2], 0.5)
    with pytest.raises(ValueError, match="latents must have the levels at dim -2"):
        fused_linear_snce_levels(hid, W, lat[..., :2, :], cbs, 0.5)
    with pytest.raises(ValueError, match="mask must have the levels at dim -1"):
        fused_linear_snce_levels(hid, W, lat, cbs, 0.5, mask=mask[..., :2])


# --- the compiled chunk kernel: the same numbers as the eager path and the references -------

def assert_compiled_ran():
    """The compiled passes exist and did not fall back to eager (which would match too)."""
    assert snce_kernels.COMPILED.get(snce_kernels.soft_stats) is not None
    assert snce_kernels.COMPILED.get(snce_kernels.soft_grad) is not None


@needs_compiler
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_snce_loss_matches_dense(metric, reduction):
    z, C, h, W, b, mask = problem()
    logits = (h @ W.t()).requires_grad_()
    ref = dense_loss(logits, neighbor_probs(z, C, 0.7, metric), mask, reduction)
    got = snce_loss(logits, z, C, 0.7, metric, mask=mask, chunk_size=4, reduction=reduction,
                    compile=True)
    torch.testing.assert_close(got, ref)
    w = torch.rand(3, 5, dtype=f64) if reduction == "none" else None
    torch.testing.assert_close(grads(got, [logits], w), grads(ref, [logits], w))
    with torch.no_grad():
        torch.testing.assert_close(snce_loss(logits, z, C, 0.7, metric, mask=mask, chunk_size=4,
                                             reduction=reduction, compile=True), ref)


@needs_compiler
def test_compiled_levels_and_fp32_match_eager():
    hid, lat, cbs, W, b, mask, _ = levels_problem(lead=(4, 16), K=300, H=16, dtype=torch.float32)
    h, W_ = hid.clone().requires_grad_(), W.clone().requires_grad_()
    out = []
    for compile in (True, False):
        loss = fused_linear_snce_levels(h, W_, lat, cbs, [0.2, 0.5, 1.0], "l2", mask=mask,
                                        chunk_size=24, reduction="mean", compile=compile)
        out.append((loss, *grads(loss.sum(), [h, W_])))
    for a, b_ in zip(*out):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    assert_compiled_ran()


def test_compile_can_be_switched_off(monkeypatch):
    """SNCE_COMPILE=0 (this file's default) and compile=False give the eager path: no
    compiled function is created."""
    monkeypatch.setattr(snce_kernels, "COMPILED", {})
    z, C, h, W, b, mask = problem()
    fused_linear_snce(h, W, z, C, 0.5)
    fused_linear_snce(h, W, z, C, 0.5, compile=False)
    snce_loss(h @ W.t(), z, C, 0.5)
    assert snce_kernels.COMPILED == {}
