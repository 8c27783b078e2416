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
    fused_linear_snce_levels(hidden, weight, latents, codebooks, taus)   L residual levels, one call
    dissimilarity / nearest_code                                         the metric definitions,
                                                                         shared with tokenizer.py
    compile_available(device)                        whether the fused chunk kernel can compile

Speed: each chunk of rows runs either the eager path (plain PyTorch ops, the readable reference)
or the same computation as a torch.compile'd two-pass kernel (the default where a compiler is
available; compile=False or SNCE_COMPILE=0 turn it off). The numbers agree to fp32 rounding.

Benchmark: `python -m support.bench_snce` (bench_snce.py says what it measures).
"""

import math
import numbers
import os
import shutil
import warnings

import torch
import torch.nn.functional as F

METRICS = ("l2", "cos", "dot")
CHUNK_BYTES = 128 * 2**20  # budget for one chunk's two (rows, K) fp32 scratch buffers


# -----------------------------------------------------------------------------
# the metric definitions, one place for the whole repo


def _check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _need_tensor(x, name, expected):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {expected}, got {type(x).__name__}")


def _check_codebook(latents, codebook):
    _need_tensor(latents, "latents", "(..., D)")
    _need_tensor(codebook, "codebook", "(K, D)")
    if codebook.dim() != 2 or latents.shape[-1:] != codebook.shape[1:] or codebook.shape[0] == 0:
        raise ValueError(f"need latents (..., D) and codebook (K, D) with K >= 1, got "
                         f"{tuple(latents.shape)} and {tuple(codebook.shape)}")


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
    if inv > torch.finfo(c.dtype).max:
        raise ValueError(f"tau = {tau!r} is too small: 1 / tau overflows {c.dtype}; use tau >= "
                         f"{1 / torch.finfo(c.dtype).max:.1e}, or tau = 0 (hard CE on the nearest "
                         f"code, which is what so small a tau computes)")
    if metric == "l2":
        return torch.cat([c * (2 * inv), (c * c).sum(-1, keepdim=True) * -inv], 1)
    return (c if metric == "dot" else _unit(c)) * inv


def _prep(latents, metric, dtype):
    """(..., D) latents -> (..., D') rows for _teacher's A: unit for cos, [z, 1] for l2."""
    z = latents.detach().to(dtype)
    if metric == "l2":
        return torch.cat([z, z.new_ones(*z.shape[:-1], 1)], -1)
    return _unit(z) if metric == "cos" else z


def _check_teacher_range(z, A, tau):
    """The target logits z @ A^T must not overflow: |t| <= D' max|z| max|A| < dtype max / 4."""
    bound = z.shape[-1] * float(z.abs().max()) * float(A.abs().max()) if z.numel() else 0.0
    if not bound < torch.finfo(A.dtype).max / 4:
        raise ValueError(f"tau = {tau!r} is too small for these latents and codebook: the target "
                         f"logits -d / tau reach ~{bound:.1e}, beyond {A.dtype}; use a larger tau, "
                         f"or tau = 0 (hard CE on the nearest code, which is what it computes)")


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
    n = _check_chunk(chunk_size) or _default_chunk(K)
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


def _as_tau(tau):
    """A python float from a number, numpy scalar or 0-d tensor (never differentiated)."""
    if isinstance(tau, torch.Tensor) or type(tau).__module__ == "numpy":
        if getattr(tau, "ndim", None) != 0:
            raise ValueError(f"tau must be a number or a 0-d tensor / numpy scalar, got shape "
                             f"{tuple(tau.shape)}")
        tau = tau.item()
    if not (isinstance(tau, numbers.Real) and not isinstance(tau, bool)
            and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return float(tau)


def _check_chunk(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, "
                         f"got {chunk_size!r}")
    return int(chunk_size)


def _check(latents, codebook, tau, metric, reduction, rows_shape, K, what, targets):
    _check_metric(metric)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets is not None:
        _need_tensor(targets, "targets", f"of codes, shape {tuple(rows_shape)}")
        if targets.shape != rows_shape:
            raise ValueError(f"targets must have shape {tuple(rows_shape)} ({what}'s leading "
                             f"dims), got {tuple(targets.shape)}")
        if latents is None:
            return
    if latents is None or codebook is None:
        raise ValueError("latents and codebook are required unless hard targets are given")
    _need_tensor(latents, "latents", "(..., D)")
    _need_tensor(codebook, "codebook", "(K, D)")
    if codebook.dim() != 2 or codebook.shape[0] != K:
        raise ValueError(f"codebook must be (K, D) with K = {K} (the last dim of {what}), "
                         f"got {tuple(codebook.shape)}")
    D = codebook.shape[1]
    if latents.shape != (*rows_shape, D):
        raise ValueError(f"latents must be {(*rows_shape, D)} ({what}'s leading dims + "
                         f"codebook's D), got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or inf")
    if not torch.isfinite(codebook).all():
        raise ValueError("codebook contains NaN or inf")


def _rows(mask, rows_shape, device):
    """Indices of the rows that count (None = all of them). mask (...) bool, True = counts."""
    if mask is None:
        return None
    if (not isinstance(mask, torch.Tensor) or mask.shape != rows_shape
            or mask.dtype != torch.bool):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise ValueError(f"mask must be a bool tensor of shape {tuple(rows_shape)}, got {got}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


# -----------------------------------------------------------------------------
# the fused chunk kernel: one chunk's loss rows and (p - q) * scale in two compiled passes
#
# Eager PyTorch spends about eight passes over each (c, K) block on the soft targets (max,
# shift, threshold, exp, sum, the q.s dot, p - q). torch.compile (inductor: C++/OpenMP on the
# CPU, Triton on a GPU) fuses them into two kernels: _soft_stats (row maxima, then the three row
# sums, leaving exp(s - m) and the unnormalised q in the buffers) and _soft_grad (one pointwise
# pass writing dL/ds over s, with no exp). The teacher logits t come from one (c, D') @ (D', K)
# matmul into a scratch buffer: computing them inside the fused pass instead re-reads the whole
# (D', K) teacher for every row (inductor does not tile rows) and measured slower on the CPU.
# The row count is marked dynamic, so each kernel compiles once per (K, dtype, device) family
# whatever the chunk lengths (the last chunk, masked rows). First call: seconds of compilation
# (inductor caches the result on disk for later processes). Any compile failure falls back to
# the eager path with a warning.


def _soft_stats(s, t):
    """s, t (c, K) -> sum exp(s - m), sum q~, loss rows (all (c, 1)); leaves exp(s - m) in s
    and q~ = exp(t - max t) in t, zeroed below e^-60 (exactly 0 at fp32, no slow denormals)."""
    m = s.amax(1, keepdim=True)
    d = t - t.amax(1, keepdim=True)
    e = torch.exp(s - m)
    qt = torch.where(d < -60, 0.0, torch.exp(d))
    ssum = e.sum(1, keepdim=True)
    tsum = qt.sum(1, keepdim=True)
    qs = (qt * (s - m)).sum(1, keepdim=True) / tsum     # sum_k q_k (s_k - m)
    s.copy_(e)
    t.copy_(qt)
    return ssum, tsum, torch.log(ssum) - qs             # Eq. 8: logsumexp(s) - sum_k q_k s_k


def _soft_grad(s, t, ssum, tsum, scale):
    """s <- (p - q) * scale (Eq. 11), in place: (c, K), from _soft_stats' exp(s - m) and q~."""
    s.copy_(s * (scale / ssum) - t * (scale / tsum))


_COMPILED = {}          # plain function -> its torch.compile'd form, or None after a failure


def compile_available(device):
    """Whether the fused chunk kernel can be compiled for this device: not without a C++
    compiler (CPU inductor needs one) or Triton (CUDA). Without it the loss runs the eager path,
    which computes the same numbers."""
    if torch.device(device).type == "cpu":
        cxx = os.environ.get("CXX")
        return any(shutil.which(c) for c in ([cxx] if cxx else ["g++", "c++", "clang++"]))
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton()
    return False


def _compiled(fn, *args):
    """fn(*args) through its compiled form, or False when compilation failed (then eager)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    if _COMPILED[fn] is None:
        return False
    for a in args:      # rows dynamic: one kernel for every chunk length, the tail included
        torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return _COMPILED[fn](*args)
    except Exception as e:   # noqa: BLE001  an inductor bug or a missing toolchain: eager works
        warnings.warn(f"snce: torch.compile of {fn.__name__} failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the eager path")
        _COMPILED[fn] = None
        return False


def _use_compile(compile, device):
    """compile None: on unless the environment says SNCE_COMPILE=0 or compile_available says
    no; True: on (an error if unavailable); False: the eager path."""
    if compile is None:
        return os.environ.get("SNCE_COMPILE", "1") != "0" and compile_available(device)
    if compile not in (True, False):
        raise ValueError(f"compile must be None, True or False, got {compile!r}")
    if compile and not compile_available(device):
        raise ValueError("compile=True, but torch.compile cannot run here (no C++ compiler for "
                         "the CPU, or no Triton for CUDA); pass compile=None to fall back to the "
                         "eager path")
    return compile


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
        self.fast = False          # True: the compiled chunk kernel, False: the eager path
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
            _check_teacher_range(self.z, self.A, tau)
        else:  # tau == 0: hard target = the nearest code
            self.target = nearest_code(latents, codebook, metric).reshape(-1)

    def loss_and_grad(self, s, rows, tbuf, scale):
        """s (c, K) logits in fp32/fp64, a scratch buffer we own: on return it holds
        (p - q) * scale (Eq. 11) when scale (c, 1) is given. Returns loss rows (c,)
        = logsumexp(s) - sum_k q_k s_k, i.e. -sum_k q_k log p_k (Eq. 8)."""
        if self.soft and self.fast:
            out = self._fused(s, rows, tbuf, scale)
            if out is not None:
                return out
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

    def _fused(self, s, rows, tbuf, scale):
        """The same as the eager soft path, through the compiled kernel (None if it failed)."""
        t = _teacher_logits(self.z[rows], self.A, out=tbuf[:s.shape[0]])   # (c, K)
        stats = _compiled(_soft_stats, s, t)
        if stats is False:
            return None
        if scale is not None and _compiled(_soft_grad, s, t, *stats[:2], scale) is False:
            raise RuntimeError("snce: the compiled gradient pass failed after the compiled "
                               "loss pass worked; rerun with SNCE_COMPILE=0")
        return stats[2].view(-1)


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


def _row_scale(row_scale, level, rows, like):
    """(c, 1) factor dL_total / dL_row of each row in the chunk: row_scale is a list of one
    number per level (every row of the level alike) or an (M, L) tensor (one per row)."""
    if isinstance(row_scale, torch.Tensor):
        return row_scale[:, level][rows].to(like.dtype).reshape(-1, 1).contiguous()
    return torch.full((like.shape[0], 1), row_scale[level], dtype=like.dtype, device=like.device)


def _level_scales(reduction, ns):
    """dL_level / dL_row for 'sum' (1) or 'mean' (1 / counted rows) of each level."""
    return [1.0 / max(n, 1) if reduction == "mean" else 1.0 for n in ns]


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


def _grad_output_scales(go, reduction, ns, n_rows):
    """Backward's grad_output go: (L,) for 'sum'/'mean', (M, L) for 'none'. Returns one number
    when every row's dL/dloss_row is that number times the forward's row scale (the gradients
    computed in forward only need scaling), else the (M, L) per-row scales to recompute with."""
    if reduction == "none":
        return go
    if go.numel() == 1 or bool((go == go.reshape(-1)[0]).all()):
        return go.reshape(-1)[0]
    return (go.reshape(1, -1) * go.new_tensor(_level_scales(reduction, ns))).expand(n_rows, -1)


# -----------------------------------------------------------------------------
# snce_loss: on materialised logits (N, K), chunked over rows


class _SNCELoss(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, tg, idx, chunk_size, reduction):
        N, K = logits.shape
        n = N if idx is None else idx.numel()
        keep = ctx.needs_input_grad[0] and reduction != "none"   # dL/ds is final: keep it
        grad = (torch.empty_like if idx is None else torch.zeros_like)(logits) if keep else None
        loss_rows = _snce_pass(logits, tg, idx, chunk_size,
                               _level_scales(reduction, [n]) if keep else None, grad)
        ctx.tg, ctx.chunk_size, ctx.reduction = tg, chunk_size, reduction
        ctx.save_for_backward(logits if not keep else grad, idx)
        return _reduce(loss_rows, reduction, n, idx, N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        saved, idx = ctx.saved_tensors
        if ctx.reduction != "none":
            return saved * go.to(saved.dtype), None, None, None, None
        grad = torch.zeros_like(saved)  # per-row grad_output: recompute chunk by chunk
        _snce_pass(saved, ctx.tg, idx, ctx.chunk_size, go.reshape(-1, 1), grad)
        return grad, None, None, None, None


def _snce_pass(logits, tg, idx, chunk_size, row_scale, grad):
    """Loss rows of the counted rows; writes (p - q) * dL/dloss_row into grad when given."""
    dtype = _acc_dtype(logits)
    n = logits.shape[0] if idx is None else idx.numel()
    sbuf = logits.new_empty((min(chunk_size, n), logits.shape[1]), dtype=dtype)
    tbuf = torch.empty_like(sbuf) if tg.soft else None
    losses = [logits.new_zeros(0, dtype=dtype)]
    for rows in _chunks(logits.shape[0], idx, chunk_size):
        s = sbuf[:_n(rows)]
        s.copy_(logits[rows])
        scale = _row_scale(row_scale, 0, rows, s) if grad is not None else None
        losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
        if grad is not None:
            grad[rows] = s
    return torch.cat(losses)


def snce_loss(logits, latents, codebook, tau=1.0, metric="l2", mask=None, chunk_size=None,
              reduction="mean", targets=None, label_smoothing=0.0, compile=None):
    """SNCE (Eq. 8) of logits (..., K) against q(k | z) of latents (..., D) and codebook (K, D).

    mask (...) bool, True = the row counts (MaskGIT's masked positions, Eq. 15).
    tau == 0: hard CE on the nearest code, or on `targets` (...) when given (then latents and
    codebook may be None); label_smoothing > 0 with tau == 0 is the paper's LS baseline.
    tau: a number, numpy scalar or 0-d tensor (not differentiated).
    Chunked over rows: holds at most two (chunk_size, K) fp32 buffers besides dL/dlogits.
    compile: None = the fused compiled chunk kernel when available (compile_available), True =
    require it, False = the eager path. Same numbers either way (fp32 rounding aside).
    Returns an fp32 loss (fp64 for fp64 logits); 'none' gives (...) with 0 on uncounted rows."""
    _need_tensor(logits, "logits", "(..., K)")
    K, rows_shape = logits.shape[-1], logits.shape[:-1]
    if logits.dim() < 1 or K == 0:
        raise ValueError(f"logits must be (..., K) with K >= 1 codes, got {tuple(logits.shape)}")
    tau, chunk_size = _as_tau(tau), _check_chunk(chunk_size)
    _check(latents, codebook, tau, metric, reduction, rows_shape, K, "logits", targets)
    idx = _rows(mask, rows_shape, logits.device)
    with torch.autocast(logits.device.type, enabled=False):
        tg = _Targets(latents, codebook, tau, metric, targets, label_smoothing, K, _acc_dtype(logits))
        chunk_size = chunk_size or _default_chunk(K)
        tg.fast = _use_compile(compile, logits.device)
        args = (logits.reshape(-1, K), tg, idx, chunk_size, reduction)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = _SNCELoss.apply(*args)
        else:   # eval: the loss only (a Function would compute dL/dlogits regardless)
            n = len(args[0]) if idx is None else idx.numel()
            loss = _reduce(_snce_pass(*args[:4], None, None), reduction, n, idx, rows_shape.numel())
    return loss.view(rows_shape) if reduction == "none" else loss


# -----------------------------------------------------------------------------
# fused_linear_snce: hidden (N, H) @ weight (K, H)^T + SNCE, without the (N, K) logits;
# fused_linear_snce_levels: the same for L residual levels in one call (one grad_weight)


class _FusedLinearSNCE(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, bias, tgs, idxs, chunk_size, reduction):
        M, L, _ = hidden.shape
        ns = [M if i is None else i.numel() for i in idxs]
        needs = ctx.needs_input_grad[:3]
        now = any(needs) and reduction != "none"   # grad_output is per level: do it all now
        loss_rows, grads = _fused_pass(hidden, weight, bias, tgs, idxs, chunk_size,
                                       _level_scales(reduction, ns) if now else None,
                                       needs if now else (False,) * 3)
        ctx.tgs, ctx.idxs, ctx.chunk_size, ctx.reduction, ctx.ns, ctx.now = (
            tgs, idxs, chunk_size, reduction, ns, now)
        ctx.save_for_backward(hidden, weight, bias, *grads)
        return _reduce_levels(loss_rows, reduction, ns, idxs, M)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        hidden, weight, bias, *grads = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        scales = _grad_output_scales(go, ctx.reduction, ctx.ns, hidden.shape[0])
        if ctx.now and scales.dim() == 0:   # the grads were computed in forward: scale them
            grads = [g * scales.to(g.dtype) if need else None for g, need in zip(grads, needs)]
        else:                               # per-row / per-level grad_output: one more pass
            _, grads = _fused_pass(hidden, weight, bias, ctx.tgs, ctx.idxs, ctx.chunk_size,
                                   scales, needs)
        return (*grads, None, None, None, None)


def _reduce_levels(loss_rows, reduction, ns, idxs, M):
    """(L,) per-level sums / means, or (M, L) per-row losses for 'none'."""
    out = [_reduce(r, reduction, n, i, M) for r, n, i in zip(loss_rows, ns, idxs)]
    return torch.stack(out, -1)


def _fused_pass(hidden, weight, bias, tgs, idxs, chunk_size, row_scale, needs):
    """One sweep over each level's counted rows in chunks (hidden (M, L, H), level l's rows are
    hidden[:, l]): per chunk the logits (c, K), the loss rows, and (p - q) * row scale turned
    straight into grad_hidden (c, H) = g @ W and accumulated into the one grad_weight (K, H) +=
    g^T @ h, grad_bias (K,) += sum_c g shared by all levels. Matmuls run in hidden's dtype
    (bf16 tensor cores on GPU); softmax, q and the weight/bias sums are fp32 (fp64 for fp64)."""
    M, L, H = hidden.shape
    K = weight.shape[0]
    dtype, low = _acc_dtype(hidden), hidden.dtype not in (torch.float32, torch.float64)
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
        for rows in _chunks(M, idx, chunk_size):
            h = hid[rows]                                               # (c, H)
            s = sbuf[:_n(rows)]
            if low:
                s.copy_(h @ w.t())
            else:
                torch.mm(h, w.t(), out=s)
            if b is not None:
                s.add_(b)
            scale = _row_scale(row_scale, l, rows, s) if any(needs) else None
            level_losses.append(tg.loss_and_grad(s, rows, tbuf, scale))
            if not any(needs):
                continue
            g = s.to(hidden.dtype) if low else s                        # (c, K) = dL/ds
            if gh is not None:
                gh[:, l][rows] = g @ w
            if gw is not None:
                if low:
                    gw.add_(g.t() @ h)
                else:
                    gw.addmm_(g.t(), h)
            if gb is not None:
                gb.add_(s.sum(0))
        losses.append(torch.cat(level_losses))
    grads = (gh, None if gw is None else gw.to(weight.dtype),
             None if gb is None else gb.to(bias.dtype))
    return losses, grads


def fused_linear_snce_levels(hidden, weight, latents, codebooks, taus, metric="l2", bias=None,
                             mask=None, chunk_size=None, reduction="sum", targets=None,
                             label_smoothing=0.0, compile=None):
    """SNCE of L levels' logits hidden[..., l, :] @ weight (K, H)^T + bias in one call, with
    one fp32 grad_weight accumulator for all levels (a per-level call holds one each).

    hidden (..., L, H); latents (..., L, D) with codebooks (L, K, D) (or one shared (K, D)) and
    taus (L numbers, or one): level l's rows get q from latents[..., l, :] against codebooks[l]
    at taus[l]; or, with taus == 0, targets (..., L) hard codes and label_smoothing. mask
    (..., L) bool. Returns the (L,) per-level sums ('sum') or means over counted rows ('mean'),
    or (..., L) per-row losses ('none'). Same semantics per level as fused_linear_snce."""
    _need_tensor(hidden, "hidden", "(..., L, H)")
    _need_tensor(weight, "weight", "(K, H)")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., L, H), got {tuple(hidden.shape)}")
    L, H, rows_shape = hidden.shape[-2], hidden.shape[-1], hidden.shape[:-2]
    M = rows_shape.numel()
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be (K, H) with K >= 1 and H = {H} (hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[0]
    if bias is not None:
        _need_tensor(bias, "bias", f"({K},)")
        if bias.shape != (K,):
            raise ValueError(f"bias must be ({K},), got {tuple(bias.shape)}")
    if isinstance(taus, torch.Tensor) and taus.dim() == 1:
        taus = taus.tolist()
    taus = [_as_tau(t) for t in (taus if isinstance(taus, (list, tuple)) else [taus] * L)]
    if len(taus) != L:
        raise ValueError(f"taus must be one number or L = {L} of them (hidden's dim -2), "
                         f"got {len(taus)}")
    chunk_size = _check_chunk(chunk_size)

    def level(x, name, trail):      # x (..., L, *trail) -> L views (M, *trail), or Nones
        if x is None:
            return [None] * L
        _need_tensor(x, name, f"(..., {L}{', ...' * trail})")
        if x.dim() < 1 + trail or x.shape[-1 - trail] != L:
            raise ValueError(f"{name} must have the levels at dim {-1 - trail} like hidden "
                             f"(..., L = {L}, H), got {tuple(x.shape)}")
        return [x[(..., l) + (slice(None),) * trail] for l in range(L)]

    if codebooks is None or (isinstance(codebooks, torch.Tensor) and codebooks.dim() == 2):
        cbs = [codebooks] * L                                   # one shared (K, D), or hard
    elif isinstance(codebooks, torch.Tensor) and codebooks.dim() == 3 and len(codebooks) == L:
        cbs = list(codebooks)
    else:
        _need_tensor(codebooks, "codebooks", f"({L}, K, D)")
        raise ValueError(f"codebooks must be (L = {L}, K, D) or one shared (K, D), "
                         f"got {tuple(codebooks.shape)}")
    zs, tgts, masks = level(latents, "latents", 1), level(targets, "targets", 0), level(mask, "mask", 0)
    for l in range(L):
        _check(zs[l], cbs[l], taus[l], metric, reduction, rows_shape, K, "weight", tgts[l])
    idxs = [_rows(m, rows_shape, hidden.device) for m in masks]
    fast = _use_compile(compile, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        tgs = [_Targets(zs[l], cbs[l], taus[l], metric, tgts[l], label_smoothing, K,
                        _acc_dtype(hidden)) for l in range(L)]
        chunk_size = chunk_size or _default_chunk(K, 4 * H)
        for tg in tgs:
            tg.fast = fast
        args = (hidden.reshape(M, L, H), weight, bias, tgs, idxs, chunk_size, reduction)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (hidden, weight, bias)):
            loss = _FusedLinearSNCE.apply(*args)
        else:   # eval: one matmul per chunk, no gradient work
            ns = [M if i is None else i.numel() for i in idxs]
            loss_rows, _ = _fused_pass(*args[:6], None, (False,) * 3)
            loss = _reduce_levels(loss_rows, reduction, ns, idxs, M)
    return loss.view(*rows_shape, L) if reduction == "none" else loss


def fused_linear_snce(hidden, weight, latents, codebook, tau=1.0, metric="l2", bias=None,
                      mask=None, chunk_size=None, reduction="mean", targets=None,
                      label_smoothing=0.0, compile=None):
    """SNCE of the logits hidden (..., H) @ weight (K, H)^T + bias, never materialising them.

    Same targets, mask, reduction, tau == 0 / targets / label_smoothing and compile semantics
    as snce_loss. Peak extra memory is O(chunk_size x K) plus the fp32 grad_weight accumulator:
    forward computes the gradients chunk by chunk (dL/ds = p - q, Eq. 11) and backward only
    scales them by grad_output ('none' recomputes instead, since each row has its own scale)."""
    _need_tensor(hidden, "hidden", "(..., H)")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be (..., H), got {tuple(hidden.shape)}")
    if codebook is not None and (not isinstance(codebook, torch.Tensor) or codebook.dim() != 2):
        _need_tensor(codebook, "codebook", "(K, D)")
        raise ValueError(f"codebook must be (K, D), got {tuple(codebook.shape)}")

    _rows(mask, hidden.shape[:-1], hidden.device)          # its own messages, before reshaping
    for x, name, expected in ((latents, "latents", "(..., D)"), (targets, "targets", "(...)")):
        if x is not None:
            _need_tensor(x, name, expected)

    def one_level(x, at):            # (..., *) -> (..., 1, *): a single level
        return x.unsqueeze(at) if isinstance(x, torch.Tensor) else x

    loss = fused_linear_snce_levels(
        one_level(hidden, -2), weight, one_level(latents, -2), codebook, [tau], metric, bias,
        one_level(mask, -1), chunk_size, reduction, one_level(targets, -1), label_smoothing,
        compile)
    return loss.squeeze(-1) if reduction == "none" else loss[0]


def neighbor_probs(latents, codebook, tau=1.0, metric="l2"):
    """q(k | z) of Eq. 5, dense: (..., D), (K, D) -> (..., K). tau == 0 gives one-hot(argmin d)."""
    _check_codebook(latents, codebook)
    K, tau = codebook.shape[0], _as_tau(tau)
    _check(latents, codebook, tau, metric, "none", latents.shape[:-1], K, "codebook", None)
    dtype = _acc_dtype(latents)
    if tau == 0:
        code = nearest_code(latents, codebook, metric)
        return torch.nn.functional.one_hot(code, K).to(dtype)
    A = _teacher(codebook.to(dtype), tau, metric)
    z = _prep(latents.reshape(-1, codebook.shape[1]), metric, dtype)
    _check_teacher_range(z, A, tau)
    return _teacher_logits(z, A).softmax(-1).view(*latents.shape[:-1], K)
