"""data.py tests: the ImageFolder dataset (resize / crop, 16-bit grayscale PNGs, unreadable files
and the pre-scan that drops them, also through encode.py), the encoded format's errors
(missing, truncated, inconsistent memmaps; invalid or incomplete meta.json; foreign files),
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
from helpers import class_images, make_encoded, make_image_folder, make_tokenizer_ckpt  # noqa: E402


def test_image_folder_dataset_and_errors(tmp_path):
    make_image_folder(tmp_path)
    ds, n_cls, ch = data.get_dataset("folder", "train", 16, str(tmp_path))
    x, y = ds[7]
    assert (n_cls, ch, len(ds), x.shape, y) == (2, 3, 12, (3, 16, 16), 1)
    assert x.min() >= -1 and x.max() <= 1 and data.class_names(ds, n_cls) == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.get_dataset("folder", "test", 16, str(tmp_path))
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images"):
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
    meta, codes, latents, labels = data.load_encoded(enc[1])
    assert codes.shape == (4, 4, 4, 2) and latents.shape == (4, 4, 4, 4) and labels.shape == (4,)
    assert meta["complete"] is True and meta["classes"] == [0, 1, 2]


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
