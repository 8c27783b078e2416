"""Tokenizer tests (tokenizer.py, train_tokenizer.py, encode.py): quantizer vs naive argmin, RQ
identities, EMA / restart / k-means math, PSNR / usage / evaluate() vs naive one-pass references,
encode/decode shapes, memmap round trip and tokenizer identity by content, bad inputs and
checkpoints at every entry point, run-directory safety, exact resume, 2-rank gloo DDP sync.
Dataset / encoded-format tests: test_data.py."""

import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import data  # noqa: E402
import tokenizer as tk  # noqa: E402
from support.tokenizer_eval import evaluate  # noqa: E402
from support.common import resolve_path  # noqa: E402
from support.encode import encode_split  # noqa: E402
from helpers import make_image_folder, make_tokenizer_ckpt, naive_codes  # noqa: E402


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
    with pytest.raises(ValueError, match="ema_decay in \\[0, 1\\)"):
        tiny_cfg(ema_decay=1.0)


# -----------------------------------------------------------------------------
# metrics: psnr, usage_stats, evaluate() against naive one-pass references


def test_psnr_vs_naive():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 2, 4, 5, generator=g) * 2 - 1, torch.rand(3, 2, 4, 5, generator=g) * 2 - 1
    y[2] = x[2]                                   # identical images: mse clamped, finite
    want = []
    for a, b in zip(x.double().tolist(), y.double().tolist()):
        d = [(p - q) ** 2 for ca, cb in zip(a, b) for ra, rb in zip(ca, cb) for p, q in zip(ra, rb)]
        mse = max(sum(d) / len(d), 1e-10)
        want.append(10 * np.log10(2.0 ** 2 / mse))  # peak-to-peak 2 for images in [-1, 1]
    assert tk.psnr(x, y).tolist() == pytest.approx(want, rel=1e-5)


def test_usage_stats_vs_naive():
    hist = torch.tensor([[3.0, 0.0, 1.0, 4.0, 0.0], [0.0, 0.0, 7.0, 0.0, 0.0], [0.0] * 5])
    util, ppl = tk.usage_stats(hist)
    for l, row in enumerate(hist.tolist()):
        n = sum(row)
        used = sum(c > 0 for c in row) / len(row)
        h = -sum(c / n * np.log(c / n) for c in row if c > 0) if n else 0.0
        assert util[l].item() == pytest.approx(used) and ppl[l].item() == pytest.approx(np.exp(h), rel=1e-6)
    assert ppl.tolist()[1:] == [1.0, 1.0]         # one code used / none: perplexity 1


def _naive_eval(model, x):
    """The evaluate() metrics from one pass over all images, float64 sums in plain Python."""
    with torch.no_grad():
        recon = model(x)[0].double()
        z = model.encode_latents(x).double().reshape(-1, model.config.code_dim)   # (N*h*w, D)
    books = model.codebooks.double()
    L, K = books.shape[:2]
    per_image = len(z) // len(x)
    psnr = [10 * np.log10(4 / ((r - xi.double()) ** 2).mean().item()) for r, xi in zip(recon, x)]
    r, qerr, counts = z, [], []
    for l in range(L):
        t = ((r[:, None] - books[l][None]) ** 2).sum(-1).argmin(1)
        r = r - books[l][t]
        qerr.append(sum(v.pow(2).sum().item() for v in r) / per_image / len(x))
        counts.append(np.bincount(t.numpy(), minlength=K))
    util = [float((c > 0).mean()) for c in counts]
    ppl = [float(np.exp(-sum(p * np.log(p) for p in c / c.sum() if p > 0))) for c in counts]
    return {"psnr": sum(psnr) / len(x), "latent_power": z.pow(2).sum().item() / len(z),
            "qerr": qerr, "util": util, "ppl": ppl, "images": len(x)}


