"""
A dataset encoded by a tokenizer batch by batch as train.py reads it (data_source=images), in
place of encode.py's memmaps: its codes / latents / labels index like the memmaps that
data.load_encoded returns. data.open_on_the_fly builds one with the meta.json encode.py would
write for the same images.

    from support import data
    meta, codes, latents, labels = data.open_on_the_fly(tok, info, ckpt, "folder", "train", root)
    codes[idx], latents[idx], labels[idx]   # (B, h, w, L) int64, (B, h, w, D) float32, (B,) int64

Tests: python -m pytest -q tests/test_train_on_the_fly.py
"""

from contextlib import nullcontext

import numpy as np
import torch

from support.common import epoch_flips


class _Rows:
    """One array of an OnTheFlySplit (codes, latents or labels), indexed like a memmap."""

    def __init__(self, source, field, shape):
        self.source, self.field, self.shape = source, field, shape

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, idx):
        return self.source.rows(idx)[self.field]


class _WithIndex(torch.utils.data.Dataset):
    """ds[i] = (x, y) -> (i, x, y): a prefetched batch says which rows it holds."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return (i, *self.ds[i])


class OnTheFlySplit:
    """A dataset encoded by a tokenizer batch by batch as it is read, in place of encode.py's
    memmaps (no disk): .codes[idx] (B, h, w, L) int64, .latents[idx] (B, h, w, D) float32 and
    .labels[idx] (B,) int64 are torch tensors on `device` (idx: an index array or a slice). The
    three reads of one batch encode it once (the last batch is kept). The encoder runs under
    no_grad and `autocast` (bf16 on CUDA, as encode.py); z is its output in float32, SNCE's
    target, and the codes are tok.quantize(z), the tokenizer's own (encode.py's float16 storage
    quantizes the rounded z instead). With flip_seed, image i is mirrored in epoch e (set_epoch)
    when common.epoch_flips(n, flip_seed, e)[i]: a function of (seed, epoch, index), so a resume
    mirrors the same images; before set_epoch nothing is. prefetch(batches): num_workers
    DataLoader workers read (decode, resize) the batches that will be asked for ahead."""

    def __init__(self, tok, ds, device="cpu", autocast=None, num_workers=0, flip_seed=None):
        self.tok, self.ds, self.device, self.num_workers = tok, ds, device, num_workers
        self.autocast, self.flip_seed, self.epoch = autocast or nullcontext(), flip_seed, None
        g, c = tok.grid, tok.config
        self.codes = _Rows(self, 0, (len(ds), g, g, c.levels))
        self.latents = _Rows(self, 1, (len(ds), g, g, c.code_dim))
        self.labels = _Rows(self, 2, (len(ds),))
        self._last, self._stream, self._pending = (None, None), None, None

    def __len__(self):
        return len(self.ds)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def rows(self, idx):
        """-> (codes, latents, labels) of these rows, encoded once per (epoch, rows)."""
        idx = np.arange(len(self))[idx]  # slices, lists, negative indices -> (B,) int64
        if idx.ndim != 1:
            raise ValueError(f"on-the-fly rows: expected a 1-D index array or a slice, got shape {idx.shape}")
        key = (self.epoch if self.flip_seed is not None else None, idx.tobytes())
        if self._last[0] != key:
            self._last = (key, self._encode(idx))
        return self._last[1]

    @torch.no_grad()
    def _encode(self, idx):
        x, y = self._read(idx)                                          # (B, C, S, S), (B,)
        if self.flip_seed is not None and self.epoch is not None:
            m = torch.from_numpy(epoch_flips(len(self), self.flip_seed, self.epoch)[idx]).to(x.device)
            x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
        with self.autocast:
            z = self.tok.encode_latents(x)
        z = z.float().contiguous()                                      # (B, h, w, D), as memmap rows
        if not torch.isfinite(z).all():  # NaN latents would quantize to code 0 and poison SNCE's q
            bad = int(idx[int(torch.isfinite(z).flatten(1).all(1).logical_not().nonzero()[0])])
            where = f" ({self.ds.items[bad][0]})" if hasattr(self.ds, "items") else ""
            raise ValueError(f"the tokenizer's latents of image {bad}{where} are not finite (NaN / "
                             "inf): check the image and the tokenizer's weights")
        return self.tok.quantize(z), z, y.long()

    def prefetch(self, batches):
        """Read these batches (index arrays, in the order they will be asked for) ahead in
        num_workers DataLoader workers; replaces an earlier stream; nothing without workers. A
        request for other rows is read here and leaves the stream where it is."""
        self.close()
        if self.num_workers:
            loader = torch.utils.data.DataLoader(
                _WithIndex(self.ds), batch_sampler=(list(map(int, b)) for b in batches),
                num_workers=self.num_workers, pin_memory=str(self.device).startswith("cuda"))
            self._stream = iter(loader)

    def close(self):
        """Stop the prefetching workers now (the split and its arrays refer to each other, so
        otherwise they stop whenever the garbage collector gets to them)."""
        self._stream = self._pending = None

    def _read(self, idx):
        """Images and labels of rows idx on the device: the next prefetched batch if it holds
        exactly these rows, else read (and collated) in this process."""
        if self._stream is not None and self._pending is None:
            self._pending = next(self._stream, None)
            if self._pending is None:  # the stream is used up
                self._stream = None
        if self._pending is not None and np.array_equal(self._pending[0].numpy(), idx):
            (_, x, y), self._pending = self._pending, None
        else:
            x, y = torch.utils.data.default_collate([self.ds[int(i)] for i in idx])
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
