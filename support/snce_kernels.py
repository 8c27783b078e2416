"""
The machinery behind snce.py: input checks, the torch.compile'd chunk kernel and its probing,
and the bookkeeping of chunks, row scales and reductions. snce.py holds the math (the dense
Eq. 5 / 8 / 11 and the per-chunk loss and gradient); nothing here is needed to read it.

The compiled kernel computes the same function as snce.snce_chunk (soft targets), in two
passes over each (c, K) block instead of the eager path's eight or so; tests/test_snce.py ties
the two. Run the tests with

    python -m pytest -q tests/test_snce.py
"""

import math
import numbers
import os
import shutil
import warnings

import torch

METRICS = ("l2", "cos", "dot")
CHUNK_BYTES = 128 * 2**20  # CPU budget for one chunk's two (rows, K) fp32 scratch buffers
# On a GPU the cost of a chunk is not its buffers but what it re-reads: every chunk reads the
# (K, H) head weight twice (logits, grad_hidden) and read-modify-writes the fp32 (K, H)
# grad_weight accumulator, so chunks are as many rows as this budget allows (at most 1/16 of the
# device's memory), in multiples of 128 rows (tensor-core tiles), at least 256
DEVICE_CHUNK_BYTES = 4 * 2**30
ROWDOT_BYTES = CHUNK_BYTES // 8  # rowdot's (rows, K) block of products, besides the two


# -----------------------------------------------------------------------------
# input checks: bad input gets a clear ValueError saying what was expected


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def need_tensor(x, name, expected):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {expected}, got {type(x).__name__}")


def check_codebook(latents, codebook):
    need_tensor(latents, "latents", "(..., D)")
    need_tensor(codebook, "codebook", "(K, D)")
    if codebook.dim() != 2 or latents.shape[-1:] != codebook.shape[1:] or codebook.shape[0] == 0:
        raise ValueError(f"need latents (..., D) and codebook (K, D) with K >= 1, got "
                         f"{tuple(latents.shape)} and {tuple(codebook.shape)}")


def acc_dtype(x):
    """fp64 stays fp64 (tests); everything else computes its softmaxes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_tau(tau):
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


def check_inverse_tau(inv, tau, dtype):
    """1 / tau must be representable in the compute dtype."""
    if inv > torch.finfo(dtype).max:
        raise ValueError(f"tau = {tau!r} is too small: 1 / tau overflows {dtype}; use tau >= "
                         f"{1 / torch.finfo(dtype).max:.1e}, or tau = 0 (the zero-temperature "
                         f"limit: hard CE on the nearest code, which is what so small a tau "
                         f"computes)")


def check_teacher_range(z, A, tau):
    """The target logits z @ A^T must not overflow: |t| <= D' max|z| max|A| < dtype max / 4."""
    bound = z.shape[-1] * float(z.abs().max()) * float(A.abs().max()) if z.numel() else 0.0
    if not bound < torch.finfo(A.dtype).max / 4:
        raise ValueError(f"tau = {tau!r} is too small for these latents and codebook: the target "
                         f"logits -d / tau reach ~{bound:.1e}, beyond {A.dtype}; use a larger tau, "
                         f"or tau = 0 (the zero-temperature limit: hard CE on the nearest code, "
                         f"which is what it computes)")


def check_chunk(chunk_size):
    if chunk_size is None:
        return None
    if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
            or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, "
                         f"got {chunk_size!r}")
    return int(chunk_size)


def check_inputs(latents, codebook, tau, metric, reduction, rows_shape, K, what, targets):
    check_metric(metric)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets is not None:
        need_tensor(targets, "targets", f"of codes, shape {tuple(rows_shape)}")
        if targets.shape != rows_shape:
            raise ValueError(f"targets must have shape {tuple(rows_shape)} ({what}'s leading "
                             f"dims), got {tuple(targets.shape)}")
        if latents is None:
            return
    if latents is None or codebook is None:
        raise ValueError("latents and codebook are required unless hard targets are given")
    need_tensor(latents, "latents", "(..., D)")
    need_tensor(codebook, "codebook", "(K, D)")
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


