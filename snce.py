"""
Stochastic Neighbor Cross Entropy (SNCE): the loss, dense first, then chunked so it scales to
262k-code vocabularies.

Paper: "SNCE: Geometry-Aware Supervision for Scalable Discrete Image Generation" (equation
numbers below are the paper's). Cross entropy trains a discrete generator against the one-hot
code t_i = argmin_k d(z_i, c_k) of the tokenizer's continuous latent z_i (D-dim) and codebook
C = (c_1 .. c_K). SNCE trains it against the neighbor distribution of z_i instead, so codes near
z_i get positive signal rather than being pushed down as hard as unrelated ones:

    q(k | z_i) = exp(-d(z_i, c_k) / tau) / sum_j exp(-d(z_i, c_j) / tau)             (Eq. 5)
    L_SNCE     = -(1 / |M|) sum_{i in M} sum_k q(k | z_i) log p(k | ctx_i)           (Eq. 7-8)
    dL_i / ds  = p - q                                                               (Eq. 11)

with p = softmax(s) the model's distribution from its logits s (K,), M the rows that count (all
tokens for AR, the masked ones for MaskGIT), d one of the METRICS below and tau a temperature.
Its zero-temperature limit tau -> 0 makes q one-hot on argmin_k d, i.e. CE on the nearest code;
the loss functions accept tau = 0 and compute that limit (or CE on given `targets`, optionally
label-smoothed: the paper's baselines). KL view: L_i = KL(q || p) + H(q), and H(q) does not
depend on the model, so a distillation loss with "teacher" q has SNCE's gradient.

The file reads top to bottom: the dense form (Eq. 5, 8, 11 on whole tensors: small sizes and
the tests' reference), one chunk of rows (the same math in place, snce_chunk), and the chunked
losses built on it: snce_loss on materialised logits, fused_linear_snce(_levels) that never
builds the (N, K) logits. Input checks, the torch.compile'd form of snce_chunk and the chunk
bookkeeping live in support/snce_kernels.py. Each loss takes compile=None (the compiled chunk
kernel where compile_available says it can run, unless SNCE_COMPILE=0), True or False (eager).

    python -m pytest -q tests/test_snce.py    # every fast form against the dense one, float64
    python -m support.bench_snce               # time and memory against torch, CCE, Liger
"""

import math

import torch
import torch.nn.functional as F

from support.snce_kernels import (METRICS, acc_dtype, accumulate_mm, as_tau, check_chunk,
                                  check_codebook, check_hard, check_inputs, check_inverse_tau,
                                  check_levels, check_metric, check_teacher_range, chunks,
                                  compile_available, compiled_soft_chunk, default_chunk,
                                  grad_output_scales, level_scales, n_rows, need_tensor, reduce,
                                  reduce_levels, row_scale_of, rowdot, rows_of, use_compile)


# -----------------------------------------------------------------------------
# the dense form: Eq. 5, 8, 11 on whole tensors (and the metric definitions for the whole repo)


