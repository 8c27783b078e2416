"""The whole path with pretrained tokenizers, on the CPU: a tiny random-weight IBQ (dot metric,
Lightning .ckpt with its EMA copy) and LlamaGen VQ (cos metric, {"model", "ema"}) saved in their
upstream containers -> encode.py on a generated image folder (int8 / float16 latents, flip views)
-> a few train.py steps with loss=snce -> sample.py's grid and npz. Also: int8 storage (reader,
recorded code flips vs a naive count, train.py's check), the flip / ten-crop rows, the loader's
errors for missing dataset / image size.

    python -m pytest -q tests/test_pretrained_pipeline.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import data  # noqa: E402
from support import pretrained as P  # noqa: E402
from support import views as V  # noqa: E402
from support.common import read_jsonl  # noqa: E402
from support.encode import encode_split  # noqa: E402
from helpers import make_image_folder, make_tokenizer_ckpt  # noqa: E402
from test_pretrained import ibq_lightning, llamagen_ckpt, random_model, tiny  # noqa: E402
from test_train import base_args, run_script, run_train  # noqa: E402

CONTAINERS = {"ibq": ibq_lightning, "llamagen": llamagen_ckpt}


def save_upstream(path, family, seed=0, **cfg):
    """A tiny random tokenizer of `family` (8 px, 4x4 grid, K=64, D=8) in its upstream container
    with a complete EMA set (the one the loader must pick). -> the EMA model."""
    main, ema = random_model(tiny(family, **cfg), seed), random_model(tiny(family, **cfg), seed + 1)
    torch.save(CONTAINERS[family](main, ema), path)
    return ema


def folder_images(root, split, size=8):
    """The images of make_image_folder's split as encode reads them (center crop), in order."""
    ds = data.ImageFolder(os.path.join(root, split), size)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


@pytest.mark.parametrize("family,latents_dtype,augment", [("ibq", "int8", "none"),
                                                          ("llamagen", "float16", "flip")])
