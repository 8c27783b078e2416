"""Tokenizer tests: quantizer vs naive argmin, RQ identities, EMA / restart / k-means math,
encode/decode shapes, memmap round trip, bad inputs, exact resume, and 2-rank gloo DDP sync."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from common import save_checkpoint  # noqa: E402


def tiny_cfg(**kw):
    base = dict(in_channels=1, image_size=16, channels=(8, 16, 16), downsample=4, num_res_blocks=1,
                code_dim=4, levels=3, codebook_size=32, metric="l2", restart_after=2)
    return tk.TokenizerConfig(**{**base, **kw})


def naive_d(r, c, metric):
    if metric == "l2":
        return sum((a - b) ** 2 for a, b in zip(r, c))
    dot = sum(a * b for a, b in zip(r, c))
    if metric == "dot":
        return -dot
    return -dot / (sum(a * a for a in r) ** 0.5 * sum(b * b for b in c) ** 0.5)


@pytest.mark.parametrize("metric", ["l2", "cos", "dot"])
@pytest.mark.parametrize("shared", [False, True])
def test_quantizer_matches_naive_argmin(metric, shared):
    torch.manual_seed(0)
    q = tk.ResidualQuantizer(tiny_cfg(metric=metric, shared_codebook=shared)).double()
    q.books.copy_(torch.randn_like(q.books))
    z = torch.randn(40, 4, dtype=torch.float64)
    codes, res = q.quantize(z)
    for i in range(len(z)):
        r = z[i].tolist()
        for l in range(3):
            book = q.books[0 if shared else l].tolist()
            t = min(range(len(book)), key=lambda k: naive_d(r, book[k], metric))
            assert codes[i, l].item() == t, (i, l)
            assert res[i, l].tolist() == pytest.approx(r, abs=1e-12)
            r = [a - b for a, b in zip(r, book[t])]


@pytest.mark.parametrize("metric", ["l2", "cos", "dot"])
def test_residual_identity_and_residuals(metric):
    torch.manual_seed(1)
    model = tk.Tokenizer(tiny_cfg(metric=metric)).double()
    model.quantizer.books.copy_(torch.randn_like(model.quantizer.books))
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    codes = model.quantize(z)
    assert codes.shape == (2, 4, 4, 3) and codes.dtype == torch.int64
    r = model.residuals(z, codes)                                  # (2, 4, 4, 3, 4)
    chosen = model.quantizer.lookup(codes)
    last = r[..., -1, :] - chosen[..., -1, :]                      # r_L
    torch.testing.assert_close(chosen.sum(-2) + last, z, rtol=0, atol=1e-12)
    _, res = model.quantizer.quantize(z.reshape(-1, 4))
    torch.testing.assert_close(r.reshape(-1, 3, 4), res, rtol=0, atol=1e-12)
    for l in range(3):  # each level's code is the nearest code to its residual
        from snce import nearest_code
        assert torch.equal(nearest_code(r[..., l, :], model.codebooks[l], metric), codes[..., l])
    # float16 latents (as stored in the memmaps) are accepted and computed in float32
    assert model.residuals(z.half(), codes).dtype == torch.float32


def test_ema_update_by_hand():
    q = tk.ResidualQuantizer(tiny_cfg(levels=1, codebook_size=3, code_dim=2, ema_decay=0.5,
                                      ema_eps=0.1))
    q.books.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
    q.ema_count.fill_(1.0)
    q.ema_sum.copy_(q.books)
    res = torch.tensor([[[0.2, 0.0]], [[0.0, 0.4]], [[1.0, 1.0]]])   # (N=3, L=1, D=2)
    codes = torch.tensor([[0], [0], [1]])
    hist = q.update(codes, res)
    assert hist.tolist() == [[2.0, 1.0, 0.0]]
    count = [0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1, 0.5 * 1 + 0.5 * 0]      # [1.5, 1.0, 0.5]
    sums = [[0.5 * 0 + 0.5 * 0.2, 0.5 * 0 + 0.5 * 0.4], [0.5 * 1 + 0.5 * 1, 0.5 * 0 + 0.5 * 1],
            [0.0, 0.5]]
    n = sum(count)
    size = [(c + 0.1) / (n + 3 * 0.1) * n for c in count]
    want = [[s / size[k] for s in sums[k]] for k in range(3)]
    assert q.ema_count[0].tolist() == pytest.approx(count)
    assert q.books[0].tolist() == [pytest.approx(w, rel=1e-6) for w in want]
    assert q.unused[0].tolist() == [0, 0, 1]


def test_ema_update_shared_codebook_pools_levels():
    q = tk.ResidualQuantizer(tiny_cfg(levels=2, codebook_size=2, code_dim=1, ema_decay=0.0,
                                      ema_eps=0.0, shared_codebook=True))
    res = torch.tensor([[[1.0], [3.0]], [[5.0], [7.0]]])            # (N=2, L=2, D=1)
    q.update(torch.tensor([[0, 1], [0, 0]]), res)
    assert q.books[0, :, 0].tolist() == pytest.approx([(1 + 5 + 7) / 3, 3.0])  # decay 0: means
    assert q.codebooks.shape == (2, 2, 1) and torch.equal(q.codebooks[0], q.codebooks[1])


def test_dead_code_restart_moves_unused_codes():
    torch.manual_seed(0)
    q = tk.ResidualQuantizer(tiny_cfg(levels=2, codebook_size=8, code_dim=2, restart_after=3))
    before = q.books.clone()
    q.unused[0, [1, 5]] = 3                      # dead at level 0
    q.unused[1, 2] = 2                           # not yet dead
    res = torch.randn(50, 2, 2)
    codes, _ = q.quantize(res[:, 0])
    res = torch.stack([res[:, 0], res[:, 0] - q.books[0][codes[:, 0]]], 1)  # consistent residuals
    res[:10] = q.books[0, 0]                     # vectors sitting exactly on a code: error 0
    codes[:10, 0] = 0
    n = q.restart_dead(codes, res, torch.Generator().manual_seed(0))
    assert n.tolist() == [2, 0]
    cand = res[10:, 0]
    for k in (1, 5):  # moved onto a level-0 residual with non-zero error
        assert ((cand - q.books[0, k]).abs().sum(-1) < 1e-6).any()
        assert q.ema_sum[0, k].tolist() == pytest.approx((q.books[0, k] * q.ema_count[0, k]).tolist())
    keep = [0, 2, 3, 4, 6, 7]
    assert torch.equal(q.books[0, keep], before[0, keep]) and torch.equal(q.books[1], before[1])
    assert q.unused[0].tolist() == [0] * 8 and q.unused[1, 2] == 2


def test_kmeans_lloyd_vs_naive_and_init():
    x = torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c, sizes = tk.kmeans(x, 5, "l2", iters=2, generator=torch.Generator().manual_seed(3))
    # naive: the same seeds (distinct rows, sorted by torch.unique), two Lloyd steps by hand
    src = torch.unique(x, dim=0)
    ref = src[torch.randperm(len(src), generator=torch.Generator().manual_seed(3))[:5]].tolist()
    for _ in range(2):
        groups = [[] for _ in ref]
        for p in x.tolist():
            groups[min(range(5), key=lambda k: naive_d(p, ref[k], "l2"))].append(p)
        ref = [[sum(v) / len(g) for v in zip(*g)] if g else ref[k] for k, g in enumerate(groups)]
    torch.testing.assert_close(c, torch.tensor(ref, dtype=torch.float64))
    assert sizes.sum() == 60
    dup = torch.cat([torch.zeros(50, 2, dtype=torch.float64), x[:10]])  # 50 identical rows
    c, sizes = tk.kmeans(dup, 8, "l2", iters=3, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(c, dim=0)) == 8     # seeds are distinct rows, not 8 copies of 0
    q = tk.ResidualQuantizer(tiny_cfg(levels=2, codebook_size=4, code_dim=2))
    q.kmeans_init(x.float(), iters=5, steps=3, generator=torch.Generator().manual_seed(0))
    assert bool(q.initialized) and q.ema_count.tolist() == [[5.0] * 4] * 2   # 60 / 4 / 3
    assert q.books[1].norm(dim=-1).mean() < q.books[0].norm(dim=-1).mean()  # level 1: residuals
    with pytest.raises(ValueError, match="at least codebook_size=4"):
        q.kmeans_init(x[:3].float())


def test_psnr_and_usage_stats_naive():
    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 0.2]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert tk.psnr(y, x).tolist() == pytest.approx([10 * np.log10(4 / 0.01), 10 * np.log10(4 / 0.04)],
                                                   rel=1e-5)
    util, ppl = tk.usage_stats(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    p = [0.25, 0.25, 0.5]
    assert util.tolist() == [0.75] and ppl.item() == pytest.approx(np.exp(-sum(a * np.log(a) for a in p)))


def test_encode_decode_shapes_and_bad_inputs():
    model = tk.Tokenizer(tiny_cfg())
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z, codes = model.encode(x)
    assert z.shape == (2, 4, 4, 4) and codes.shape == (2, 4, 4, 3)
    assert model.decode(codes).shape == (2, 1, 16, 16) and model.codebooks.shape == (3, 32, 4)
    assert model.metric == "l2"
    recon, commit, c, res = model(x)
    assert recon.shape == x.shape and c.shape == (32, 3) and res.shape == (32, 3, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 1, 16, 16\), got \(2, 3, 16, 16\)"):
        model.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(B, 4, 4, 3\)"):
        model.decode(codes[..., :2])
    with pytest.raises(ValueError, match=r"integers in \[0, 32\)"):
        model.decode(codes + 32)
    with pytest.raises(ValueError, match="expected latents"):
        model.residuals(z[..., :3], codes)
    with pytest.raises(ValueError, match="len\\(channels\\) == log2"):
        tiny_cfg(downsample=8)
    with pytest.raises(ValueError, match="metric must be one of"):
        tiny_cfg(metric="l1")
    with pytest.raises(ValueError, match="divisible by downsample"):
        tiny_cfg(image_size=18)


def _tiny_ckpt(path, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_cfg()
    model = tk.Tokenizer(cfg)
    model.quantizer.books.normal_()
    save_checkpoint({"model": model.state_dict(), "model_config": tk.asdict(cfg), "iter": 7,
                     "config": {"dataset": "synthetic", "data_root": ""}}, path)
    return model


def test_encode_memmap_round_trip(tmp_path, monkeypatch):
    model = _tiny_ckpt(str(tmp_path / "ckpt.pt"))
    x = torch.rand(10, 1, 16, 16) * 2 - 1
    y = torch.arange(10) % 3
    monkeypatch.setattr(data, "get_dataset",
                        lambda *a, **k: (torch.utils.data.TensorDataset(x, y), 3, 1))
    for k, v in dict(ckpt=str(tmp_path / "ckpt.pt"), split="val", encode_dir=str(tmp_path / "enc"),
                     batch_size=4, overwrite=False).items():
        monkeypatch.setattr(tk, k, v)
    tk.encode_split()
    meta, codes, latents, labels = data.load_encoded(str(tmp_path / "enc"))
    assert codes.shape == (10, 4, 4, 3) and codes.dtype == np.uint16
    assert latents.shape == (10, 4, 4, 4) and latents.dtype == np.float16
    assert meta["codebook_size"] == 32 and meta["levels"] == 3 and meta["num_classes"] == 3
    assert labels.tolist() == y.tolist() and meta["tokenizer_iter"] == 7
    z = torch.from_numpy(np.array(latents)).float()
    with torch.no_grad():
        z_ref = model.encode_latents(x)
        assert torch.equal(model.quantize(z), torch.from_numpy(codes.astype(np.int64)))
    torch.testing.assert_close(z, z_ref, atol=2e-3, rtol=1e-3)
    tk.encode_split()                           # same encoding again: a no-op, not an error
    _tiny_ckpt(str(tmp_path / "ckpt2.pt"), seed=1)
    monkeypatch.setattr(tk, "ckpt", str(tmp_path / "ckpt2.pt"))
    with pytest.raises(FileExistsError, match="different encoding"):
        tk.encode_split()
    monkeypatch.setattr(tk, "overwrite", True)
    tk.encode_split()
    assert data.load_encoded(str(tmp_path / "enc"))[0]["tokenizer_ckpt"].endswith("ckpt2.pt")


def test_load_encoded_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        data.load_encoded(str(tmp_path / "nope"))
    d = tmp_path / "enc"
    d.mkdir()
    np.save(d / "codes.npy", np.zeros((2, 1, 1, 1), np.uint16))
    np.save(d / "latents.npy", np.zeros((2, 1, 1, 4), np.float16))
    np.save(d / "labels.npy", np.zeros(2, np.int64))
    meta = {"complete": True, "levels": 1, "code_dim": 4, "codes_shape": [3, 1, 1, 1],
            "codes_dtype": "uint16", "latents_shape": [2, 1, 1, 4], "latents_dtype": "float16",
            "labels_shape": [2], "labels_dtype": "int64"}
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"expected \(3, 1, 1, 1\) uint16, got \(2, 1, 1, 1\)"):
        data.load_encoded(str(d))
    (d / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        data.load_encoded(str(d))


def _make_folder(root, n_per_class=6, size=20):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")


def test_image_folder_dataset_and_errors(tmp_path):
    _make_folder(tmp_path)
    ds, n_cls, ch = data.get_dataset("folder", "train", 16, str(tmp_path))
    x, y = ds[7]
    assert (n_cls, ch, len(ds), x.shape, y) == (2, 3, 12, (3, 16, 16), 1)
    assert x.min() >= -1 and x.max() <= 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.get_dataset("folder", "test", 16, str(tmp_path))
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images"):
        data.get_dataset("folder", "empty", 16, str(tmp_path))
    (tmp_path / "train" / "a" / "broken.JPEG").write_bytes(b"not a jpeg")
    ds, _, _ = data.get_dataset("folder", "train", 16, str(tmp_path))
    with pytest.raises(ValueError, match="cannot read image .*broken.JPEG"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(ValueError, match="dataset must be"):
        data.get_dataset("cifar", "train", 16)


@pytest.mark.slow  # three short training subprocesses: ~10 s on an idle 2-core machine
def test_exact_resume(tmp_path):
    _make_folder(tmp_path)
    args = [sys.executable, os.path.join(ROOT, "tokenizer.py"), "--dataset=folder",
            f"--data_root={tmp_path}", "--image_size=16", "--channels=(8, 8, 8)", "--code_dim=4",
            "--levels=2", "--codebook_size=16", "--batch_size=4", "--eval_interval=3",
            "--log_interval=1", "--random_flip=True", "--warmup_iters=2", "--restart_after=2"]
    run = lambda *a: subprocess.run(args + list(a), capture_output=True, text=True, cwd=ROOT)  # noqa
    for a in ([f"--out_dir={tmp_path}/full", "--max_iters=6"],
              [f"--out_dir={tmp_path}/half", "--max_iters=3"],
              [f"--out_dir={tmp_path}/half", "--max_iters=6", "--init_from=resume"]):
        p = run(*a)
        assert p.returncode == 0, p.stderr
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    half = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert full["iter"] == half["iter"] == 6 and os.path.isfile(tmp_path / "full" / "recon_000006.png")
    for k, v in full["model"].items():
        torch.testing.assert_close(half["model"][k], v, rtol=0, atol=0, msg=k)
    assert torch.equal(full["util_window"], half["util_window"])


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)                        # same initial codebooks everywhere
    q = tk.ResidualQuantizer(tiny_cfg(levels=2, codebook_size=16, code_dim=3, restart_after=2))
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    q.kmeans_init(torch.randn(24, 3, generator=g), iters=3, generator=torch.Generator().manual_seed(rank))
    restarts = 0
    for step in range(6):
        z = torch.randn(20 + 0 * rank, 3, generator=g) * (1 + rank)
        codes, res = q.quantize(z)
        q.update(codes, res)
        restarts += int(q.restart_dead(codes, res, torch.Generator().manual_seed(rank + step)).sum())
    torch.save({"books": q.books, "ema_count": q.ema_count, "ema_sum": q.ema_sum,
                "unused": q.unused, "restarts": restarts}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_codebooks_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["restarts"] > 0                   # the restart + broadcast path was exercised
    for k in ("books", "ema_count", "ema_sum", "unused"):
        assert torch.equal(r0[k], r1[k]), k
