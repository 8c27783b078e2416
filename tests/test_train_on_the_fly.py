"""train.py with data_source=images: each batch's images are encoded by the tokenizer as they are
read (on_the_fly.OnTheFlySplit), no memmaps. On a generated image folder and a tiny tokenizer (helpers):
the rows equal encode.py's (codes exactly, latents = the tokenizer's float32 ones, which encode.py
stores rounded to float16), one encoding per batch, training equals training on an encoding of
the same float32 latents, exact resume with random flips and prefetching workers, the flip
coins, the resume rules (another source, dataset or split is another run), MNIST through its
loader (generated digits), and clear errors / warnings. No MNIST, no network.

    python -m pytest -q tests/test_train_on_the_fly.py
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
from support.common import epoch_flips  # noqa: E402
from support.encode import encode_split  # noqa: E402
from helpers import class_images, make_image_folder, make_tokenizer_ckpt  # noqa: E402
from support.pretrained import open_tokenizer  # noqa: E402
from test_train import assert_same_run, base_args, read_log, run_train, weights  # noqa: E402

N_PER_CLASS = 8  # 2 classes: 16 train and 16 val images; batch 4 -> 4 batches per epoch


@pytest.fixture(scope="module")
def fly(tmp_path_factory):
    """An image folder {train,val}/{a,b}/*.png and a tokenizer (3 channels, 8 px -> 4x4 grid,
    L=2, K=16, D=4) that records it as its dataset. -> (image root, tokenizer ckpt)."""
    root = str(tmp_path_factory.mktemp("fly"))
    imgs = os.path.join(root, "imgs")
    make_image_folder(imgs, n_per_class=N_PER_CLASS)
    ckpt = os.path.join(root, "tok.pt")
    make_tokenizer_ckpt(ckpt, source={"dataset": "folder", "data_root": imgs}, in_channels=3)
    return imgs, ckpt


def fly_args(fly, out_dir, **kw):
    """train.py arguments of an on-the-fly run (test_train.base_args without data_dir / val_dir)."""
    kw = {"data_source": "images", "tokenizer_ckpt": fly[1], "batch_size": 4, **kw}
    return [a for a in base_args(("", "", ""), out_dir, **kw) if not a.startswith(("--data_dir=", "--val_dir="))]


def open_split(fly, split="train", **kw):
    tok, info = open_tokenizer(fly[1], verbose=False)
    return tok, data.open_on_the_fly(tok, info, fly[1], "folder", split, fly[0], **kw)


def folder_images(fly, split="train"):
    """(N, 3, 8, 8) images and (N,) labels of the split as the loader reads them, in order."""
    ds = data.ImageFolder(os.path.join(fly[0], split), 8)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


# ---- the rows ----

def test_rows_equal_encode_py(fly, tmp_path):
    enc_dir = encode_split(fly[1], "train", str(tmp_path / "enc"), batch_size=5)
    meta_e, codes_e, latents_e, labels_e = data.load_encoded(enc_dir)
    tok, (meta, codes, latents, labels) = open_split(fly, relative_to=enc_dir)
    assert codes.shape == codes_e.shape and latents.shape == latents_e.shape and len(labels) == len(labels_e) == 16
    # the same description as encode.py's, but for what the rows are (float32 latents, int64 codes)
    differ = {k for k in set(meta) | set(meta_e) if meta.get(k) != meta_e.get(k)}
    assert differ == {"data_source", "latents_dtype", "codes_dtype", "complete", "stored_code_flips"}
    assert (meta["data_source"], meta["latents_dtype"], meta["codes_dtype"]) == ("images", "float32", "int64")
    x, y = folder_images(fly)
    for idx in (np.array([0, 3, 7, 12]), slice(None), np.arange(16)[::-1].copy()):
        z_ref, c_ref = tok.encode(x[idx])                         # the tokenizer's own, float32
        z, c = latents[idx], codes[idx]
        assert z.dtype == torch.float32 and c.dtype == torch.int64
        assert torch.equal(z, z_ref) and torch.equal(c, c_ref)
        # encode.py stores z rounded to float16 (half an ulp: 2^-11 relative; its batches of 5
        # may move the last float32 bits) and the codes of the rounded z: here the same codes
        z16 = torch.from_numpy(np.array(latents_e[idx])).float()
        assert ((z - z16).abs() <= z.abs() * 2 ** -11 * 1.01 + 1e-7).all() and not torch.equal(z, z16)
        assert torch.equal(c, torch.from_numpy(codes_e[idx].astype(np.int64)))
        assert torch.equal(labels[idx], torch.from_numpy(np.array(labels_e[idx]))) and torch.equal(labels[idx], y[idx])


def test_a_batch_is_encoded_once(fly):
    _, (_, codes, latents, labels) = open_split(fly)
    src, calls = codes.source, []
    encode = src.tok.encode_latents
    src.tok.encode_latents = lambda x: (calls.append(len(x)), encode(x))[1]
    idx = np.array([1, 5, 9])
    codes[idx], latents[idx], labels[idx]
    assert calls == [3]
    latents[[1, 5, 9]], labels[1:10:4]   # the same rows, however indexed
    assert calls == [3]
    labels[np.array([2, 5])]
    assert calls == [3, 2]
    with pytest.raises(ValueError, match="expected a 1-D index array or a slice"):
        codes[3]


def test_flips(fly):
    """Image i is mirrored in epoch e iff epoch_flips(n, seed, e)[i]: about half, other ones
    each epoch, the same for the same (seed, epoch); none before set_epoch."""
    a, b = epoch_flips(1000, 5, 0), epoch_flips(1000, 5, 1)
    assert 400 < a.sum() < 600 and 400 < (a != b).sum() < 600
    assert np.array_equal(epoch_flips.__wrapped__(1000, 5, 0), a) and not np.array_equal(epoch_flips(1000, 6, 0), a)
    tok, (_, codes, latents, _) = open_split(fly, flip_seed=5)
    x, _ = folder_images(fly)
    assert torch.equal(latents[:], tok.encode(x)[0])          # no epoch set yet: plain images
    for epoch in (0, 1):
        codes.source.set_epoch(epoch)
        m = torch.from_numpy(epoch_flips(16, 5, epoch)).view(-1, 1, 1, 1)
        assert 0 < m.sum() < 16
        z, c = tok.encode(torch.where(m, x.flip(-1), x))
        assert torch.equal(latents[:], z) and torch.equal(codes[:], c)


def test_prefetch_workers_read_ahead(fly, monkeypatch):
    """With workers, the batches given to prefetch are read in the workers (the main process
    reads no image); a request off the schedule is read here and the stream stays in step."""
    tok, (_, codes, latents, _) = open_split(fly, num_workers=1)
    src, x = codes.source, folder_images(fly)[0]
    reads, get = [], data.ImageFolder.__getitem__  # reads in this process (a worker's are its own)
    monkeypatch.setattr(data.ImageFolder, "__getitem__", lambda s, i: (reads.append(i), get(s, i))[1])
    batches = [np.array([0, 1, 2]), np.array([4, 8]), np.array([15, 3])]
    src.prefetch(iter(batches))  # an iterator, as train.py's endless schedule
    assert torch.equal(codes[batches[0]], tok.encode(x[batches[0]])[1]) and reads == []
    assert torch.equal(latents[[6, 7]], tok.encode(x[[6, 7]])[0]) and reads == [6, 7]  # off schedule
    for idx in batches[1:]:
        assert torch.equal(latents[idx], tok.encode(x[idx])[0])
    assert reads == [6, 7]
    codes[[9]]                   # the stream is used up: read here
    assert reads == [6, 7, 9]
    src.prefetch([np.array([1])])
    src.close()                  # its worker stops: read here
    codes[[1]]
    assert reads == [6, 7, 9, 1]


# ---- training ----

def fp32_encoding(fly, monkeypatch):
    """Serve train.py's data_source=encoded the on-the-fly rows of both splits as numpy arrays,
    in place of memmaps: the encoding of the exact float32 latents (encode.py stores float16).
    -> (train dir, val dir) names that train.py's load_encoded then reads."""
    splits = {}
    for split in ("train", "val"):
        _, (meta, codes, latents, labels) = open_split(fly, split)
        meta = {k: v for k, v in meta.items() if k != "data_source"}
        splits[f"fp32/{split}"] = (meta, codes[:].numpy(), latents[:].numpy(), labels[:].numpy())
    monkeypatch.setattr(data, "load_encoded", lambda d: splits[d])
    return "fp32/train", "fp32/val"


def losses(out_dir):
    """The logged training objectives and eval numbers, without the records' wall-clock fields."""
    return [{k: v for k, v in r.items() if k != "grid"} for r in read_log(out_dir)]


def close(a, b, rel):
    """Nested records / lists / floats equal up to rel (exactly where rel = 0)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    return a == b if rel == 0 or not isinstance(a, float) else a == pytest.approx(b, rel=rel)


@pytest.mark.parametrize("loss", ["snce", "ce"])
def test_training_equals_training_on_the_float32_encoding(fly, tmp_path, monkeypatch, loss):
    """The same steps, evals and weights as data_source=encoded reading the float32 latents and
    codes of all images (encoded in one batch). ce sees only the codes: identical. snce sees the
    latents, which the encoder's convolutions round differently in the last float32 bit for a
    batch of 4 than of 16 (~1e-7 relative): equal to 1e-6."""
    kw = dict(max_iters=6, eval_interval=3, loss=loss, gradient_accumulation_steps=2, batch_size=4)
    run_train(fly_args(fly, str(tmp_path / "fly"), **kw))
    tr, va = fp32_encoding(fly, monkeypatch)
    run_train(base_args((tr, va, None), str(tmp_path / "enc"), tokenizer_ckpt=fly[1], **kw))
    got, want = losses(str(tmp_path / "fly")), losses(str(tmp_path / "enc"))
    assert [r["iter"] for r in got if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["iter"] for r in got if "val_nll" in r] == [0, 3, 6]
    rel = 0 if loss == "ce" else 1e-6
    assert close(got, want, rel)
    ca, cb = weights(str(tmp_path / "fly")), weights(str(tmp_path / "enc"))
    for a, b in zip(ca["model"].values(), cb["model"].values()):  # AdamW divides by sqrt(v): a
        torch.testing.assert_close(a, b, rtol=0, atol=100 * rel)   # ~0 gradient's 1e-7 can move a weight ~1e-6
    assert ca["data_id"]["data_source"] == "images" and ca["meta"]["dataset"] == "folder"


def test_training_on_encode_py_float16_is_close(fly, tmp_path):
    """encode.py's float16 latents: here the same codes (so ce is identical) and SNCE losses
    within 2e-3 relative. Rounding moves each coordinate of z by <= 2^-11 relative; with
    |z| ~ 1 and tau = 1 the logits -d(r, c_k) / tau of q move by ~1e-3, and so does the loss."""
    dirs = [encode_split(fly[1], s, str(tmp_path / s), batch_size=8) for s in ("train", "val")]
    kw = dict(max_iters=4, eval_interval=2)
    run_train(fly_args(fly, str(tmp_path / "fly"), **kw))
    run_train(base_args((dirs[0], dirs[1], None), str(tmp_path / "enc"), batch_size=4, **kw))
    got, want = losses(str(tmp_path / "fly")), losses(str(tmp_path / "enc"))
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for a, b in zip(got, want):
        for k in ("loss", "val_loss", "val_nll"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=2e-3)


def test_resume_with_flips_and_workers_is_exact(fly, tmp_path, monkeypatch):
    """Train 8 steps (2 epochs of 4 batches, each mirroring other images) straight, or 4 then
    resume to 8 with prefetching workers: the same run, and the resumed run's workers read every batch
    it trains and evaluates on (none is read in this process). Without random_flip the run
    differs."""
    kw = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, random_flip=True, ema_decay=0.9,
              dropout=0.1, mode="maskgit", gradient_accumulation_steps=1)
    full, part, plain = str(tmp_path / "full"), str(tmp_path / "part"), str(tmp_path / "plain")
    assert run_train(fly_args(fly, full, **kw))["codes_mm"].source.epoch == 1  # steps 4-7
    run_train(fly_args(fly, part, **{**kw, "max_iters": 4, "num_workers": 1}))
    assert weights(part)["iter"] == 4
    reads, get = [], data.ImageFolder.__getitem__
    monkeypatch.setattr(data.ImageFolder, "__getitem__", lambda s, i: (reads.append(i), get(s, i))[1])
    run_train(fly_args(fly, part, **kw, num_workers=1, init_from="resume"))
    assert_same_run(full, part)
    assert reads == []  # the taus come from the checkpoint: no q sample to read either
    run_train(fly_args(fly, plain, **{**kw, "random_flip": False}))
    assert [r["loss"] for r in read_log(plain) if "loss" in r] != [r["loss"] for r in read_log(full) if "loss" in r]


def test_resume_rules(fly, tmp_path, monkeypatch, capsys):
    """Another data source, dataset or split is another run; moved images (data_root) and a
    changed random_flip are not (the latter is noted)."""
    out = str(tmp_path / "r")
    run_train(fly_args(fly, out, max_iters=1))
    with pytest.raises(ValueError, match=r"incompatible.*'split': \('train', 'val'\)"):
        run_train(fly_args(fly, out, max_iters=2, train_split="val", val_split="train", init_from="resume"))
    capsys.readouterr()
    run_train(fly_args(fly, out, max_iters=2, random_flip=True, data_root=fly[0], init_from="resume"))
    assert "'random_flip': (False, True)" in capsys.readouterr().out and weights(out)["iter"] == 2
    tr, va = fp32_encoding(fly, monkeypatch)  # the same latents, but from an encoding
    with pytest.raises(ValueError, match=r"incompatible.*'data_source': \('images', 'encoded'\)"):
        run_train(base_args((tr, va, None), out, max_iters=3, batch_size=4, tokenizer_ckpt=fly[1],
                            init_from="resume"))
    enc = str(tmp_path / "e")
    run_train(base_args((tr, va, None), enc, max_iters=1, batch_size=4, tokenizer_ckpt=fly[1]))
    with pytest.raises(ValueError, match=r"incompatible.*'data_source': \('encoded', 'images'\)"):
        run_train(fly_args(fly, enc, max_iters=2, init_from="resume"))
    ck = weights(enc)  # a checkpoint from before data_source: encoded
    del ck["data_id"]["data_source"]
    torch.save(ck, os.path.join(enc, "ckpt.pt"))
    with pytest.raises(ValueError, match=r"incompatible.*'data_source': \('encoded', 'images'\)"):
        run_train(fly_args(fly, enc, max_iters=2, init_from="resume"))


def test_mnist_on_the_fly(tmp_path, monkeypatch):
    """dataset=mnist through data.get_dataset, its 32 px digits replaced by generated images."""
    monkeypatch.setattr(data, "load_mnist", lambda split: class_images(24 if split == "train" else 8, size=32,
                                                                      seed=int(split == "val")))
    ckpt = str(tmp_path / "tok.pt")
    make_tokenizer_ckpt(ckpt, source={"dataset": "mnist", "data_root": ""}, image_size=32,
                        channels=(8, 8, 8, 8), downsample=8)
    out = str(tmp_path / "run")
    g = run_train(fly_args(("", ckpt), out, max_iters=2, eval_iters=1))
    assert (g["meta"]["dataset"], g["meta"]["split"], g["num_classes"], g["N"]) == ("mnist", "train", 10, 24)
    assert [r["iter"] for r in read_log(out) if "loss" in r] == [1, 2]
    x, y = class_images(24, size=32)
    assert torch.equal(g["codes_mm"][:4], g["tok"].encode(x[:4])[1]) and torch.equal(g["labels_mm"][:4], y[:4])


# ---- bad inputs ----

def test_bad_inputs_give_clear_errors(fly, tmp_path):
    out = str(tmp_path / "o")

    def bad(match, args, exc=ValueError):
        with pytest.raises(exc, match=match):
            run_train(args)
        assert not os.path.exists(os.path.join(out, "ckpt.pt"))

    bad("data_source=images: expected tokenizer_ckpt", fly_args(fly, out, max_iters=0, tokenizer_ckpt=""))
    bad(r"'data_source': expected one of \('encoded', 'images'\), got 'disk'", fly_args(fly, out, data_source="disk"))
    bad(r"'dataset': expected one of \('', 'mnist', 'folder'\), got 'cifar'", fly_args(fly, out, dataset="cifar"))
    bad("--dataset=mnist, but the tokenizer .* was trained on 'folder'", fly_args(fly, out, dataset="mnist"))
    bad(r"'num_workers': expected a value in \[0, inf\), got -1", fly_args(fly, out, num_workers=-1))
    bad("image folder .*nope/train' does not exist", fly_args(fly, out, data_root=str(tmp_path / "nope")),
        FileNotFoundError)
    bad("16 training items are too few for batch_size=32", fly_args(fly, out, batch_size=32))
    bad("is a 8 px tokenizer, but 16 px", fly_args(fly, out, image_size=16))
    # the val split's classes must be the train split's
    other = str(tmp_path / "imgs")
    make_image_folder(other, n_per_class=4)
    os.rename(os.path.join(other, "val", "b"), os.path.join(other, "val", "c"))
    bad(r"encoded differently.*'classes': \(\['a', 'b'\], \['a', 'c'\]\).*same classes",
        fly_args(fly, out, data_root=other))


def test_pretrained_file_needs_dataset_and_image_size(fly, tmp_path):
    from test_pretrained_pipeline import save_upstream
    ckpt = str(tmp_path / "ibq.ckpt")
    save_upstream(ckpt, "ibq")
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="does not record the image size.*pass image_size"):
        run_train(fly_args(fly, out, tokenizer_ckpt=ckpt, dataset="folder", data_root=fly[0]))
    with pytest.raises(ValueError, match="its file names no dataset, so pass --dataset=folder"):
        run_train(fly_args(fly, out, tokenizer_ckpt=ckpt, image_size=8))
    g = run_train(fly_args(fly, out, tokenizer_ckpt=ckpt, image_size=8, dataset="folder", data_root=fly[0],
                           max_iters=2, tau=0.5))
    assert (g["meta"]["tokenizer_kind"], g["meta"]["image_size"], g["K"]) == ("ibq", 8, 64)
    assert [r["iter"] for r in read_log(out) if "loss" in r] == [1, 2]


def test_ignored_options_warn(fly, tmp_path, capsys, monkeypatch):
    tr, va = fp32_encoding(fly, monkeypatch)
    run_train(base_args((tr, va, None), str(tmp_path / "e"), max_iters=0, batch_size=4, tokenizer_ckpt=fly[1],
                        dataset="folder", random_flip=True, num_workers=2))
    assert "dataset='folder', random_flip=True, num_workers=2 ignored: data_source=encoded" in capsys.readouterr().out
    run_train(fly_args(fly, str(tmp_path / "f"), max_iters=0) + ["--data_dir=x", "--val_dir=y"])
    printed = capsys.readouterr().out
    assert "data_dir='x', val_dir='y' ignored: data_source=images" in printed
    run_train(fly_args(fly, str(tmp_path / "g"), max_iters=0, random_flip=True, num_workers=1))
    assert "ignored:" not in capsys.readouterr().out


# ---- DDP ----

@pytest.mark.slow
def test_ddp_two_ranks_on_the_fly(fly, tmp_path):
    """2-rank gloo run on the fly with flips and a worker each: the ranks stay identical."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + fly_args(fly, out, max_iters=3, eval_interval=100, batch_size=2,
                                                      gradient_accumulation_steps=4, random_flip=True, num_workers=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "max |weight difference| between ranks = 0" in p.stdout, p.stdout[-2000:]
    assert [r["iter"] for r in read_log(out) if "loss" in r] == [1, 2, 3]
