"""
SNCE for implicit (product) codebooks: LFQ (lookup-free quantisation; Open-MAGVIT2's tokenizer has
K = 2^18 codes, each a vector of 18 signs) and FSQ (finite scalar quantisation: each dimension
rounded to one of a few levels). Such a codebook is never stored: code c is one level per
dimension, c = (v_1[j_1], .., v_D[j_D]), and there are K = prod_d L_d of them.

The math (metric l2, the quantizers' own: LFQ takes the sign, FSQ rounds, both the nearest
code). ||z - c||^2 = sum_d (z_d - c_d)^2, so the neighbor distribution of Eq. 5 factorises:

    q(c | z)   = prod_d q_d(c_d | z_d),   q_d(v | z_d) = softmax_v(-(z_d - v)^2 / tau)   over v_d
    LFQ (v = -1, +1): q_d(+1 | z_d) = sigmoid(((z_d + 1)^2 - (z_d - 1)^2) / tau)
                                    = sigmoid(4 z_d / tau)

The marginal of q over a group g of dimensions (a factorised head's sub-token c_g) is the product
over that group, exactly, since the other dimensions' factors each sum to 1:

    q_g(c_g | z) = prod_{d in g} q_d(c_d | z_d)            (K_g = prod_{d in g} L_d entries)

and q_g is the Eq. 5 distribution of z_g against the group's own enumerated codebook, so the
repo's snce_loss computes it (metric l2). A factorised model p(c) = prod_g p_g(c_g) has, against
q, the cross entropy (Eq. 8)

    -sum_c q(c) log p(c) = -sum_g sum_c q(c) log p_g(c_g) = -sum_g sum_{c_g} q_g(c_g) log p_g(c_g)

the sum over groups of each head's SNCE against its marginal (this holds for any q). Open-MAGVIT2's
generator predicts the second sub-token given the first (p(c) = p_1(c_1) p_2(c_2 | c_1, ctx)); as
q is a product, q(c_2 | c_1) = q_2(c_2), so each head's target is still its marginal q_g and the
teacher-forced loss is again the sum of the groups' SNCE. Nothing of size N x 2^18 is built: a
6 + 12 bit split needs (N, 64) and (N, 4096) targets.

Index convention (Open-MAGVIT2's LFQ and the FSQ reference code): a code's index is mixed radix
with dimension 0 the least significant digit, k = sum_d j_d prod_{e<d} L_e, j_d the level's
position in ascending order; for LFQ bit d of the index is (z_d > 0). A group's sub-token uses the
same rule over its own dimensions, so with consecutive groups (6, 12) the sub-tokens are k & 63 and
k >> 6, Open-MAGVIT2's "pre" and "post" indices. Level values: LFQ -1, +1; FSQ with L levels
(j - L // 2) / (L // 2), j = 0 .. L - 1, i.e. the integers around 0 scaled by L // 2 (an even L has
one more level below 0), applied to fsq_bound(z), the tanh-bounded encoder output, which is what
FSQ rounds and so the latent SNCE compares with the levels.

    from support.implicit import lfq_levels, factorized_snce
    loss = factorized_snce([logits_pre, logits_post], z, lfq_levels(18), (6, 12), tau=0.5)
    # a generator's heads, without materialising the logits (snce.fused_linear_snce per group)
    loss = fused_factorized_snce([h_pre, h_post], [W_pre, W_post], z, lfq_levels(18), (6, 12), 0.5)

Tests: python -m pytest -q tests/test_implicit.py
"""

import torch

from snce import fused_linear_snce, snce_loss
from support.snce_kernels import as_tau

# -----------------------------------------------------------------------------
# level sets: per dimension, the values a code's coordinate can take (ascending)


def lfq_levels(bits):
    """LFQ with `bits` dimensions: every coordinate is -1 or +1 (K = 2^bits)."""
    if not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be a positive int, got {bits!r}")
    return ((-1.0, 1.0),) * bits


