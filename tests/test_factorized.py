"""Factorised heads on an implicit (LFQ) code: support/factorized.py's FactorizedGPT (per-level
vocabularies, GPTConfig.level_vocab) and train.py's token_groups, which split each position's code
into sub-tokens (support/implicit.py) and train one head per sub-token with CE or SNCE against
the sub-token's exact marginal target.
A tiny random LFQ tokenizer (6 bits) encodes generated images with encode.py; no network."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, MODELS, GPTConfig, KVCache  # noqa: E402
from support.factorized import FactorizedGPT, join_sub_tokens, make_gpt  # noqa: E402
from support.encode import encode_split  # noqa: E402
from support.implicit import factorized_snce, lfq_levels, split_codes  # noqa: E402
from helpers import NUM_CLASSES, class_images  # noqa: E402
from test_implicit import lightning, tiny_lfq  # noqa: E402
from test_train import assert_same_run, base_args, enc, read_log, run_script, run_train  # noqa: E402,F401

GROUPS = "2,4"  # 6 LFQ bits: sub-tokens of 4 and 16 codes


@pytest.fixture(scope="module")
def lfq_enc(tmp_path_factory):
    """An Open-MAGVIT2-style LFQ file (K = 2^6, 16 px -> 4x4 grid) and its encoded splits."""
    root = str(tmp_path_factory.mktemp("lfq"))
    ckpt = os.path.join(root, "lfq.ckpt")
    torch.save(lightning(tiny_lfq(0).float().state_dict()), ckpt)
    dirs = []
    for i, (split, n) in enumerate((("train", 24), ("val", 8))):
        x, y = class_images(n, size=16, seed=i)
        ds = torch.utils.data.TensorDataset(x.repeat(1, 3, 1, 1), y)
        dirs.append(encode_split(ckpt, split, os.path.join(root, split), batch_size=8, image_size=16,
                                 dataset_name="synthetic", dataset=(ds, list(range(NUM_CLASSES)))))
    return dirs[0], dirs[1], ckpt


def args(enc, out, **kw):
    return base_args(enc, out, **{"tokenizer_ckpt": enc[2], "token_groups": GROUPS, "batch_size": 4, **kw})


def test_per_level_heads_shapes_and_sampling():
    """level_vocab: one head per level, logits (B, h*w, K_l); AR (KV cache) and MaskGIT sampling
    draw each level's token from its own vocabulary."""
    for mode in ("ar", "maskgit"):
        cfg = GPTConfig(mode=mode, vocab_size=16, levels=2, level_vocab=(4, 16), grid_h=2, grid_w=3,
                        num_classes=3, **MODELS["tiny"])
        model = make_gpt(cfg).eval()  # no class dropout: two forwards see the same labels
        assert type(model) is FactorizedGPT
        assert [tuple(h.weight.shape) for h in model.heads] == [(4, 64), (16, 64)]
        codes = torch.stack([torch.randint(0, 4, (5, 2, 3)), torch.randint(0, 16, (5, 2, 3))], -1)
        mask = model.sample_mask(5) if mode == "maskgit" else None
        logits = model(codes, torch.arange(5) % 3, mask)
        assert [tuple(x.shape) for x in logits] == [(5, 6, 4), (5, 6, 16)]
        hidden = model(codes, torch.arange(5) % 3, mask, return_hidden=True)
        torch.testing.assert_close(logits[1], model.heads[1](hidden[:, 1::2]))
        if mode == "ar":  # the KV-cache steps embed each token with its level's rows, as the full forward
            cache, flat, steps = KVCache(cfg.n_layer, cfg.seq_len), codes.view(5, -1), []
            for t in range(cfg.seq_len):
                steps.append(model._ar_step(torch.arange(5) % 3, flat[:, t - 1 : t] if t else None, cache)[:, -1])
            torch.testing.assert_close(torch.stack(steps, 1), hidden, rtol=1e-5, atol=1e-6)
        g = torch.Generator().manual_seed(0)
        out = model.generate(torch.arange(8) % 3, cfg_scale=2.0, generator=g)
        assert out.shape == (8, 2, 3, 2) and out.dtype == torch.long
        # 48 draws per level from near-uniform heads: level 0 only ever 0..3, level 1 exceeds 3
        assert out.min() >= 0 and out[..., 0].max() < 4 and 4 <= out[..., 1].max() < 16
        with pytest.raises(ValueError, match="level l's tokens"):  # 4 is level 1's first row
            model(codes.index_fill(-1, torch.tensor([0]), 4), torch.arange(5) % 3)
    with pytest.raises(ValueError, match="level_vocab"):
        GPTConfig(levels=2, vocab_size=16, level_vocab=(4, 32))
    with pytest.raises(ValueError, match="FactorizedGPT"):   # the plain GPT has one head
        GPT(GPTConfig(levels=2, vocab_size=16, level_vocab=(4, 16), **MODELS["tiny"]))
    with pytest.raises(ValueError, match="max"):              # vocab_size is the [MASK] id
        FactorizedGPT(GPTConfig(levels=2, vocab_size=32, level_vocab=(4, 16), **MODELS["tiny"]))


def naive_embed(model, codes, mask):
    """The token table's row of each slot, slot by slot: level l's rows start after the
    K_j (+ 1 [MASK] in maskgit) rows of each level j < l; a masked slot takes its level's [MASK]."""
    Ks, extra = model.config.level_vocab, int(model.config.mode == "maskgit")
    rows = torch.empty_like(codes)
    for b in range(codes.size(0)):
        for t in range(codes.size(1)):
            l = t % len(Ks)
            first = sum(k + extra for k in Ks[:l])
            rows[b, t] = first + (Ks[l] if mask is not None and mask[b, t] else codes[b, t])
    return model.tok_emb.weight[rows]


@pytest.mark.parametrize("mode", ["ar", "maskgit"])
def test_embed_rows_and_masked_draws_per_level(mode):
    """embed against the slot-by-slot table lookup (masks included); MaskGIT's draw of the
    masked slots against drawing each slot alone from its own level's head, same generator."""
    cfg = GPTConfig(mode=mode, vocab_size=16, levels=3, level_vocab=(4, 16, 2), grid_h=2, grid_w=2,
                    num_classes=3, **MODELS["tiny"])
    model = make_gpt(cfg).eval()
    assert model.tok_emb.weight.shape[0] == 22 + 3 * (mode == "maskgit")
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(0, k, (3, 4), generator=g) for k in (4, 16, 2)], -1).view(3, 12)
    mask = torch.rand(3, 12, generator=g) < 0.5 if mode == "maskgit" else None
    filled = codes if mask is None else codes.masked_fill(mask, model.mask_token)
    torch.testing.assert_close(model.embed(filled, 0), naive_embed(model, codes, mask), rtol=0, atol=0)
    torch.testing.assert_close(model.embed(filled[:, 5:9], 5), naive_embed(model, codes, mask)[:, 5:9],
                               rtol=0, atol=0)   # a KV-cache step: slots 5..8
    if mode == "maskgit":
        hidden = torch.randn(3, 12, 64, generator=g)
        tok, logp = model._draw_masked(hidden, mask, 1.0, None, None, torch.Generator().manual_seed(5))
        slots = mask.nonzero().tolist()
        assert tok.shape == logp.shape == (len(slots),)
        for (b, t), k, lp in zip(slots, tok.tolist(), logp.tolist()):
            lf = model.heads[t % 3](hidden[b, t]).float().log_softmax(-1)
            assert 0 <= k < cfg.level_vocab[t % 3] and abs(lf[k].item() - lp) < 1e-5
        # level by level: the generator's draws go to each level's slots in row-major order
        ref_g = torch.Generator().manual_seed(5)
        lvl = (torch.arange(12) % 3).expand(3, 12)[mask]
        for l in range(3):
            sel = lvl == l
            if sel.any():
                want = torch.multinomial(model.heads[l](hidden[mask][sel]).float().softmax(-1), 1,
                                         generator=ref_g)[:, 0]
                assert torch.equal(tok[sel], want)


