"""train.py tests on a tiny generated encoded dataset (written by encode.py, see helpers.py):
the per-level fused training loss vs a naive float64 reference, 2-rank gloo DDP keeps ranks
identical, exact resume, and clear errors for bad inputs. No MNIST, no network."""

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from common import save_checkpoint  # noqa: E402
from helpers import NUM_CLASSES, make_encoded  # noqa: E402

@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def base_args(enc, out_dir, **kw):
    args = dict(data_dir=enc[0], val_dir=enc[1], out_dir=out_dir, model_size="tiny", batch_size=8,
                max_iters=4, eval_interval=2, warmup_iters=1, learning_rate=3e-3, grid_per_class=2,
                log_interval=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def run_script(name, args, run_name="__main__"):
    """Run a top-level script in this process (no torch import per run); -> its globals."""
    argv = sys.argv
    sys.argv = [name] + args
    try:
        return runpy.run_path(os.path.join(ROOT, name), run_name=run_name)
    finally:
        sys.argv = argv


def run_train(args):
    return run_script("train.py", args, run_name="train_test")


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.mark.parametrize("mode", ["ar", "maskgit"])
@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_training_loss_matches_dense_reference(enc, tmp_path, mode, metric):
    g = run_train(base_args(enc, str(tmp_path), max_iters=0, mode=mode, metric=metric, tau=0.7))
    model, L = g["raw_model"], g["L"]
    books = tk.Tokenizer.from_checkpoint(enc[2]).codebooks.double()  # (L, K, D)
    idx = np.arange(5)
    codes, res, labels = g["get_batch"](g["codes_mm"], g["latents_mm"], g["labels_mm"], idx)
    mask = model.sample_mask(5) if mode == "maskgit" else None
    hidden = model(codes, labels, mask, return_hidden=True).detach().requires_grad_()
    sums, n = g["level_losses"](hidden, codes, res, mask)
    fused = sums.sum() / n.sum()
    fused.backward()
    # naive float64: residuals by explicit loops over levels, dense q, dense log-softmax
    z = torch.from_numpy(np.asarray(g["latents_mm"][idx])).double()  # (B, h, w, D)
    c = codes.long()                                                 # (B, h, w, L)
    W = model.head.weight.detach().double().requires_grad_()
    h64 = hidden.detach().double().requires_grad_()
    total, count, r = 0.0, 0, z.clone()
    for l in range(L):
        d = ((r[..., None, :] - books[l]) ** 2).sum(-1) if metric == "l2" else -(r @ books[l].T)
        q = torch.softmax(-d / 0.7, -1)                              # (B, h, w, K), Eq. 5
        logp = torch.log_softmax(h64.view(5, 4, 4, L, -1)[..., l, :] @ W.T, -1)
        rows = -(q * logp).sum(-1)                                   # Eq. 8
        m = torch.ones_like(rows, dtype=torch.bool) if mask is None else mask.view(5, 4, 4, L)[..., l]
        total, count = total + rows[m].sum(), count + int(m.sum())
        r = r - books[l][c[..., l]]                                  # next level's residual
    ref = total / count
    ref.backward()
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model.head.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-7)


def test_hard_losses_and_eval_nll(enc, tmp_path):
    """ce / ls go through the same per-level path: compare with F.cross_entropy (+ smoothing)."""
    g = run_train(base_args(enc, str(tmp_path), max_iters=0, loss="ls", label_smoothing=0.2))
    model = g["raw_model"]
    codes, _, labels = g["get_batch"](g["codes_mm"], g["latents_mm"], g["labels_mm"], np.arange(6))
    hidden = model(codes, labels, return_hidden=True)
    logits = model.head(hidden).flatten(0, 1)
    for kind, eps in (("ce", 0.0), ("ls", 0.2)):
        sums, n = g["level_losses"](hidden, codes, None, None, kind=kind)
        ref = torch.nn.functional.cross_entropy(logits, codes.reshape(-1), label_smoothing=eps)
        torch.testing.assert_close(sums.sum() / n.sum(), ref, rtol=1e-5, atol=1e-6)
    ev = read_log(str(tmp_path))[0]
    assert ev["iter"] == 0 and abs(ev["val_nll"] - np.log(16)) < 0.3 and len(ev["val_nll_levels"]) == 2
    assert os.path.isfile(ev["grid"])


