"""data.py tests: the ImageFolder dataset (resize / crop, 16-bit grayscale PNGs, unreadable files
and the pre-scan that drops them, also through encode.py), the encoded format (values written
== values read, float16 and int8 latents, meta.json; missing, truncated, inconsistent memmaps;
invalid or incomplete meta.json; foreign files),
encode.py resuming an interrupted encoding block by block, and save_grid's atomic write (a
failing writer leaves the previous PNG as it was)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import data  # noqa: E402
from support.encode import block_layout, encode_split, rank_blocks  # noqa: E402
from helpers import class_images, make_encoded, make_image_folder, make_tokenizer_ckpt, naive_codes  # noqa: E402
import tokenizer as tk  # noqa: E402


def test_image_folder_dataset_and_errors(tmp_path):
    make_image_folder(tmp_path)
    ds, n_cls, ch = data.get_dataset("folder", "train", 16, str(tmp_path))
    x, y = ds[7]
    assert (n_cls, ch, len(ds), x.shape, y) == (2, 3, 12, (3, 16, 16), 1)
    assert x.min() >= -1 and x.max() <= 1 and data.class_names(ds, n_cls) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.get_dataset("folder", "test", 16, str(tmp_path))
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder\(s\) \[.c.\] hold no images"):
        data.get_dataset("folder", "empty", 16, str(tmp_path))
    (tmp_path / "train" / "a" / "broken.JPEG").write_bytes(b"not a jpeg")
    ds, _, _ = data.get_dataset("folder", "train", 16, str(tmp_path))
    with pytest.raises(ValueError, match="cannot read image .*broken.JPEG.*--scan_images=True"):
        [ds[i] for i in range(len(ds))]
    with pytest.raises(ValueError, match="dataset must be"):
        data.get_dataset("cifar", "train", 16)


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    """Pillow opens a 16-bit grayscale PNG as mode I;16 (0..65535); convert("RGB") alone clips
    every value above 255, giving an all-white image."""
    from PIL import Image
    a = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)   # 0 .. 65520
    os.makedirs(tmp_path / "train" / "c")
    Image.fromarray(a).save(tmp_path / "train" / "c" / "x.png")
    with Image.open(tmp_path / "train" / "c" / "x.png") as im:
        assert im.mode.startswith("I")             # really a 16-bit image on disk
    ds, _, _ = data.get_dataset("folder", "train", 8, str(tmp_path))
    x, _ = ds[0]
    want = np.round(a / 65535 * 255) / 127.5 - 1.0            # 8-bit levels, in [-1, 1]
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), want, atol=1e-6)
    assert x.min() == -1 and x.max() > 0.99


def _add_bad_images(root):
    good = open(next((root / "val" / "a").glob("*.png")), "rb").read()
    (root / "val" / "a" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (root / "val" / "b" / "cut.png").write_bytes(good[: len(good) // 2])   # truncated mid-file


def test_scan_images_drops_unreadable_files(tmp_path):
    make_image_folder(tmp_path)
    _add_bad_images(tmp_path)
    ds, _, _ = data.get_dataset("folder", "val", 16, str(tmp_path))
    assert len(ds) == 14
    bad = data.scan_images(ds)
    assert len(bad) == 2 and "broken.JPEG" in bad[0] and "cut.png" in bad[1]
    assert len(ds) == 12 and [ds[i][1] for i in range(12)] == [0] * 6 + [1] * 6   # labels kept
    assert data.scan_images(ds) == []
    mnist_like = torch.utils.data.TensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    assert data.scan_images(mnist_like) == []      # tensors in memory: nothing to scan


def test_encode_folder_with_bad_image_scan(tmp_path, capsys):
    """Without the scan a bad file stops the encode with a hint; with it, the file is skipped,
    counted, and recorded in meta.json."""
    make_image_folder(tmp_path)
    _add_bad_images(tmp_path)
    ckpt = str(tmp_path / "ckpt.pt")
    make_tokenizer_ckpt(ckpt, in_channels=3, image_size=8,
                        source={"dataset": "folder", "data_root": str(tmp_path)})
    with pytest.raises(ValueError, match="cannot read image .*--scan_images=True"):
        encode_split(ckpt, "val", str(tmp_path / "enc0"), batch_size=4)
    out = encode_split(ckpt, "val", str(tmp_path / "enc"), batch_size=4, scan_images=True)
    assert "2 unreadable image(s) skipped, 12 left" in capsys.readouterr().out
    meta, codes, _, labels = data.load_encoded(out)
    assert codes.shape[0] == 12 and len(meta["skipped_images"]) == 2
    assert meta["classes"] == ["a", "b"] and labels.tolist() == [0] * 6 + [1] * 6


# -----------------------------------------------------------------------------
# the encoded format


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return make_encoded(str(tmp_path_factory.mktemp("enc")), n_train=8, n_val=4)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_load_encoded_round_trip(enc):
    """What make_encoded's val split holds, value by value: the tokenizer's float16 latents of
    the images, their l2 residual codes (naive float64 search), the labels, and meta.json."""
    meta, codes, latents, labels = data.load_encoded(enc[1])
    tok = tk.Tokenizer.from_checkpoint(enc[2])
    x, y = class_images(4, seed=1)                               # make_encoded's val images
    with torch.no_grad():
        z = tok.encode_latents(x).half()                         # (4, 4, 4, 4): one batch, as encoded
    assert latents.dtype == np.float16 and np.array_equal(np.asarray(latents), z.numpy())
    assert codes.dtype == np.uint16 and codes.shape == (4, 4, 4, 2)
    assert codes.reshape(-1, 2).tolist() == naive_codes(z.float().reshape(-1, 4), tok.codebooks)
    assert labels.dtype == np.int64 and labels.tolist() == y.tolist()
    want = {"codes_shape": [4, 4, 4, 2], "codes_dtype": "uint16", "latents_shape": [4, 4, 4, 4],
            "latents_dtype": "float16", "labels_shape": [4], "labels_dtype": "int64",
            "codebook_size": 16, "levels": 2, "code_dim": 4, "metric": "l2", "shared_codebook": False,
            "image_size": 8, "dataset": "synthetic", "data_root": "", "split": "val", "num_classes": 3,
            "classes": [0, 1, 2], "tokenizer_fingerprint": tok.fingerprint(),
            "tokenizer_ckpt": os.path.join("..", "tok.pt"), "tokenizer_iter": 3,
            "stored_code_flips": 0.0, "complete": True}
    assert meta == want


@pytest.mark.parametrize("latents_dtype", ["float16", "int8"])
def test_encoded_format_round_trip(tmp_path, latents_dtype):
    """create_encoded / open_encoded / finish_encoded, then load_encoded: every value written is
    read back (int8: payload x scale, multiplied here in float32), and meta.json is what was
    written plus complete=True; a re-finish keeps the measured code flips."""
    rng = np.random.default_rng(0)
    n, g, L, D, K = 5, 3, 2, 4, 70000                        # K > 65536: int32 codes
    meta = data.encoded_meta(n, g, L, D, K, latents_dtype, metric="dot", num_classes=7,
                             classes=list("abcdefg"), split="val")
    d = str(tmp_path / "enc")
    data.create_encoded(d, meta)
    assert json.load(open(os.path.join(d, "meta.json"))) == {**meta, "complete": False}
    arr = data.open_encoded(d, meta)
    codes = rng.integers(0, K, (n, g, g, L)).astype(np.int32)
    labels = rng.integers(0, 7, n).astype(np.int64)
    if latents_dtype == "int8":
        payload = rng.integers(-127, 128, (n, g, g, D)).astype(np.int8)
        scale = rng.random((n, g, g, 1)).astype(np.float16)
        arr["latents"][:], arr["latents_scale"][:] = payload, scale
        want_z = payload.astype(np.float32) * scale.astype(np.float32)
    else:
        want_z = rng.standard_normal((n, g, g, D)).astype(np.float16)
        arr["latents"][:] = want_z
    arr["codes"][:], arr["labels"][:] = codes, labels
    for a in arr.values():
        a.flush()
    data.finish_encoded(d, {**meta, "stored_code_flips": 0.25})
    got_meta, got_codes, got_z, got_labels = data.load_encoded(d)
    assert got_meta == {**meta, "stored_code_flips": 0.25, "complete": True}
    assert got_codes.dtype == np.int32 and np.array_equal(got_codes, codes)
    assert np.array_equal(got_labels, labels)
    assert got_z.shape == (n, g, g, D) and np.array_equal(got_z[:], want_z)
    assert np.array_equal(got_z[2:4], want_z[2:4]) and np.array_equal(got_z[[4, 0]], want_z[[4, 0]])
    data.finish_encoded(d, meta)                             # a re-run that found it done
    assert data.load_encoded(d)[0]["stored_code_flips"] == 0.25


def test_load_encoded_missing_and_truncated_files(enc, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing meta.json"):
        data.load_encoded(str(tmp_path / "nope"))
    d = _copy(enc[0], str(tmp_path / "a"))
    path = os.path.join(d, "latents.npy")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)                     # a copy cut short
    with pytest.raises(ValueError, match=r"latents.npy: expected \(8, 4, 4, 4\) float16 .*"
                                         rf"the file \({size - 100:,} bytes\).*truncated"):
        data.load_encoded(d)
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=r"latents.npy is missing: expected \(8, 4, 4, 4\)"):
        data.load_encoded(d)
    d = _copy(enc[0], str(tmp_path / "b"))
    np.save(os.path.join(d, "codes.npy"), np.zeros((7, 4, 4, 2), np.uint16))   # wrong length
    with pytest.raises(ValueError, match=r"codes.npy inconsistent with meta.json: expected \(8, 4, 4, 2\) "
                                         r"uint16, got \(7, 4, 4, 2\)"):
        data.load_encoded(d)


def test_load_encoded_bad_meta(enc, tmp_path):
    d = _copy(enc[0], str(tmp_path / "a"))
    meta_path = os.path.join(d, "meta.json")
    meta = json.load(open(meta_path))
    with open(meta_path, "w") as f:
        f.write(json.dumps(meta)[:40])             # cut mid-write
    with pytest.raises(ValueError, match="meta.json.* is not valid JSON"):
        data.load_encoded(d)
    for key in ("codes_shape", "num_classes", "metric"):
        json.dump({k: v for k, v in meta.items() if k != key}, open(meta_path, "w"))
        with pytest.raises(ValueError, match=f"meta.json.* lacks key.*'{key}'"):
            data.load_encoded(d)
    json.dump({**meta, "complete": False}, open(meta_path, "w"))
    with pytest.raises(ValueError, match="incomplete"):
        data.load_encoded(d)
    json.dump([1, 2], open(meta_path, "w"))
    with pytest.raises(ValueError, match="expected a JSON object"):
        data.load_encoded(d)


def test_existing_encoding_guards(enc, tmp_path):
    meta = data.load_encoded(enc[0])[0]
    meta = {k: v for k, v in meta.items() if k != "complete"}
    assert data.existing_encoding(enc[0], meta) == "done"
    assert data.existing_encoding(enc[0], meta, overwrite=True) == "new"
    d = tmp_path / "mine"
    d.mkdir()
    np.save(d / "codes.npy", np.zeros(3))          # someone's file, no meta.json
    with pytest.raises(FileExistsError, match="codes.npy but no meta.json"):
        data.existing_encoding(str(d), meta)
    assert data.existing_encoding(str(d), meta, overwrite=True) == "new"
    (d / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.existing_encoding(str(d), meta)
    assert data.existing_encoding(str(d), meta, overwrite=True) == "new"
    # interrupted: the same encoding resumes, another one is refused, broken arrays start over
    d = _copy(enc[0], str(tmp_path / "cut"))
    json.dump({**meta, "complete": False}, open(os.path.join(d, "meta.json"), "w"))
    assert data.existing_encoding(d, meta) == "resume"
    assert data.existing_encoding(d, meta, overwrite=True) == "new"
    with pytest.raises(FileExistsError, match="different encoding.*tokenizer_fingerprint"):
        data.existing_encoding(d, {**meta, "tokenizer_fingerprint": "another"})
    os.remove(os.path.join(d, "latents.npy"))
    assert data.existing_encoding(d, meta) == "new"


# -----------------------------------------------------------------------------
# resuming an interrupted encoding


class _Killed(Exception):
    pass


class _Images(torch.utils.data.Dataset):
    """class_images(n), counting the images read; with fail_at=j, reading image j raises (a kill
    in the middle of the split)."""

    def __init__(self, n, fail_at=None):
        self.x, self.y = class_images(n)
        self.fail_at, self.reads = fail_at, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise _Killed(f"killed while reading image {i}")
        self.reads += 1
        return self.x[i], self.y[i]


N, BLOCK, KILL_AT = 22, 4, 13   # blocks [0, 4) .. [20, 22); the kill leaves [0, 12) done


def _encode(ckpt, out, ds, **kw):
    # batch_size 3 does not divide the block: a block's rows come from several batches
    return encode_split(ckpt, "val", str(out), batch_size=3, dataset=(ds, [0, 1, 2]), **kw)


def _interrupted(ckpt, out, **kw):
    with pytest.raises(_Killed):
        _encode(ckpt, out, _Images(N, fail_at=KILL_AT), block_images=BLOCK, **kw)
    assert json.load(open(out / "meta.json"))["complete"] is False
    assert sorted(os.listdir(out / "progress")) == ["000000000-000000004.json",
                                                    "000000004-000000008.json",
                                                    "000000008-000000012.json"]


def _resume(ckpt, out, **kw):
    """-> how many images the run read."""
    ds = _Images(N)
    _encode(ckpt, out, ds, **kw)
    return ds.reads


def _assert_same_encoding(a, b):
    """Byte-identical arrays, equal meta.json, nothing else left (no progress/)."""
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for f in os.listdir(a):
        if f.endswith(".npy"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert json.load(open(a / "meta.json")) == json.load(open(b / "meta.json"))


@pytest.fixture
def tok(tmp_path):
    ckpt = tmp_path / "tok.pt"
    make_tokenizer_ckpt(str(ckpt))
    return ckpt


def test_interrupted_encoding_resumes_where_it_stopped(tok, tmp_path, capsys):
    full = tmp_path / "full"
    assert _resume(tok, full, block_images=BLOCK) == N
    out = tmp_path / "enc"
    _interrupted(tok, out)
    capsys.readouterr()
    assert _resume(tok, out, block_images=BLOCK) == N - 12     # the three done blocks are kept
    assert f"resuming {out}: 3 of 6 blocks (12 of {N} images) already encoded" in capsys.readouterr().out
    _assert_same_encoding(full, out)
    assert data.load_encoded(str(out))[0]["stored_code_flips"] == 0.0   # float16: exact by design


def test_int8_code_flips_summed_over_runs(tmp_path):
    # 1,024 cosine codes in D = 4: close enough that int8 rounding changes some nearest codes
    # (in this setup, both among the first 12 images and among the rest)
    ckpt = tmp_path / "tok.pt"
    model = make_tokenizer_ckpt(str(ckpt), metric="cos", codebook_size=1024)
    full, out = tmp_path / "full", tmp_path / "enc"
    _encode(ckpt, full, _Images(N), block_images=BLOCK, latents_dtype="int8")
    _interrupted(ckpt, out, latents_dtype="int8")
    before = [json.load(open(out / "progress" / f)) for f in os.listdir(out / "progress")]
    flips_before = sum(m["code_flips"] for m in before)
    assert sum(m["codes"] for m in before) == 12 * 4 * 4 * 2          # images x grid x levels
    assert _resume(ckpt, out, block_images=BLOCK, latents_dtype="int8") == N - 12
    meta, codes, latents, _ = data.load_encoded(str(full))
    want = meta["stored_code_flips"]
    naive = (model.quantize(torch.from_numpy(latents[:])).numpy() != codes[:]).mean()
    assert want == pytest.approx(naive, abs=1e-12)                    # the share, counted directly
    # flips in the blocks of both runs: losing either run's count would change the share
    assert 0 < flips_before < round(want * N * 4 * 4 * 2)
    assert data.load_encoded(str(out))[0]["stored_code_flips"] == want
    _assert_same_encoding(full, out)


def test_markers_of_another_block_size_are_ignored(tok, tmp_path, capsys):
    full, out = tmp_path / "full", tmp_path / "enc"
    _encode(tok, full, _Images(N), block_images=8)
    _interrupted(tok, out)                          # markers of 4-image blocks
    capsys.readouterr()
    assert _resume(tok, out, block_images=8) == N   # blocks of 8: none is recorded done
    assert "0 of 3 blocks (0 of 22 images) already encoded" in capsys.readouterr().out
    _assert_same_encoding(full, out)


def test_overwrite_after_an_interruption_starts_over(tok, tmp_path, capsys):
    full, out = tmp_path / "full", tmp_path / "enc"
    _encode(tok, full, _Images(N), block_images=BLOCK)
    _interrupted(tok, out)
    assert _resume(tok, out, block_images=BLOCK, overwrite=True) == N   # old markers dropped
    _assert_same_encoding(full, out)
    # a run killed after finishing but before removing progress/: the next one just tidies up
    (full / "progress").mkdir()
    capsys.readouterr()
    assert _resume(tok, full, block_images=BLOCK) == 0
    assert "nothing to do" in capsys.readouterr().out and not (full / "progress").exists()


def test_rank_blocks_cover_the_remaining_blocks_once():
    layout = block_layout(N, BLOCK)
    todo = [b for b in layout if b not in {(0, 4), (8, 12)}]
    for world in (1, 2, 3, 7):
        shares = [rank_blocks(todo, r, world) for r in range(world)]
        assert sorted(b for s in shares for b in s) == todo


def _png_bytes_ok(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()                                  # decodes every byte: a truncated file raises
        return im.format, im.size


def test_save_grid_is_atomic(tmp_path):
    path = str(tmp_path / "sub" / "g.png")
    data.save_grid(torch.rand(5, 1, 4, 4) * 2 - 1, path, nrow=2)
    assert _png_bytes_ok(path) == ("PNG", (2 * 4, 3 * 4))
    assert os.listdir(tmp_path / "sub") == ["g.png"]           # no temp file left behind
    data.save_grid(torch.rand(2, 3, 4, 4) * 2 - 1, path, nrow=2)  # replaces it
    assert _png_bytes_ok(path) == ("PNG", (2 * 4, 4)) and os.listdir(tmp_path / "sub") == ["g.png"]
    with pytest.raises(ValueError, match="expected an image file name such as grid.png, got .*grid'"):
        data.save_grid(torch.zeros(1, 1, 4, 4), str(tmp_path / "grid"), nrow=1)


def test_save_grid_failure_keeps_the_previous_file(tmp_path, monkeypatch):
    """A writer that dies halfway (disk full, a kill) must not cost the PNG already there."""
    from PIL import Image
    path = str(tmp_path / "g.png")
    data.save_grid(torch.rand(4, 1, 4, 4) * 2 - 1, path, nrow=2)
    before = open(path, "rb").read()
    written = []

    def dying_save(self, fp, format=None, **kw):
        with open(fp, "wb") as f:                  # part of a PNG, then the failure
            f.write(before[:20])
        written.append(fp)
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        data.save_grid(torch.rand(4, 1, 4, 4) * 2 - 1, path, nrow=2)
    assert written and written[0] != path                      # it wrote somewhere else first
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["g.png"]


# -----------------------------------------------------------------------------
# hostile inputs: odd image folders, a busy or full encode_dir, NaN / out-of-range rows


def _write_image(path, fmt=None):
    from PIL import Image
    Image.fromarray(np.full((10, 12, 3), 128, np.uint8)).save(path, format=fmt)


def test_image_folder_opens_every_pillow_format_any_case_and_ignores_hidden(tmp_path, capsys):
    """.webp / .bmp / .tif / .JPG beside PNGs are images; .thumbnails/ and .DS_Store are not data
    (a hidden class would shift every label); other files are skipped with a count."""
    make_image_folder(tmp_path)
    a = tmp_path / "train" / "a"
    for name, fmt in [("w.webp", "WEBP"), ("m.bmp", "BMP"), ("t.tif", "TIFF"), ("t2.TIFF", "TIFF"),
                      ("u.JPG", "JPEG"), ("v.Png", "PNG")]:
        _write_image(a / name, fmt)
    (a / ".DS_Store").write_bytes(b"\0")
    (a / "notes.txt").write_text("x")
    (a / "labels.csv").write_text("x")
    (tmp_path / "train" / ".thumbnails").mkdir()
    _write_image(tmp_path / "train" / ".thumbnails" / "0.png")
    ds, n_cls, _ = data.get_dataset("folder", "train", 8, str(tmp_path))
    assert ds.classes == ["a", "b"] and n_cls == 2                 # class order as before
    names = [os.path.basename(p) for p, y in ds.items if y == 0]
    assert sorted(names) == sorted([f"{i}.png" for i in range(6)]
                                   + ["w.webp", "m.bmp", "t.tif", "t2.TIFF", "u.JPG", "v.Png"])
    assert [y for _, y in ds.items].count(1) == 6
    assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))
    out = capsys.readouterr().out
    assert "skipped 2 file(s) that are not images Pillow can open: 1 x .csv, 1 x .txt" in out


def test_image_folder_empty_class_is_an_error_naming_it(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\] hold no images \(of 3 classes\)"):
        data.get_dataset("folder", "train", 8, str(tmp_path))


def test_unreadable_image_hint_names_an_option_of_the_running_script(tmp_path):
    """The loader's default hint is right for every caller (train.py's images path has no
    scan_images); encode.py passes its own."""
    make_image_folder(tmp_path)
    (tmp_path / "val" / "a" / "0.png").write_bytes(b"cut")
    ds, _, _ = data.get_dataset("folder", "val", 8, str(tmp_path))
    with pytest.raises(ValueError, match=r"0.png.*remove or replace the file \(train_tokenizer.py "
                                         r"and encode.py skip unreadable images with --scan_images"):
        ds[0]
    ckpt = str(tmp_path / "ckpt.pt")
    make_tokenizer_ckpt(ckpt, in_channels=3, source={"dataset": "folder", "data_root": str(tmp_path)})
    with pytest.raises(ValueError, match=r"0.png.*\(pass --scan_images=True to find and skip"):
        encode_split(ckpt, "val", str(tmp_path / "enc"))


def test_dirlock_refuses_a_second_holder_and_names_the_first(tmp_path):
    import subprocess
    from support.dirlock import DirInUseError, lock_dir
    d = tmp_path / "run"
    with lock_dir(str(d)):
        assert f"pid {os.getpid()}" in (d / ".lock").read_text()
        with pytest.raises(DirInUseError, match=rf"{d} is in use by another process \(pid "
                                                rf"{os.getpid()}, started .*\): wait for it or use another directory"):
            lock_dir(str(d))
        # another process sees it too (flock is per open file, across processes)
        code = ("import sys; sys.path.insert(0, sys.argv[2]); from support.dirlock import lock_dir\n"
                "try:\n    lock_dir(sys.argv[1])\nexcept RuntimeError as e:\n    print(e)")
        r = subprocess.run([sys.executable, "-c", code, str(d), ROOT], capture_output=True, text=True)
        assert f"in use by another process (pid {os.getpid()}" in r.stdout, r.stderr
    lock = lock_dir(str(d))                      # released: free again; the file stays
    lock.release()
    assert os.listdir(d) == [".lock"]


def test_second_encode_of_a_busy_dir_stops_at_once_and_touches_nothing(tok, tmp_path):
    from support.dirlock import DirInUseError, lock_dir
    out = tmp_path / "enc"
    _interrupted(tok, out)                        # a half-done encoding, as mid-way
    # every file but .lock, which names its holder (pid, start time): the first run rewrites it
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if os.path.isfile(out / f) and f != ".lock"}
    ds = _Images(N)
    with lock_dir(str(out)):                      # the first encode, still running
        with pytest.raises(DirInUseError, match="is in use by another process"):
            _encode(tok, out, ds, block_images=BLOCK)
    assert ds.reads == 0 and len(os.listdir(out / "progress")) == 3
    assert {f: (out / f).read_bytes() for f in before} == before
    _encode(tok, out, _Images(N), block_images=BLOCK)   # the first one finishes cleanly
    assert data.load_encoded(str(out))[0]["complete"] and not os.path.exists(out / "progress")


def test_encode_progress_bar_reaches_100_percent(tok, tmp_path, capsys):
    _encode(tok, tmp_path / "enc", _Images(N))          # 22 images in batches of 3: 8 batches
    err = capsys.readouterr().err
    assert "100%" in err and "8/8" in err and "7/8" not in err.split("\r")[-1]


def test_full_disk_is_an_error_before_any_work_and_leaves_nothing(tok, tmp_path, monkeypatch):
    import errno
    import shutil
    ds = _Images(N)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(OSError, match=r"no space left on .*enc: need [\d,]+ bytes .*, have 100"):
        _encode(tok, tmp_path / "enc", ds)
    assert ds.reads == 0 and sorted(os.listdir(tmp_path / "enc")) == [".lock"]
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(fd, offset, length):                 # the check passed, the reservation fails
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no space left on .*enc: need [\d,]+ bytes"):
        _encode(tok, tmp_path / "enc", ds)
    assert ds.reads == 0 and sorted(os.listdir(tmp_path / "enc")) == [".lock"]


def test_create_encoded_reserves_every_byte(tmp_path):
    meta = data.encoded_meta(8192, 4, 2, 8, 16, "int8")      # latents: 1 MB, codes 512 KB, ...
    data.create_encoded(str(tmp_path), meta)
    for k in ("codes", "latents", "latents_scale", "labels"):
        st = os.stat(tmp_path / f"{k}.npy")
        assert st.st_size > 60_000 and st.st_blocks * 512 >= st.st_size, k   # allocated, not sparse


def test_first_bad_row_vs_naive():
    from support.latents import first_bad_row
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 3, 2)).astype(np.float16)
    assert first_bad_row(a, np.isfinite, chunk_bytes=7) is None
    for rows in ([37], [49], [0, 20], [12, 13]):
        b = a.copy()
        for r in rows:
            b[r, rng.integers(3), rng.integers(2)] = rng.choice([np.nan, np.inf, -np.inf])
        naive = next(i for i in range(50) if not all(np.isfinite(v) for v in b[i].ravel()))
        for chunk in (1, 7, 12 * 5, 1 << 20):       # a row per chunk, several, all at once
            assert first_bad_row(b, np.isfinite, chunk_bytes=chunk) == naive == min(rows)


@pytest.mark.parametrize("latents_dtype", ["float16", "int8"])
def test_load_encoded_names_the_file_and_row_of_bad_values(tok, tmp_path, latents_dtype):
    """int8 scales that are NaN / inf, codes >= K and labels out of range are found when the
    split is opened, not as a NaN loss or an index error many steps later. float16 latents are
    not read when the split is opened (that would read the whole file at every start): their
    batches are checked as they are read (test_nan_latents_are_found_in_the_batch_that_reads_them)."""
    good = tmp_path / "good"
    _encode(tok, good, _Images(N), latents_dtype=latents_dtype)
    data.load_encoded(str(good))
    fin = r"finite values \(no NaN / inf\)"
    cases = [("codes", (9, 1, 2, 1), 16, r"codes in \[0, 16\)", r"\[16\]"),
             ("labels", (3,), -1, r"labels in \[0, 3\)", r"\[-1\]")]
    if latents_dtype == "int8":
        cases += [("latents_scale", (17, 2, 1, 0), np.nan, fin, r"\[nan\]"),
                  ("latents_scale", (5, 0, 0, 0), np.inf, fin, r"\[inf\]")]
    for i, (name, where, value, want, found) in enumerate(cases):
        d = _copy(good, tmp_path / f"bad{i}")
        a = np.load(d / f"{name}.npy", mmap_mode="r+")
        a[where] = value
        a.flush()
        del a
        with pytest.raises(ValueError, match=rf"{d}/{name}.npy: expected {want}, row {where[0]} holds {found}"):
            data.load_encoded(str(d))


def test_nan_latents_are_found_in_the_batch_that_reads_them(tok, tmp_path, monkeypatch):
    """float16 latents: load_encoded reads only the small arrays (never latents.npy); finite_rows
    checks a batch as it is read and names the file and the bad row's index in the split."""
    d = tmp_path / "enc"
    _encode(tok, d, _Images(N))
    a = np.load(d / "latents.npy", mmap_mode="r+")
    a[17, 2, 1, 0], a[20, 0, 0, 3] = np.nan, -np.inf
    a.flush()
    del a
    scanned = []
    real = data.first_bad_row
    monkeypatch.setattr(data, "first_bad_row", lambda arr, ok: scanned.append(arr.shape) or real(arr, ok))
    meta, codes, latents, labels = data.load_encoded(str(d))  # opens: the latents are not scanned
    assert latents.shape not in scanned and len(scanned) == 2
    idx = np.array([1, 4, 20, 17, 21])
    assert data.finite_rows(latents[idx[:2]], idx[:2], latents) is not None
    with pytest.raises(ValueError, match=rf"{d}/latents.npy: expected finite latents \(no NaN / inf\), "
                                         r"row 20 holds \[-inf\]"):
        data.finite_rows(latents[idx], idx, latents)
    sorted_idx = np.sort(idx)
    with pytest.raises(ValueError, match=r"row 17 holds \[nan\]"):
        data.finite_rows(latents[sorted_idx], sorted_idx, latents)


def test_nan_latents_while_encoding_are_an_error_naming_the_image(tok, tmp_path):
    from support.on_the_fly import OnTheFlySplit
    ds = _Images(N)
    ds.x[14, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"latents of row 14 \(image 14\) are not finite"):
        _encode(tok, tmp_path / "enc", ds)
    split = OnTheFlySplit(tk.Tokenizer.from_checkpoint(str(tok)), ds)
    split.codes[np.arange(0, 6)]
    with pytest.raises(ValueError, match=r"latents of image 14 are not finite"):
        split.codes[np.arange(12, 18)]