def test_join_sub_tokens_inverts_split_codes():
    """join_sub_tokens(split_codes(c)) = c for every 6-bit LFQ code and every grouping."""
    codes = torch.arange(64).view(1, 4, 16, 1)
    for groups in ((6,), (2, 4), (1, 2, 3), (3, 3)):
        sub = torch.stack(split_codes(codes[..., 0], lfq_levels(6), groups), -1)
        assert torch.equal(join_sub_tokens(sub, [2**g for g in groups]), codes)


def test_group_loss_equals_factorized_snce_float64(lfq_enc, tmp_path):
    """train.py's group losses at one step = support.implicit.factorized_snce on the heads'
    logits (float64), snce and ce, ar and maskgit (masked rows only)."""
    for mode in ("ar", "maskgit"):
        g = run_train(args(lfq_enc, str(tmp_path / mode), max_iters=0, loss="snce", tau=0.3, mode=mode))
        model, L = g["raw_model"], g["L"]
        assert L == 2 and model.config.level_vocab == (4, 16) and model.config.seq_len == 32
        idx = np.arange(4)
        codes, res, labels = g["get_batch"](g["codes_mm"], g["latents_mm"], g["labels_mm"], idx)
        full = torch.from_numpy(np.asarray(g["codes_mm"][idx]).astype(np.int64))[..., 0]
        assert torch.equal(codes, torch.stack(split_codes(full, lfq_levels(6), (2, 4)), -1))
        assert torch.equal(join_sub_tokens(codes, (4, 16))[..., 0], full)  # how samples decode
        mask = model.sample_mask(4) if mode == "maskgit" else None
        hidden = model(codes, labels, mask, return_hidden=True).detach().requires_grad_()
        model.zero_grad()
        sums, n = g["level_losses"](hidden, codes, res, mask)
        sums.sum().backward()  # the fused gradients (Eq. 11: p - q_g per head)
        ce, _ = g["level_losses"](hidden.detach(), codes, res, mask, kind="ce")
        h64 = hidden.detach().double().requires_grad_()
        W64 = [model.heads[i].weight.detach().double().requires_grad_() for i in range(2)]
        logits = [h64.view(4, 16, 2, -1)[:, :, i] @ W64[i].T for i in range(2)]
        z = torch.from_numpy(np.asarray(g["latents_mm"][idx])).double().view(4, 16, 6)
        m = None if mask is None else mask.view(4, 16, 2)
        total = 0
        for i, (lo, hi) in enumerate(((0, 2), (2, 6))):  # group by group: each its own mask
            one = factorized_snce([logits[i]], z[..., lo:hi], lfq_levels(hi - lo), (hi - lo,), 0.3,
                                  mask=None if m is None else m[..., i], reduction="sum")
            torch.testing.assert_close(sums[i].double(), one, rtol=1e-5, atol=1e-5)
            total = total + one
            hard = torch.nn.functional.cross_entropy(logits[i].flatten(0, 1), codes.view(-1, 2)[:, i],
                                                     reduction="none")
            keep = torch.ones_like(hard, dtype=torch.bool) if m is None else m[..., i].reshape(-1)
            torch.testing.assert_close(ce[i].double(), hard[keep].sum(), rtol=1e-5, atol=1e-5)
            assert n[i] == (16 * 4 if m is None else m[..., i].sum())
        total.backward()
        torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
        for i in range(2):
            torch.testing.assert_close(model.heads[i].weight.grad.double(), W64[i].grad, rtol=1e-4, atol=1e-6)
        # the sum over groups is factorized_snce of the whole product model (ar: no mask)
        if mask is None:
            total = factorized_snce(logits, z, lfq_levels(6), (2, 4), 0.3, reduction="sum")
            full_model = factorized_snce([x.detach() for x in logits], z, lfq_levels(6), (2, 4), 0.3,
                                         reduction="sum")
            torch.testing.assert_close(sums.sum().double(), full_model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss,mode", [pytest.param("ce", "ar", marks=pytest.mark.slow), ("snce", "ar"),
                                       pytest.param("snce", "maskgit", marks=pytest.mark.slow)])