def test_ddp_two_ranks_stay_identical(enc, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + base_args(enc, out, max_iters=3, eval_interval=100,
                                                       gradient_accumulation_steps=4, ema_decay=0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    open("/tmp/ddp_err.txt", "w").write(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "max |weight difference| between ranks = 0" in p.stdout, p.stdout[-2000:]
    log = read_log(out)
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]
    assert os.path.isfile(os.path.join(out, "ckpt.pt"))


def test_resume_is_exact(enc, tmp_path):
    kw = dict(mode="maskgit", max_iters=6, lr_decay_iters=6, eval_interval=3, ema_decay=0.9,
              dropout=0.1, gradient_accumulation_steps=2)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    g_full = run_train(base_args(enc, full, **kw))
    run_train(base_args(enc, part, **{**kw, "max_iters": 3}))
    g_part = run_train(base_args(enc, part, **kw, init_from="resume"))
    a, b = read_log(full), read_log(part)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]  # resume trimmed nothing twice
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
    assert [r.get("val_nll") for r in a] == [r.get("val_nll") for r in b]
    for m in ("raw_model", "ema"):
        for x, y in zip(g_full[m].state_dict().values(), g_part[m].state_dict().values()):
            assert torch.equal(x, y)
    ck = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert ck["iter"] == 6 and ck["config"]["mode"] == "maskgit" and ck["model_args"]["levels"] == 2


def _copy_encoded(src, dst, codes=None, labels=None, meta_update=None):
    os.makedirs(dst)
    meta, c, z, y = data.load_encoded(src)
    np.save(os.path.join(dst, "codes.npy"), np.asarray(c) if codes is None else codes(np.array(c)))
    np.save(os.path.join(dst, "latents.npy"), np.asarray(z))
    np.save(os.path.join(dst, "labels.npy"), np.asarray(y) if labels is None else labels(np.array(y)))
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump({**meta, **(meta_update or {})}, f)
    return dst


def test_bad_inputs_give_clear_errors(enc, tmp_path):
    out = str(tmp_path / "o")

    def bad(match, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            run_train(base_args(enc, out, max_iters=0, **kw))

    def set_code(c):
        c[0, 0, 0, 0] = 16
        return c

    def set_label(y):
        y[1] = NUM_CLASSES
        return y

    bad(r"expected codes in \[0, 16\).*max code 16",
        data_dir=_copy_encoded(enc[0], str(tmp_path / "c"), codes=set_code))
    bad(r"labels in \[0, 3\).*labels in \[0, 3\]",
        data_dir=_copy_encoded(enc[0], str(tmp_path / "y"), labels=set_label))
    bad("missing meta.json", FileNotFoundError, data_dir=str(tmp_path))
    bad("inconsistent with meta.json",
        data_dir=_copy_encoded(enc[0], str(tmp_path / "m"), meta_update={"codes_shape": [1, 4, 4, 2]}))
    bad("encoded differently",
        val_dir=_copy_encoded(enc[1], str(tmp_path / "v"), meta_update={"tokenizer_iter": 9}))
    bad("unknown config key 'learning_rat'", learning_rat=1e-3)
    bad("loss must be one of", loss="mse")
    bad("no checkpoint at", FileNotFoundError, init_from="resume")
    run_train(base_args(enc, out, max_iters=1))
    bad(r"incompatible with this config.*n_layer", init_from="resume", model_size="mini")
    bad("is at iter 4 but .* encoded at iter 3", tokenizer_ckpt=_retag_tokenizer(enc[2], str(tmp_path / "t.pt")))


def _retag_tokenizer(src, dst):
    ck = torch.load(src, weights_only=True)
    save_checkpoint({**ck, "iter": 3 + 1}, dst)
    ck2 = torch.load(dst, weights_only=True)
    assert ck2["iter"] == 4
    return dst


def test_gap_scaled_taus_vs_naive(enc, tmp_path):
    g = run_train(base_args(enc, str(tmp_path), max_iters=0, tau=2.0, tau_scale="gap"))
    books = tk.Tokenizer.from_checkpoint(enc[2]).codebooks.double()
    z = torch.from_numpy(np.asarray(g["latents_mm"][:])).double().reshape(-1, 4)
    c = torch.from_numpy(np.asarray(g["codes_mm"][:]).astype(np.int64)).reshape(-1, 2)
    r0 = z
    r1 = z - books[0][c[:, 0]]
    for l, r in enumerate((r0, r1)):
        d = ((r[:, None] - books[l]) ** 2).sum(-1).sort(-1).values
        assert g["taus"][l] == pytest.approx(2.0 * (d[:, 1] - d[:, 0]).median().item(), rel=1e-4)
