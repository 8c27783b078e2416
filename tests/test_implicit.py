"""Implicit (product) codebooks (support/implicit.py): the enumerated codebook and index convention
(Open-MAGVIT2's LFQ bits, FSQ's mixed radix), the factorised neighbor distribution against the
dense Eq. 5 of the enumerated codebook, group marginals against sums of the dense q, and the
factorised loss against the dense loss of the explicit product model, gradients and masks
included, all in float64; the tau -> 0 limit; bad inputs. The Open-MAGVIT2 LFQ tokenizer
(support/implicit_arch.py): module layout vs upstream, forward vs a functional float64 reference,
codes = signs, the loader (EMA selection, errors)."""

import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import snce  # noqa: E402
from support import implicit as I  # noqa: E402

LEVEL_SETS = {"lfq4": I.lfq_levels(4), "lfq6": I.lfq_levels(6), "lfq8": I.lfq_levels(8),
              "fsq": I.fsq_levels((3, 4, 2, 5)), "fsq853": I.fsq_levels((8, 5, 3))}
GROUPS = {"lfq4": [(1, 3), (4,)], "lfq6": [(2, 4), ((5, 0), (1, 2, 3, 4))],
          "lfq8": [(3, 5), (2, 2, 4)], "fsq": [(2, 2), ((3,), (0, 2), (1,))],
          "fsq853": [(1, 2), ((2, 0), (1,))]}


def latents(n, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64) * scale


def naive_codebook(levels):
    # itertools.product varies its LAST factor fastest: reverse so dimension 0 is least significant
    return torch.tensor([c[::-1] for c in itertools.product(*levels[::-1])], dtype=torch.float64)


def naive_marginal(q, levels, groups):
    """Sum the dense q (N, K) over the codes sharing each group's sub-token."""
    K = q.shape[1]
    subs = I.split_codes(torch.arange(K), levels, groups)
    out = []
    for sub in subs:
        m = q.new_zeros(q.shape[0], int(sub.max()) + 1)
        out.append(m.index_add_(1, sub, q))
    return out


def product_logits(group_logits, levels, groups):
    """Logits of p(c) = prod_g p_g(c_g) over all K codes: s(c) = sum_g log p_g(c_g)."""
    K = torch.Size(len(v) for v in levels).numel()
    subs = I.split_codes(torch.arange(K), levels, groups)
    return sum(s.log_softmax(-1)[..., sub] for s, sub in zip(group_logits, subs))


# -----------------------------------------------------------------------------
# codebook and codes


def test_lfq_codebook_bits_match_open_magvit2_convention():
    cb = I.implicit_codebook(I.lfq_levels(5), torch.float64)
    k = torch.arange(32)
    bits = (k[:, None] >> torch.arange(5)) & 1          # bit d of the index = (c_d > 0)
    assert cb.shape == (32, 5)
    assert torch.equal(cb, bits.double() * 2 - 1)
    assert torch.equal(cb, naive_codebook(I.lfq_levels(5)))


def test_fsq_levels_and_codebook_match_reference():
    # FSQ: L odd -> symmetric integers, L even -> one more below 0, scaled by L // 2
    assert I.fsq_levels((3, 4, 5)) == ((-1.0, 0.0, 1.0), (-1.0, -0.5, 0.0, 0.5),
                                       (-1.0, -0.5, 0.0, 0.5, 1.0))
    lv = I.fsq_levels((3, 4, 2))
    cb = I.implicit_codebook(lv, torch.float64)
    assert torch.equal(cb, naive_codebook(lv)) and cb.shape == (24, 3)
    # the reference code's index: sum_d (round(bounded)_d + L_d // 2) * basis_d, basis = cumprod
    L = torch.tensor([3, 4, 2])
    basis = torch.cumprod(torch.tensor([1, 3, 4]), 0)
    half = L // 2
    assert torch.equal(((cb * half + half).round().long() * basis).sum(-1), torch.arange(24))


