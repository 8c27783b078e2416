"""
The geometry control for SNCE: a soft target exactly as soft as SNCE's, with the code geometry
taken out. If SNCE helps only because a soft target regularises an overfitting CE, this control
helps as much; if the neighbors in code space matter (the paper's claim), SNCE beats it.

Per row i with SNCE target q_i (K,) (Eq. 5, from the latent's residual and the level's codebook)
and VQ code t_i, the control target is q_i with its values permuted among the codes,

    q~_i[k] = q_i[sigma_i(k)],   sigma_i a random permutation of the K codes with sigma_i(t_i) = t_i

so q~_i keeps q_i's whole sorted mass profile (the same entropy, i.e. the same perplexity, and
the same mass q_i[t_i] on the VQ code), but the mass SNCE puts on t_i's neighbors lands on codes
drawn without regard to the latent. sigma_i is drawn fresh for every row and step from a seeded
generator, so a resume replays the same targets. To stay cheap at K = 65,536 (a sort per row
costs seconds per step on a CPU) sigma_i is one random permutation P of the step, shifted per
row by a random offset r_i, then corrected by one swap to fix t_i:

    sigma_i(k) = P[(k + r_i) mod K], except sigma_i(t_i) = t_i and sigma_i(v_i) = P[(t_i + r_i) mod K]

where v_i = sigma_i^{-1}(t_i) before the swap. For each row the codes that receive the
neighbors' mass are a uniformly random ordered set; rows differ by their offset.

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
    """-> sigma (N, K) int64 with sigma[i, codes[i]] = codes[i]: row i's permutation of the codes
    (module docstring). codes (N,) int64."""
    n = codes.shape[0]
    P = torch.randperm(K, generator=generator)                             # (K,)
    r = torch.randint(K, (n,), generator=generator)                        # (N,)
    P, r, t = P.to(codes.device), r.to(codes.device), codes.long()
    sigma = P[(torch.arange(K, device=codes.device) + r[:, None]) % K]   # (N, K)
    rows = torch.arange(n, device=codes.device)
    v = (torch.argsort(P)[t] - r) % K          # sigma_i(v_i) = t_i before the swap
    u = sigma[rows, t]                         # where t_i's own mass would come from
    sigma[rows, v] = u                         # the swap: v_i takes t_i's old source ...
    sigma[rows, t] = t                         # ... and t_i keeps its own mass
    return sigma


def control_targets(q, codes, generator):
    """q~ (N, K) = q gathered by control_permutation: the same values per row, moved."""
    return q.gather(1, control_permutation(codes, q.shape[1], generator))


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
