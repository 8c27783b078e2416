"""
Stochastic Neighbor Cross Entropy (SNCE): the loss, chunked so it scales to 262k-code vocabularies.

Paper: "SNCE: Geometry-Aware Supervision for Scalable Discrete Image Generation" (equation
numbers below are the paper's).

Cross entropy trains a discrete generator against the one-hot code t_i = argmin_k d(z_i, c_k)
of the tokenizer's continuous latent z_i (D-dim) and codebook C = (c_1 .. c_K). SNCE trains it
against the neighbor distribution of z_i instead (Eq. 5), so codes near z_i get positive signal
rather than being pushed down as hard as unrelated ones:

    q(k | z_i) = exp(-d(z_i, c_k) / tau) / sum_j exp(-d(z_i, c_j) / tau)             (Eq. 5)
    L_SNCE     = -(1 / |M|) sum_{i in M} sum_k q(k | z_i) log p(k | ctx_i)           (Eq. 7-8)

with p = softmax(s) the model's distribution from its logits s (K,), M the rows that count
(all tokens for AR, the masked ones for MaskGIT), and d one of

    l2 : d(z, c) = ||z - c||^2        dot: d(z, c) = -z . c        cos: d(z, c) = -cos(z, c)

Facts the code relies on (each checked in tests/test_snce.py):
  - gradient: dL_row / ds = p - q (Eq. 11), so one chunk of rows gives its loss and its logit
    gradient in one pass, and backprop through the head is two matmuls with (p - q).
  - KL view: L_row = KL(q || p) + H(q); H(q) does not depend on the model, so SNCE and the
    forward KL to q have the same gradient (that is how a distillation loss with a "teacher"
    computes the same thing).
  - tau -> 0: q becomes one-hot on argmin_k d, so SNCE becomes CE on the nearest code; tau == 0
    is accepted and means exactly that (hard CE; or CE on given `targets`, optionally with
    label smoothing, the paper's baselines).
  - linear teacher: for every metric the target logits -d(z, c_k) / tau are, up to a per-row
    constant that the softmax ignores, an affine map of (a normalised) z:

        l2 : -||z - c||^2 / tau = [z, 1] @ [2C / tau, -||c||^2 / tau]^T  (- ||z||^2 / tau, cancels)
        dot: -(-z . c)   / tau = z @ (C / tau)^T
        cos: -(-cos)     / tau = (z / ||z||) @ (C / ||C|| / tau)^T

    so one (rows, D') @ (D', K) product per chunk of rows gives them, whatever the metric.

Public API:
    neighbor_probs(latents, codebook, tau, metric)                       dense q, for small sizes
    snce_loss(logits, latents, codebook, tau, metric, mask, ...)          on materialised logits
    fused_linear_snce(hidden, weight, latents, codebook, tau, ...)       never builds (N, K) logits
    dissimilarity / nearest_code                                         the metric definitions,
                                                                         shared with tokenizer.py

Benchmark: `python bench_snce.py` (bench_snce.py says what it measures).
"""

import math

import torch
import torch.nn.functional as F

METRICS = ("l2", "cos", "dot")
CHUNK_BYTES = 128 * 2**20  # budget for one chunk's two (rows, K) fp32 scratch buffers


# -----------------------------------------------------------------------------
# the metric definitions, one place for the whole repo


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _check_codebook(latents, codebook):
    if codebook.dim() != 2 or latents.shape[-1:] != codebook.shape[1:]:
        raise ValueError(f"need latents (..., D) and codebook (K, D), got {tuple(latents.shape)} "
                         f"and {tuple(codebook.shape)}")