@pytest.mark.parametrize("name", sorted(LEVEL_SETS))
def test_quantize_is_nearest_code_and_groups_split_it(name):
    lv = LEVEL_SETS[name]
    z = latents(200, len(lv), seed=1)
    cb = I.implicit_codebook(lv, torch.float64)
    codes = I.implicit_quantize(z, lv)
    assert torch.equal(codes, snce.nearest_code(z, cb, "l2"))
    for groups in GROUPS[name]:
        parts = I.implicit_quantize(z, lv, groups)
        assert all(torch.equal(a, b) for a, b in zip(parts, I.split_codes(codes, lv, groups)))
        for part, g in zip(parts, I.group_dims(groups, len(lv))):   # the group's own nearest code
            book = I.implicit_codebook([lv[d] for d in g], torch.float64)
            assert torch.equal(part, snce.nearest_code(z[:, list(g)], book, "l2"))


def test_lfq_codes_match_upstream_formula_including_zero():
    z = latents(64, 18, seed=2)
    z[0, 3] = 0.0                                       # upstream: (z > 0), so 0 -> bit 0
    bits = (z > 0).long()
    want = (bits * 2 ** torch.arange(18)).sum(-1)
    assert torch.equal(I.implicit_quantize(z, I.lfq_levels(18)), want)
    pre, post = I.implicit_quantize(z, I.lfq_levels(18), (6, 12))
    assert torch.equal(pre, (bits[:, :6] * 2 ** torch.arange(6)).sum(-1))     # upstream pre_mask
    assert torch.equal(post, (bits[:, 6:] * 2 ** torch.arange(12)).sum(-1))   # upstream post_mask
    assert torch.equal(pre, want & 63) and torch.equal(post, want >> 6)


def test_fsq_bound_rounds_to_the_reference_quantizer():
    levels = (8, 5, 3, 4)
    z = latents(500, 4, seed=3, scale=2.0)
    L = torch.tensor(levels, dtype=torch.float64)
    half_l = (L - 1) * (1 + 1e-3) / 2     # Cosmos-Tokenizer's FSQ.bound
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset   # written out
    half_w = torch.tensor([4, 2, 1, 2])
    zhat = bounded.round()                                                    # the FSQ code
    basis = torch.cumprod(torch.tensor([1, 8, 5, 3]), 0)
    want = ((zhat.long() + half_w) * basis).sum(-1)
    b = I.fsq_bound(z, levels)
    assert torch.allclose(b, bounded / half_w, atol=1e-12, rtol=0)
    assert torch.equal(I.implicit_quantize(b, I.fsq_levels(levels)), want)


# -----------------------------------------------------------------------------
# the factorised q against the dense Eq. 5


@pytest.mark.parametrize("name", sorted(LEVEL_SETS))
@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_factorized_q_equals_dense_q_and_marginals_equal_sums(name, tau):
    lv = LEVEL_SETS[name]
    z = latents(50, len(lv), seed=4)
    cb = I.implicit_codebook(lv, torch.float64)
    dense = snce.neighbor_probs(z, cb, tau, "l2")                            # (N, K)
    (full,) = I.factorized_targets(z, lv, [len(lv)], tau)                    # one group: all of q
    assert full.dtype == torch.float64
    torch.testing.assert_close(full, dense, rtol=1e-12, atol=1e-14)
    for groups in GROUPS[name]:
        got = I.factorized_targets(z, lv, groups, tau)
        for a, b in zip(got, naive_marginal(dense, lv, groups)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lfq_dimension_probability_is_sigmoid():
    z = latents(100, 6, seed=5)
    for tau in (0.2, 1.0, 3.0):
        qd = I.dim_probs(z, I.lfq_levels(6), tau)
        got = torch.stack([q[:, 1] for q in qd], -1)
        torch.testing.assert_close(got, torch.sigmoid(4 * z / tau), rtol=1e-12, atol=1e-14)


# -----------------------------------------------------------------------------
# the factorised loss against the dense loss of the explicit product model


def group_logits(shape, levels, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for dims in I.group_dims(groups, len(levels)):
        K_g = torch.Size(len(levels[d]) for d in dims).numel()
        out.append(torch.randn(*shape, K_g, generator=g, dtype=torch.float64).requires_grad_())
    return out


@pytest.mark.parametrize("name", sorted(LEVEL_SETS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_factorized_loss_and_grads_equal_dense_product_model(name, reduction, masked):
    lv = LEVEL_SETS[name]
    groups, tau = GROUPS[name][0], 0.7
    z = latents(6 * 5, len(lv), seed=6).view(6, 5, len(lv))
    mask = (torch.arange(30).view(6, 5) % 3 != 0) if masked else None
    logits = group_logits((6, 5), lv, groups, seed=7)
    loss = I.factorized_snce(logits, z, lv, groups, tau, mask=mask, reduction=reduction,
                             compile=False)
    # reference: dense q over all K codes, the product model's log p(c) = sum_g log p_g(c_g)
    ref_logits = [s.detach().clone().requires_grad_() for s in logits]
    q = snce.neighbor_probs(z, I.implicit_codebook(lv, torch.float64), tau, "l2")
    rows = snce.dense_snce(product_logits(ref_logits, lv, groups), q)          # (6, 5)
    m = torch.ones(6, 5, dtype=torch.bool) if mask is None else mask
    rows = torch.where(m, rows, torch.zeros_like(rows))
    ref = {"mean": rows.sum() / m.sum(), "sum": rows.sum(), "none": rows}[reduction]
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn(loss.shape, dtype=torch.float64)        # a non-uniform grad_output for 'none'
    grads = torch.autograd.grad((loss * w).sum(), logits)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_logits)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if mask is not None:   # uncounted rows get no gradient
        assert all(float(a[~mask].abs().max()) == 0 for a in grads)


def test_per_group_gradient_is_p_minus_marginal():
    lv, groups, tau = I.lfq_levels(18), (6, 12), 0.5     # the real Open-MAGVIT2 split: K_g 64, 4096
    z = latents(8, 18, seed=8)
    logits = group_logits((8,), lv, groups, seed=9)
    loss = I.factorized_snce(logits, z, lv, groups, tau, reduction="sum", compile=False)
    grads = torch.autograd.grad(loss, logits)
    targets = I.factorized_targets(z, lv, groups, tau)
    assert [t.shape[-1] for t in targets] == [64, 4096]
    for s, q, gr in zip(logits, targets, grads):        # Eq. 11 per head
        torch.testing.assert_close(gr, s.detach().softmax(-1) - q, rtol=1e-10, atol=1e-12)
    ref = sum(snce.dense_snce(s.detach(), q).sum() for s, q in zip(logits, targets))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_heads_equal_factorized_loss_on_their_logits(reduction):
    lv, groups, tau = LEVEL_SETS["fsq"], GROUPS["fsq"][1], 0.6      # non-consecutive groups
    z = latents(20, len(lv), seed=12).view(4, 5, len(lv))
    mask = torch.arange(20).view(4, 5) % 4 != 2
    g = torch.Generator().manual_seed(13)
    hid = [torch.randn(4, 5, 7, generator=g, dtype=torch.float64).requires_grad_()
           for _ in range(3)]
    Ks = [len(lv[3]), len(lv[0]) * len(lv[2]), len(lv[1])]
    W = [torch.randn(k, 7, generator=g, dtype=torch.float64).requires_grad_() for k in Ks]
    b = [torch.randn(k, generator=g, dtype=torch.float64).requires_grad_() for k in Ks]
    fused = I.fused_factorized_snce(hid, W, z, lv, groups, tau, biases=b, mask=mask,
                                    reduction=reduction, compile=False)
    ref = I.factorized_snce([h @ w.t() + bb for h, w, bb in zip(hid, W, b)], z, lv, groups, tau,
                            mask=mask, reduction=reduction, compile=False)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    wts = torch.rand(fused.shape, dtype=torch.float64)
    ga = torch.autograd.grad((fused * wts).sum(), hid + W + b)
    gb = torch.autograd.grad((ref * wts).sum(), hid + W + b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="expected hidden"):
        I.fused_factorized_snce(hid, W[::-1], z, lv, groups, tau)


@pytest.mark.parametrize("name", ["lfq6", "fsq"])
def test_zero_temperature_is_ce_on_the_quantized_code(name):
    lv = LEVEL_SETS[name]
    groups = GROUPS[name][0]
    z = latents(40, len(lv), seed=10)
    logits = group_logits((40,), lv, groups, seed=11)
    mask = torch.arange(40) % 4 != 1
    loss = I.factorized_snce(logits, z, lv, groups, 0.0, mask=mask, compile=False)
    parts = I.implicit_quantize(z, lv, groups)
    ce = sum(F.cross_entropy(s[mask], t[mask]) for s, t in zip(logits, parts))
    torch.testing.assert_close(loss, ce, rtol=1e-12, atol=1e-12)
    cold = I.factorized_snce(logits, z, lv, groups, 1e-4, mask=mask, compile=False)
    torch.testing.assert_close(cold, ce, rtol=1e-6, atol=1e-6)
    for q, t in zip(I.factorized_targets(z, lv, groups, 0.0), parts):
        assert torch.equal(q, F.one_hot(t, q.shape[-1]).double())


def test_bad_inputs_are_clear_errors():
    lv = I.lfq_levels(4)
    z = latents(3, 4)
    with pytest.raises(ValueError, match="partition"):
        I.factorized_targets(z, lv, (2, 1), 1.0)
    with pytest.raises(ValueError, match="partition"):
        I.group_dims([(0, 1), (1, 2, 3)], 4)
    with pytest.raises(ValueError, match="one logits tensor per group"):
        I.factorized_snce([torch.zeros(3, 4)], z, lv, (2, 2), 1.0)
    with pytest.raises(ValueError, match=r"expected logits \(3, 4\)"):
        I.factorized_snce([torch.zeros(3, 4), torch.zeros(3, 8)], z, lv, (2, 2), 1.0)
    with pytest.raises(ValueError, match="dimensions"):
        I.implicit_quantize(latents(3, 5), lv)
    with pytest.raises(ValueError, match="ascending"):
        I.implicit_codebook([(1.0, -1.0)])
    with pytest.raises(ValueError, match="ints >= 2"):
        I.fsq_levels((8, 1))
    with pytest.raises(ValueError, match="tau"):
        I.dim_probs(z, lv, -1.0)


# -----------------------------------------------------------------------------
# the Open-MAGVIT2 LFQ tokenizer (support/implicit_arch.py) and its loader

from support import implicit_arch as A  # noqa: E402
from support import pretrained_arch as PA  # noqa: E402

# measured by building SEED-Voken's src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py
# Encoder + Decoder (the tokenizer configs' ddconfig, z_channels 18 / 14) and hashing "key:shape;"
UPSTREAM_LAYOUT = {"lfq-262144": (339, 115127829, "045e21b6659493e0"),
                   "lfq-16384": (339, 115094033, "49540b9b1d343b7f")}


def layout_of(sd):
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    return len(sd), sum(v.numel() for v in sd.values()), h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(UPSTREAM_LAYOUT))
def test_full_size_layout_matches_upstream(name):
    with torch.device("meta"):
        sd = A.LFQTokenizer(A.LFQConfig(**A.OPEN_MAGVIT2[name])).state_dict()
    assert layout_of(sd) == UPSTREAM_LAYOUT[name]
    assert A.infer_lfq_config(sd) == A.LFQConfig(**A.OPEN_MAGVIT2[name])


@pytest.mark.parametrize("bad,match", [(dict(code_dim=25), "code_dim <= 24"), (dict(code_dim=0), "code_dim"),
                                       (dict(ch=48), "divisible by 32"), (dict(num_res_blocks=0), "num_res_blocks"),
                                       (dict(image_size=100), "divisible by downsample=16"),
                                       (dict(metric="cos"), "metric 'l2'")])
def test_lfq_config_refuses_bad_sizes(bad, match):
    with pytest.raises(ValueError, match=match):
        A.LFQConfig(**bad)


def tiny_lfq(seed=0, D=6):
    torch.manual_seed(seed)
    m = A.LFQTokenizer(A.LFQConfig(image_size=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                                   code_dim=D)).double()
    with torch.no_grad():   # non-trivial norms and biases, so a skipped op changes the output
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 1 / p[0].numel() ** 0.5)
                    + (1.0 if "norm" in n and n.endswith("weight") else 0))
    return m.eval()


# a functional float64 reference written from the upstream key layout and forward code
def _gn(sd, p, x, affine=True):
    return F.group_norm(x, 32, sd[p + "weight"] if affine else None,
                        sd[p + "bias"] if affine else None, 1e-6)


def _res(sd, p, x):
    h = F.conv2d(F.silu(_gn(sd, p + "norm1.", x)), sd[p + "conv1.weight"], padding=1)
    h = F.conv2d(F.silu(_gn(sd, p + "norm2.", h)), sd[p + "conv2.weight"], padding=1)
    skip = F.conv2d(x, sd[p + "nin_shortcut.weight"]) if p + "nin_shortcut.weight" in sd else x
    return skip + h


def ref_encode(sd, x, n, nb):
    h = F.conv2d(x, sd["encoder.conv_in.weight"], padding=1)
    for i in range(n):
        for j in range(nb):
            h = _res(sd, f"encoder.down.{i}.block.{j}.", h)
        if i < n - 1:
            h = F.conv2d(h, sd[f"encoder.down.{i}.downsample.weight"],
                         sd[f"encoder.down.{i}.downsample.bias"], stride=2, padding=1)
    for j in range(nb):
        h = _res(sd, f"encoder.mid_block.{j}.", h)
    h = F.silu(_gn(sd, "encoder.norm_out.", h))
    return F.conv2d(h, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])