def test_evaluate_aggregation_vs_naive_one_pass():
    torch.manual_seed(0)
    model = tk.Tokenizer(tiny_cfg(codebook_size=8))
    model.quantizer.books.normal_()
    x = torch.rand(10, 1, 16, 16) * 2 - 1
    ds = torch.utils.data.TensorDataset(x, torch.zeros(10, dtype=torch.long))
    got, (x0, r0) = evaluate(model, ds, batch_size=3, max_images=None)   # batches 3+3+3+1
    want = _naive_eval(model, x)
    for k in ("psnr", "latent_power", "images"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    for k in ("qerr", "util", "ppl"):
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert x0.shape == r0.shape == (3, 1, 16, 16) and model.training   # back in train mode
    sub, _ = evaluate(model, ds, batch_size=3, max_images=4)
    assert sub["images"] == 4 and sub["psnr"] != pytest.approx(want["psnr"], rel=1e-4)


# -----------------------------------------------------------------------------
# checkpoints, identity by content, encode.py


def test_fingerprint_is_content_and_from_checkpoint(tmp_path):
    model = make_tokenizer_ckpt(str(tmp_path / "a.pt"), seed=0)
    again = make_tokenizer_ckpt(str(tmp_path / "b.pt"), seed=0)
    other = make_tokenizer_ckpt(str(tmp_path / "c.pt"), seed=1)
    assert model.fingerprint() == again.fingerprint() != other.fingerprint()
    loaded = tk.Tokenizer.from_checkpoint(str(tmp_path / "a.pt"))
    assert loaded.fingerprint() == model.fingerprint() and not loaded.training
    model.quantizer.books[0, 0, 0] += 1e-3        # one codebook entry: another tokenizer
    assert model.fingerprint() != loaded.fingerprint()


def _bad_checkpoints(tmp_path):
    """{kind: path} of files no tokenizer entry point may load (pickled objects, truncated,
    empty, a checkpoint of something else)."""
    import argparse
    good = tmp_path / "good.pt"
    make_tokenizer_ckpt(str(good))
    raw = good.read_bytes()
    paths = {k: tmp_path / f"{k}.pt" for k in ("pickled", "truncated", "empty", "foreign")}
    torch.save({"model": {}, "model_config": {}, "args": argparse.Namespace(lr=1)}, paths["pickled"])
    paths["truncated"].write_bytes(raw[: len(raw) // 2])
    paths["empty"].write_bytes(b"")
    torch.save({"model": {}, "iter": 3, "config": {}}, paths["foreign"])  # e.g. a train.py ckpt
    return {k: str(v) for k, v in paths.items()}


BAD_CKPT = {"pickled": "refuses to unpickle", "truncated": "truncated or corrupt",
            "empty": "is empty", "foreign": "not a tokenizer checkpoint"}


def test_bad_checkpoints_refused_by_library_and_encode(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    for kind, path in _bad_checkpoints(tmp_path).items():
        with pytest.raises(ValueError, match=BAD_CKPT[kind]) as e:
            tk.Tokenizer.from_checkpoint(path)
        assert path in str(e.value)
        with pytest.raises(ValueError, match=BAD_CKPT[kind]):
            encode_split(path, "val", str(tmp_path / "enc"), dataset=(ds, [0]))
        assert not os.path.exists(tmp_path / "enc")  # nothing written


def _edited_ckpt(tmp_path, name, edit):
    """make_tokenizer_ckpt's file with edit(checkpoint dict) applied. -> its path."""
    good = tmp_path / "good.pt"
    make_tokenizer_ckpt(str(good))
    ck = torch.load(good, weights_only=True)
    edit(ck)
    torch.save(ck, tmp_path / name)
    return str(tmp_path / name)


def test_checkpoint_with_non_finite_weights_is_refused_naming_file_and_key(tmp_path):
    """One NaN in a codebook made every level-0 code that code, with no warning (its distances
    are NaN): any non-finite weight is an error at load time, from the library and encode.py."""
    ds = torch.utils.data.TensorDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    for key, where in [("quantizer.books", (0, 5, 1)), ("encoder.0.weight", (0, 0, 1, 1))]:
        def poison(ck):
            ck["model"][key][where] = float("nan")
        path = _edited_ckpt(tmp_path, f"nan_{key}.pt", poison)
        msg = rf"{path}: tensor '{key}' .* holds 1 non-finite value\(s\) \(NaN / inf\)"
        with pytest.raises(ValueError, match=msg):
            tk.Tokenizer.from_checkpoint(path)
        with pytest.raises(ValueError, match=msg):
            encode_split(path, "val", str(tmp_path / "enc"), dataset=(ds, [0]))
        assert not os.path.exists(tmp_path / "enc")


def test_checkpoint_whose_config_and_weights_disagree_names_file_key_and_shapes(tmp_path):
    def wrong_k(ck):
        ck["model_config"]["codebook_size"] = 32         # the weights hold K = 16
    path = _edited_ckpt(tmp_path, "k.pt", wrong_k)
    with pytest.raises(ValueError, match=rf"{path}: tensor 'quantizer.books' has shape \(2, 16, 4\), "
                                         r"expected \(2, 32, 4\) \(the model built from its model_config\)"):
        tk.Tokenizer.from_checkpoint(path)

    def extra_key(ck):
        ck["model"]["decoder.extra"] = torch.zeros(1)
        del ck["model"]["quantizer.initialized"]
    path = _edited_ckpt(tmp_path, "keys.pt", extra_key)
    with pytest.raises(ValueError, match=r"missing \['quantizer.initialized'\], unexpected \['decoder.extra'\]"):
        tk.Tokenizer.from_checkpoint(path)

    def unknown_option(ck):
        ck["model_config"]["codebook_sise"] = 16
    path = _edited_ckpt(tmp_path, "cfg.pt", unknown_option)
    with pytest.raises(ValueError, match=rf"{path}: its model_config cannot build a tokenizer: .*codebook_sise"):
        tk.Tokenizer.from_checkpoint(path)


def _encode(ckpt, out, x, y, classes=(0, 1, 2), **kw):
    return encode_split(ckpt, "val", out, batch_size=4,
                        dataset=(torch.utils.data.TensorDataset(x, y), list(classes)), **kw)


def test_encode_memmap_round_trip_and_meta(tmp_path, capsys):
    ckpt = str(tmp_path / "tok" / "ckpt.pt")
    model = make_tokenizer_ckpt(ckpt, levels=3, codebook_size=32)
    x, y = torch.rand(10, 1, 8, 8) * 2 - 1, torch.arange(10) % 3
    out = _encode(ckpt, str(tmp_path / "enc"), x, y, classes=["a", "b", "c"])
    meta, codes, latents, labels = data.load_encoded(out)
    assert codes.shape == (10, 4, 4, 3) and codes.dtype == np.uint16
    assert latents.shape == (10, 4, 4, 4) and latents.dtype == np.float16
    assert meta["codebook_size"] == 32 and meta["levels"] == 3 and meta["num_classes"] == 3
    assert labels.tolist() == y.tolist() and meta["tokenizer_iter"] == 3
    assert meta["classes"] == ["a", "b", "c"] and meta["tokenizer_fingerprint"] == model.fingerprint()
    assert meta["tokenizer_ckpt"] == os.path.join("..", "tok", "ckpt.pt")   # relative: portable
    z = torch.from_numpy(np.array(latents)).float()
    # the codes are the l2 residual codes of the stored (float16-rounded) latents
    assert codes.reshape(-1, 3).tolist() == naive_codes(z.reshape(-1, 4), model.codebooks)
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode_latents(x), atol=2e-3, rtol=1e-3)
    _encode(ckpt, out, x, y, classes=["a", "b", "c"])      # same encoding again: a no-op
    assert "nothing to do" in capsys.readouterr().out
    # the run moved (tokenizer dir and encoding together): the stored path still resolves
    os.rename(tmp_path / "tok", tmp_path / "tok2"), os.rename(tmp_path / "enc", tmp_path / "enc2")
    os.makedirs(tmp_path / "enc"), os.rename(tmp_path / "tok2", tmp_path / "tok")
    found = resolve_path(meta["tokenizer_ckpt"], str(tmp_path / "enc2"))
    assert os.path.samefile(found, ckpt)


def test_reencode_after_retraining_is_not_a_noop(tmp_path, capsys):
    """Retraining writes another tokenizer to the same path at the same iteration: the encoding
    must be recognised as stale (by content), refused, and redone with overwrite."""
    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "enc")
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6) % 3
    make_tokenizer_ckpt(ckpt, seed=0)
    _encode(ckpt, out, x, y)
    new = make_tokenizer_ckpt(ckpt, seed=1)                 # "retrained": same path, same iter
    with pytest.raises(FileExistsError, match="different encoding.*tokenizer_fingerprint"):
        _encode(ckpt, out, x, y)
    capsys.readouterr()
    _encode(ckpt, out, x, y, overwrite=True)
    assert "nothing to do" not in capsys.readouterr().out
    meta, codes, latents, _ = data.load_encoded(out)
    assert meta["tokenizer_fingerprint"] == new.fingerprint()
    z = torch.from_numpy(np.array(latents)).float()
    assert torch.equal(new.quantize(z), torch.from_numpy(codes.astype(np.int64)))
    with pytest.raises(FileExistsError, match="different encoding.*num_classes"):
        _encode(ckpt, out, x, y, classes=(0, 1))           # another class set, same tokenizer


def run_script(name, *args):
    """Run a top-level script in this process as __main__ (no torch import per run)."""
    argv = sys.argv
    sys.argv = [name] + [str(a) for a in args]
    try:
        return runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
    finally:
        sys.argv = argv


def test_encode_cli_refuses_model_options(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    make_tokenizer_ckpt(ckpt)
    with pytest.raises(ValueError, match="--levels: encode.py takes the model from the tokenizer checkpoint"):
        run_script("support/encode.py", f"--ckpt={ckpt}", "--levels=7")
    with pytest.raises(ValueError, match="'batch_size': expected a value in \\[1, inf\\), got 0"):
        run_script("support/encode.py", f"--ckpt={ckpt}", "--batch_size=0")
    with pytest.raises(FileNotFoundError, match="not found"):
        run_script("support/encode.py", f"--ckpt={tmp_path / 'nope.pt'}")


# -----------------------------------------------------------------------------
# train_tokenizer.py: bad options, run directories, checkpoints, exact resume


def tiny_run_args(root, out_dir, *extra):
    return ["--dataset=folder", f"--data_root={root}", "--image_size=16", "--channels=(8, 8, 8)",
            "--code_dim=4", "--levels=2", "--codebook_size=16", "--batch_size=4", "--eval_interval=3",
            "--log_interval=1", "--warmup_iters=2", "--restart_after=2", f"--out_dir={out_dir}", *extra]


@pytest.mark.parametrize("arg,msg", [
    ("--batch_size=0", "'batch_size': expected a value in \\[1, inf\\), got 0"),
    ("--batch_size=-4", "'batch_size': expected a value in \\[1, inf\\), got -4"),
    ("--eval_interval=0", "'eval_interval'"), ("--log_interval=0", "'log_interval'"),
    ("--max_iters=0", "'max_iters'"), ("--eval_max=0", "'eval_max'"),
    ("--util_window=0", "'util_window'"), ("--kmeans_batches=0", "'kmeans_batches'"),
    ("--learning_rate=0", "'learning_rate': expected a value in \\(0, inf\\)"),
    ("--weight_decay=-0.1", "'weight_decay'"), ("--warmup_iters=-1", "'warmup_iters'"),
    ("--dataset=cifar", "'dataset': expected one of"), ("--init_from=latest", "'init_from'"),
    ("--ema_decay=1.5", "ema_decay in \\[0, 1\\)"), ("--dtype=fp16", "dtype: expected"),
])
def test_train_tokenizer_bad_options(tmp_path, arg, msg):
    make_image_folder(tmp_path)
    with pytest.raises(ValueError, match=msg):
        run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, tmp_path / "run", arg))
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_train_tokenizer_run_dir_safety(tmp_path, capsys):
    """Scratch refuses a used out_dir (nothing touched); leftover temp files of killed writers
    are removed; resuming a finished run trains nothing; resume refuses another experiment."""
    make_image_folder(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt.tmp.999999999").write_bytes(b"half a checkpoint")   # a writer killed mid-save
    run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=3"))
    assert not (run / "ckpt.pt.tmp.999999999").exists()
    assert "removed" in capsys.readouterr().out
    before = (run / "ckpt.pt").read_bytes(), (run / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a run .*--init_from=resume"):
        run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=3"))
    run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=3", "--init_from=resume"))
    assert "nothing to do" in capsys.readouterr().out
    assert ((run / "ckpt.pt").read_bytes(), (run / "metrics.json").read_text()) == before
    for arg, key in (("--seed=1", "seed"), ("--batch_size=2", "batch_size"), ("--levels=3", "levels")):
        with pytest.raises(ValueError, match=f"incompatible .*'{key}'"):
            run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=6",
                                                           "--init_from=resume", arg))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, tmp_path / "none", "--init_from=resume"))