def dissimilarity(latents, codebook, metric="l2"):
    """d(z, c_k) for every code, exactly as defined: (..., D), (K, D) -> (..., K). METRICS:
    l2: ||z - c||^2, dot: -z . c (IBQ-style), cos: -cos(z, c)."""
    check_metric(metric)
    check_codebook(latents, codebook)
    z = latents.to(acc_dtype(latents))
    c = codebook.to(z.dtype)
    with torch.autocast(z.device.type, enabled=False):   # fp32 even inside a bf16 autocast
        if metric == "l2":
            # ||z||^2 - 2 z.c + ||c||^2, clamped: rounding can make it slightly negative
            d = (z * z).sum(-1, keepdim=True) - 2 * z @ c.t() + (c * c).sum(-1)
            return d.clamp_min(0)
        if metric == "dot":
            return -(z @ c.t())
        return -(_unit(z) @ _unit(c).t())


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def linear_teacher(latents, codebook, tau, metric="l2", dtype=None):
    """-d(z, c_k) / tau as one matmul: -> zt (..., D'), A (K, D') with zt @ A^T = -d / tau + a
    per-row constant, which the softmax of Eq. 5 ignores. For every metric:

        l2 : -||z - c||^2 / tau = [z, 1] @ [2C / tau, -||c||^2 / tau]^T  (- ||z||^2 / tau, cancels)
        dot: -(-z . c)   / tau = z @ (C / tau)^T
        cos: -(-cos)     / tau = (z / ||z||) @ (C / ||C|| / tau)^T

    tau == 0 uses scale 1 (only the argmax means anything then). Computed in dtype (default:
    fp64 for fp64 latents, else fp32); no gradient reaches latents or codebook."""
    dtype = acc_dtype(latents) if dtype is None else dtype
    c = codebook.detach().to(dtype)
    inv = 1.0 / tau if tau > 0 else 1.0
    check_inverse_tau(inv, tau, c.dtype)
    z = latents.detach().to(dtype)
    if metric == "l2":
        A = torch.cat([c * (2 * inv), (c * c).sum(-1, keepdim=True) * -inv], 1)
        return torch.cat([z, z.new_ones(*z.shape[:-1], 1)], -1), A
    if metric == "dot":
        return z, c * inv
    return _unit(z), _unit(c) * inv


def neighbor_probs(latents, codebook, tau=1.0, metric="l2"):
    """q(k | z) of Eq. 5 = softmax_k(-d(z, c_k) / tau), dense: (..., D), (K, D) -> (..., K).
    tau == 0 is the zero-temperature limit: one-hot(argmin_k d)."""
    check_codebook(latents, codebook)
    (K, D), tau = codebook.shape, as_tau(tau)
    check_inputs(latents, codebook, tau, metric, "none", latents.shape[:-1], K, "codebook", None)
    if tau == 0:
        return F.one_hot(nearest_code(latents, codebook, metric), K).to(acc_dtype(latents))
    zt, A = linear_teacher(latents.reshape(-1, D), codebook, tau, metric)    # (N, D'), (K, D')
    check_teacher_range(zt, A, tau)
    with torch.autocast(zt.device.type, enabled=False):  # the target in fp32 under any autocast
        return torch.mm(zt, A.t()).softmax(-1).view(*latents.shape[:-1], K)


def dense_snce(logits, q):
    """Eq. 8 per row: -sum_k q_k log p_k with p = softmax(logits). (..., K), (..., K) -> (...)."""
    return -(q * logits.log_softmax(-1)).sum(-1)


def dense_snce_grad(logits, q):
    """Eq. 11: d dense_snce / d logits = p - q, (..., K)."""
    return logits.softmax(-1) - q


def nearest_code(latents, codebook, metric="l2", chunk_size=None):
    """argmin_k d(z, c_k), CE's target: (..., D), (K, D) -> (...) int64. Chunked over rows."""
    check_metric(metric)
    check_codebook(latents, codebook)
    K, D = codebook.shape
    z, A = linear_teacher(latents.reshape(-1, D), codebook, 0.0, metric)     # (N, D'), (K, D')
    n = check_chunk(chunk_size) or default_chunk(K, device=z.device)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    # fp32 even inside the tokenizer's bf16 autocast: bf16 distances pick other codes (near
    # ties) than encoding in fp32 does
    with torch.autocast(z.device.type, enabled=False):
        for i in range(0, z.shape[0], n):   # max(1).indices: faster than argmax(1) on the CPU
            out[i:i + n] = torch.mm(z[i:i + n], A.t()).max(1).indices
    return out.view(latents.shape[:-1])


# -----------------------------------------------------------------------------
# one chunk of rows: dense_snce and dense_snce_grad, in place in a (c, K) scratch buffer


