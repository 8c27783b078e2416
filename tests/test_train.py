"""train.py tests on a tiny generated encoded dataset (written by encode.py, see helpers.py):
the per-level fused training loss vs a naive float64 reference, 2-rank gloo DDP keeps ranks
identical, exact resume for every objective x mode (also across kill -9 during checkpoint and
log writes), the run-directory rules, and clear errors / warnings for bad or ignored inputs.
No MNIST, no network."""

import argparse
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from support.common import fingerprint, portable_path, read_jsonl, save_checkpoint  # noqa: E402
from helpers import NUM_CLASSES, make_encoded  # noqa: E402

TIMING = ("tok_per_s", "peak_mem_gb", "ms_per_iter", "ms_data", "ms_forward", "ms_loss", "ms_backward",
          "ms_optimizer", "sample_seconds")


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def _copy_encoded(src, dst, codes=None, labels=None, meta_update=None):
    """A copy of an encoded split, optionally with edited codes / labels / meta.json keys."""
    os.makedirs(dst)
    meta, c, z, y = data.load_encoded(src)
    np.save(os.path.join(dst, "codes.npy"), np.asarray(c) if codes is None else codes(np.array(c)))
    np.save(os.path.join(dst, "latents.npy"), np.asarray(z))
    np.save(os.path.join(dst, "labels.npy"), np.asarray(y) if labels is None else labels(np.array(y)))
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump({**meta, **(meta_update or {})}, f)
    return dst


def with_identity(enc, root, tok_ckpt=None):
    """enc's splits copied with the meta keys encode.py writes: the tokenizer's content
    fingerprint, its path relative to the split, and the class list. -> (train, val, tok)."""
    tok_ckpt = tok_ckpt or enc[2]
    fp = fingerprint(tk.Tokenizer.from_checkpoint(tok_ckpt).state_dict())
    dirs = []
    for src, name in ((enc[0], "train"), (enc[1], "val")):
        d = os.path.join(root, name)
        dirs.append(_copy_encoded(src, d, meta_update={"tokenizer_fingerprint": fp, "classes": [0, 1, 2],
                                                       "tokenizer_ckpt": portable_path(tok_ckpt, d)}))
    return dirs[0], dirs[1], tok_ckpt


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


def read_log(out_dir, timing=False):
    """log.jsonl records; without the wall-clock fields unless timing (they differ run to run)."""
    recs = read_jsonl(os.path.join(out_dir, "log.jsonl"))
    return recs if timing else [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def weights(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)


def assert_same_run(a, b):
    """Two run dirs hold the same final checkpoint (model, optimizer, EMA) and the same log."""
    assert read_log(a) == read_log(b)
    ca, cb = weights(a), weights(b)
    assert ca["iter"] == cb["iter"]
    for key in ("model", "ema"):
        for (k, x), y in zip(ca[key].items(), cb[key].values()):
            assert torch.equal(x, y), (key, k)
    for x, y in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)


# ---- the loss ----

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
    assert ev["grid"] == "samples_000000.png" and os.path.isfile(tmp_path / ev["grid"])
    assert weights(str(tmp_path))["iter"] == 0  # iteration 0 is checkpointed: a killed run resumes


def test_step_time_split_is_logged(enc, tmp_path):
    """Each step's phases are disjoint laps of one clock: they sum to at most the step's wall time."""
    run_train(base_args(enc, str(tmp_path), max_iters=3, eval_interval=100))
    steps = [r for r in read_log(str(tmp_path), timing=True) if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3]
    for r in steps:
        split = [r[f"ms_{k}"] for k in ("data", "forward", "loss", "backward", "optimizer")]
        assert min(split) >= 0 and r["ms_forward"] > 0 and r["ms_backward"] > 0
        assert sum(split) <= r["ms_per_iter"] * 1.01 + 0.5


# ---- DDP ----