def test_train_tokenizer_resume_keeps_the_schedule(tmp_path, capsys):
    """Like train.py: the cosine length is stored; a longer resume keeps it (lr = min_lr past
    it, with a note) unless --lr_decay_iters says otherwise (a warning)."""
    make_image_folder(tmp_path)
    run = tmp_path / "run"
    run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=3", "--min_lr=1e-4"))
    assert torch.load(run / "ckpt.pt", weights_only=True)["lr_decay_iters"] == 3
    capsys.readouterr()
    run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=5", "--min_lr=1e-4",
                                                   "--init_from=resume"))
    out = capsys.readouterr().out
    assert "ends at iter 3 (kept" in out and "iter 4 | " in out and "lr 1.0e-04" in out.split("iter 4 | ")[1]
    assert torch.load(run / "ckpt.pt", weights_only=True)["lr_decay_iters"] == 3
    run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--max_iters=6", "--lr_decay_iters=9",
                                                   "--init_from=resume"))
    assert "changes the run's cosine schedule (it was 3) at iter 5" in capsys.readouterr().out
    assert torch.load(run / "ckpt.pt", weights_only=True)["lr_decay_iters"] == 9


@pytest.mark.parametrize("kind", sorted(BAD_CKPT))
def test_train_tokenizer_resume_refuses_bad_checkpoints(tmp_path, kind):
    make_image_folder(tmp_path)
    path = _bad_checkpoints(tmp_path)[kind]
    run = tmp_path / "run"
    run.mkdir()
    os.replace(path, run / "ckpt.pt")
    with pytest.raises(ValueError, match=BAD_CKPT[kind]):
        run_script("support/train_tokenizer.py", *tiny_run_args(tmp_path, run, "--init_from=resume", "--max_iters=6"))