def _acc_dtype(x):
    """fp64 stays fp64 (tests); everything else computes its softmaxes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dissimilarity(latents, codebook, metric="l2"):
    """d(z, c_k) for every code, exactly as defined: (..., D), (K, D) -> (..., K). Dense."""
    _check_metric(metric)
    _check_codebook(latents, codebook)
    z = latents.to(_acc_dtype(latents))
    c = codebook.to(z.dtype)
    if metric == "l2":
        # ||z||^2 - 2 z.c + ||c||^2, clamped: rounding can make it slightly negative
        d = (z * z).sum(-1, keepdim=True) - 2 * z @ c.t() + (c * c).sum(-1)
        return d.clamp_min(0)
    if metric == "dot":
        return -(z @ c.t())
    return -(_unit(z) @ _unit(c).t())


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _teacher(codebook, tau, metric):
    """A (K, D') with -d(z, c_k) / tau = prep(z) @ A^T + (per-row const): one matmul, no bias.
    l2 appends the column -||c||^2 / tau, which meets the constant 1 that prep appends to z.
    tau == 0 -> scale 1 (only the argmax is used then). fp32, or fp64 for fp64 codebooks."""
    c = codebook.detach().to(_acc_dtype(codebook))
    inv = 1.0 / tau if tau > 0 else 1.0
    if metric == "l2":
        return torch.cat([c * (2 * inv), (c * c).sum(-1, keepdim=True) * -inv], 1)
    return (c if metric == "dot" else _unit(c)) * inv


def _prep(latents, metric, dtype):
    """(..., D) latents -> (..., D') rows for _teacher's A: unit for cos, [z, 1] for l2."""
    z = latents.detach().to(dtype)
    if metric == "l2":
        return torch.cat([z, z.new_ones(*z.shape[:-1], 1)], -1)
    return _unit(z) if metric == "cos" else z


def _teacher_logits(z, A, out=None):
    """(c, D') prepared latents -> (c, K) target logits -d/tau (+ row const)."""
    return torch.mm(z, A.t(), out=out)


def nearest_code(latents, codebook, metric="l2", chunk_size=None):
    """argmin_k d(z, c_k): (..., D), (K, D) -> (...) int64. Chunked over rows (bounded memory)."""
    _check_metric(metric)
    _check_codebook(latents, codebook)
    K, D = codebook.shape
    dtype = _acc_dtype(latents)
    A = _teacher(codebook.to(dtype), 0.0, metric)
    z = _prep(latents.reshape(-1, D), metric, dtype)
    n = chunk_size or _default_chunk(K)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for i in range(0, z.shape[0], n):   # max(1).indices: 3x faster than argmax(1) on CPU
        out[i:i + n] = _teacher_logits(z[i:i + n], A).max(1).indices
    return out.view(latents.shape[:-1])


def _default_chunk(K, extra_bytes_per_row=0):
    """Rows per chunk so two fp32 (rows, K) buffers stay within CHUNK_BYTES."""
    per_row = 2 * 4 * K + extra_bytes_per_row
    return max(8, (CHUNK_BYTES // per_row) // 8 * 8)


# -----------------------------------------------------------------------------
# input checks: bad input gets a clear error


def _check(latents, codebook, tau, metric, reduction, rows_shape, K, what, targets):
    _check_metric(metric)
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets is not None:
        if targets.shape != rows_shape:
            raise ValueError(f"targets must have shape {tuple(rows_shape)} ({what}'s leading "
                             f"dims), got {tuple(targets.shape)}")
        if latents is None:
            return
    if latents is None or codebook is None:
        raise ValueError("latents and codebook are required unless hard targets are given")
    if codebook.dim() != 2 or codebook.shape[0] != K:
        raise ValueError(f"codebook must be (K, D) with K = {K} (the last dim of {what}), "
                         f"got {tuple(codebook.shape)}")
    D = codebook.shape[1]
    if latents.shape != (*rows_shape, D):
        raise ValueError(f"latents must be {(*rows_shape, D)} ({what}'s leading dims + "
                         f"codebook's D), got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf")


def _rows(mask, rows_shape, device):
    """Indices of the rows that count (None = all of them). mask (...) bool, True = counts."""
    if mask is None:
        return None
    if mask.shape != rows_shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(rows_shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


# -----------------------------------------------------------------------------
# the targets and one chunk of rows: loss rows and the logit gradient (p - q), in place


class _Targets:
    """What q is for each row: soft (the linear teacher over the latents, Eq. 5) or hard
    ((1 - eps) one-hot + eps / K: CE when eps == 0, label smoothing otherwise)."""

    def __init__(self, latents, codebook, tau, metric, targets, label_smoothing, K, dtype):
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if label_smoothing and tau > 0:
            raise ValueError(f"label_smoothing is a hard-target baseline: it needs tau == 0, got "
                             f"tau = {tau}")
        self.eps = float(label_smoothing)
        self.soft = tau > 0
        if targets is not None:
            if tau > 0:
                raise ValueError("targets (hard codes) are only used with tau == 0, got tau "
                                 f"= {tau}: SNCE's soft targets come from the latents")
            tgt = targets.reshape(-1)
            if tgt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"targets must be an integer tensor, got {tgt.dtype}")
            if tgt.numel() and (tgt.min() < 0 or tgt.max() >= K):
                raise ValueError(f"targets must be codes in [0, {K}), got values in "
                                 f"[{int(tgt.min())}, {int(tgt.max())}]")
            self.target = tgt.long()
        elif self.soft:
            self.A = _teacher(codebook.to(dtype), tau, metric)
            self.z = _prep(latents.reshape(-1, codebook.shape[1]), metric, dtype)
        else:  # tau == 0: hard target = the nearest code
            self.target = nearest_code(latents, codebook, metric).reshape(-1)

    def loss_and_grad(self, s, rows, tbuf, scale):
        """s (c, K) logits in fp32/fp64, a scratch buffer we own: on return it holds
        (p - q) * scale (Eq. 11) when scale (c, 1) is given. Returns loss rows (c,)
        = logsumexp(s) - sum_k q_k s_k, i.e. -sum_k q_k log p_k (Eq. 8)."""
        s.sub_(s.amax(1, keepdim=True))                   # stable softmax; the shift cancels
        if self.soft:
            t = _teacher_logits(self.z[rows], self.A, out=tbuf[:s.shape[0]])  # (c, K)
            t.sub_(t.amax(1, keepdim=True))
            # q_k < e^-60 is exactly 0 at fp32/fp64 precision: zero it (no slow denormals)
            F.threshold_(t, -60.0, -math.inf).exp_()      # unnormalised q
            tsum = t.sum(1, keepdim=True)                 # (c, 1)
            qs = _rowdot(t, s) / tsum                     # sum_k q_k s_k
        else:
            tgt = self.target[rows].view(-1, 1)
            qs = (1 - self.eps) * s.gather(1, tgt)
            if self.eps:
                qs = qs + (self.eps / s.shape[1]) * s.sum(1, keepdim=True)
        s.exp_()
        ssum = s.sum(1, keepdim=True)
        loss = ssum.log() - qs
        if scale is not None:
            s.mul_(scale / ssum)                          # p * scale
            if self.soft:
                s.addcmul_(t, -scale / tsum)              # - q * scale
            else:
                if self.eps:
                    s.sub_(scale * (self.eps / s.shape[1]))
                s.scatter_add_(1, tgt, -(1 - self.eps) * scale)
        return loss.view(-1)


def _rowdot(a, b):
    """(c, K), (c, K) -> (c, 1) row-wise dot products with no (c, K) temporary. On the CPU one
    BLAS dot per row streams both rows once (5x faster than vecdot, which multiplies into a
    temporary first); on a GPU the batched form is one kernel."""
    if a.device.type == "cpu":
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b)]).view(-1, 1)
    return torch.linalg.vecdot(a, b).view(-1, 1)


def _chunks(n_rows, idx, chunk_size):
    """Row selectors of each chunk: slices when every row counts, index tensors otherwise."""
    if idx is None:
        return [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]
    return [rows for rows in idx.split(chunk_size) if len(rows)]


def _row_scale(reduction, n_counted, grad_rows, rows, like):
    """(c, 1) factor dL_total / dL_row of each row in the chunk."""
    if reduction == "none":
        return grad_rows[rows].to(like.dtype).view(-1, 1)
    w = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
    return torch.full((like.shape[0], 1), w, dtype=like.dtype, device=like.device)


def _reduce(loss_rows, reduction, n_counted, idx, n_rows):
    """The loss from the counted rows' losses; 'none' gives (n_rows,) with 0 where not counted."""
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / max(n_counted, 1)
    if idx is None:
        return loss_rows
    full = loss_rows.new_zeros(n_rows)
    full[idx] = loss_rows
    return full


def _n(rows):
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


# -----------------------------------------------------------------------------
# snce_loss: on materialised logits (N, K), chunked over rows


class _SNCELoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, tg, idx, chunk_size, reduction):
        N, K = logits.shape
        n = N if idx is None else idx.numel()
        keep = ctx.needs_input_grad[0] and reduction != "none"   # dL/ds is final: keep it
        grad = (torch.empty_like if idx is None else torch.zeros_like)(logits) if keep else None
        loss_rows = _snce_pass(logits, tg, idx, chunk_size, reduction, n, None, grad)
        ctx.tg, ctx.chunk_size, ctx.reduction, ctx.n = tg, chunk_size, reduction, n
        ctx.save_for_backward(logits if not keep else grad, idx)
        return _reduce(loss_rows, reduction, n, idx, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        saved, idx = ctx.saved_tensors
        if ctx.reduction != "none":
            return saved * go.to(saved.dtype), None, None, None, None
        grad = torch.zeros_like(saved)  # per-row grad_output: recompute chunk by chunk
        _snce_pass(saved, ctx.tg, idx, ctx.chunk_size, "none", ctx.n, go.reshape(-1), grad)
        return grad, None, None, None, None


def _snce_pass(logits, tg, idx, chunk_size, reduction, n, grad_rows, grad):
    """Loss rows of the counted rows; writes (p - q) * dL/dloss_row into grad when given."""
    dtype = _acc_dtype(logits)
    sbuf = logits.new_empty((min(chunk_size, n), logits.shape[1]), dtype=dtype)
    tbuf = torch.empty_like(sbuf) if tg.soft else None
    losses = [logits.new_zeros(0, dtype=dtype)]
    for rows in _chunks(logits.shape[0], idx, chunk_size):
        s = sbuf[:_n(rows)]
        s.copy_(logits[rows])
        scale = _row_scale(reduction, n, grad_rows, rows, s) if grad is not None else None
        losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
        if grad is not None:
            grad[rows] = s
    return torch.cat(losses)


def snce_loss(logits, latents, codebook, tau=1.0, metric="l2", mask=None, chunk_size=None,
              reduction="mean", targets=None, label_smoothing=0.0):
    """SNCE (Eq. 8) of logits (..., K) against q(k | z) of latents (..., D) and codebook (K, D).

    mask (...) bool, True = the row counts (MaskGIT's masked positions, Eq. 15).
    tau == 0: hard CE on the nearest code, or on `targets` (...) when given (then latents and
    codebook may be None); label_smoothing > 0 with tau == 0 is the paper's LS baseline.
    Chunked over rows: holds at most two (chunk_size, K) fp32 buffers besides dL/dlogits.
    Returns an fp32 loss (fp64 for fp64 logits); 'none' gives (...) with 0 on uncounted rows."""
    K, rows_shape = logits.shape[-1], logits.shape[:-1]
    _check(latents, codebook, tau, metric, reduction, rows_shape, K, "logits", targets)
    idx = _rows(mask, rows_shape, logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        tg = _Targets(latents, codebook, tau, metric, targets, label_smoothing, K, _acc_dtype(logits))
        args = (logits.reshape(-1, K), tg, idx, chunk_size or _default_chunk(K), reduction)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = _SNCELoss.apply(*args)
        else:   # eval: the loss only (a Function would compute dL/dlogits regardless)
            n = len(logits.reshape(-1, K)) if idx is None else idx.numel()
            loss = _reduce(_snce_pass(*args, n, None, None), reduction, n, idx, rows_shape.numel())
    return loss.view(rows_shape) if reduction == "none" else loss


# -----------------------------------------------------------------------------
# fused_linear_snce: hidden (N, H) @ weight (K, H)^T + SNCE, without the (N, K) logits


class _FusedLinearSNCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, tg, idx, chunk_size, reduction):
        N = hidden.shape[0]
        n = N if idx is None else idx.numel()
        needs = ctx.needs_input_grad[:3]
        now = any(needs) and reduction != "none"   # grad_output is a scalar: do it all now
        loss_rows, grads = _fused_pass(hidden, weight, bias, tg, idx, chunk_size, reduction, n,
                                       None, needs if now else (False,) * 3)
        ctx.tg, ctx.chunk_size, ctx.reduction, ctx.n = tg, chunk_size, reduction, n
        if now:
            ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        else:
            ctx.save_for_backward(hidden, weight, bias, idx)
        return _reduce(loss_rows, reduction, n, idx, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        needs = ctx.needs_input_grad[:3]
        if ctx.reduction != "none":   # the grads were computed in forward: only scale them
            grads = [g * go.to(g.dtype) if need else None
                     for g, need in zip(ctx.saved_tensors, needs)]
        else:                         # per-row grad_output: one more pass, scaled per row
            hidden, weight, bias, idx = ctx.saved_tensors
            _, grads = _fused_pass(hidden, weight, bias, ctx.tg, idx, ctx.chunk_size, "none",
                                   ctx.n, go.reshape(-1), needs)
        return (*grads, None, None, None, None)


def _fused_pass(hidden, weight, bias, tg, idx, chunk_size, reduction, n, grad_rows, needs):
    """One sweep over the counted rows in chunks: per chunk the logits (c, K), the loss rows,
    and (p - q) * row scale turned straight into grad_hidden (c, H) = g @ W and accumulated
    grad_weight (K, H) += g^T @ h, grad_bias (K,) += sum_c g. Matmuls run in hidden's dtype
    (bf16 tensor cores on GPU); softmax, q and the weight/bias sums are fp32 (fp64 for fp64)."""
    N, H = hidden.shape
    K = weight.shape[0]
    dtype, low = _acc_dtype(hidden), hidden.dtype not in (torch.float32, torch.float64)
    w = weight.to(hidden.dtype)
    b = None if bias is None else bias.to(dtype)
    gh = (torch.empty_like if idx is None else torch.zeros_like)(hidden) if needs[0] else None
    gw = weight.new_zeros((K, H), dtype=dtype) if needs[1] else None
    gb = weight.new_zeros(K, dtype=dtype) if bias is not None and needs[2] else None
    sbuf = hidden.new_empty((min(chunk_size, n), K), dtype=dtype)
    tbuf = torch.empty_like(sbuf) if tg.soft else None
    losses = [hidden.new_zeros(0, dtype=dtype)]
    for rows in _chunks(N, idx, chunk_size):
        h = hidden[rows]                                            # (c, H)
        s = sbuf[:_n(rows)]
        if low:
            s.copy_(h @ w.t())
        else:
            torch.mm(h, w.t(), out=s)
        if b is not None:
            s.add_(b)
        scale = _row_scale(reduction, n, grad_rows, rows, s) if any(needs) else None
        losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
        if not any(needs):
            continue
        g = s.to(hidden.dtype) if low else s                        # (c, K) = dL/ds
        if gh is not None:
            gh[rows] = g @ w
        if gw is not None:
            if low:
                gw.add_(g.t() @ h)
            else:
                gw.addmm_(g.t(), h)
        if gb is not None:
            gb.add_(s.sum(0))
    grads = (gh, None if gw is None else gw.to(weight.dtype),
             None if gb is None else gb.to(bias.dtype))
    return torch.cat(losses), grads


def fused_linear_snce(hidden, weight, latents, codebook, tau=1.0, metric="l2", bias=None,
                      mask=None, chunk_size=None, reduction="mean", targets=None,
                      label_smoothing=0.0):
    """SNCE of the logits hidden (..., H) @ weight (K, H)^T + bias, never materialising them.

    Same targets, mask, reduction and tau == 0 / targets / label_smoothing semantics as
    snce_loss. Peak extra memory is O(chunk_size x K) plus the fp32 grad_weight accumulator:
    forward computes the gradients chunk by chunk (dL/ds = p - q, Eq. 11) and backward only
    scales them by grad_output ('none' recomputes instead, since each row has its own scale)."""
    H, rows_shape = hidden.shape[-1], hidden.shape[:-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (K, H) with H = {H} (hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[0]
    if bias is not None and bias.shape != (K,):
        raise ValueError(f"bias must be ({K},), got {tuple(bias.shape)}")
    _check(latents, codebook, tau, metric, reduction, rows_shape, K, "weight", targets)
    idx = _rows(mask, rows_shape, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        tg = _Targets(latents, codebook, tau, metric, targets, label_smoothing, K, _acc_dtype(hidden))
        args = (hidden.reshape(-1, H), weight, bias, tg, idx, chunk_size or _default_chunk(K, 4 * H),
                reduction)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (hidden, weight, bias)):
            loss = _FusedLinearSNCE.apply(*args)
        else:   # eval: one matmul per chunk, no gradient work
            n = args[0].shape[0] if idx is None else idx.numel()
            loss_rows, _ = _fused_pass(*args, n, None, (False,) * 3)
            loss = _reduce(loss_rows, reduction, n, idx, rows_shape.numel())
    return loss.view(rows_shape) if reduction == "none" else loss


def neighbor_probs(latents, codebook, tau=1.0, metric="l2"):
    """q(k | z) of Eq. 5, dense: (..., D), (K, D) -> (..., K). tau == 0 gives one-hot(argmin d)."""
    K = codebook.shape[0]
    _check(latents, codebook, tau, metric, "none", latents.shape[:-1], K, "codebook", None)
    dtype = _acc_dtype(latents)
    if tau == 0:
        code = nearest_code(latents, codebook, metric)
        return torch.nn.functional.one_hot(code, K).to(dtype)
    A = _teacher(codebook.to(dtype), tau, metric)
    z = _prep(latents.reshape(-1, codebook.shape[1]), metric, dtype)
    return _teacher_logits(z, A).softmax(-1).view(*latents.shape[:-1], K)