def test_ddp_two_ranks_stay_identical(enc, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + base_args(enc, out, max_iters=3, eval_interval=100,
                                                       gradient_accumulation_steps=4, ema_decay=0.5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "max |weight difference| between ranks = 0" in p.stdout, p.stdout[-2000:]
    log = read_log(out)
    assert [r["iter"] for r in log if "loss" in r] == [1, 2, 3]
    assert [r["iter"] for r in log if "val_nll" in r] == [0, 3]
    assert weights(out)["iter"] == 3 and weights(out)["world_size"] == 2


# ---- resume ----

@pytest.mark.parametrize("mode", ["ar", "maskgit"])
@pytest.mark.parametrize("loss", ["ce", "snce", "ls"])
def test_resume_is_exact(enc, tmp_path, loss, mode):
    kw = dict(mode=mode, loss=loss, max_iters=6, lr_decay_iters=6, eval_interval=3, ema_decay=0.9, dropout=0.1,
              gradient_accumulation_steps=2)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_train(base_args(enc, full, **kw))
    run_train(base_args(enc, part, **{**kw, "max_iters": 3}))
    assert weights(part)["iter"] == 3
    run_train(base_args(enc, part, **kw, init_from="resume"))
    assert_same_run(full, part)
    assert [r["iter"] for r in read_log(part) if "val_nll" in r] == [0, 3, 6]


def test_resume_rules(enc, tmp_path, capsys):
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=2, ema_decay=0.5))
    log = read_log(out)
    # a finished run resumed again adds nothing (no duplicate final eval)
    run_train(base_args(enc, out, max_iters=2, ema_decay=0.5, init_from="resume"))
    assert read_log(out) == log
    # a kill mid-append leaves a partial last line: resume drops it (with a warning) and goes on
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"iter": 3, "lo')
    capsys.readouterr()
    run_train(base_args(enc, out, max_iters=2, ema_decay=0.5, init_from="resume"))
    assert "partial last line" in capsys.readouterr().out
    assert open(os.path.join(out, "log.jsonl")).read().endswith("}\n") and read_log(out) == log
    # the cosine length is stored: a resume without lr_decay_iters keeps it, a different one warns
    assert weights(out)["lr_decay_iters"] == 2
    g = run_train(base_args(enc, out, max_iters=4, ema_decay=0.5, init_from="resume"))
    assert g["decay_iters"] == 2 and "schedule of" in capsys.readouterr().out
    assert [r["lr"] for r in read_log(out) if "lr" in r][2:] == [1e-4] * 2  # min_lr after it
    run_train(base_args(enc, out, max_iters=5, ema_decay=0.5, lr_decay_iters=8, init_from="resume"))
    assert "changes the run's cosine schedule" in capsys.readouterr().out
    # changed seed / loss: a note; ar with another mask_schedule: accepted (ar never masks)
    run_train(base_args(enc, out, max_iters=6, ema_decay=0.5, seed=7, loss="ce", mask_schedule="arccos",
                        init_from="resume"))
    printed = capsys.readouterr().out
    assert "resuming with changed settings" in printed and "'seed': (1337, 7)" in printed
    assert "'loss': ('snce', 'ce')" in printed
    assert weights(out)["model_args"]["mask_schedule"] == "cosine"


def test_resume_of_an_older_checkpoint(enc, tmp_path, capsys):
    """Checkpoints written before the stored schedule / fingerprint / data_id still resume: the
    data is compared on the meta keys they have, the cosine length is rebuilt from their config."""
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=1, lr_decay_iters=3))
    ck = weights(out)
    for key in ("data_id", "tokenizer_fingerprint", "lr_decay_iters"):
        del ck[key]
    ck["tokenizer_ckpt"] = os.path.abspath(enc[2])
    save_checkpoint(ck, os.path.join(out, "ckpt.pt"))
    g = run_train(base_args(enc, out, max_iters=2, init_from="resume"))
    assert g["decay_iters"] == 3 and weights(out)["data_id"]["tokenizer_fingerprint"] == g["tok_fp"]


def test_resume_refuses_incompatible(enc, tmp_path):
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=1, mode="maskgit"))
    with pytest.raises(ValueError, match=r"incompatible with this config.*n_layer"):
        run_train(base_args(enc, out, max_iters=2, mode="maskgit", init_from="resume", model_size="mini"))
    with pytest.raises(ValueError, match=r"incompatible.*mask_schedule"):  # maskgit does use it
        run_train(base_args(enc, out, max_iters=2, mode="maskgit", init_from="resume", mask_schedule="arccos"))
    with pytest.raises(ValueError, match="has no EMA"):
        run_train(base_args(enc, out, max_iters=2, mode="maskgit", init_from="resume", ema_decay=0.5))