def fsq_levels(levels):
    """FSQ with L_d levels in dimension d, e.g. (8, 8, 8, 5, 5, 5): values (j - L // 2) / (L // 2)
    for j = 0 .. L - 1 (the FSQ paper's reference code; K = prod L_d)."""
    levels = tuple(levels)
    if not levels or any(not isinstance(L, int) or L < 2 for L in levels):
        raise ValueError(f"FSQ levels must be ints >= 2, one per dimension, got {levels!r}")
    return tuple(tuple((j - L // 2) / (L // 2) for j in range(L)) for L in levels)


def fsq_bound(z, levels, eps=1e-3):
    """FSQ's bound, in the code's units: (..., D) encoder output -> (..., D), tanh(z + shift) *
    half_l - offset with half_l = (L - 1)(1 + eps) / 2, offset = 1/2 for even L, shift =
    atanh(offset / half_l) (z = 0 maps to 0), divided by L // 2: FSQ.bound of NVIDIA's
    Cosmos-Tokenizer and of vector-quantize-pytorch (the paper's listing has (1 - eps) and tan).
    Rounding it (times L // 2) gives the code, so it is the latent whose nearest code (l2) is the
    token."""
    L = torch.tensor(levels, dtype=z.dtype, device=z.device)
    half_l = (L - 1) * (1 + eps) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).to(z.dtype)
    shift = torch.atanh(offset / half_l)
    return (torch.tanh(z + shift) * half_l - offset) / torch.div(L, 2, rounding_mode="floor")


def as_levels(levels):
    """-> the level sets as tuples of floats; each dimension's values strictly ascending."""
    try:
        out = tuple(tuple(float(v) for v in vs) for vs in levels)
    except TypeError:
        raise ValueError("levels must be one sequence of values per dimension (lfq_levels(bits) "
                         f"or fsq_levels(levels)), got {levels!r}") from None
    if not out or any(len(vs) < 2 or any(b <= a for a, b in zip(vs, vs[1:])) for vs in out):
        raise ValueError(f"each dimension needs >= 2 strictly ascending level values, got "
                         f"{levels!r}")
    return out


def group_dims(groups, D):
    """groups -> a tuple of dimension-index tuples partitioning range(D). An int list gives sizes
    of consecutive groups ((6, 12): dims 0-5 and 6-17); a list of index lists is taken as is."""
    groups = tuple(groups)
    if all(isinstance(g, int) for g in groups):
        starts = [sum(groups[:i]) for i in range(len(groups))]
        dims = tuple(tuple(range(s, s + g)) for s, g in zip(starts, groups) if g > 0)
        if len(dims) != len(groups):
            raise ValueError(f"group sizes must be positive, got {groups!r}")
    else:
        dims = tuple(tuple(int(d) for d in g) for g in groups)
    flat = sorted(d for g in dims for d in g)
    if flat != list(range(D)) or any(len(g) == 0 for g in dims):
        raise ValueError(f"groups must partition the {D} dimensions (sizes summing to {D}, or "
                         f"index lists using each dimension once), got {groups!r}")
    return dims


def _values(vs, like):
    return torch.tensor(vs, dtype=like.dtype, device=like.device)


def _check_latents(z, levels):
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.dim() < 1:
        raise ValueError(f"latents must be a float tensor (..., D), got {type(z).__name__}")
    if z.shape[-1] != len(levels):
        raise ValueError(f"latents have {z.shape[-1]} dimensions, the levels describe "
                         f"{len(levels)}")


# -----------------------------------------------------------------------------
# the codebook, enumerated (small K only) and the codes


def implicit_codebook(levels, dtype=torch.float32, device=None):
    """The enumerated (K, D) codebook: row k = (v_1[j_1], .., v_D[j_D]) with k = sum_d j_d
    prod_{e<d} L_e (dimension 0 least significant; LFQ: bit d of k is c_d > 0). K = prod_d L_d:
    for the flat K-way head and tests, not for 2^18 codes (use the factorised form)."""
    levels = as_levels(levels)
    k = torch.arange(torch.Size(len(v) for v in levels).numel(), device=device)
    cols, base = [], 1
    for vs in levels:
        cols.append(torch.tensor(vs, dtype=dtype, device=device)[(k // base) % len(vs)])
        base *= len(vs)
    return torch.stack(cols, 1)


def level_digits(z, levels):
    """(..., D) -> (..., D) int64: per dimension the nearest level's position j_d (ties to the
    lower level: LFQ's z_d = 0 is -1, as Open-MAGVIT2's (z > 0))."""
    levels = as_levels(levels)
    _check_latents(z, levels)
    return torch.stack([(z[..., d, None] - _values(vs, z)).square().argmin(-1)
                        for d, vs in enumerate(levels)], -1)


def digits_to_code(digits, levels):
    """(..., n) level positions of n dimensions with level sets `levels` -> (...) mixed-radix
    index."""
    code, base = torch.zeros_like(digits[..., 0]), 1
    for d, vs in enumerate(levels):
        code = code + digits[..., d] * base
        base *= len(vs)
    return code


def implicit_quantize(z, levels, groups=None):
    """The tokenizer's codes: (..., D) latents -> (...) int64 index of the nearest code (l2);
    with groups, one (...) sub-token per group instead (Open-MAGVIT2's (pre, post) for (6, 12))."""
    levels = as_levels(levels)
    j = level_digits(z, levels)
    if groups is None:
        return digits_to_code(j, levels)
    return tuple(digits_to_code(j[..., list(g)], [levels[d] for d in g])
                 for g in group_dims(groups, len(levels)))


def split_codes(codes, levels, groups):
    """Full indices (...) -> one sub-token (...) per group (implicit_quantize's convention)."""
    levels = as_levels(levels)
    digits, base = [], 1
    for vs in levels:
        digits.append((codes // base) % len(vs))
        base *= len(vs)
    j = torch.stack(digits, -1)
    return tuple(digits_to_code(j[..., list(g)], [levels[d] for d in g])
                 for g in group_dims(groups, len(levels)))


class ImplicitCodes:
    """For a tokenizer whose codebook is implicit (its `level_values`, the codes on
    `code_device`): the nearest-code `quantize` and the (1, K, D) `codebooks`, enumerated only
    when asked for (a flat K-way head's SNCE; factorised heads never need it) and once per
    device; not weights, so outside the state dict."""

    enumerated = None

    @property
    def codebooks(self):
        device = self.code_device
        if self.enumerated is None or self.enumerated.device != device:
            self.enumerated = implicit_codebook(self.level_values, device=device)[None]
        return self.enumerated

    @torch.no_grad()
    def quantize(self, latents):
        """(..., D) latents -> codes (..., 1) int64: the nearest code's index (l2)."""
        if latents.dtype in (torch.float16, torch.bfloat16):   # stored / autocast latents
            latents = latents.float()
        return implicit_quantize(latents, self.level_values).unsqueeze(-1)


# -----------------------------------------------------------------------------
# the factorised neighbor distribution (Eq. 5) and its group marginals


def dim_probs(z, levels, tau):
    """Per dimension q_d(. | z_d) = softmax over its levels of -(z_d - v)^2 / tau: a list of D
    tensors (..., L_d), fp32 (fp64 for fp64 latents). tau: a number or 0-d tensor (as snce_loss);
    tau == 0: one-hot on the nearest level."""
    levels = as_levels(levels)
    _check_latents(z, levels)
    zz = z.detach().to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    tau = as_tau(tau)
    if tau == 0:
        j = level_digits(zz, levels)
        return [torch.nn.functional.one_hot(j[..., d], len(vs)).to(zz.dtype)
                for d, vs in enumerate(levels)]
    return [(-(zz[..., d, None] - _values(vs, zz)).square() / tau).softmax(-1)
            for d, vs in enumerate(levels)]


def factorized_targets(z, levels, groups, tau):
    """Per group g the exact marginal q_g(c_g | z) = prod_{d in g} q_d(c_d | z_d), (..., K_g),
    indexed as implicit_quantize's sub-tokens (the group's first dimension least significant).
    Enumerated within the group only: (N, 64) and (N, 4096) for LFQ 6 + 12 bits."""
    levels = as_levels(levels)
    qd = dim_probs(z, levels, tau)
    out = []
    for g in group_dims(groups, len(levels)):
        q = qd[g[0]]                                             # (..., L_first)
        for d in g[1:]:  # new digit is the more significant one: index j * K_so_far + k
            q = (qd[d][..., :, None] * q[..., None, :]).flatten(-2)
        out.append(q)
    return out


# -----------------------------------------------------------------------------
# the loss of a factorised head: sum over groups of each head's SNCE against its marginal


def factorized_snce(logits_per_group, z, levels, groups, tau, mask=None, reduction="mean",
                    chunk_size=None, compile=None):
    """SNCE (Eq. 8) of a factorised model p(c) = prod_g p_g(c_g) against the product-codebook q
    of Eq. 5: sum_g snce_loss(logits_g, z_g, the group's enumerated codebook, tau, "l2"), whose
    q is exactly the marginal q_g (module docstring). logits_per_group: one (..., K_g) tensor per
    group; z (..., D); mask (...) bool (the rows that count); tau == 0: CE on each group's
    sub-token of the nearest code. reduction 'mean' (per group the mean over counted rows, then
    summed: the mean of the per-row sums), 'sum' or 'none' ((...) per-row sums)."""
    levels = as_levels(levels)
    _check_latents(z, levels)
    dims = group_dims(groups, len(levels))
    logits_per_group = list(logits_per_group)
    if len(logits_per_group) != len(dims):
        raise ValueError(f"expected one logits tensor per group ({len(dims)}), got "
                         f"{len(logits_per_group)}")
    for logits, g in zip(logits_per_group, dims):      # every shape checked before any work
        K_g = torch.Size(len(levels[d]) for d in g).numel()
        if logits.shape[-1] != K_g or logits.shape[:-1] != z.shape[:-1]:
            raise ValueError(f"group {g}: expected logits {(*z.shape[:-1], K_g)}, got "
                             f"{tuple(logits.shape)}")
    total = 0
    for logits, g in zip(logits_per_group, dims):
        book = implicit_codebook([levels[d] for d in g], z.dtype, z.device)    # (K_g, |g|)
        total = total + snce_loss(logits, z[..., list(g)], book, tau, "l2", mask, chunk_size,
                                  reduction, compile=compile)
    return total


def fused_factorized_snce(hidden_per_group, weights, z, levels, groups, tau, biases=None,
                          mask=None, reduction="mean", chunk_size=None, compile=None):
    """factorized_snce of the heads' logits hidden_g (..., H) @ weights[g] (K_g, H)^T + biases[g],
    each through snce.fused_linear_snce (never the (N, K_g) logits; the hidden states may differ
    per group, as with Open-MAGVIT2's intra-token layers, or be one tensor repeated)."""
    levels = as_levels(levels)
    _check_latents(z, levels)
    dims = group_dims(groups, len(levels))
    hidden_per_group, weights = list(hidden_per_group), list(weights)
    biases = [None] * len(dims) if biases is None else list(biases)
    if not len(hidden_per_group) == len(weights) == len(biases) == len(dims):
        raise ValueError(f"expected one hidden, weight (and bias) per group ({len(dims)}), got "
                         f"{len(hidden_per_group)}, {len(weights)}, {len(biases)}")
    for h, w, g in zip(hidden_per_group, weights, dims):
        K_g = torch.Size(len(levels[d]) for d in g).numel()
        if (w.dim() != 2 or w.shape[0] != K_g or h.shape[:-1] != z.shape[:-1]
                or h.shape[-1] != w.shape[1]):
            raise ValueError(f"group {g}: expected hidden {(*z.shape[:-1], 'H')} and weight "
                             f"({K_g}, H), got {tuple(h.shape)} and {tuple(w.shape)}")
    total = 0
    for h, w, b, g in zip(hidden_per_group, weights, biases, dims):
        book = implicit_codebook([levels[d] for d in g], z.dtype, z.device)     # (K_g, |g|)
        total = total + fused_linear_snce(h, w, z[..., list(g)], book, tau, "l2", b,
                                          mask, chunk_size, reduction, compile=compile)
    return total
