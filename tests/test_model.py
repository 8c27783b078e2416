"""Tests for model.py (and its support/sampling.py): causality, the KV cache (one slot and blocks
of slots), MaskGIT masking/sampling, CFG, filtering, errors, FLOPs against an independent count.

    .venv/bin/python -m pytest -q tests/test_model.py
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import model as model_module  # noqa: E402
from model import GPT, GPTConfig, KVCache, MODELS, mask_fraction  # noqa: E402
from support.sampling import cfg_combine, gumbel_noise, sample_logits, top_k_top_p_filter  # noqa: E402

K, L, H, W, NC = 37, 2, 3, 2, 5
T = H * W * L


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: threads only add overhead (and the CI box is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(mode="ar", dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(mode=mode, vocab_size=K, levels=L, grid_h=H, grid_w=W, num_classes=NC, bias=True)
    args.update(MODELS["tiny"])
    args.update(kw)
    model = GPT(GPTConfig(**args)).to(dtype)
    return model.eval()


def rand_codes(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (B, T), generator=g)


# ---- AR ---------------------------------------------------------------------


def test_ar_causality():
    model = make("ar")
    codes, labels = rand_codes(3), torch.tensor([0, 1, 4])
    ref = model(codes, labels)
    assert ref.shape == (3, T, K)
    for t0 in range(T):
        changed = codes.clone()
        changed[:, t0:] = (changed[:, t0:] + 1 + torch.arange(T - t0)) % K
        out = model(changed, labels)
        # output at slot t predicts token t from codes[:t]: slots <= t0 must not move
        torch.testing.assert_close(out[:, : t0 + 1], ref[:, : t0 + 1], rtol=0, atol=1e-12)
        if t0 + 1 < T:
            assert (out[:, t0 + 1] - ref[:, t0 + 1]).abs().max() > 1e-6
    # the class is the first input: it changes every slot
    other = model(codes, torch.tensor([1, 2, 0]))
    assert ((other - ref).abs().amax(-1) > 1e-6).all()


def test_ar_accepts_grid_shaped_codes():
    model = make("ar")
    codes, labels = rand_codes(2), torch.tensor([0, 1])
    torch.testing.assert_close(model(codes.view(2, H, W, L), labels), model(codes, labels))


def test_kv_cache_logits_match_full_forward():
    model = make("ar")
    labels = torch.tensor([0, 3, 4])
    codes = rand_codes(3, seed=5)
    full = model(codes, labels)
    cache, prev = KVCache(model.config.n_layer, T), None
    for t in range(T):
        step = model.head(model._ar_step(labels, prev, cache))
        assert step.shape == (3, 1, K)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-10)
        prev = codes[:, t : t + 1]


@pytest.mark.parametrize("chunks", [[T], [1, 3, 2, 1, 5], [4, 4, 4], [2, 1, 9]])
def test_kv_cache_blocks_of_slots_match_full_causal_forward(chunks):
    """Slots fed to the cache a block at a time (a prefix, then several at once) attend causally
    within the block, so every slot's hidden state equals the full causal forward's (float64)."""
    model = make("ar")
    labels, codes = torch.tensor([1, 0, 4]), rand_codes(3, seed=6)
    full = model._hidden(codes, labels)                                  # (B, T, C)
    seen = []  # the blocks' input (B, T, C): class slot, then tokens, plus slot embeddings
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model._hidden(codes, labels)
    hook.remove()
    # the blocks alone, fed their full-forward input a block of slots at a time
    cache, a, out = KVCache(model.config.n_layer, T), 0, []
    for n in chunks:
        x = seen[0][:, a : a + n]
        for block in model.blocks:
            x = block(x, cache)
        cache.pos += n
        out.append(model.ln_f(x))
        a += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-12)
    # the same through the sampler's entry point: slot 0 holds the class, slot t token t - 1
    cache, a, out = KVCache(model.config.n_layer, T), 0, []
    for n in chunks:
        out.append(model._ar_step(labels, codes[:, max(a - 1, 0) : a + n - 1] if a + n > 1 else None, cache))
        a += n
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=0, atol=1e-12)


def naive_ar_generate(model, labels, cfg_scale, temperature, top_k, top_p, generator):
    """Reference sampler: full recomputation every step, cond/uncond run separately."""
    B = labels.size(0)
    codes = torch.zeros(B, T, dtype=torch.long)
    null = torch.full_like(labels, model.null_class)
    for t in range(T):
        cond = model._hidden(codes, labels)[:, t]
        logits = model.head(cond)
        if cfg_scale != 1.0:
            unc = model.head(model._hidden(codes, null)[:, t])
            logits = unc + cfg_scale * (logits - unc)
        codes[:, t] = sample_logits(logits, temperature, top_k, top_p, generator)
    return codes.view(B, H, W, L)


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p",
                         [(1.0, 0.0, None, None), (3.0, 0.0, None, None),
                          (1.0, 1.0, None, None), (2.5, 0.8, 10, 0.9)])
def test_kv_cache_generation_equals_recomputation(cfg_scale, temperature, top_k, top_p):
    model = make("ar")
    labels = torch.tensor([0, 1, 2, 3])
    got = model.generate(labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                         top_p=top_p, generator=torch.Generator().manual_seed(7))
    ref = naive_ar_generate(model, labels, cfg_scale, temperature, top_k, top_p,
                            torch.Generator().manual_seed(7))
    assert got.shape == (4, H, W, L) and got.dtype == torch.long
    assert torch.equal(got, ref)


def test_generate_restores_train_mode_and_is_reproducible():
    model = make("ar", dropout=0.5).train()
    a = model.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    assert model.training
    b = model.generate(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---- CFG and label dropout ------------------------------------------------------------


def test_cfg_scale_one_equals_conditional_logits():
    for mode in ("ar", "maskgit"):
        model = make(mode)
        codes, labels = rand_codes(3), torch.tensor([0, 2, 4])
        mask = model.sample_mask(3, generator=torch.Generator().manual_seed(0)) if mode == "maskgit" else None
        cond = model(codes, labels, mask)
        both = torch.cat([labels, torch.full_like(labels, model.null_class)])
        m2 = None if mask is None else mask.repeat(2, 1)
        batched = model.head(model._hidden(codes.repeat(2, 1), both, m2))
        torch.testing.assert_close(cfg_combine(batched, 1.0), cond, rtol=0, atol=1e-10)
        uncond = model(codes, None, mask)
        torch.testing.assert_close(cfg_combine(batched, 3.0), uncond + 3.0 * (cond - uncond),
                                   rtol=0, atol=1e-10)


def test_label_dropout_uses_null_class_in_training_only():
    model = make("ar", class_dropout=0.999)
    codes, labels = rand_codes(4), torch.tensor([0, 1, 2, 3])
    uncond = model(codes, None)
    cond = model(codes, labels)
    model.train()
    torch.manual_seed(0)
    dropped = model(codes, labels)
    torch.testing.assert_close(dropped, uncond, rtol=0, atol=1e-12)
    model.eval()
    torch.testing.assert_close(model(codes, labels), cond, rtol=0, atol=0)


def test_unconditional_model():
    model = make("ar", num_classes=0)
    out = model.generate(None, num_samples=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, H, W, L)
    with pytest.raises(ValueError, match="labels"):
        model(rand_codes(2), torch.tensor([0, 0]))


# ---- top-k / top-p ------------------------------------------------------------------


def naive_filter(logits, top_k, top_p):
    out = logits.clone()
    for r in range(logits.size(0)):
        row = logits[r].tolist()
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = set(range(len(row)))
        if top_k is not None:
            keep = set(order[:top_k])
        if top_p is not None:
            kept = [i for i in order if i in keep]
            z = sum(math.exp(row[i]) for i in kept)
            mass, nucleus = 0.0, set()
            for i in kept:
                if mass >= top_p:
                    break
                nucleus.add(i)
                mass += math.exp(row[i]) / z
            keep = nucleus
        for i in range(len(row)):
            if i not in keep:
                out[r, i] = float("-inf")
    return out


@pytest.mark.parametrize("top_k,top_p", [(1, None), (5, None), (K, None), (None, 0.5),
                                         (None, 0.9), (None, 1.0), (8, 0.7), (None, 1e-6)])
def test_top_k_top_p_matches_naive(top_k, top_p):
    logits = torch.randn(6, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    got = top_k_top_p_filter(logits, top_k, top_p)
    ref = naive_filter(logits, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got[~torch.isinf(got)], logits[~torch.isinf(ref)])
    assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_sampling_respects_filter_and_greedy():
    logits = torch.randn(200, K, generator=torch.Generator().manual_seed(2))
    allowed = ~torch.isinf(top_k_top_p_filter(logits, 4, 0.8))
    s = sample_logits(logits, 1.0, 4, 0.8, torch.Generator().manual_seed(0))
    assert allowed.gather(1, s[:, None]).all()
    assert torch.equal(sample_logits(logits, 0.0), logits.argmax(-1))


@pytest.mark.parametrize("tie", [False, True])
def test_top_k_sampling_draws_the_filtered_distribution(tie):
    """sample_logits with top_k alone samples among the k survivors directly (or, when a logit
    ties with the k-th, through the filter): the empirical frequencies over many draws must match
    softmax(top_k_top_p_filter(logits)) computed the slow way."""
    row = torch.randn(K, generator=torch.Generator().manual_seed(3)) * 1.5
    if tie:  # the 4th and 5th largest equal: both survive top_k = 4
        order = row.argsort(descending=True)
        row[order[4]] = row[order[3]]
    n = 40000
    logits = row.expand(n, K)
    want = torch.softmax(top_k_top_p_filter(row.double(), 4), -1)       # the naive distribution
    s = sample_logits(logits, 1.0, 4, None, torch.Generator().manual_seed(0))
    freq = torch.bincount(s, minlength=K).double() / n
    assert set(s.unique().tolist()) <= set(torch.nonzero(want).view(-1).tolist())
    assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n)             # 4 sigma of a frequency
    assert int((want > 0).sum()) == (5 if tie else 4) and (freq > 0).sum() == (want > 0).sum()


# ---- MaskGIT ------------------------------------------------------------------------


def test_mask_fraction_schedules():
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(mask_fraction(r, "cosine"), torch.tensor([math.cos(math.pi / 2 * v) for v in r.tolist()], dtype=torch.float64))
    torch.testing.assert_close(mask_fraction(r, "arccos"), torch.tensor([math.acos(v) / (math.pi / 2) for v in r.tolist()], dtype=torch.float64))
    with pytest.raises(ValueError, match="mask schedule"):
        mask_fraction(r, "linear")


def test_sample_mask_semantics_and_schedule():
    model = make("maskgit")
    m = model.sample_mask(6, generator=torch.Generator().manual_seed(0))
    assert m.shape == (6, T) and m.dtype == torch.bool
    assert (m.sum(1) >= 1).all()
    # n = clamp(ceil(gamma(r) * 64), 1, 64) masked per row, r ~ U[0, 1): P(n <= j) = P(gamma(r) <= j / 64)
    # = 1 - (2/pi) arccos(j / 64) for cosine, 1 - cos(pi j / 128) for arccos (solve gamma(r) = j / 64)
    cdfs = {"cosine": lambda j: 1 - 2 / math.pi * math.acos(j / 64),
            "arccos": lambda j: 1 - math.cos(math.pi * j / 128)}
    for schedule, cdf in cdfs.items():
        gen = torch.Generator().manual_seed(1)
        n = make("maskgit", mask_schedule=schedule).sample_mask(4000, 64, generator=gen).sum(1)
        assert n.min() >= 1 and n.max() <= 64
        ecdf = torch.tensor([(n <= j).double().mean().item() for j in range(1, 65)])
        ref = torch.tensor([cdf(j) for j in range(1, 65)], dtype=torch.float64)
        assert (ecdf - ref).abs().max() < 0.03, schedule  # Kolmogorov-Smirnov, n = 4000: 1% level is 0.026


def test_maskgit_mask_replaces_tokens_with_mask_token():
    model = make("maskgit")
    codes, labels = rand_codes(3), torch.tensor([1, 2, 3])
    mask = model.sample_mask(3, generator=torch.Generator().manual_seed(4))
    out = model(codes, labels, mask)
    # whatever sits under the mask is invisible
    other = torch.where(mask, (codes + 7) % K, codes)
    torch.testing.assert_close(model(other, labels, mask), out, rtol=0, atol=0)
    # and it is exactly the [MASK] embedding (id K)
    manual = model.head(model._hidden(codes.masked_fill(mask, K), labels))
    torch.testing.assert_close(manual, out, rtol=0, atol=0)
    assert model.tok_emb.num_embeddings == K + 1 and model.head.out_features == K
    # bidirectional: changing the last token (visible) moves the output at slot 0 (masked)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, 0] = True
    moved = codes.clone()
    moved[:, -1] = (moved[:, -1] + 1) % K
    assert ((model(moved, labels, mask)[:, 0] - model(codes, labels, mask)[:, 0]).abs().amax(-1) > 1e-8).all()


def test_maskgit_loss_counts_only_masked_positions():
    snce = pytest.importorskip("snce")
    model = make("maskgit")
    B, D = 3, 4
    codes, labels = rand_codes(B), torch.tensor([0, 1, 2])
    mask = model.sample_mask(B, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    codebook = torch.randn(K, D, generator=g, dtype=torch.float64)
    hidden = model.forward_hidden(codes, labels, mask)
    assert hidden.shape == (B, T, model.config.n_embd)
    hidden.retain_grad()
    loss = snce.fused_linear_snce(hidden, model.head.weight, latents, codebook, 1.0,
                                  bias=model.head.bias, mask=mask)
    loss.backward()
    # reference: mean over masked rows of -sum q log p
    logits = model.head(hidden.detach())
    q = snce.neighbor_probs(latents, codebook, 1.0)
    ref = -(q * logits.log_softmax(-1)).sum(-1)[mask].mean()
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-9, atol=1e-9)
    assert hidden.grad[~mask].abs().max() == 0
    assert hidden.grad[mask].abs().amax(-1).min() > 0


def count_passes(model):
    calls = []
    model.ln_f.register_forward_hook(lambda m, i, o: calls.append(1))
    seen = []  # number of [MASK] inputs per row at each pass
    model.tok_emb.register_forward_pre_hook(lambda m, i: seen.append((i[0] == K).sum(-1)))
    return calls, seen


# masked tokens fed at each pass, T = 12, cosine schedule: after step s, floor(12 cos(pi/2 (s+1)/steps))
# stay masked, at least one fewer than before. steps=4: 12 cos(pi/8) = 11.09, 12 cos(pi/4) = 8.49,
# 12 cos(3pi/8) = 4.59. steps=5: 11.41, 9.71, 7.05, 3.71. steps=T: floor(12 cos(pi k/24)) >= 12 - k,
# so the "one fewer" rule wins every step.
@pytest.mark.parametrize("steps,cfg_scale,n_masked", [(1, 1.0, [12]), (4, 1.0, [12, 11, 8, 4]),
                                                      (5, 2.0, [12, 11, 9, 7, 3]),
                                                      (T, 3.0, list(range(12, 0, -1)))])
def test_maskgit_generate_valid_and_respects_steps(steps, cfg_scale, n_masked):
    assert T == 12
    model = make("maskgit")
    calls, seen = count_passes(model)
    labels = torch.tensor([0, 1, 4])
    out = model.generate(labels, cfg_scale=cfg_scale, temperature=1.0, top_k=20, top_p=0.95,
                         steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, H, W, L) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < K  # no [MASK] id left
    assert len(calls) == steps
    assert [s[0].item() for s in seen] == n_masked
    assert all((s == s[0]).all() for s in seen)  # same count in every row (and cfg half)


def naive_maskgit_generate(model, labels, cfg_scale, temperature, top_k, top_p, steps, generator,
                           gumbel_temperature=4.5):
    """Reference sampler: full (B, T, K) logits every pass, cond and uncond run separately and
    guided in logit space; the masked positions (row-major) drawn with one sample_logits call."""
    B = labels.size(0)
    codes = torch.zeros(B, T, dtype=torch.long)
    masked = torch.ones(B, T, dtype=torch.bool)
    null = torch.full_like(labels, model.null_class)
    for s in range(steps):
        logits = model.head(model._hidden(codes, labels, masked))
        if cfg_scale != 1.0:
            unc = model.head(model._hidden(codes, null, masked))
            logits = unc + cfg_scale * (logits - unc)
        tok = sample_logits(logits[masked], temperature, top_k, top_p, generator)
        logp = torch.zeros(B, T)
        logp[masked] = logits[masked].float().log_softmax(-1).gather(-1, tok[:, None])[:, 0]
        sampled = codes.clone()
        sampled[masked] = tok
        ratio = (s + 1) / steps
        n_next = math.floor(T * math.cos(math.pi / 2 * ratio))  # cosine schedule
        n_next = 0 if s == steps - 1 else max(0, min(n_next, int(masked[0].sum()) - 1))
        remask = torch.zeros_like(masked)
        if n_next > 0:
            conf = logp + gumbel_temperature * (1 - ratio) * gumbel_noise((B, T), generator)
            conf[~masked] = float("inf")
            for b in range(B):
                remask[b, conf[b].argsort()[:n_next]] = True
        codes, masked = sampled, remask
    return codes.view(B, H, W, L)


@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p,rows,gumbel",
                         [(1.0, 1.0, None, None, 4096, 4.5), (3.0, 1.0, 20, None, 4096, 4.5),
                          (2.0, 0.8, 10, 0.9, 4096, 4.5), (3.0, 0.0, None, None, 4096, 4.5),
                          (3.0, 0.0, None, None, 5, 4.5), (1.0, 1.0, None, None, 7, 0.0),
                          (3.0, 0.0, None, None, 4096, 0.0)])
def test_maskgit_generate_equals_full_logits_reference(cfg_scale, temperature, top_k, top_p, rows, gumbel,
                                                       monkeypatch):
    """Guiding the head's input and computing only the masked positions' logits (rows at a time)
    draws what the full-logits sampler draws, with the same generator."""
    monkeypatch.setattr(model_module, "SAMPLE_ROWS", rows)
    model = make("maskgit")
    labels = torch.tensor([0, 1, 4, 2])
    got = model.generate(labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                         steps=5, generator=torch.Generator().manual_seed(3), gumbel_temperature=gumbel)
    ref = naive_maskgit_generate(model, labels, cfg_scale, temperature, top_k, top_p, 5,
                                 torch.Generator().manual_seed(3), gumbel)
    assert torch.equal(got, ref)


def test_maskgit_generate_keeps_unmasked_tokens():
    model = make("maskgit")
    snaps = []
    orig = model._hidden

    def spy(codes, labels, mask=None):
        snaps.append((codes.clone(), mask.clone()))
        return orig(codes, labels, mask)

    model._hidden = spy
    out = model.generate(torch.tensor([0, 1]), steps=4, generator=torch.Generator().manual_seed(1))
    snaps.append((out.view(2, T), torch.zeros(2, T, dtype=torch.bool)))
    for (c0, m0), (c1, m1) in zip(snaps, snaps[1:]):
        assert not (m1 & ~m0).any()  # never re-masked
        assert torch.equal(c1[~m0], c0[~m0])  # known tokens never change


def test_maskgit_bad_steps():
    model = make("maskgit")
    for steps in (0, T + 1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            model.generate(torch.tensor([0]), steps=steps)


# ---- bad inputs -----------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    ar, mg = make("ar"), make("maskgit")
    codes, labels = rand_codes(2), torch.tensor([0, 1])
    cases = [
        (ar, dict(codes=codes.clone().fill_(K)), rf"\[0, {K}\).*max {K}"),
        (ar, dict(codes=codes - 5), "min -"),
        (ar, dict(codes=codes[:, :-1]), rf"\(B, {T}\).*got \(2, {T - 1}\)"),
        (ar, dict(codes=codes.view(2, W, H, L)), "expected shape"),
        (ar, dict(codes=codes.float()), "integer"),
        (ar, dict(labels=torch.tensor([0, NC])), rf"\[0, {NC}\).*max {NC}"),
        (ar, dict(labels=torch.tensor([-1, 0])), "min -1"),
        (ar, dict(labels=torch.tensor([0, 1, 2])), r"\(2,\).*\(3,\)"),
        (ar, dict(labels=torch.tensor([0.0, 1.0])), "integer"),
        (ar, dict(mask=torch.zeros(2, T, dtype=torch.bool)), "'ar'"),
        (mg, dict(mask=torch.zeros(2, T - 1, dtype=torch.bool)), "mask"),
        (mg, dict(mask=torch.zeros(2, T)), "bool"),
    ]
    for model, kw, msg in cases:
        args = dict(codes=codes, labels=labels, mask=None)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            model.forward_hidden(args["codes"], args["labels"], args["mask"])
    with pytest.raises(ValueError, match="labels"):
        ar.generate(torch.tensor([NC]))
    with pytest.raises(ValueError, match="num_samples"):
        ar.generate(None)
    for bad in (3, [0, 1], torch.tensor(3)):  # not a (B,) tensor
        with pytest.raises(ValueError, match=r"labels: expected a \(B,\) tensor"):
            ar.generate(bad)
    with pytest.raises(ValueError, match="top_p"):
        ar.generate(labels, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        ar.generate(labels, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        ar.generate(labels, temperature=-1.0)
    for bad in (dict(mode="diffusion"), dict(n_embd=65), dict(class_dropout=1.0),
                dict(vocab_size=0), dict(mask_schedule="linear")):
        with pytest.raises(ValueError, match="GPTConfig"):
            GPTConfig(**bad)


# ---- optimizer, bookkeeping, checkpoints -------------------------------------------------


def test_configure_optimizers_decays_only_matrices():
    model = make("maskgit", dtype=torch.float32)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert any(p is model.head.bias for p in no_decay["params"])
    assert any(p is model.head.weight for p in decay["params"])


def counted_train_flops_per_token(model, mask=None, B=2):
    """FLOPs of one forward + backward per token, counted without the formula: torch's
    FlopCounterMode counts every matmul (the Linear layers, forward and backward); the two
    attention products, which the CPU attention kernel hides from it, are counted by hand
    from the shapes scaled_dot_product_attention sees: QK^T and PV are 2 * B * h * nq * nk * d
    each forward, and the backward takes two matmuls of the same size for each."""
    from torch.utils.flop_counter import FlopCounterMode

    sdpa, attn = F.scaled_dot_product_attention, []

    def counting_sdpa(q, k, v, **kw):
        Bq, h, nq, d = q.shape
        attn.append(2 * (2 * Bq * h * nq * k.size(2) * d))
        return sdpa(q, k, v, **kw)

    codes = rand_codes(B)
    F.scaled_dot_product_attention = counting_sdpa
    try:
        with FlopCounterMode(display=False) as fc:
            model(codes, torch.arange(B), mask).sum().backward()
    finally:
        F.scaled_dot_product_attention = sdpa
    assert set(map(str, fc.get_flop_counts()["Global"])) == {"aten.mm"}  # else attention counted twice
    assert len(attn) == model.config.n_layer
    return (fc.get_total_flops() + 3 * sum(attn)) / (B * T)


def test_num_params_flops_and_registry():
    model = make("ar", dtype=torch.float32, bias=False)
    emb = sum(m.weight.numel() for m in (model.tok_emb, model.pos_emb, model.lvl_emb, model.cls_emb))
    assert model.num_params(False) == sum(p.numel() for p in model.parameters())
    assert model.num_params() == model.num_params(False) - emb
    # PaLM's 6N counts every non-embedding parameter as a matmul weight; the LayerNorm gains
    # (2 per block + the final one, n_embd each) are the only ones that are not
    counted = counted_train_flops_per_token(model)
    norms = (2 * model.config.n_layer + 1) * model.config.n_embd
    assert model.estimate_flops_per_token() == counted + 6 * norms
    assert model.estimate_mfu(1e6 / counted, peak_flops=1e6) == pytest.approx(1.0, rel=0.01)
    # maskgit runs the blocks over T + 1 slots (the class slot) for T predicted tokens: 6N per
    # token is short by one slot in T, so the estimate is within ~1/T of the count
    mg = make("maskgit", dtype=torch.float32, bias=False)
    mask = mg.sample_mask(2, generator=torch.Generator().manual_seed(0))
    assert mg.estimate_flops_per_token() == pytest.approx(counted_train_flops_per_token(mg, mask), rel=1 / T)
    for size in MODELS.values():
        GPTConfig(**size)  # every named size is a valid config
    with torch.device("meta"):  # IBQ-B: the paper's ~300M-parameter AR generator (in the blocks)
        big = GPT(GPTConfig(vocab_size=16, **MODELS["IBQ-B"]))
    assert 290e6 < sum(p.numel() for p in big.blocks.parameters()) < 310e6


def test_training_step_reduces_loss():
    model = make("ar", dtype=torch.float32, class_dropout=0.0).train()
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    codes, labels = rand_codes(4), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(codes, labels).reshape(-1, K), codes.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_memmap_dtypes_and_return_hidden():
    model = make("ar")
    codes, labels = rand_codes(2), torch.tensor([0, 1])
    ref = model(codes, labels)
    for dt in (torch.uint16, torch.int32, torch.int16):
        torch.testing.assert_close(model(codes.to(dt), labels.to(torch.int32)), ref, rtol=0, atol=0)
    hidden = model(codes, labels, return_hidden=True)
    assert hidden.shape == (2, T, model.config.n_embd)
    torch.testing.assert_close(model.head(hidden), ref, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_hidden(codes, labels), hidden, rtol=0, atol=0)


def test_gumbel_noise_statistics():
    g = gumbel_noise((200_000,), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_maskgit_greedy_unmasks_most_confident_first():
    model = make("maskgit")
    snaps = []
    orig = model._hidden

    def spy(codes, labels, mask=None):
        h = orig(codes, labels, mask)
        probs = model.head(h).softmax(-1)
        snaps.append((mask.clone(), probs.amax(-1), probs.argmax(-1)))
        return h

    model._hidden = spy
    out = model.generate(torch.tensor([0, 3]), temperature=0.0, steps=T, gumbel_temperature=0.0)
    snaps.append((torch.zeros(2, T, dtype=torch.bool), None, None))
    for (m0, conf, best_tok), (m1, _, _) in zip(snaps, snaps[1:]):
        newly = m0 & ~m1
        assert newly.sum(1).tolist() == [1, 1]
        best = conf.masked_fill(~m0, -1).argmax(1)
        assert torch.equal(newly.float().argmax(1), best)  # the most confident masked slot
        assert torch.equal(out.view(2, T)[newly], best_tok[newly])  # gets its most likely token


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_generator_on_wrong_device_is_rejected():
    model = make("ar")
    with pytest.raises(ValueError, match="generator"):
        model.generate(torch.tensor([0]), generator=torch.Generator("cuda"))