def ref_decode(sd, zq, n, nb):
    h = F.conv2d(zq, sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"], padding=1)
    for j in range(nb):
        h = _res(sd, f"decoder.mid_block.{j}.", h)
    std = (zq.flatten(2).var(-1) + 1e-6).sqrt()
    mean = zq.flatten(2).mean(-1)
    for i in reversed(range(n)):
        p = f"decoder.adaptive.{i}."
        scale = F.linear(std, sd[p + "gamma.weight"], sd[p + "gamma.bias"])
        bias = F.linear(mean, sd[p + "beta.weight"], sd[p + "beta.bias"])
        h = scale[..., None, None] * _gn(sd, p, h, affine=False) + bias[..., None, None]
        for j in range(nb):
            h = _res(sd, f"decoder.up.{i}.block.{j}.", h)
        if i > 0:
            u = F.conv2d(h, sd[f"decoder.up.{i}.upsample.conv1.weight"],
                         sd[f"decoder.up.{i}.upsample.conv1.bias"], padding=1)
            B, C4, hh, ww = u.shape
            C = C4 // 4   # depth-to-space DCR: channel (2a + b) C + c -> pixel (2y + a, 2x + b)
            out = u.new_empty(B, C, 2 * hh, 2 * ww)
            for a in range(2):
                for b in range(2):
                    out[:, :, a::2, b::2] = u[:, (a * 2 + b) * C:(a * 2 + b + 1) * C]
            h = out
    h = F.silu(_gn(sd, "decoder.norm_out.", h))
    return F.conv2d(h, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def test_lfq_forward_matches_functional_reference_and_codes_are_signs():
    tok = tiny_lfq()
    sd = tok.state_dict()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    z, codes = tok.encode(x)
    z_ref = ref_encode(sd, x, 3, 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(tok.encode_latents(x), z_ref, rtol=1e-10, atol=1e-10)
    assert codes.shape == (2, 4, 4, 1) and z.shape == (2, 4, 4, 6)
    zr = tok.encode_latents(x)
    assert torch.equal(codes[..., 0], ((zr > 0).long() * 2 ** torch.arange(6)).sum(-1))
    assert torch.equal(codes, snce.nearest_code(zr, tok.codebooks[0].double(), "l2")[..., None])
    zq = torch.where(zr > 0, 1.0, -1.0).double().permute(0, 3, 1, 2)
    torch.testing.assert_close(tok.decode(codes), ref_decode(sd, zq, 3, 2), rtol=1e-10, atol=1e-10)
    assert tok.codebooks.shape == (1, 64, 6) and tok.config.codebook_size == 64
    assert layout_of(tok.state_dict()) == layout_of(sd)    # the enumerated codebook is no weight


def lightning(main, ema=None):
    sd = {**main, "loss.discriminator.main.0.weight": torch.zeros(2, 3)}
    if ema is not None:
        sd.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
        sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.999), torch.tensor(-1)
    return {"state_dict": sd, "epoch": 3}


def test_load_lfq_ema_when_complete_else_main(tmp_path, capsys):
    main, ema = tiny_lfq(0).float().state_dict(), tiny_lfq(1).float().state_dict()
    x = torch.randn(1, 3, 16, 16)
    for name, ck, want, which in (("ema", lightning(main, ema), ema, "ema"),
                                  ("part", lightning(main, dict(list(ema.items())[:5])), main,
                                   "main"),
                                  ("bare", dict(main), main, "main")):
        path = str(tmp_path / f"{name}.ckpt")
        torch.save(ck, path)
        tok = A.load_lfq(path, image_size=16)
        assert tok.weights == which and not tok.training
        assert all(torch.equal(tok.state_dict()[k], want[k]) for k in want)
        assert tok.encode(x)[1].shape == (1, 4, 4, 1)
        assert "lfq tokenizer, K=2^6" in capsys.readouterr().out


def test_load_lfq_errors(tmp_path):
    main = tiny_lfq().float().state_dict()
    cases = {"extra": ({**main, "decoder.mystery.weight": torch.zeros(1)}, "does not have"),
             "missing": ({k: v for k, v in main.items() if k != "decoder.conv_out.bias"}, "lacks"),
             "nan": ({**main, "encoder.conv_out.bias": torch.full((6,), float("nan"))}, "finite"),
             "ibq": (PA.PretrainedTokenizer(PA.PretrainedConfig(
                 family="ibq", image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, enc_attn=(1,),
                 dec_attn=(0,), z_channels=32, code_dim=8, codebook_size=64)).state_dict(),
                 "not an Open-MAGVIT2")}
    for name, (sd, msg) in cases.items():
        path = str(tmp_path / f"{name}.ckpt")
        torch.save({"state_dict": sd}, path)
        with pytest.raises(ValueError, match=msg):
            A.load_lfq(path, image_size=16, verbose=False)
    assert A.is_lfq_state(main) and not A.is_lfq_state(cases["ibq"][0])


def test_open_tokenizer_routes_lfq_files_and_names_missing_ones(tmp_path):
    """The one loader (support.pretrained.open_tokenizer) tells an LFQ file from an IBQ one (both
    have encoder.down.* weights) and says where a missing upstream LFQ file comes from."""
    from support import pretrained as P
    main, ema = tiny_lfq(0).float().state_dict(), tiny_lfq(1).float().state_dict()
    path = str(tmp_path / "lfq.ckpt")
    torch.save(lightning(main, ema), path)
    tok, info = P.open_tokenizer(path, image_size=16, verbose=False)
    assert isinstance(tok, A.LFQTokenizer) and info["kind"] == "lfq" and info["weights"] == "ema"
    assert all(torch.equal(tok.state_dict()[k], ema[k]) for k in ema)
    with pytest.raises(ValueError, match="image size"):
        P.open_tokenizer(path, verbose=False)
    with pytest.raises(ValueError, match="LFQ tokenizer"):
        P.load_pretrained(path, image_size=16, verbose=False)
    with pytest.raises(FileNotFoundError, match="Open-MAGVIT2's LFQ tokenizer"):
        P.open_tokenizer(str(tmp_path / "imagenet_256_L.ckpt"), image_size=256)