def test_scratch_refuses_a_used_out_dir(enc, tmp_path):
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=0))
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("ckpt.pt", "log.jsonl")}
    with pytest.raises(FileExistsError, match="already holds a run.*--init_from=resume"):
        run_train(base_args(enc, out, max_iters=0))
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    os.remove(os.path.join(out, "ckpt.pt"))  # a log alone is a run too
    with pytest.raises(FileExistsError, match="log.jsonl"):
        run_train(base_args(enc, out, max_iters=0))


def test_stale_tmp_files_are_removed(enc, tmp_path):
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=0))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(out, f"ckpt.pt.tmp.{dead.pid}")
    open(stale, "wb").write(b"half a checkpoint")
    run_train(base_args(enc, out, max_iters=0, init_from="resume"))
    assert not os.path.exists(stale)


def test_moved_run_dir_resumes(enc, tmp_path):
    """Paths are stored relative to the run / encode dirs: move everything, resume, same result."""
    a = str(tmp_path / "a")
    os.makedirs(a)
    tr, va, tok = with_identity(enc, a, tok_ckpt=shutil.copy(enc[2], os.path.join(a, "tok.pt")))
    run_train(base_args((tr, va, tok), os.path.join(a, "run"), max_iters=2))
    ck = weights(os.path.join(a, "run"))
    assert ck["tokenizer_ckpt"] == os.path.join("..", "tok.pt") and len(ck["tokenizer_fingerprint"]) == 16
    b = str(tmp_path / "b")
    shutil.move(a, b)
    run_train(base_args((os.path.join(b, "train"), os.path.join(b, "val"), None), os.path.join(b, "run"),
                        max_iters=4, init_from="resume"))
    assert weights(os.path.join(b, "run"))["iter"] == 4


# ---- kill -9 during checkpoint / log writes ----

