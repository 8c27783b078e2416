"""
The geometry control for SNCE: a soft target exactly as soft as SNCE's, with the code geometry
taken out. If SNCE helps only because a soft target regularises an overfitting CE, this control
helps as much; if the neighbors in code space matter (the paper's claim), SNCE beats it.

Per row i with SNCE target q_i (K,) (Eq. 5, from the latent's residual and the level's codebook)
and VQ code t_i, the control target is q_i with its values permuted among the codes,

    q~_i[k] = q_i[sigma_i(k)],   sigma_i a random permutation of the K codes with sigma_i(t_i) = t_i

so q~_i keeps q_i's whole sorted mass profile (the same entropy, i.e. the same perplexity, and
the same mass q_i[t_i] on the VQ code), but the mass SNCE puts on t_i's neighbors lands on codes
drawn without regard to the latent. The permutation is drawn fresh for every step from a seeded
generator, so a resume replays the same targets. To stay cheap at K = 65,536 (a sort per row
costs seconds per step on a CPU, an (N, K) index as much memory as the logits) it is one random
permutation P of the step, shared by the rows, corrected per row by one swap that fixes t_i:

    sigma_i(k) = P[k], except sigma_i(t_i) = t_i and sigma_i(v_i) = P[t_i], v_i = P^{-1}(t_i)

so q~_i = q_i[:, P] (one column gather) with two entries per row put right. P is independent
of the codebook's geometry and changes every step, so no fixed wrong geometry can be learned.

The loss runs on materialised logits (rows x K, per level): the study's sizes (2,048 rows per
micro-step, K <= 65,536: 0.5 GB of fp32 logits) fit in memory, and the control is a measuring
instrument, not an objective to scale; the fused path stays SNCE's and CE's.

    python -m pytest -q tests/test_geometry_control.py
"""

import torch

from snce import dense_snce, neighbor_probs


def control_generator(seed):
    """The control's own CPU generator, so its draws move no other random stream."""
    return torch.Generator().manual_seed(int(seed))


def control_permutation(codes, K, generator):
    """-> sigma (N, K) int64, row i's permutation (module docstring), sigma[i, codes[i]] =
    codes[i]. The definition written out; control_targets applies it without the (N, K) index."""
    n, t = codes.shape[0], codes.long()
    P = torch.randperm(K, generator=generator).to(codes.device)          # (K,)
    sigma = P.repeat(n, 1)                                                # (N, K)
    rows = torch.arange(n, device=codes.device)
    sigma[rows, torch.argsort(P)[t]] = P[t]    # v_i = P^-1(t_i) takes t_i's old source ...
    sigma[rows, t] = t                         # ... and t_i keeps its own mass
    return sigma


def control_targets(q, codes, generator):
    """q~ (N, K): q (N, K) permuted by control_permutation, q~[i, k] = q[i, sigma_i(k)]: the same
    values per row, moved. codes (N,) int64."""
    K, t = q.shape[1], codes.long()
    P = torch.randperm(K, generator=generator).to(q.device)              # (K,)
    rows = torch.arange(q.shape[0], device=q.device)
    own, moved = q[rows, t], q[rows, P[t]]     # (N,): t_i's mass, and what lands on v_i
    qt = q.index_select(1, P)                  # q~[i, k] = q[i, P[k]]
    qt[rows, torch.argsort(P)[t]] = moved
    qt[rows, t] = own
    return qt


def control_level_losses(hidden, weight, bias, latents, codebooks, taus, codes, metric, mask, generator):
    """The control's loss sums per level (L,), like snce.fused_linear_snce_levels(...,
    reduction="sum"). hidden (..., L, H), weight (K, H), latents (..., L, D) residuals r_l,
    codebooks (L, K, D), codes (..., L), mask (..., L) bool or None (True = counts)."""
    L, H = hidden.shape[-2], hidden.shape[-1]
    hid, lat, cod = hidden.reshape(-1, L, H), latents.reshape(-1, L, latents.shape[-1]), codes.reshape(-1, L)
    msk = None if mask is None else mask.reshape(-1, L)
    sums = []
    for l in range(L):
        rows = slice(None) if msk is None else msk[:, l]
        h, z, t = hid[rows, l], lat[rows, l], cod[rows, l]
        acc = torch.promote_types(h.dtype, torch.float32)    # fp32 softmaxes, fp64 when given
        with torch.no_grad():   # the target is a constant, as SNCE's: no gradient to z or C
            q = neighbor_probs(z.to(acc), codebooks[l].to(acc), float(taus[l]), metric)  # (n, K)
            qt = control_targets(q, t, generator)
        logits = (h @ weight.t() + (0 if bias is None else bias)).to(acc)    # (n, K)
        sums.append(dense_snce(logits, qt).sum())
    return torch.stack(sums)
