"""train.py's SNCE target setup on the tiny encoded dataset (helpers.py): the tau calibrated to
target_perplexity reaches it, the q statistics it prints / stores (ckpt.pt "q_info", the first
log.jsonl record) equal a dense float64 recomputation for calibrated, given and gap-scaled taus,
a resume reuses the stored taus (bit-exact) instead of recalibrating, and bad combinations are
clear errors.

    python -m pytest -q tests/test_train_snce_target.py
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as tk  # noqa: E402
from support.common import read_jsonl, save_checkpoint  # noqa: E402
from support.snce_target import sample_rows  # noqa: E402
from helpers import make_encoded  # noqa: E402
from test_train import assert_same_run, base_args, run_train, weights  # noqa: E402


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def naive_residuals(g, idx):
    """float64 residuals (n_img * h * w, L, D) of training images idx, by an explicit loop over
    levels: r_0 = z, r_{l+1} = r_l - C_l[t_l]."""
    books = tk.Tokenizer.from_checkpoint(g["tok_path"]).codebooks.double()  # (L, K, D)
    z = torch.from_numpy(np.asarray(g["latents_mm"][idx])).double()
    codes = torch.from_numpy(np.asarray(g["codes_mm"][idx]).astype(np.int64))
    L, D = books.shape[0], books.shape[2]
    out, r = [], z.reshape(-1, D)
    for l in range(L):
        out.append(r)
        r = r - books[l][codes[..., l].reshape(-1)]
    return torch.stack(out, 1), books


def naive_stats(res, book, tau):
    """Per-row q = softmax(-||r - c||^2 / tau) in float64 -> (mean perplexity, lower median
    perplexity, mean top-1 mass), the median as torch.median takes it (the lower middle)."""
    rows = []
    for r in res:
        q = torch.softmax(-((r - book) ** 2).sum(-1) / tau, 0)
        rows.append(((-(q * q.clamp_min(1e-300).log()).sum()).exp().item(), q.max().item()))
    ppl = sorted(p for p, _ in rows)
    return np.mean(ppl), ppl[(len(ppl) - 1) // 2], np.mean([m for _, m in rows])


def check_stats(info, res, books, taus):
    for l, st in enumerate(info["levels"]):
        mean, median, top1 = naive_stats(res[:, l], books[l], taus[l])
        assert st["perplexity_mean"] == pytest.approx(mean, rel=1e-5)
        assert st["perplexity_median"] == pytest.approx(median, rel=1e-5)
        assert st["top1_mass_mean"] == pytest.approx(top1, rel=1e-5)


@pytest.mark.parametrize("target", [3.0, 8.0])
def test_calibrated_tau_reaches_target_and_is_stored(enc, tmp_path, target):
    out = str(tmp_path / "o")
    g = run_train(base_args(enc, out, max_iters=0, target_perplexity=target))
    info, N = weights(out)["q_info"], g["N"]
    assert info["rows"] == N * 16  # 48 images x 16 tokens < 4096 rows: every training image
    res, books = naive_residuals(g, np.arange(N))
    assert len(info["taus"]) == 2 and info["taus"][0] != info["taus"][1]  # one tau per RQ level
    for l, t in enumerate(info["taus"]):
        assert naive_stats(res[:, l], books[l], t)[0] == pytest.approx(target, rel=2e-3)
    check_stats(info, res, books, info["taus"])
    assert g["taus"] == info["taus"]  # what the loss trains with
    first = read_jsonl(os.path.join(out, "log.jsonl"))[0]
    assert first == {"iter": 0, "snce_target": info}


@pytest.mark.parametrize("tau_scale", ["none", "gap"])
def test_given_tau_statistics(enc, tmp_path, tau_scale):
    g = run_train(base_args(enc, str(tmp_path / "o"), max_iters=0, tau=0.7, tau_scale=tau_scale))
    info = weights(str(tmp_path / "o"))["q_info"]
    res, books = naive_residuals(g, np.arange(g["N"]))
    taus = [0.7, 0.7]
    if tau_scale == "gap":  # tau x the lower median of d(2nd nearest) - d(nearest)
        taus = []
        for l in range(2):
            d = ((res[:, l, None] - books[l]) ** 2).sum(-1).sort(-1).values
            gaps = sorted((d[:, 1] - d[:, 0]).tolist())
            taus.append(0.7 * gaps[(len(gaps) - 1) // 2])
    assert info["taus"] == pytest.approx(taus, rel=1e-5)
    check_stats(info, res, books, info["taus"])


def test_fixed_sample_spreads_over_the_split(enc, tmp_path):
    g = run_train(base_args(enc, str(tmp_path / "o"), max_iters=0))
    rows = sample_rows(g["N"], 16, n_rows=150)  # ceil(150 / 16) = 10 images, evenly spaced over 48
    idx = [0, 5, 10, 16, 21, 26, 31, 37, 42, 47]
    assert rows.tolist() == idx
    got = g["get_batch"](g["codes_mm"], g["latents_mm"], g["labels_mm"], rows)[1].view(-1, 2, 4)
    torch.testing.assert_close(got.double(), naive_residuals(g, idx)[0], rtol=1e-5, atol=1e-6)
    assert sample_rows(48, 16).tolist() == list(range(48))  # 4096 rows > 48 x 16: every image


def test_softness_warnings(enc, tmp_path, capsys):
    run_train(base_args(enc, str(tmp_path / "a"), max_iters=0, tau=1e4))
    assert "q is nearly uniform" in capsys.readouterr().out
    run_train(base_args(enc, str(tmp_path / "b"), max_iters=0, tau=1e-4))
    assert "q is nearly one-hot" in capsys.readouterr().out
    run_train(base_args(enc, str(tmp_path / "c"), max_iters=0, target_perplexity=3))
    assert "nearly" not in capsys.readouterr().out


def test_resume_reuses_stored_taus(enc, tmp_path):
    kw = dict(target_perplexity=3.0, max_iters=4, lr_decay_iters=4, eval_interval=2, ema_decay=0.9)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_train(base_args(enc, full, **kw))
    run_train(base_args(enc, part, **{**kw, "max_iters": 2}))
    run_train(base_args(enc, part, **kw, init_from="resume"))
    assert_same_run(full, part)
    assert sum("snce_target" in r for r in read_jsonl(os.path.join(part, "log.jsonl"))) == 1
    # the stored taus are what a resume trains with, not a recalibration
    ck_path = os.path.join(part, "ckpt.pt")
    ck = torch.load(ck_path, weights_only=True)
    ck["q_info"]["taus"] = [2 * t for t in ck["q_info"]["taus"]]
    save_checkpoint(ck, ck_path)
    g = run_train(base_args(enc, part, **{**kw, "max_iters": 5}, init_from="resume"))
    assert g["taus"] == ck["q_info"]["taus"]
    # a changed target is recalibrated, and logged at the iteration it starts from
    g = run_train(base_args(enc, part, **{**kw, "max_iters": 6, "target_perplexity": 6.0}, init_from="resume"))
    recs = [r for r in read_jsonl(os.path.join(part, "log.jsonl")) if "snce_target" in r]
    assert [r["iter"] for r in recs] == [0, 5] and recs[1]["snce_target"]["taus"] == g["taus"]
    assert g["taus"][0] > recs[0]["snce_target"]["taus"][0]  # softer target, larger tau


def test_bad_target_settings(enc, tmp_path):
    out = str(tmp_path / "o")
    for match, kw in ((r"target_perplexity=16.0: expected a value below K=16", dict(target_perplexity=16)),
                      (r"target_perplexity=1.0: expected 0 \(use tau\) or a value > 1", dict(target_perplexity=1.0)),
                      (r"tau=0.5 and target_perplexity=4.0: give one", dict(tau=0.5, target_perplexity=4.0)),
                      (r"tau=1.0 and target_perplexity=4.0: give one", dict(tau=1.0, target_perplexity=4.0)),
                      (r"tau_scale='gap' scales a given tau", dict(target_perplexity=4.0, tau_scale="gap")),
                      (r"tau=0.0: loss=snce needs a temperature tau > 0.*hard labels .* are --loss=ce", dict(tau=0.0)),
                      (r"'target_perplexity': expected a value in \[0, inf\)", dict(target_perplexity=-1.0))):
        with pytest.raises(ValueError, match=match):
            run_train(base_args(enc, out, max_iters=0, **kw))
        assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def test_resume_of_a_checkpoint_from_before_target_perplexity_was_a_switch(enc, tmp_path):
    """Checkpoints without a stored target setting meant "calibrate" by tau = 0: resuming one with
    the same perplexity reuses its taus, resuming one with a given tau and the old default
    target_perplexity = 25 (then unused) reuses them too."""
    for old_config, now in ((dict(tau=0.0, target_perplexity=3.0), dict(target_perplexity=3.0)),
                            (dict(tau=0.7, target_perplexity=25.0), dict(tau=0.7))):
        out = str(tmp_path / str(now))
        run_train(base_args(enc, out, max_iters=1, **now))
        ck_path = os.path.join(out, "ckpt.pt")
        ck = torch.load(ck_path, weights_only=True)
        del ck["target_setting"]
        ck["config"].update(old_config)
        ck["q_info"]["taus"] = [2 * t for t in ck["q_info"]["taus"]]  # reused, not recomputed
        save_checkpoint(ck, ck_path)
        g = run_train(base_args(enc, out, max_iters=2, init_from="resume", **now))
        assert g["taus"] == ck["q_info"]["taus"] and not g["q_fresh"]


def test_control_objective_same_softness_other_codes_exact_resume(enc, tmp_path):
    """loss=control: the same taus and q statistics as loss=snce at one setting and the same
    model at iter 0 (so the same val NLL), other targets from the first step on (its training
    objective differs), and a resume replays its random codes exactly."""
    kw = dict(target_perplexity=3.0, max_iters=4, lr_decay_iters=4, eval_interval=2, ema_decay=0.9)
    snce, full, part = (str(tmp_path / n) for n in ("snce", "full", "part"))
    run_train(base_args(enc, snce, loss="snce", **kw))
    run_train(base_args(enc, full, loss="control", **kw))
    ls, lc = (read_jsonl(os.path.join(d, "log.jsonl")) for d in (snce, full))
    assert [r for r in ls if "snce_target" in r] == [r for r in lc if "snce_target" in r]
    ev_s, ev_c = ([r for r in recs if "val_nll" in r] for recs in (ls, lc))
    assert ev_s[0]["val_nll"] == ev_c[0]["val_nll"] and ev_s[0]["val_loss"] != ev_c[0]["val_loss"]
    tr_s, tr_c = ([r["loss"] for r in recs if "loss" in r and "val_nll" not in r] for recs in (ls, lc))
    assert len(tr_c) == 4 and all(map(math.isfinite, tr_c)) and tr_s[0] != tr_c[0]
    run_train(base_args(enc, part, loss="control", **{**kw, "max_iters": 2}))
    run_train(base_args(enc, part, loss="control", **kw, init_from="resume"))
    assert_same_run(full, part)


def test_control_objective_maskgit(enc, tmp_path):
    out = str(tmp_path / "mg")
    run_train(base_args(enc, out, loss="control", mode="maskgit", target_perplexity=3.0, max_iters=2))
    recs = read_jsonl(os.path.join(out, "log.jsonl"))
    assert all(math.isfinite(r["val_loss"]) for r in recs if "val_loss" in r)