def snce_chunk(s, scale=None, t=None, target=None, eps=0.0):
    """Loss rows (c,) = logsumexp(s) - sum_k q_k s_k = -sum_k q_k log p_k (Eq. 8) and, when
    scale (c, 1) = dL/dloss_row is given, s <- (p - q) * scale (Eq. 11). s (c, K) fp32/fp64
    logits, a buffer we own. q is soft, from t (c, K) target logits -d / tau + per-row constant
    (overwritten with the unnormalised q), or hard: target (c,) codes, q = (1 - eps) one-hot +
    eps / K (CE when eps == 0, label smoothing otherwise). support.snce_kernels'
    compiled_soft_chunk is the same function for soft q as a compiled kernel."""
    s.sub_(s.amax(1, keepdim=True))                   # stable softmax; the shift cancels
    if t is not None:
        t.sub_(t.amax(1, keepdim=True))
        # q_k < e^-60 is exactly 0 at fp32/fp64 precision: zero it (no slow denormals)
        F.threshold_(t, -60.0, -math.inf).exp_()      # unnormalised q
        tsum = t.sum(1, keepdim=True)                 # (c, 1)
        qs = rowdot(t, s) / tsum                      # sum_k q_k s_k
    else:
        tgt = target.view(-1, 1)
        qs = (1 - eps) * s.gather(1, tgt)
        if eps:
            qs = qs + (eps / s.shape[1]) * s.sum(1, keepdim=True)
    s.exp_()
    ssum = s.sum(1, keepdim=True)
    loss = ssum.log() - qs                            # logsumexp(s) - sum_k q_k s_k
    if scale is not None:
        s.mul_(scale / ssum)                          # p * scale
        if t is not None:
            s.addcmul_(t, -scale / tsum)              # - q * scale
        else:
            if eps:
                s.sub_(scale * (eps / s.shape[1]))
            s.scatter_add_(1, tgt, -(1 - eps) * scale)
    return loss.view(-1)


class _Targets:
    """What q is for each row: soft (Eq. 5 through linear_teacher, one (c, D') @ (D', K) matmul
    per chunk) or hard (given codes or, at tau == 0, the nearest code; label smoothing eps)."""

    def __init__(self, latents, codebook, tau, metric, targets, label_smoothing, K, dtype):
        self.target = check_hard(targets, tau, label_smoothing, K)
        self.eps, self.soft = float(label_smoothing), tau > 0
        self.fast = False          # True: the compiled chunk kernel, False: the eager path
        if self.target is None and self.soft:
            self.z, self.A = linear_teacher(latents.reshape(-1, codebook.shape[1]), codebook,
                                            tau, metric, dtype)             # (N, D'), (K, D')
            check_teacher_range(self.z, self.A, tau)
        elif self.target is None:  # tau == 0: hard target = the nearest code
            self.target = nearest_code(latents, codebook, metric).reshape(-1)

    def loss_and_grad(self, s, rows, tbuf, scale):
        """snce_chunk for the chunk's rows: s (c, K) logits -> loss rows; s <- (p - q) * scale."""
        if not self.soft:
            return snce_chunk(s, scale, target=self.target[rows], eps=self.eps)
        t = torch.mm(self.z[rows], self.A.t(), out=tbuf[:s.shape[0]])      # (c, K) -d / tau
        out = compiled_soft_chunk(s, t, scale) if self.fast else None
        return snce_chunk(s, scale, t=t) if out is None else out


# -----------------------------------------------------------------------------
# snce_loss: on materialised logits (N, K), chunked over rows


def _snce_pass(logits, tg, idx, chunk_size, row_scale, grad):
    """Loss rows of the counted rows; writes (p - q) * dL/dloss_row into grad when given."""
    dtype = acc_dtype(logits)
    n = logits.shape[0] if idx is None else idx.numel()
    sbuf = logits.new_empty((min(chunk_size, n), logits.shape[1]), dtype=dtype)
    tbuf = torch.empty_like(sbuf) if tg.soft else None
    losses = [logits.new_zeros(0, dtype=dtype)]
    for rows in chunks(logits.shape[0], idx, chunk_size):
        s = sbuf[:n_rows(rows)]                                             # (c, K)
        s.copy_(logits[rows])
        scale = row_scale_of(row_scale, 0, rows, s) if grad is not None else None
        losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
        if grad is not None:
            grad[rows] = s.to(grad.dtype)   # fp32 chunk math into the logits dtype (bf16)
    return torch.cat(losses)


