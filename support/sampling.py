"""
Token-sampling utilities for the generator's samplers (model.GPT.generate): top-k / top-p
filtering, one draw per row of logits, classifier-free guidance, Gumbel noise. Each is checked
against a naive reference in tests/test_model.py.

    from support.sampling import sample_logits
    tokens = sample_logits(logits, temperature=1.0, top_k=50, generator=g)   # (B, K) -> (B,)
"""

import torch


def top_k_top_p_filter(logits, top_k=None, top_p=None):
    """Set logits outside the top-k and outside the top-p nucleus to -inf. (..., K) -> (..., K).

    top_k: keep the k largest (ties with the k-th value are kept too).
    top_p: keep the smallest set of largest-probability tokens whose total mass reaches top_p
    (the most likely token is always kept). Both may be given: top-k applies first.
    """
    if top_k is not None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected a positive int or None, got {top_k!r}")
        if top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass strictly before it already reaches top_p
            drop_sorted = (probs.cumsum(-1) - probs) >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Draw one token per row of (..., K) logits; temperature 0 means argmax. -> (...) long."""
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    K = logits.size(-1)
    if top_k is not None and top_p is None and isinstance(top_k, int) and 1 <= top_k < K:
        # the same distribution drawn from the k survivors only: softmax and multinomial over
        # (..., k) instead of (..., K), much less work when k << K. Only when nothing ties with
        # the k-th value (the filter would keep such ties).
        vals, idx = torch.topk(logits, top_k, dim=-1)                       # (..., k)
        if bool(((logits >= vals[..., -1:]).sum(-1) == top_k).all()):
            pick = torch.multinomial(vals.softmax(-1).reshape(-1, top_k), 1, generator=generator)
            return idx.reshape(-1, top_k).gather(1, pick).view(logits.shape[:-1])
    logits = top_k_top_p_filter(logits, top_k, top_p)
    probs = logits.softmax(-1).reshape(-1, K)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def cfg_combine(logits, cfg_scale):
    """(2B, ..., K) logits, cond rows first then uncond -> (B, ..., K) = u + s * (c - u). Also
    for the head's (2B, ..., C) inputs: the head is linear, so guiding them guides the logits."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def gumbel_noise(shape, generator=None, device=None):
    """Standard Gumbel(0, 1) samples, -log(-log U); drawn on the generator's device."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gdev).to(device)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
