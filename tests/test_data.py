"""data.py tests: the ImageFolder dataset (resize / crop, 16-bit grayscale PNGs, unreadable files
and the pre-scan that drops them, also through encode.py), and the encoded format's errors
(missing, truncated, inconsistent memmaps; invalid or incomplete meta.json; foreign files), and
save_grid's atomic write (a failing writer leaves the previous PNG as it was)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from encode import encode_split  # noqa: E402
from helpers import make_encoded, make_image_folder, make_tokenizer_ckpt  # noqa: E402


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
    assert data.existing_encoding(enc[0], {k: v for k, v in meta.items() if k != "complete"})
    d = tmp_path / "mine"
    d.mkdir()
    np.save(d / "codes.npy", np.zeros(3))          # someone's file, no meta.json
    with pytest.raises(FileExistsError, match="codes.npy but no meta.json"):
        data.existing_encoding(str(d), meta)
    assert data.existing_encoding(str(d), meta, overwrite=True) is False
    (d / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.existing_encoding(str(d), meta)
    assert data.existing_encoding(str(d), meta, overwrite=True) is False


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