def _kill_loop(enc, tmp_path, kills, max_iters):
    """Train to max_iters while killing the process (SIGKILL) `kills` times at random moments
    after it has started writing, resuming after each kill; then compare bit for bit with an
    uninterrupted run. eval_interval=1: a checkpoint and log records at every step; a round
    makes a step or two, so max_iters >= 3 x kills leaves room for every kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = dict(max_iters=max_iters, eval_interval=1, ema_decay=0.9, mode="maskgit", grid_per_class=1)

    def start(out, init):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")]
                                + base_args(enc, out, **kw, init_from=init), cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    p = start(ref, "scratch")
    assert p.wait(timeout=300) == 0, p.stdout.read()[-3000:]
    rng, killed, init = random.Random(0), 0, "scratch"
    log = os.path.join(out, "log.jsonl")
    while True:
        size = os.path.getsize(log) if os.path.exists(log) else 0
        p = start(out, init)
        if killed < kills:
            while p.poll() is None and (not os.path.exists(log) or os.path.getsize(log) <= size):
                time.sleep(0.01)  # wait until this run has written something new
            time.sleep(rng.uniform(0, 0.1))  # then kill it somewhere in its next writes
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                killed += 1
        rc = p.wait(timeout=300)
        assert rc in (0, -signal.SIGKILL), p.stdout.read()[-3000:]
        assert os.path.isfile(os.path.join(out, "ckpt.pt"))  # written before anything else
        init = "resume"
        if rc == 0:
            break
    assert killed == kills
    assert_same_run(ref, out)
    assert not [f for f in os.listdir(out) if ".tmp." in f]


def test_kill_during_writes_then_resume_is_exact(enc, tmp_path):
    _kill_loop(enc, tmp_path, kills=2, max_iters=6)


@pytest.mark.slow
def test_kill_during_writes_many_times(enc, tmp_path):
    _kill_loop(enc, tmp_path, kills=15, max_iters=45)


# ---- bad inputs ----

def test_bad_inputs_give_clear_errors(enc, tmp_path):
    out = str(tmp_path / "o")

    def bad(match, exc=ValueError, **kw):
        with pytest.raises(exc, match=match):
            run_train(base_args(enc, out, **{"max_iters": 0, **kw}))
        assert not os.path.exists(os.path.join(out, "ckpt.pt"))

    def set_code(c):
        c[0, 0, 0, 0] = 16
        return c

    def set_label(y):
        y[1] = NUM_CLASSES
        return y

    bad(r"c/codes.npy: expected codes in \[0, 16\), row 0 holds \[16\]",  # data.load_encoded's checks
        data_dir=_copy_encoded(enc[0], str(tmp_path / "c"), codes=set_code))
    bad(r"y/labels.npy: expected labels in \[0, 3\), row 1 holds \[3\]",
        data_dir=_copy_encoded(enc[0], str(tmp_path / "y"), labels=set_label))
    bad("missing meta.json", FileNotFoundError, data_dir=str(tmp_path))
    bad("inconsistent with meta.json",
        data_dir=_copy_encoded(enc[0], str(tmp_path / "m"), meta_update={"codes_shape": [1, 4, 4, 2]}))
    bad(r"encoded differently.*'tokenizer'", val_dir=_copy_encoded(  # by another tokenizer (either meta form)
        enc[1], str(tmp_path / "v"), meta_update={"tokenizer_iter": 9, "tokenizer_fingerprint": "0" * 16}))
    bad("unknown config key 'learning_rat'", learning_rat=1e-3)
    bad(r"'loss': expected one of \('ce', 'snce', 'ls', 'control'\), got 'mse'", loss="mse")
    bad(r"grid_classes: expected class ids in \[0, 3\)", grid_classes=(0, 3))
    bad(r"48 training items are too few for batch_size=64", batch_size=64)
    for key, value, rng in (("gradient_accumulation_steps", 0, r"\[1, inf\)"), ("batch_size", -4, r"\[1, inf\)"),
                            ("batch_size", 0, r"\[1, inf\)"), ("eval_interval", 0, r"\[1, inf\)"),
                            ("log_interval", 0, r"\[1, inf\)"), ("grid_per_class", 0, r"\[1, inf\)"),
                            ("ema_decay", 1.0, r"\[0, 1\)"), ("ema_decay", -0.1, r"\[0, 1\)"),
                            ("weight_decay", -0.01, r"\[0, inf\)"), ("max_iters", -1, r"\[0, inf\)"),
                            ("tau", -0.5, r"\[0, inf\)"), ("label_smoothing", 1.0, r"\[0, 1\)")):
        bad(f"'{key}': expected a value in {rng}, got {value}", **{key: value})
    bad("no checkpoint at", FileNotFoundError, init_from="resume")


def test_checkpoints_refused_unless_plain(enc, tmp_path):
    """Pickled objects (loading could run code), truncated and empty files: clear errors at resume
    and for the tokenizer checkpoint."""
    out = str(tmp_path / "o")
    run_train(base_args(enc, out, max_iters=1))
    ck = os.path.join(out, "ckpt.pt")
    good = open(ck, "rb").read()
    torch.save({"model": argparse.Namespace(x=1), "iter": 1}, ck)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        run_train(base_args(enc, out, max_iters=2, init_from="resume"))
    open(ck, "wb").write(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        run_train(base_args(enc, out, max_iters=2, init_from="resume"))
    open(ck, "wb").close()
    with pytest.raises(ValueError, match="is empty"):
        run_train(base_args(enc, out, max_iters=2, init_from="resume"))
    pickled = str(tmp_path / "tok_pickled.pt")
    torch.save({**torch.load(enc[2], weights_only=True), "extra": argparse.Namespace(x=1)}, pickled)
    with pytest.raises(ValueError, match=f"{pickled}.*refuses to unpickle"):
        run_train(base_args(enc, str(tmp_path / "o2"), max_iters=0, tokenizer_ckpt=pickled))


def test_tokenizer_and_split_identity(enc, tmp_path):
    """The tokenizer is identified by content: the same weights saved elsewhere (or at another
    iteration) are accepted, other weights are refused; so are splits from different tokenizers
    or class lists, and a tokenizer whose K / L / D does not fit the data."""
    root = str(tmp_path)
    tr, va, tok = with_identity(enc, root)
    same = os.path.join(root, "same.pt")
    save_checkpoint({**torch.load(tok, weights_only=True), "iter": 99}, same)
    run_train(base_args((tr, va, tok), os.path.join(root, "ok"), max_iters=0, tokenizer_ckpt=same))

    other = os.path.join(root, "other.pt")
    ck = torch.load(tok, weights_only=True)
    ck["model"] = {k: v + 0.01 if k.startswith("decoder") and v.is_floating_point() else v
                   for k, v in ck["model"].items()}  # same codebooks (codes reproduce), other decoder
    save_checkpoint(ck, other)
    with pytest.raises(ValueError, match=f"tokenizer {other} is not the one {tr}/meta.json was encoded with"):
        run_train(base_args((tr, va, tok), os.path.join(root, "o1"), max_iters=0, tokenizer_ckpt=other))

    va2 = _copy_encoded(va, os.path.join(root, "va2"), meta_update={"tokenizer_fingerprint": "0" * 16})
    with pytest.raises(ValueError, match=r"encoded differently.*'tokenizer'"):
        run_train(base_args((tr, va2, tok), os.path.join(root, "o2"), max_iters=0))
    va3 = _copy_encoded(va, os.path.join(root, "va3"), meta_update={"classes": [0, 2, 1]})
    with pytest.raises(ValueError, match=r"encoded differently.*'classes': \(\[0, 1, 2\], \[0, 2, 1\]\)"):
        run_train(base_args((tr, va3, tok), os.path.join(root, "o3"), max_iters=0, loss="ce"))

    torch.manual_seed(1)
    cfg = tk.TokenizerConfig(in_channels=1, image_size=8, channels=(8, 8), downsample=2,
                             num_res_blocks=1, code_dim=4, levels=2, codebook_size=32)
    big = os.path.join(root, "k32.pt")
    save_checkpoint({"model": tk.Tokenizer(cfg).state_dict(), "model_config": asdict(cfg), "iter": 1,
                     "config": {"dataset": "synthetic", "data_root": ""}}, big)
    with pytest.raises(ValueError, match=rf"tokenizer {big} \(K=32 L=2 D=4 grid 4\) does not fit the data {tr}/meta.json \(K=16"):
        run_train(base_args((tr, va, tok), os.path.join(root, "o4"), max_iters=0, tokenizer_ckpt=big))


def test_ignored_options_warn(enc, tmp_path, capsys):
    def printed(**kw):
        run_train(base_args(enc, str(tmp_path / f"o{len(os.listdir(tmp_path))}"), max_iters=0, **kw))
        return capsys.readouterr().out

    out = printed(loss="ce", tau=0.5, tau_scale="gap", metric="cos", label_smoothing=0.3)
    assert "tau=0.5, tau_scale='gap', metric='cos', label_smoothing=0.3 ignored: loss=ce" in out
    assert "label_smoothing=0.3 ignored: loss=snce" in printed(loss="snce", label_smoothing=0.3)
    assert "tau=0.5 ignored: loss=ls" in printed(loss="ls", tau=0.5)
    assert "mask_schedule='arccos', grid_steps=4 ignored: mode=ar" in printed(mask_schedule="arccos", grid_steps=4)
    assert "ignored:" not in printed(mode="maskgit", mask_schedule="arccos", tau=0.5)


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


def test_check_tokenizer_fits_shapes_fingerprint_and_older_files(enc, capsys):
    """The one tokenizer check of train.py and sample.py: shapes first (D only where recorded),
    then the content fingerprint; a source without one is checked on shapes, with a warning."""
    from support.checks import check_tokenizer_fits
    tok = tk.Tokenizer.from_checkpoint(enc[2])  # K=16 L=2 D=4, 4x4 grid
    fp = fingerprint(tok.state_dict())
    want = {"K": 16, "L": 2, "grid": (4, 4)}
    assert check_tokenizer_fits(tok, "t.pt", "trained", "g.pt", want, fp, "fix") == fp
    assert check_tokenizer_fits(tok, "t.pt", "encoded", "m.json", {**want, "D": 4}, fp, "fix") == fp
    assert "warning" not in capsys.readouterr().out
    assert check_tokenizer_fits(tok, "t.pt", "trained", "g.pt", want, None, "fix") == fp
    assert "g.pt predates tokenizer fingerprints: only the shapes of t.pt were checked" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"tokenizer t.pt \(K=16 L=2 D=4 grid 4\) does not fit the data "
                                         r"m.json \(K=16 L=2 D=8 grid 4x4\): fix"):
        check_tokenizer_fits(tok, "t.pt", "encoded", "m.json", {**want, "D": 8}, fp, "fix")
    with pytest.raises(ValueError, match=r"does not fit the generator g.pt \(K=16 L=2 grid 4x2\)"):
        check_tokenizer_fits(tok, "t.pt", "trained", "g.pt", {**want, "grid": (4, 2)}, fp, "fix")
    with pytest.raises(ValueError, match=r"tokenizer t.pt is not the one g.pt was trained with \(fingerprint "
                                         rf"{fp}, expected 0+\): fix"):
        check_tokenizer_fits(tok, "t.pt", "trained", "g.pt", want, "0" * 16, "fix")