@pytest.mark.slow  # three short training subprocesses
def test_exact_resume(tmp_path):
    make_image_folder(tmp_path)
    run = lambda out, *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "support.train_tokenizer",
         *tiny_run_args(tmp_path, out, "--random_flip=True", *a)], capture_output=True, text=True, cwd=ROOT)
    for a in ([tmp_path / "full", "--max_iters=6"], [tmp_path / "half", "--max_iters=3", "--lr_decay_iters=6"],
              [tmp_path / "half", "--max_iters=6", "--init_from=resume"]):
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


@pytest.mark.slow  # two 2-process torchrun jobs
def test_torchrun_train_and_encode_two_ranks(tmp_path):
    """train_tokenizer.py and encode.py under torchrun (2 gloo ranks), with the image scan: ranks
    agree on the dropped file, eval covers every val image once, and the 2-rank encoding equals
    the 1-process one."""
    make_image_folder(tmp_path)
    (tmp_path / "val" / "b" / "broken.JPEG").write_bytes(b"not a jpeg")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    p = subprocess.run(torchrun + ["-m", "support.train_tokenizer",
                                   *tiny_run_args(tmp_path, run, "--max_iters=3", "--scan_images=True")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "scan val: 1 unreadable image(s) skipped, 12 left" in p.stdout
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["iter"] == 3 and ck["world_size"] == 2 and ck["metrics"]["images"] == 12
    p = subprocess.run(torchrun + ["-m", "support.encode", f"--ckpt={run / 'ckpt.pt'}",
                                   "--split=val", f"--encode_dir={tmp_path / 'enc2'}", "--batch_size=5",
                                   "--scan_images=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    encode_split(str(run / "ckpt.pt"), "val", str(tmp_path / "enc1"), batch_size=5, scan_images=True)
    (m2, c2, z2, y2), (m1, c1, z1, y1) = (data.load_encoded(str(tmp_path / d)) for d in ("enc2", "enc1"))
    assert len(c1) == 12 and np.array_equal(c1, c2) and np.array_equal(y1, y2)
    np.testing.assert_allclose(z1.astype(np.float32), z2.astype(np.float32), atol=1e-3)
    assert m1["tokenizer_fingerprint"] == m2["tokenizer_fingerprint"] == ck["fingerprint"]