def snce_loss(logits, latents, codebook, tau=1.0, metric="l2", mask=None, chunk_size=None,
              reduction="mean", targets=None, label_smoothing=0.0, compile=None):
    """SNCE (Eq. 8) of logits (..., K) against q(k | z) of latents (..., D) and codebook (K, D).

    mask (...) bool, True = the row counts (MaskGIT's masked positions, Eq. 15).
    tau: the temperature, a number, numpy scalar or 0-d tensor (not differentiated). tau == 0
    is its zero-temperature limit: hard CE on the nearest code, or on `targets` (...) when given
    (then latents and codebook may be None); label_smoothing > 0 with tau == 0 is the paper's
    LS baseline. Chunked over rows: holds at most two (chunk_size, K) fp32 buffers besides
    dL/dlogits. compile: None = the compiled chunk kernel when available (compile_available),
    True = require it, False = the eager path; the same numbers either way (fp32 rounding aside).
    Returns an fp32 loss (fp64 for fp64 logits); 'none' gives (...) with 0 on uncounted rows."""
    need_tensor(logits, "logits", "(..., K)")
    K, rows_shape = logits.shape[-1], logits.shape[:-1]
    if logits.dim() < 1 or K == 0:
        raise ValueError(f"logits must be (..., K) with K >= 1 codes, got {tuple(logits.shape)}")
    tau, chunk_size = as_tau(tau), check_chunk(chunk_size)
    check_inputs(latents, codebook, tau, metric, reduction, rows_shape, K, "logits", targets)
    idx = rows_of(mask, rows_shape, logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        tg = _Targets(latents, codebook, tau, metric, targets, label_smoothing, K,
                      acc_dtype(logits))
        chunk_size = chunk_size or default_chunk(K, device=logits.device)
        tg.fast = use_compile(compile, logits.device)
        args = (logits.reshape(-1, K), tg, idx, chunk_size, reduction)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = _SNCELoss.apply(*args)
        else:   # eval: the loss only (a Function would compute dL/dlogits regardless)
            n = len(args[0]) if idx is None else idx.numel()
            loss = reduce(_snce_pass(*args[:4], None, None), reduction, n, idx, rows_shape.numel())
    return loss.view(rows_shape) if reduction == "none" else loss


# -----------------------------------------------------------------------------
# fused_linear_snce_levels: hidden (M, L, H) @ weight (K, H)^T + SNCE, without the (M, K)
# logits, for L residual levels in one call (one grad_weight); fused_linear_snce: L = 1


def _fused_pass(hidden, weight, bias, tgs, idxs, chunk_size, row_scale, needs):
    """One sweep over each level's counted rows in chunks (hidden (M, L, H), level l's rows are
    hidden[:, l]): per chunk the logits s (c, K), the loss rows, and g = (p - q) * row scale
    turned straight into grad_hidden (c, H) = g @ W and accumulated into the one grad_weight
    (K, H) += g^T @ h, grad_bias (K,) += sum_c g shared by all levels. Matmuls run in hidden's
    dtype (bf16 tensor cores on GPU); softmax, q and the weight/bias sums are fp32 (fp64 for
    fp64)."""
    M, L, H = hidden.shape
    K = weight.shape[0]
    dtype, low = acc_dtype(hidden), hidden.dtype not in (torch.float32, torch.float64)
    w = weight.to(hidden.dtype)
    b = None if bias is None else bias.to(dtype)
    zeros = any(i is not None for i in idxs)
    gh = (torch.zeros_like if zeros else torch.empty_like)(hidden) if needs[0] else None
    gw = weight.new_zeros((K, H), dtype=dtype) if needs[1] else None
    gb = weight.new_zeros(K, dtype=dtype) if bias is not None and needs[2] else None
    n_max = max(M if i is None else i.numel() for i in idxs)
    sbuf = hidden.new_empty((min(chunk_size, n_max), K), dtype=dtype)
    tbuf = torch.empty_like(sbuf) if any(tg.soft for tg in tgs) else None
    losses = []
    for l, (tg, idx) in enumerate(zip(tgs, idxs)):
        hid, level_losses = hidden[:, l], [hidden.new_zeros(0, dtype=dtype)]
        for rows in chunks(M, idx, chunk_size):
            h = hid[rows]                                               # (c, H)
            s = sbuf[:n_rows(rows)]                                     # (c, K) logits
            if low:
                s.copy_(h @ w.t())
            else:
                torch.mm(h, w.t(), out=s)
            if b is not None:
                s.add_(b)
            scale = row_scale_of(row_scale, l, rows, s) if any(needs) else None
            level_losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
            if not any(needs):
                continue
            g = s.to(hidden.dtype) if low else s                        # (c, K) = dL/ds
            if gh is not None:
                gh[:, l][rows] = g @ w
            if gw is not None:
                if low:
                    accumulate_mm(gw, g.t(), h)
                else:
                    gw.addmm_(g.t(), h)
            if gb is not None:
                gb.add_(s.sum(0))
        losses.append(torch.cat(level_losses))
    grads = (gh, None if gw is None else gw.to(weight.dtype),
             None if gb is None else gb.to(bias.dtype))
    return losses, grads


def fused_linear_snce_levels(hidden, weight, latents, codebooks, taus, metric="l2", bias=None,
                             mask=None, chunk_size=None, reduction="mean", targets=None,
                             label_smoothing=0.0, compile=None):
    """SNCE of L levels' logits hidden[..., l, :] @ weight (K, H)^T + bias in one call, with
    one fp32 grad_weight accumulator for all levels (a per-level call holds one each).

    hidden (..., L, H); latents (..., L, D) with codebooks (L, K, D) (or one shared (K, D)) and
    taus (L numbers, or one): level l's rows get q from latents[..., l, :] against codebooks[l]
    at taus[l]; or, with taus == 0, targets (..., L) hard codes and label_smoothing. mask
    (..., L) bool. Returns the (L,) per-level means over counted rows ('mean') or sums ('sum'),
    or (..., L) per-row losses ('none'). Same semantics per level as fused_linear_snce."""
    zs, cbs, taus, tgts, idxs = check_levels(hidden, weight, bias, latents, codebooks, taus,
                                             mask, targets, metric, reduction)
    L, H, K, rows_shape = *hidden.shape[-2:], weight.shape[0], hidden.shape[:-2]
    M = rows_shape.numel()
    chunk_size = check_chunk(chunk_size)
    fast = use_compile(compile, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        tgs = [_Targets(zs[l], cbs[l], taus[l], metric, tgts[l], label_smoothing, K,
                        acc_dtype(hidden)) for l in range(L)]
        chunk_size = chunk_size or default_chunk(K, 4 * H, hidden.device)
        for tg in tgs:
            tg.fast = fast
        args = (hidden.reshape(M, L, H), weight, bias, tgs, idxs, chunk_size, reduction)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (hidden, weight, bias)):
            loss = _FusedLinearSNCE.apply(*args)
        else:   # eval: one matmul per chunk, no gradient work
            ns = [M if i is None else i.numel() for i in idxs]
            loss_rows, _ = _fused_pass(*args[:6], None, (False,) * 3)
            loss = reduce_levels(loss_rows, reduction, ns, idxs, M)
    return loss.view(*rows_shape, L) if reduction == "none" else loss


def fused_linear_snce(hidden, weight, latents, codebook, tau=1.0, metric="l2", bias=None,
                      mask=None, chunk_size=None, reduction="mean", targets=None,
                      label_smoothing=0.0, compile=None):
    """SNCE of the logits hidden (..., H) @ weight (K, H)^T + bias, never materialising them.

    Same targets, mask, reduction, tau (tau == 0: the zero-temperature limit) / targets /
    label_smoothing and compile semantics as snce_loss. Peak extra memory is O(chunk_size x K)
    plus the fp32 grad_weight accumulator: forward computes the gradients chunk by chunk
    (dL/ds = p - q, Eq. 11) and backward only scales them by grad_output ('none' recomputes
    instead, since each row has its own scale)."""
    need_tensor(hidden, "hidden", "(..., H)")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be (..., H), got {tuple(hidden.shape)}")
    if codebook is not None and (not isinstance(codebook, torch.Tensor) or codebook.dim() != 2):
        need_tensor(codebook, "codebook", "(K, D)")
        raise ValueError(f"codebook must be (K, D), got {tuple(codebook.shape)}")
    rows_of(mask, hidden.shape[:-1], hidden.device)        # its own messages, before reshaping
    for x, name, expected in ((latents, "latents", "(..., D)"), (targets, "targets", "(...)")):
        if x is not None:
            need_tensor(x, name, expected)

    def one_level(x, at):            # (..., *) -> (..., 1, *): a single level
        return x.unsqueeze(at) if isinstance(x, torch.Tensor) else x

    loss = fused_linear_snce_levels(
        one_level(hidden, -2), weight, one_level(latents, -2), codebook, [tau], metric, bias,
        one_level(mask, -1), chunk_size, reduction, one_level(targets, -1), label_smoothing,
        compile)
    return loss.squeeze(-1) if reduction == "none" else loss[0]


# -----------------------------------------------------------------------------
# autograd plumbing: forward computes dL/ds chunk by chunk when grad_output can only scale it


class _SNCELoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, tg, idx, chunk_size, reduction):
        N, K = logits.shape
        n = N if idx is None else idx.numel()
        keep = ctx.needs_input_grad[0] and reduction != "none"   # dL/ds is final: keep it
        grad = (torch.empty_like if idx is None else torch.zeros_like)(logits) if keep else None
        loss_rows = _snce_pass(logits, tg, idx, chunk_size,
                               level_scales(reduction, [n]) if keep else None, grad)
        ctx.tg, ctx.chunk_size, ctx.reduction = tg, chunk_size, reduction
        ctx.save_for_backward(logits if not keep else grad, idx)
        return reduce(loss_rows, reduction, n, idx, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        saved, idx = ctx.saved_tensors
        if ctx.reduction != "none":
            return saved * go.to(saved.dtype), None, None, None, None
        grad = torch.zeros_like(saved)  # per-row grad_output: recompute chunk by chunk
        _snce_pass(saved, ctx.tg, idx, ctx.chunk_size, go.reshape(-1, 1), grad)
        return grad, None, None, None, None


class _FusedLinearSNCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, tgs, idxs, chunk_size, reduction):
        M, L, _ = hidden.shape
        ns = [M if i is None else i.numel() for i in idxs]
        needs = ctx.needs_input_grad[:3]
        now = any(needs) and reduction != "none"   # grad_output is per level: do it all now
        loss_rows, grads = _fused_pass(hidden, weight, bias, tgs, idxs, chunk_size,
                                       level_scales(reduction, ns) if now else None,
                                       needs if now else (False,) * 3)
        ctx.tgs, ctx.idxs, ctx.chunk_size, ctx.reduction, ctx.ns, ctx.now = (
            tgs, idxs, chunk_size, reduction, ns, now)
        ctx.save_for_backward(hidden, weight, bias, *grads)
        return reduce_levels(loss_rows, reduction, ns, idxs, M)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        hidden, weight, bias, *grads = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        scales = grad_output_scales(go, ctx.reduction, ctx.ns, hidden.shape[0])
        if ctx.now and scales.dim() == 0:   # the grads were computed in forward: scale them
            grads = [g * scales.to(g.dtype) if need else None for g, need in zip(grads, needs)]
        else:                               # per-row / per-level grad_output: one more pass
            _, grads = _fused_pass(hidden, weight, bias, ctx.tgs, ctx.idxs, ctx.chunk_size,
                                   scales, needs)
        return (*grads, None, None, None, None)
