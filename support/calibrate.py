"""
How soft is the SNCE target, and which tau gives a chosen softness? The one place for the
entropy / perplexity / top-1 mass of a distribution and for the perplexity bisection.

tau is in the tokenizer's distance units, so one value means different targets on different
tokenizers. The perplexity exp(H(q)) of the target q(k | z) = softmax_k(-d(z, c_k) / tau)
(paper Eq. 5) does not: it is the number of codes a latent spreads its target over (1 = CE's
one-hot, K = uniform). t-SNE (van der Maaten & Hinton, "Visualizing Data using t-SNE", 2008)
sets one tau per point to a target perplexity; here one global tau is calibrated once on a
sample of training latents, by bisection on log tau, so that the MEAN perplexity over the
sample equals the target (the mean perplexity grows monotonically with tau: the entropy of a
Gibbs distribution grows with its temperature).

    from support.calibrate import q_stats, calibrate_tau, entropy, perplexity
    q_stats(latents, codebook, tau=0.01, metric="l2")
        # {"perplexity_mean": .., "perplexity_median": .., "top1_mass_mean": ..}
    tau, stats = calibrate_tau(latents, codebook, perplexity=16.0, metric="l2")
    entropy(p), perplexity(p)      # of any distribution p (..., K) over its last dim

latents (N, D), codebook (K, D). q is computed by snce.neighbor_probs (the loss's own target)
a chunk of rows at a time; calibrate_tau makes ~10-20 passes over the latents.

    python -m pytest -q tests/test_calibrate.py
"""

import math

import torch

from snce import neighbor_probs

CHUNK_ELEMENTS = 2**24  # rows x K per chunk: a few (rows, K) fp32 buffers of 64 MB each


def _check(latents, codebook):
    if not (torch.is_tensor(latents) and torch.is_tensor(codebook)) or latents.dim() != 2 \
            or codebook.dim() != 2 or latents.shape[1] != codebook.shape[1] or not len(latents):
        raise ValueError(f"expected latents (N, D) with N >= 1 and a codebook (K, D), got "
                         f"{getattr(latents, 'shape', type(latents))} and {getattr(codebook, 'shape', type(codebook))}")


def entropy(q):
    """H(q) = -sum_k q_k log q_k over the last dim, with 0 log 0 = 0: (..., K) -> (...)."""
    return -(q * q.clamp_min(1e-30).log()).sum(-1)


def perplexity(q):
    """exp(H(q)), the number of outcomes q spreads over (1 = one-hot, K = uniform): (..., K) ->
    (...)."""
    return entropy(q).exp()


def _q_chunks(latents, codebook, tau, metric, chunk_rows):
    """q of Eq. 5 for a chunk of rows at a time: (n, K) each."""
    _check(latents, codebook)
    n = chunk_rows or max(1, CHUNK_ELEMENTS // codebook.shape[0])
    for i in range(0, len(latents), n):
        yield neighbor_probs(latents[i:i + n], codebook, tau, metric)


def row_entropy(latents, codebook, tau, metric="l2", chunk_rows=None):
    """Per latent: the entropy H(q) of its target, (N,)."""
    return torch.cat([entropy(q) for q in _q_chunks(latents, codebook, tau, metric, chunk_rows)])


def row_stats(latents, codebook, tau, metric="l2", chunk_rows=None):
    """Per latent: perplexity exp(H(q)) and top-1 mass max_k q (the nearest code's share), both (N,).
    tau == 0 (the zero-temperature limit) is CE's one-hot target (perplexity 1, mass 1)."""
    ppl, top1 = [], []
    for q in _q_chunks(latents, codebook, tau, metric, chunk_rows):   # (n, K)
        ppl.append(perplexity(q))
        top1.append(q.max(-1).values)
    return torch.cat(ppl), torch.cat(top1)


def q_stats(latents, codebook, tau, metric="l2", chunk_rows=None):
    """Mean and median perplexity and mean top-1 mass of q over the latents, as floats."""
    ppl, top1 = row_stats(latents, codebook, tau, metric, chunk_rows)
    return {"perplexity_mean": ppl.double().mean().item(),
            "perplexity_median": ppl.double().median().item(),
            "top1_mass_mean": top1.double().mean().item()}


def calibrate_tau(latents, codebook, perplexity, metric="l2", rtol=1e-3, chunk_rows=None, tau0=1.0):
    """The tau whose mean perplexity over `latents` is `perplexity` (relative tolerance rtol).
    Brackets by factors of 10 from tau0, then bisects log tau. -> (tau, q_stats at tau)."""
    _check(latents, codebook)
    K = codebook.shape[0]
    if not 1.0 < perplexity < K:
        raise ValueError(f"perplexity: expected a target in (1, K={K}) (1 = CE's one-hot, K = "
                         f"uniform), got {perplexity}")
    if not (rtol > 0 and tau0 > 0):
        raise ValueError(f"expected rtol > 0 and tau0 > 0, got {rtol} and {tau0}")

    def mean_ppl(tau):
        f = row_stats(latents, codebook, tau, metric, chunk_rows)[0].double().mean().item()
        if not math.isfinite(f):  # fp32 target logits -d / tau overflow for a tiny tau
            raise ValueError(f"perplexity {perplexity}: q is not finite at tau={tau:g} ({latents.dtype} "
                             "latents); the target is not reached before the logits overflow")
        return f

    def close(f):
        return abs(f / perplexity - 1) <= rtol

    def done(tau):
        return tau, q_stats(latents, codebook, tau, metric, chunk_rows)

    f = mean_ppl(tau0)
    if close(f):
        return done(tau0)
    up = f < perplexity  # too sharp: raise tau by decades until the target is passed (or lower it)
    lo = hi = tau0
    for _ in range(40):  # 40 decades: beyond that fp32 logits overflow or q is uniform anyway
        t = hi * 10 if up else lo / 10
        f = mean_ppl(t)
        if close(f):
            return done(t)
        lo, hi = (hi, t) if up else (t, lo)
        if (f > perplexity) == up:
            break
    else:
        raise ValueError(f"perplexity {perplexity}: not reached for tau within 40 decades of "
                         f"tau0={tau0:g} (mean perplexity at tau={t:g}: {f:.4g})")
    while hi / lo > 1 + 1e-12:  # f(lo) < target < f(hi)
        mid = math.sqrt(lo * hi)
        f = mean_ppl(mid)
        if close(f):
            break
        lo, hi = (mid, hi) if f < perplexity else (lo, mid)
    return done(mid)
