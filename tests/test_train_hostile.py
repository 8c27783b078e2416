"""Hostile inputs to train.py, support/train_tokenizer.py and sample.py: settings that would
train something other than what was asked (min_lr above the peak, validating on the training
split, resuming on other data), a diverging run (stops at its first non-finite loss, every rank,
its last checkpoint kept), NaN latents read in a batch, seeds out of range, the torchrun
accumulation hint, the DDP wrap before compile, and the parameter counts a config states.
No MNIST, no network."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist

from test_train import base_args, read_log, run_script, run_train, weights
from helpers import make_encoded, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import common  # noqa: E402


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def tok_args(root, out_dir, *extra):
    """A tiny train_tokenizer.py run on an image folder (tests/test_tokenizer.py's sizes)."""
    return ["--dataset=folder", f"--data_root={root}", "--image_size=16", "--channels=(8, 8, 8)",
            "--code_dim=4", "--levels=2", "--codebook_size=16", "--batch_size=4", "--eval_interval=3",
            "--log_interval=1", "--warmup_iters=0", "--restart_after=2", f"--out_dir={out_dir}", *extra]


def run_tokenizer(args):
    return run_script(os.path.join("support", "train_tokenizer.py"), args)


# ---- settings that silently train something else ----

def test_min_lr_above_learning_rate_is_an_error(enc, tmp_path):
    """The cosine decays from learning_rate to min_lr: a floor above the peak would make it rise."""
    with pytest.raises(ValueError, match=r"min_lr=0.01 > learning_rate=0.003"):
        run_train(base_args(enc, str(tmp_path / "g"), min_lr=1e-2))
    make_image_folder(tmp_path / "img")
    with pytest.raises(ValueError, match=r"min_lr=0.5 > learning_rate=0.002"):
        run_tokenizer(tok_args(tmp_path / "img", tmp_path / "t", "--min_lr=0.5"))
    assert not os.path.exists(tmp_path / "g" / "ckpt.pt") and not os.path.exists(tmp_path / "t" / "ckpt.pt")
    run_train(base_args(enc, str(tmp_path / "ok"), max_iters=0, min_lr=3e-3))  # equal: a constant lr


def test_validating_on_the_training_split_is_an_error(enc, tmp_path):
    """val_dir the same directory as data_dir (another spelling of it too), or a copy of it."""
    spelled = os.path.join(enc[0], "..", os.path.basename(enc[0]))
    copy = shutil.copytree(enc[0], str(tmp_path / "copy"))
    for val in (enc[0], spelled, copy):
        with pytest.raises(ValueError, match=r"holds the same encoded split as data_dir.*--val_dir"):
            run_train(base_args(enc, str(tmp_path / "g"), val_dir=val, tokenizer_ckpt=enc[2], max_iters=0))
    with pytest.raises(ValueError, match=r"train_split = val_split = 'train'"):
        run_train(base_args(enc, str(tmp_path / "g"), data_source="images", tokenizer_ckpt=enc[2],
                            val_split="train"))
    assert not os.path.exists(tmp_path / "g" / "ckpt.pt")


def test_resume_on_other_data_is_refused_a_moved_copy_is_not(enc, tmp_path):
    """The checkpoint records which images it was trained on (count, split, a hash of the labels),
    not where they were: another split is refused naming both, a moved copy resumes."""
    out = str(tmp_path / "r")
    run_train(base_args(enc, out, max_iters=1))
    assert weights(out)["data_id"]["n"] == 48
    with pytest.raises(ValueError, match=rf"incompatible with this run's data: it was trained on {re.escape(enc[0])} "
                                         rf"\(.* split 'train', n=48\), this run reads {re.escape(enc[1])} "
                                         r"\(.* split 'val', n=12\)"):
        run_train(base_args(enc, out, max_iters=2, data_dir=enc[1], val_dir=enc[0], init_from="resume"))
    moved = shutil.copytree(enc[0], str(tmp_path / "moved"))
    run_train(base_args(enc, out, max_iters=2, data_dir=moved, tokenizer_ckpt=enc[2], init_from="resume"))
    assert weights(out)["iter"] == 2
    relabeled = shutil.copytree(enc[0], str(tmp_path / "relabeled"))  # same count and split, other images
    y = np.load(os.path.join(relabeled, "labels.npy"), mmap_mode="r+")
    y[:] = y[::-1].copy()
    y.flush()
    del y
    with pytest.raises(ValueError, match=r"'labels_sha256'"):
        run_train(base_args(enc, out, max_iters=3, data_dir=relabeled, tokenizer_ckpt=enc[2], init_from="resume"))


# ---- a diverging run ----

def test_diverging_run_stops_at_the_first_non_finite_loss(enc, tmp_path):
    """lr 1e4: the run stops at the first step whose loss or gradient norm is not finite, names it
    and the last checkpoint, and leaves that checkpoint (finite weights) and the log as they were."""
    out = str(tmp_path / "d")
    with pytest.raises(FloatingPointError, match=r"step \d+: .*not finite") as e:
        run_train(base_args(enc, out, learning_rate=1e4, max_iters=40, eval_interval=2))
    found = re.search(r"step (\d+): .*the last checkpoint, (\S+) \(iter (\d+)\)", str(e.value))
    step, ck_path, ck_iter = found.groups()
    ck = weights(out)
    assert ck_path == os.path.join(out, "ckpt.pt") and ck["iter"] == int(ck_iter) == (int(step) - 1) // 2 * 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == int(step) - 1 and all(np.isfinite(losses))


def test_diverging_tokenizer_run_stops(tmp_path):
    make_image_folder(tmp_path / "img")
    out = tmp_path / "t"
    with pytest.raises(FloatingPointError, match=r"step \d+: .*not finite") as e:
        run_tokenizer(tok_args(tmp_path / "img", out, "--learning_rate=1e4", "--max_iters=30"))
    step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    if step > 3:  # a checkpoint was written at iter 3, 6, ...: named, and its weights finite
        ck = torch.load(out / "ckpt.pt", weights_only=True)
        assert f"{out / 'ckpt.pt'} (iter {ck['iter']})" in str(e.value) and ck["iter"] == (step - 1) // 3 * 3
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    else:
        assert "no checkpoint was written yet" in str(e.value)


@pytest.mark.slow  # a 2-process torchrun job
def test_diverging_ddp_run_stops_every_rank(enc, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + base_args(enc, out, learning_rate=1e4, max_iters=40, eval_interval=2,
                                                       gradient_accumulation_steps=2)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert p.returncode != 0 and len(re.findall(r"FloatingPointError: step \d+: .*not finite", text)) == 2, text[-3000:]
    assert all(torch.isfinite(v).all() for v in weights(out)["model"].values())


# ---- unhelpful messages ----

def test_seed_out_of_range_names_the_range(enc, tmp_path):
    want = r"'seed': expected an integer in \[0, 4294967295\]"
    for seed in (2**64, -1):
        with pytest.raises(ValueError, match=rf"{want} \(2\*\*32 - 1\), got {seed}"):
            run_train(base_args(enc, str(tmp_path / "g"), seed=seed))
    make_image_folder(tmp_path / "img")
    with pytest.raises(ValueError, match=want):
        run_tokenizer(tok_args(tmp_path / "img", tmp_path / "t", f"--seed={2**64}"))
    with pytest.raises(ValueError, match=want):
        run_script("sample.py", [f"--ckpt={tmp_path / 'none.pt'}", f"--seed={2**64}"])
    run_train(base_args(enc, str(tmp_path / "ok"), max_iters=0, seed=2**32 - 1))


def test_accumulation_not_a_multiple_of_the_world_size_says_what_to_pass(enc, tmp_path, monkeypatch):
    """As under `torchrun --nproc_per_node=4` (the error comes before any collective)."""
    monkeypatch.setattr(common, "init_distributed", lambda device: (True, 0, 0, 4, device))
    with pytest.raises(ValueError, match=r"multiple of the world size 4.*pass --gradient_accumulation_steps=8"):
        run_train(base_args(enc, str(tmp_path / "g"), gradient_accumulation_steps=5))


def test_ddp_wraps_before_compile(enc, tmp_path, monkeypatch):
    """torch.compile gets the DDP module (so the gradient all-reduce can overlap the backward),
    with gradient_as_bucket_view; one gloo rank in this process."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(dir=tmp_path), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    compiled = []
    monkeypatch.setattr(common, "init_distributed", lambda device: (True, 0, 0, 1, device))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    try:
        g = run_train(base_args(enc, str(tmp_path / "g"), max_iters=1, compile=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(compiled) == 1 and isinstance(compiled[0], DDP) and compiled[0].gradient_as_bucket_view
    assert compiled[0].module is g["raw_model"] and weights(str(tmp_path / "g"))["iter"] == 1


def test_ibqb_config_states_the_parameter_counts_of_model_py():
    """config/imagenet_ibqb.py's docstring: every parameter of GPT at K = 16,384 and 262,144
    (built on the meta device: no memory)."""
    from model import GPT, MODELS, GPTConfig
    text = open(os.path.join(ROOT, "config", "imagenet_ibqb.py")).read()
    stated = {int(k.replace(",", "")): float(m) for m, k in re.findall(r"([\d.]+)M with K = ([\d,]+)", text)}
    assert set(stated) == {16384, 262144}
    for K, millions in stated.items():
        with torch.device("meta"):
            m = GPT(GPTConfig(mode="ar", vocab_size=K, levels=1, grid_h=16, grid_w=16, num_classes=1000,
                              **MODELS["IBQ-B"]))
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions
