"""
Storing latents for SNCE in fewer bytes. D = 256 latents (IBQ) take 128 KB per image at
16 x 16 tokens in float16; the 1-byte formats here divide each vector by a float16 scale
s = max|z| / top and round, halving that. encode.py writes them (--latents_dtype=int8) and
data.load_encoded reads them back (a ScaledLatents, checked for NaN / inf rows by
first_bad_row); bench_pretrained.py measures what the rounding does to SNCE's
target q and to the nearest codes.

    from support.latents import pack_latents, unpack_latents
    payload, scale = pack_latents(z, "int8")          # (..., D) int8, (..., 1) float16
    z2 = unpack_latents(payload, scale, "int8")       # (..., D) float32

Tests: python -m pytest -q tests/test_pretrained.py tests/test_data.py
"""

import numpy as np
import torch

# -----------------------------------------------------------------------------
# storing D = 256 latents for SNCE: a per-vector scaled 1-byte format halves fp16's 128 KB/image

LATENT_FORMATS = {  # name: (bytes per element, bytes of the per-vector float16 scale)
    "float32": (4, 0), "float16": (2, 0), "bfloat16": (2, 0), "int8": (1, 2), "float8_e4m3": (1, 2)}
_TOP = {"int8": 127.0, "float8_e4m3": 448.0}  # largest magnitude each 1-byte format holds


def pack_latents(z, fmt):
    """z (..., D) -> (payload (..., D), scale (..., 1) float16 or None). The 1-byte formats divide
    each vector by s = max|z| / top (top = 127 for int8, 448 for e4m3) and round: int8 to the
    nearest integer (error <= s / 2), float8_e4m3 to 3 mantissa bits (relative error <= 2^-4)."""
    if fmt not in LATENT_FORMATS:
        raise ValueError(f"latent format must be one of {tuple(LATENT_FORMATS)}, got {fmt!r}")
    if fmt not in _TOP:
        return z.to(getattr(torch, fmt)), None
    s = (z.float().abs().amax(-1, keepdim=True) / _TOP[fmt]).half()   # stored: quantize with it
    inv = torch.where(s > 0, 1 / s.float(), torch.zeros_like(s, dtype=torch.float))
    y = (z.float() * inv).clamp(-_TOP[fmt], _TOP[fmt])
    return (y.round().to(torch.int8) if fmt == "int8" else y.to(torch.float8_e4m3fn)), s


def unpack_latents(payload, scale, fmt):
    """-> float32 latents (..., D): the inverse of pack_latents (up to its rounding)."""
    if fmt not in LATENT_FORMATS:
        raise ValueError(f"latent format must be one of {tuple(LATENT_FORMATS)}, got {fmt!r}")
    x = payload.float()
    return x if scale is None else x * scale.float()


class ScaledLatents:
    """int8 latents (N, h, w, D) with a float16 scale per vector (N, h, w, 1), read like the
    float16 memmap: self[idx] -> float32 numpy (..., D) = payload * scale (unpack_latents)."""

    def __init__(self, payload, scale):
        self.payload, self.scale = payload, scale
        self.shape, self.dtype = payload.shape, np.dtype(np.float32)

    def __len__(self):
        return len(self.payload)

    def __getitem__(self, idx):
        return unpack_latents(torch.from_numpy(np.array(self.payload[idx])),
                              torch.from_numpy(np.array(self.scale[idx])), "int8").numpy()


def first_bad_row(a, ok, chunk_bytes=1 << 26):
    """The first row i of a (N, ...) array or memmap for which ok(rows) (a (B, ...) chunk -> (B, ...)
    bool) is False somewhere, or None: read in chunks of about chunk_bytes, so checking a memmap
    larger than memory reads it once from disk and holds one chunk at a time."""
    row_bytes = max(1, a.dtype.itemsize * int(np.prod(a.shape[1:])))
    step = max(1, chunk_bytes // row_bytes)
    for lo in range(0, len(a), step):
        good = ok(np.asarray(a[lo:lo + step])).reshape(min(step, len(a) - lo), -1).all(1)
        if not good.all():
            return lo + int(np.argmin(good))
    return None