def test_train_and_resume_exactly(lfq_enc, tmp_path, loss, mode):
    """A few steps of training on sub-tokens: finite losses, and a resume at step 2 gives the same
    weights, optimizer state, EMA and log as the uninterrupted run."""
    kw = dict(loss=loss, max_iters=4, lr_decay_iters=4, eval_interval=2, ema_decay=0.9, mode=mode,
              **({"tau": 0.5} if loss == "snce" else {}))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_train(args(lfq_enc, full, **kw))
    run_train(args(lfq_enc, part, **{**kw, "max_iters": 2}))
    run_train(args(lfq_enc, part, **{**kw, "init_from": "resume"}))
    assert_same_run(full, part)
    log = read_log(full)
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
    evals = [r for r in log if "val_nll" in r]
    assert len(evals[0]["val_nll_levels"]) == 2 and all(np.isfinite(r["val_loss"]) for r in evals)
    # untrained: each sub-token's NLL near log K_g (4 and 16 codes)
    assert abs(evals[0]["val_nll_levels"][0] - np.log(4)) < 0.3
    assert abs(evals[0]["val_nll_levels"][1] - np.log(16)) < 0.3
    if mode == "ar" and loss == "snce":  # sample.py joins the sub-tokens into the tokenizer's codes
        run_script("sample.py", [f"--ckpt={full}/ckpt.pt", "--per_class=2", "--num_samples=6",
                                 "--batch_size=4", f"--out_dir={tmp_path / 's'}"])
        npz = [f for f in os.listdir(tmp_path / "s") if f.endswith(".npz")]
        assert len(npz) == 1 and np.load(tmp_path / "s" / npz[0])["arr_0"].shape == (6, 16, 16, 3)


def test_bad_token_groups_are_refused(lfq_enc, enc, tmp_path):
    """Groups that do not cover the code's dims, options that assume one K-way codebook, and a
    tokenizer with an explicit codebook each give a clear error before any training."""
    cases = [(args(lfq_enc, str(tmp_path / "a"), token_groups="2,3"), r"token_groups=\(2, 3\) for the tokenizer.s 6 dims: .*summing to 6"),
             (args(lfq_enc, str(tmp_path / "b"), loss="control"), "loss=control"),
             (args(lfq_enc, str(tmp_path / "c"), loss="snce", target_perplexity=10), "target_perplexity"),
             (args(lfq_enc, str(tmp_path / "d"), token_groups="2,x"), "token_groups"),
             (base_args(enc, str(tmp_path / "e"), token_groups="2,2"), "implicit-codebook tokenizer")]
    for argv, match in cases:
        with pytest.raises(ValueError, match=match):
            run_train(argv)


@pytest.mark.slow  # a 2-process torchrun job
def test_ddp_two_ranks_stay_identical(lfq_enc, tmp_path):
    """Under DDP (gloo) every head's gradient is all-reduced like the shared head's: the ranks
    end with the same weights (train.py compares them at the end of a DDP run)."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + args(lfq_enc, out, loss="snce", tau=0.5, mode="maskgit", max_iters=3,
                                                 eval_interval=100, gradient_accumulation_steps=2, batch_size=2)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "max |weight difference| between ranks = 0" in p.stdout, p.stdout[-2000:]
    assert [r["iter"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