def test_smoke_encode_train_sample(tmp_path, capsys, family, latents_dtype, augment):
    root = str(tmp_path)
    ckpt = os.path.join(root, f"{family}.ckpt")
    ema = save_upstream(ckpt, family)
    imgs = os.path.join(root, "imgs")
    make_image_folder(imgs)
    dirs = [encode_split(ckpt, s, os.path.join(root, s), data_root=imgs, dataset_name="folder",
                         image_size=8, batch_size=5, latents_dtype=latents_dtype,
                         augment=augment if s == "train" else "none") for s in ("train", "val")]
    assert "loaded the EMA weights" in capsys.readouterr().out
    meta, codes, latents, labels = data.load_encoded(dirs[0])
    views = V.AUGMENTS[augment]
    assert (meta["tokenizer_kind"], meta["tokenizer_weights"], meta["latents_dtype"]) == (family, "ema", latents_dtype)
    assert meta["tokenizer_fingerprint"] == ema.fingerprint() and meta["classes"] == ["a", "b"]
    assert meta.get("views", 1) == views and codes.shape == (12 * views, 4, 4, 1)
    # rows are the tokenizer's own latents and codes of each view, labels repeated
    x, y = folder_images(imgs, "train")
    x = V.augment_views(x, augment, 8).flatten(0, 1)
    z, want = ema.encode(x)
    stored = torch.from_numpy(np.array(latents[:])).float()
    bound = z.abs().amax(-1, keepdim=True) / 127 / 2 * 1.01 + 1e-6 if latents_dtype == "int8" else z.abs() * 2 ** -11 + 1e-7
    assert ((stored - z).abs() <= bound).all()
    if latents_dtype == "int8":   # codes of the float32 latents: exactly the tokenizer's
        assert torch.equal(torch.from_numpy(codes[:].astype(np.int64)), want)
    else:                         # codes of the stored float16 latents
        assert torch.equal(torch.from_numpy(codes[:].astype(np.int64)), ema.quantize(stored))
    assert labels[:].tolist() == y.repeat_interleave(views).tolist()

    out = os.path.join(root, "gen")
    run_train(base_args((dirs[0], dirs[1], ckpt), out, max_iters=2, eval_interval=2, batch_size=4,
                        loss="snce", tau=0.5, ema_decay=0.5))
    recs = read_jsonl(os.path.join(out, "log.jsonl"))
    assert [r["iter"] for r in recs if "val_nll" in r] == [0, 2]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert os.path.isfile(os.path.join(out, "samples_000002.png"))
    run_script("sample.py", [f"--ckpt={out}/ckpt.pt", "--num_samples=5", "--batch_size=3", "--per_class=2"])
    f = np.load(os.path.join(out, "samples_5_cfg2_t1_k0_p1_ema.npz"))
    assert f["arr_0"].shape == (5, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    assert f["arr_1"].tolist() == [0, 1, 0, 1, 0]
    assert os.path.isfile(os.path.join(out, "grid_cfg2_t1_k0_p1_ema.png"))


def save_near_tied_ibq(path):
    """A tiny IBQ whose codewords are all c0 + 1e-3 noise (main weights only): int8 rounding of
    the latents changes some of their nearest codes. -> the model."""
    m = random_model(tiny("ibq"), 5)
    with torch.no_grad():
        w = m.quantize.embedding.weight
        w.copy_(w[:1] + 1e-3 * torch.randn_like(w))
    torch.save(ibq_lightning(m), path)
    return m


def test_int8_storage_records_code_flips_and_train_checks_with_them(tmp_path):
    """Near-tied codes (every codeword c0 + 1e-3 noise, dot metric) make int8 rounding change some
    nearest codes (3 of 384 here): meta.json's stored_code_flips equals the naive count, the codes stay the
    tokenizer's own, and train.py accepts the split (its tolerance is 2x the recorded flips)."""
    root = str(tmp_path)
    ckpt = os.path.join(root, "ibq.ckpt")
    m = save_near_tied_ibq(ckpt)
    imgs = os.path.join(root, "imgs")
    make_image_folder(imgs, n_per_class=12)
    dirs = [encode_split(ckpt, s, os.path.join(root, s), data_root=imgs, dataset_name="folder",
                         image_size=8, latents_dtype="int8") for s in ("train", "val")]
    meta, codes, latents, _ = data.load_encoded(dirs[0])
    assert isinstance(latents, data.ScaledLatents) and latents[:].dtype == np.float32
    raw = np.load(os.path.join(dirs[0], "latents.npy"))
    scale = np.load(os.path.join(dirs[0], "latents_scale.npy"))
    assert raw.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (24, 4, 4, 1)
    assert np.array_equal(latents[3:5], raw[3:5].astype(np.float32) * scale[3:5].astype(np.float32))
    z, want = m.encode(folder_images(imgs, "train")[0])
    assert torch.equal(torch.from_numpy(codes[:].astype(np.int64)), want)
    naive = (m.quantize(torch.from_numpy(latents[:])) != want).double().mean().item()
    assert naive > 0 and meta["stored_code_flips"] == pytest.approx(naive, abs=1e-12)
    run_train(base_args((dirs[0], dirs[1], ckpt), os.path.join(root, "gen"), max_iters=1, batch_size=4))
    # a re-run finds the encoding done and keeps the measured number
    encode_split(ckpt, "train", dirs[0], data_root=imgs, dataset_name="folder", image_size=8,
                 latents_dtype="int8")
    assert data.load_encoded(dirs[0])[0]["stored_code_flips"] == meta["stored_code_flips"]


def test_tencrop_rows_are_the_ten_views(tmp_path):
    """augment=tencrop: images loaded at 1.1x the tokenizer's size, row i * 10 + r = view r of
    image i (float16 latents of tokenizer.encode_latents on ten_crop), labels repeated."""
    ckpt = str(tmp_path / "tok.pt")
    tok = make_tokenizer_ckpt(ckpt, image_size=16)
    S = V.crop_size("tencrop", 16)
    assert S == 17
    x, y = torch.rand(3, 1, S, S) * 2 - 1, torch.tensor([2, 0, 1])
    out = encode_split(ckpt, "train", str(tmp_path / "enc"), augment="tencrop",
                       dataset=(torch.utils.data.TensorDataset(x, y), [0, 1, 2]))
    meta, codes, latents, labels = data.load_encoded(out)
    assert (meta["augment"], meta["views"], latents.shape[0]) == ("tencrop", 10, 30)
    views = V.ten_crop(x, 16)   # (3, 10, 1, 16, 16)
    with torch.no_grad():
        want = tok.eval().encode_latents(views.flatten(0, 1)).half()
    assert np.array_equal(np.asarray(latents), want.numpy())
    assert labels[:].tolist() == [2] * 10 + [0] * 10 + [1] * 10
    assert not np.array_equal(latents[0], latents[3])  # top-left and bottom-right views differ
    with pytest.raises(ValueError, match="center-cropped to 17 px, got \\(16, 16\\)"):
        encode_split(ckpt, "train", str(tmp_path / "e2"), augment="tencrop",
                     dataset=(torch.utils.data.TensorDataset(x[..., :16, :16], y), [0, 1, 2]))


def test_loader_and_encode_errors(tmp_path):
    ckpt = str(tmp_path / "llamagen.pt")
    save_upstream(ckpt, "llamagen")
    with pytest.raises(ValueError, match="does not record the image size.*--image_size=256"):
        P.open_tokenizer(ckpt)
    tok, info = P.open_tokenizer(ckpt, image_size=8, verbose=False)
    assert info == {"kind": "llamagen", "weights": "ema", "config": {}, "iter": None} and tok.grid == 4
    with pytest.raises(ValueError, match="names no dataset, so pass --dataset=folder"):
        encode_split(ckpt, "train", str(tmp_path / "e"), image_size=8)
    with pytest.raises(ValueError, match="does not record the image size"):
        encode_split(ckpt, "train", str(tmp_path / "e"), dataset_name="folder", data_root=str(tmp_path))
    repo = str(tmp_path / "repo.pt")
    make_tokenizer_ckpt(repo)
    with pytest.raises(ValueError, match="is a 8 px tokenizer, but 16 px was asked for"):
        P.open_tokenizer(repo, image_size=16)
    with pytest.raises(ValueError, match="--dataset=folder, but the tokenizer .* was trained on 'synthetic'"):
        encode_split(repo, "train", str(tmp_path / "e"), dataset_name="folder")
    with pytest.raises(ValueError, match="latents_dtype in .* got 'bfloat16'"):
        encode_split(repo, "train", str(tmp_path / "e"), latents_dtype="bfloat16")
    assert not os.path.exists(tmp_path / "e")


def script_keys(name):
    """A script's config keys: the names its top level (and its `if __name__ == "__main__":`
    block) assigns."""
    import ast
    body = ast.parse(open(os.path.join(ROOT, name)).read()).body
    body += [n for b in body if isinstance(b, ast.If) for n in b.body]
    return {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def test_imagenet_configs_and_their_commands_use_real_keys():
    """Every config/imagenet_*.py sets only keys its script has, and every command in their
    docstrings names existing config files and only --keys of the script it runs."""
    import glob
    import re
    keys = {s: script_keys(s) for s in ("train.py", "sample.py")}
    keys.update({f"-m support.{s}": script_keys(f"support/{s}.py") for s in ("encode", "train_tokenizer")})
    files = sorted(glob.glob(os.path.join(ROOT, "config", "imagenet_*.py")))
    assert len(files) == 5
    commands = 0
    for path in files:
        text = open(path).read()
        script = "sample.py" if path.endswith("_sample.py") else "train.py"
        import runpy
        set_keys = {k for k in runpy.run_path(path) if not k.startswith("__")}
        assert set_keys <= keys[script], (path, set_keys - keys[script])
        doc = text.split('"""')[1].replace("\\\n", " ")
        for line in doc.splitlines():
            m = re.search(r"\b(train|sample)\.py\b|-m support\.(encode|train_tokenizer)\b", line)
            if not m or "torchrun" not in line and "python" not in line:
                continue
            commands += 1
            used = set(re.findall(r"--(\w+)=", line.split(m.group(0), 1)[1]))
            assert used <= keys[m.group(0)], (path, line, used - keys[m.group(0)])
            for cfg in re.findall(r"config/[\w/]+\.py", line):
                assert os.path.isfile(os.path.join(ROOT, cfg)), (path, cfg)
    assert commands >= 15


@pytest.mark.slow  # a 2-process torchrun job
def test_torchrun_encode_two_ranks_int8_flip(tmp_path):
    """encode.py's command line under torchrun (2 gloo ranks) with a pretrained file, int8 latents
    and flip views equals the 1-process encoding, and the code flips are summed over both ranks."""
    ckpt = str(tmp_path / "ibq.ckpt")
    save_near_tied_ibq(ckpt)
    imgs = str(tmp_path / "imgs")
    make_image_folder(imgs, n_per_class=7)
    args = ["--dataset=folder", f"--data_root={imgs}", "--image_size=8", "--split=train",
            "--latents_dtype=int8", "--augment=flip", "--batch_size=3"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(torchrun + ["-m", "support.encode", f"--ckpt={ckpt}",
                                   f"--encode_dir={tmp_path / 'enc2'}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    encode_split(ckpt, "train", str(tmp_path / "enc1"), data_root=imgs, dataset_name="folder",
                 image_size=8, latents_dtype="int8", augment="flip", batch_size=3)
    (m2, c2, z2, y2), (m1, c1, z1, y1) = (data.load_encoded(str(tmp_path / d)) for d in ("enc2", "enc1"))
    assert len(c1) == 28 and np.array_equal(c1, c2) and np.array_equal(y1, y2)
    np.testing.assert_allclose(z1[:], z2[:], atol=1e-6)
    assert m1["stored_code_flips"] > 0 and m2["stored_code_flips"] == pytest.approx(m1["stored_code_flips"])
    assert (m2["views"], m2["latents_dtype"], m2["tokenizer_weights"]) == (2, "int8", "main")