def check_hard(targets, tau, label_smoothing, K):
    """label_smoothing and targets are the hard-target baselines (tau == 0). -> targets as (N,)
    int64 codes, or None."""
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if label_smoothing and tau > 0:
        raise ValueError(f"label_smoothing is a hard-target baseline: it needs tau == 0, got "
                         f"tau = {tau}")
    if targets is None:
        return None
    if tau > 0:
        raise ValueError("targets (hard codes) are only used with tau == 0, got tau "
                         f"= {tau}: SNCE's soft targets come from the latents")
    tgt = targets.reshape(-1)
    if tgt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"targets must be an integer tensor, got {tgt.dtype}")
    if tgt.numel() and (tgt.min() < 0 or tgt.max() >= K):
        raise ValueError(f"targets must be codes in [0, {K}), got values in "
                         f"[{int(tgt.min())}, {int(tgt.max())}]")
    return tgt.long()


def rows_of(mask, rows_shape, device):
    """Indices of the rows that count (None = all of them). mask (...) bool, True = counts."""
    if mask is None:
        return None
    if (not isinstance(mask, torch.Tensor) or mask.shape != rows_shape
            or mask.dtype != torch.bool):
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise ValueError(f"mask must be a bool tensor of shape {tuple(rows_shape)}, got {got}")
    return mask.reshape(-1).nonzero().squeeze(1).to(device)


def check_levels(hidden, weight, bias, latents, codebooks, taus, mask, targets, metric,
                 reduction):
    """fused_linear_snce_levels' arguments -> per level l: latents, codebook, tau, targets and
    counted row indices (lists of L), after checking every shape."""
    need_tensor(hidden, "hidden", "(..., L, H)")
    need_tensor(weight, "weight", "(K, H)")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., L, H), got {tuple(hidden.shape)}")
    L, H, rows_shape = hidden.shape[-2], hidden.shape[-1], hidden.shape[:-2]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"weight must be (K, H) with K >= 1 and H = {H} (hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[0]
    if bias is not None:
        need_tensor(bias, "bias", f"({K},)")
        if bias.shape != (K,):
            raise ValueError(f"bias must be ({K},), got {tuple(bias.shape)}")
    if isinstance(taus, torch.Tensor) and taus.dim() == 1:
        taus = taus.tolist()
    taus = [as_tau(t) for t in (taus if isinstance(taus, (list, tuple)) else [taus] * L)]
    if len(taus) != L:
        raise ValueError(f"taus must be one number or L = {L} of them (hidden's dim -2), "
                         f"got {len(taus)}")

    def level(x, name, trail):      # x (..., L, *trail) -> L views (M, *trail), or Nones
        if x is None:
            return [None] * L
        need_tensor(x, name, f"(..., {L}{', ...' * trail})")
        if x.dim() < 1 + trail or x.shape[-1 - trail] != L:
            raise ValueError(f"{name} must have the levels at dim {-1 - trail} like hidden "
                             f"(..., L = {L}, H), got {tuple(x.shape)}")
        return [x[(..., l) + (slice(None),) * trail] for l in range(L)]

    if codebooks is None or (isinstance(codebooks, torch.Tensor) and codebooks.dim() == 2):
        cbs = [codebooks] * L                                   # one shared (K, D), or hard
    elif isinstance(codebooks, torch.Tensor) and codebooks.dim() == 3 and len(codebooks) == L:
        cbs = list(codebooks)
    else:
        need_tensor(codebooks, "codebooks", f"({L}, K, D)")
        raise ValueError(f"codebooks must be (L = {L}, K, D) or one shared (K, D), "
                         f"got {tuple(codebooks.shape)}")
    zs, tgts = level(latents, "latents", 1), level(targets, "targets", 0)
    masks = level(mask, "mask", 0)
    for l in range(L):
        check_inputs(zs[l], cbs[l], taus[l], metric, reduction, rows_shape, K, "weight", tgts[l])
    return zs, cbs, taus, tgts, [rows_of(m, rows_shape, hidden.device) for m in masks]


# -----------------------------------------------------------------------------
# chunks, row scales, reductions


def chunk_budget(device=None):
    """Bytes for one chunk's scratch on this device: CHUNK_BYTES on a CPU (cache-sized blocks),
    min(DEVICE_CHUNK_BYTES, memory / 16) on a GPU."""
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return CHUNK_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    return min(DEVICE_CHUNK_BYTES, total // 16)


def default_chunk(K, extra_bytes_per_row=0, device=None):
    """Rows per chunk so two fp32 (rows, K) buffers (plus extra bytes a row) fit chunk_budget:
    on a CPU multiples of 8 rows, at least 8; on a GPU multiples of 128, at least 256 (at
    K = 262,144 and H = 1,024 on an 80 GiB GPU: 1,920 rows, not the CPU budget's 56)."""
    per_row = 2 * 4 * K + extra_bytes_per_row
    rows = chunk_budget(device) // per_row
    if torch.device("cpu" if device is None else device).type == "cuda":
        return max(256, rows // 128 * 128)
    return max(8, rows // 8 * 8)


ADDMM_OUT_DTYPE = {}   # device type -> whether addmm(out_dtype=fp32) accumulates bf16 in place


def accumulate_mm(acc, a, b):
    """acc (K, H) fp32 += a (K, c) @ b (c, H) for low-precision a, b: in place through
    addmm's out_dtype where the device has it (CUDA), so no (K, H) temporary per chunk; else
    acc += a @ b (the product in a's dtype, then added). Probed once per device type on a tiny
    product, so an unsupported build falls back instead of failing."""
    kind = acc.device.type
    if kind not in ADDMM_OUT_DTYPE:
        ok = False
        if kind == "cuda":
            try:
                x = torch.ones(2, 3, dtype=a.dtype, device=acc.device)
                y = torch.ones(3, 2, dtype=a.dtype, device=acc.device)
                o = torch.ones(2, 2, dtype=acc.dtype, device=acc.device)
                torch.addmm(o, x, y, out_dtype=acc.dtype, out=o)
                ok = bool((o == 4).all())
            except (RuntimeError, TypeError):
                ok = False
        ADDMM_OUT_DTYPE[kind] = ok
    if ADDMM_OUT_DTYPE[kind]:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def chunks(n_rows, idx, chunk_size):
    """Row selectors of each chunk: slices when every row counts, index tensors otherwise."""
    if idx is None:
        return [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]
    return [rows for rows in idx.split(chunk_size) if len(rows)]


def n_rows(rows):
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def row_scale_of(row_scale, level, rows, like):
    """(c, 1) factor dL_total / dL_row of each row in the chunk: row_scale is a list of one
    number per level (every row of the level alike) or an (M, L) tensor (one per row)."""
    if isinstance(row_scale, torch.Tensor):
        return row_scale[:, level][rows].to(like.dtype).reshape(-1, 1).contiguous()
    return torch.full((like.shape[0], 1), row_scale[level], dtype=like.dtype, device=like.device)


def level_scales(reduction, ns):
    """dL_level / dL_row for 'sum' (1) or 'mean' (1 / counted rows) of each level."""
    return [1.0 / max(n, 1) if reduction == "mean" else 1.0 for n in ns]


def reduce(loss_rows, reduction, n_counted, idx, n_all):
    """The loss from the counted rows' losses; 'none' gives (n_all,) with 0 where not counted."""
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.sum() / max(n_counted, 1)
    if idx is None:
        return loss_rows
    full = loss_rows.new_zeros(n_all)
    full[idx] = loss_rows
    return full


def reduce_levels(loss_rows, reduction, ns, idxs, M):
    """(L,) per-level sums / means, or (M, L) per-row losses for 'none'."""
    return torch.stack([reduce(r, reduction, n, i, M) for r, n, i in zip(loss_rows, ns, idxs)], -1)


def grad_output_scales(go, reduction, ns, n_all):
    """Backward's grad_output go: (L,) for 'sum'/'mean', (M, L) for 'none'. Returns one number
    when every row's dL/dloss_row is that number times the forward's row scale (the gradients
    computed in forward only need scaling), else the (M, L) per-row scales to recompute with."""
    if reduction == "none":
        return go
    if go.numel() == 1 or bool((go == go.reshape(-1)[0]).all()):
        return go.reshape(-1)[0]
    return (go.reshape(1, -1) * go.new_tensor(level_scales(reduction, ns))).expand(n_all, -1)


def rowdot(a, b):
    """(c, K), (c, K) -> (c, 1) row-wise dot products sum_k a_k b_k: (a * b).sum(1) a block of
    rows at a time, each block's products within ROWDOT_BYTES, so no (c, K) temporary joins the
    chunk's two buffers. A few batched ops per chunk, not one BLAS dot per row: each call hands
    work to the thread pool and waits for it, which stalls when other processes keep the cores
    busy."""
    r = max(1, ROWDOT_BYTES // (a.shape[1] * a.element_size()))
    return torch.cat([(x * y).sum(1, keepdim=True) for x, y in zip(a.split(r), b.split(r))])


# -----------------------------------------------------------------------------
# the compiled chunk kernel: snce.snce_chunk for soft targets in two compiled passes
#
# Eager PyTorch makes about eight passes over each (c, K) block on the soft targets (max,
# shift, threshold, exp, sum, the q.s dot, p - q). torch.compile (inductor: C++/OpenMP on the
# CPU, Triton on a GPU) fuses them into two kernels: soft_stats (row maxima, then the three row
# sums, leaving exp(s - m) and the unnormalised q in the buffers) and soft_grad (one pointwise
# pass writing dL/ds over s, with no exp). The teacher logits t come from one (c, D') @ (D', K)
# matmul into a scratch buffer beforehand: computing them inside the fused pass instead re-reads
# the whole (D', K) teacher for every row (inductor does not tile rows), which measured slower
# on the CPU. The row count is marked dynamic, so each kernel compiles once per
# (K, dtype, device) family whatever the chunk lengths (the last chunk, masked rows); inductor
# caches the result on disk for later processes. Any compile failure falls back to the eager
# path with a warning.


def soft_stats(s, t):
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


def soft_grad(s, t, ssum, tsum, scale):
    """s <- (p - q) * scale (Eq. 11), in place: (c, K), from soft_stats' exp(s - m) and q~."""
    s.copy_(s * (scale / ssum) - t * (scale / tsum))


COMPILED = {}          # plain function -> its torch.compile'd form, or None after a failure


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


def run_compiled(fn, *args):
    """fn(*args) through its compiled form, or False when compilation failed (then eager)."""
    if fn not in COMPILED:
        COMPILED[fn] = torch.compile(fn, dynamic=False)
    if COMPILED[fn] is None:
        return False
    for a in args:      # rows dynamic: one kernel for every chunk length, the tail included
        torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return COMPILED[fn](*args)
    except Exception as e:   # noqa: BLE001  an inductor bug or a missing toolchain: eager works
        warnings.warn(f"snce: torch.compile of {fn.__name__} failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the eager path")
        COMPILED[fn] = None
        return False


def compiled_soft_chunk(s, t, scale=None):
    """snce.snce_chunk(s, scale, t=t) through the compiled kernel: loss rows (c,), and
    s <- (p - q) * scale when scale is given. None when compilation failed (s, t untouched)."""
    stats = run_compiled(soft_stats, s, t)
    if stats is False:
        return None
    if scale is not None and run_compiled(soft_grad, s, t, *stats[:2], scale) is False:
        raise RuntimeError("snce: the compiled gradient pass failed after the compiled "
                           "loss pass worked; rerun with SNCE_COMPILE=0")
    return stats[2].view(-1)


def use_compile(compile, device):
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
