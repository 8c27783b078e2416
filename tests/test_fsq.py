"""Cosmos-Tokenizer discrete image (FSQ) files through support/fsq_arch.py. Without the real
weights: a tiny model of the upstream DI architecture (written below from Cosmos-Tokenizer's
cosmos_tokenizer/networks/discrete_image.py, modules/layers2d.py, modules/patching.py and
modules/quantizers.py, with upstream's module and parameter names) is exported the way NVIDIA's
exporter does it (torch.jit.trace of encoder_jit() on an image, of decoder_jit() on the encoder's
indices), saved as encoder.jit / decoder.jit, loaded, and compared with the eager model and with
implicit_quantize(fsq_bound(z)) in float64; a bfloat16 export stands in for the releases."""

import math
import os
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import snce  # noqa: E402
from support import fsq_arch as Q  # noqa: E402
from support.implicit import fsq_bound, fsq_levels, implicit_codebook, implicit_quantize  # noqa: E402

# tracing a model warns (deprecation; shapes taken as constants, as in upstream's own export)
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]

LEVELS = [8, 8, 8, 5, 5, 5]          # every DI release: K = 64,000

# -----------------------------------------------------------------------------
# the upstream DI architecture, tiny (einops calls written as permute / reshape)


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


class Patcher(nn.Module):
    """Haar wavelet patching: log2(p) steps, each (C, H, W) -> (4C, H/2, W/2), halved."""

    def __init__(self, patch_size):
        super().__init__()
        self.register_buffer("wavelets", torch.tensor([0.7071067811865476] * 2), persistent=False)
        self.register_buffer("_arange", torch.arange(2), persistent=False)
        self.range = range(int(math.log2(patch_size)))

    def _dwt(self, x):
        dtype, g = x.dtype, x.shape[1]
        hl = self.wavelets.flip(0).reshape(1, 1, -1).repeat(g, 1, 1).to(dtype=dtype)
        hh = (self.wavelets * ((-1) ** self._arange)).reshape(1, 1, -1).repeat(g, 1, 1)
        hh = hh.to(dtype=dtype)
        x = F.pad(x, pad=(0, 1, 0, 1), mode="reflect").to(dtype)
        xl = F.conv2d(x, hl.unsqueeze(2), groups=g, stride=(1, 2))
        xh = F.conv2d(x, hh.unsqueeze(2), groups=g, stride=(1, 2))
        out = torch.cat([F.conv2d(xl, hl.unsqueeze(3), groups=g, stride=(2, 1)),
                         F.conv2d(xl, hh.unsqueeze(3), groups=g, stride=(2, 1)),
                         F.conv2d(xh, hl.unsqueeze(3), groups=g, stride=(2, 1)),
                         F.conv2d(xh, hh.unsqueeze(3), groups=g, stride=(2, 1))], dim=1)
        return out / 2

    def forward(self, x):
        for _ in self.range:
            x = self._dwt(x)
        return x


class UnPatcher(Patcher):
    def _idwt(self, x):
        dtype, g = x.dtype, x.shape[1] // 4
        hl = self.wavelets.flip([0]).reshape(1, 1, -1).repeat([g, 1, 1]).to(dtype=dtype)
        hh = (self.wavelets * ((-1) ** self._arange)).reshape(1, 1, -1).repeat(g, 1, 1)
        hh = hh.to(dtype=dtype)
        xll, xlh, xhl, xhh = torch.chunk(x.to(dtype), 4, dim=1)
        ct = F.conv_transpose2d
        yl = ct(xll, hl.unsqueeze(3), groups=g, stride=(2, 1)) + ct(xlh, hh.unsqueeze(3), groups=g,
                                                                    stride=(2, 1))
        yh = ct(xhl, hl.unsqueeze(3), groups=g, stride=(2, 1)) + ct(xhh, hh.unsqueeze(3), groups=g,
                                                                    stride=(2, 1))
        y = ct(yl, hl.unsqueeze(2), groups=g, stride=(1, 2)) + ct(yh, hh.unsqueeze(2), groups=g,
                                                                  stride=(1, 2))
        return y * 2

    def forward(self, x):
        for _ in self.range:
            x = self._idwt(x)
        return x


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.dropout = norm(cout), nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww))
        w = F.softmax(w * (int(c) ** (-0.5)), dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


class Encoder(nn.Module):
    def __init__(self, channels, channels_mult, num_res_blocks, attn_resolutions, resolution,
                 z_channels, spatial_compression, patch_size):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(channels_mult), num_res_blocks
        self.patcher = Patcher(patch_size)
        self.num_downsamples = int(math.log2(spatial_compression)) - int(math.log2(patch_size))
        self.conv_in = nn.Conv2d(3 * patch_size ** 2, channels, 3, padding=1)
        curr_res, in_mult = resolution // patch_size, (1,) + tuple(channels_mult)
        self.down = nn.ModuleList()
        for i in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = channels * in_mult[i], channels * channels_mult[i]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i < self.num_downsamples:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(block_in, block_in), AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out, self.conv_out = norm(block_in), nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(self.patcher(x))
        for i in range(self.num_resolutions):
            for j in range(self.num_res_blocks):
                h = self.down[i].block[j](h)
                if len(self.down[i].attn) > 0:
                    h = self.down[i].attn[j](h)
            if i < self.num_downsamples:
                h = self.down[i].downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, channels, channels_mult, num_res_blocks, attn_resolutions, resolution,
                 z_channels, spatial_compression, patch_size):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(channels_mult), num_res_blocks
        self.unpatcher = UnPatcher(patch_size)
        self.num_upsamples = int(math.log2(spatial_compression)) - int(math.log2(patch_size))
        block_in = channels * channels_mult[-1]
        curr_res = (resolution // patch_size) // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1 = ResnetBlock(block_in, block_in), AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = channels * channels_mult[i]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i >= self.num_resolutions - self.num_upsamples:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3 * patch_size ** 2, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            for j in range(self.num_res_blocks + 1):
                h = self.up[i].block[j](h)
                if len(self.up[i].attn) > 0:
                    h = self.up[i].attn[j](h)
            if i >= self.num_resolutions - self.num_upsamples:
                h = self.up[i].upsample(h)
        return self.unpatcher(self.conv_out(swish(self.norm_out(h))))


class FSQuantizer(nn.Module):
    """Upstream's FSQ (num_codebooks 1, no projection): bound, round, index = sum of the
    level positions times basis = cumprod((1, L_0, .., L_{D-2}))."""

    def __init__(self, levels, dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0,
                                                     dtype=torch.int32), persistent=False)
        self.project_in, self.project_out = nn.Identity(), nn.Identity()

    def bound(self, z, eps=1e-3):
        half_l = (self._levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        return (z + (offset / half_l).atanh()).tanh() * half_l - offset

    def indices_to_codes(self, indices):
        digits = (indices[..., None] // self._basis) % self._levels
        codes = (digits - self._levels // 2) / (self._levels // 2)
        return self.project_out(codes).permute(0, 3, 1, 2).to(self.dtype)

    def forward(self, z):
        B, D, h, w = z.shape
        z = self.project_in(z.permute(0, 2, 3, 1).reshape(B, h * w, D)).reshape(B, h * w, 1, D)
        zhat = self.bound(z)
        codes = (zhat + (zhat.round() - zhat).detach()) / (self._levels // 2)
        indices = ((codes * (self._levels // 2) + self._levels // 2).float()
                   * self._basis).sum(dim=-1).to(torch.int32)
        out = self.project_out(codes.reshape(B, h * w, D)).reshape(B, h, w, D).permute(0, 3, 1, 2)
        loss = torch.zeros_like(out.mean(dim=[1, 2, 3], keepdim=True))
        return indices.reshape(B, h, w), out.to(self.dtype), loss


class InvQuantizerJit(nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, indices):
        return self.quantizer.indices_to_codes(indices).to(self.quantizer.dtype)


class DiscreteImageTokenizer(nn.Module):
    def __init__(self, levels=LEVELS, dtype=torch.float64, z_channels=16, **arch):
        super().__init__()
        arch = {**dict(channels=32, channels_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                       resolution=16, spatial_compression=4, patch_size=2), **arch}
        self.encoder = Encoder(z_channels=z_channels, **arch)
        self.decoder = Decoder(z_channels=z_channels, **arch)
        self.quant_conv = nn.Conv2d(z_channels, len(levels), 1)
        self.post_quant_conv = nn.Conv2d(len(levels), z_channels, 1)
        self.quantizer = FSQuantizer(list(levels), dtype)

    def encoder_jit(self):
        return nn.Sequential(OrderedDict([("encoder", self.encoder), ("quant_conv", self.quant_conv),
                                          ("quantizer", self.quantizer)]))

    def decoder_jit(self):
        return nn.Sequential(OrderedDict([("inv_quant", InvQuantizerJit(self.quantizer)),
                                          ("post_quant_conv", self.post_quant_conv),
                                          ("decoder", self.decoder)]))


def tiny_di(seed=0, dtype=torch.float64, levels=LEVELS, **arch):
    torch.manual_seed(seed)
    m = DiscreteImageTokenizer(levels, dtype, **arch)
    with torch.no_grad():   # non-trivial norms and biases; latents spread over several levels
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 1 / p[0].numel() ** 0.5)
                    + (1.0 if "norm" in n and n.endswith("weight") else 0))
        m.quant_conv.weight.mul_(3.0)
    return m.to(dtype).eval()


def export(model, folder, dtype=torch.float64, size=16):
    """NVIDIA's exporter: trace encoder_jit() on a random image, decoder_jit() on its indices."""
    os.makedirs(folder, exist_ok=True)
    example = torch.randn(1, 3, size, size).to(dtype)
    with torch.no_grad():
        enc = torch.jit.trace(model.encoder_jit(), example, strict=True)
        dec = torch.jit.trace(model.decoder_jit(), enc(example)[0], strict=True)
    torch.jit.save(enc, os.path.join(folder, "encoder.jit"))
    torch.jit.save(dec, os.path.join(folder, "decoder.jit"))
    return folder


@pytest.fixture(scope="module")
def f64(tmp_path_factory):
    model = tiny_di()
    return model, export(model, str(tmp_path_factory.mktemp("di") / "Cosmos-DI-tiny"))


# -----------------------------------------------------------------------------
# the loaded files against the eager model and the FSQ math


def test_encode_decode_match_eager_model_and_fsq_math(f64):
    model, folder = f64
    tok = Q.load_fsq(folder, image_size=16, verbose=False)
    assert tok.dtype == torch.float64 and tok.grid == 4 and tok.config.downsample == 4
    assert tok.config.fsq_levels == tuple(LEVELS) and tok.config.codebook_size == 64000
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        raw = model.quant_conv(model.encoder(x))                            # (B, 6, 4, 4)
        idx, codes_eager, _ = model.quantizer(raw)
        img_eager = model.decoder(model.post_quant_conv(model.quantizer.indices_to_codes(idx)))
    z = tok.encode_latents(x)                                               # (B, 4, 4, 6)
    torch.testing.assert_close(z, fsq_bound(raw.permute(0, 2, 3, 1), LEVELS), rtol=1e-12, atol=1e-12)
    _, codes = tok.encode(x)
    assert codes.shape == (3, 4, 4, 1) and codes.dtype == torch.int64
    assert torch.equal(codes[..., 0], idx.long())                           # upstream's indices
    assert torch.equal(codes, tok.quantize(z))
    assert len(codes.unique()) > 10                                         # many codes in use
    book = tok.codebooks[0].double()                                        # (64000, 6)
    assert torch.equal(codes[..., 0], snce.nearest_code(z, book, "l2"))     # nearest code, l2
    assert torch.equal(book[codes[..., 0]], codes_eager.permute(0, 2, 3, 1))  # its coordinates
    torch.testing.assert_close(tok.decode(codes), img_eager, rtol=1e-10, atol=1e-10)
    assert tok.decode(codes).shape == (3, 3, 16, 16)


def test_index_convention_is_channel_0_least_significant(f64):
    """Every one of the 64,000 codes, from latents at level centres, through the file's own
    quantizer: index k; a reversed digit order or a missing bound offset would not give this."""
    _, folder = f64
    tok = Q.load_fsq(folder, image_size=16, verbose=False)
    book = implicit_codebook(fsq_levels(LEVELS), torch.float64)             # (K, 6) in [-1, 1]
    half = torch.tensor(LEVELS) // 2
    L = torch.tensor(LEVELS, dtype=torch.float64)
    half_l, offset = (L - 1) * 1.001 / 2, (L % 2 == 0).double() / 2
    raw = torch.atanh((book * half + offset) / half_l) - torch.atanh(offset / half_l)
    with torch.no_grad():
        idx = tok.enc.quantizer(raw.T.reshape(1, 6, 1, -1))[0].reshape(-1)
    assert torch.equal(idx.long(), torch.arange(64000))
    assert torch.equal(implicit_quantize(fsq_bound(raw, LEVELS), fsq_levels(LEVELS)), idx.long())
    # random latents (many near rounding boundaries): the file's indices are the repo's FSQ
    # math exactly; a reversed digit order or the FSQ paper's listing bound are not
    raw = torch.randn(20000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        idx = tok.enc.quantizer(raw.T.reshape(1, 6, 1, -1))[0].reshape(-1).long()
    assert torch.equal(implicit_quantize(fsq_bound(raw, LEVELS), fsq_levels(LEVELS)), idx)
    reversed_order = implicit_quantize(fsq_bound(raw, LEVELS).flip(-1), fsq_levels(LEVELS[::-1]))
    assert (reversed_order != idx).float().mean() > 0.5
    paper = (torch.tanh(raw + torch.atanh(offset / ((L - 1) * 0.999 / 2))) * (L - 1) * 0.999 / 2
             - offset) / half
    assert (implicit_quantize(paper, fsq_levels(LEVELS)) != idx).any()


def test_other_levels_are_read_from_the_file(tmp_path):
    levels = [7, 4, 3, 6]
    model = tiny_di(seed=3, levels=levels)
    tok = Q.load_fsq(export(model, str(tmp_path / "m")), image_size=16, verbose=False)
    assert tok.config.fsq_levels == tuple(levels) and tok.codebooks.shape == (1, 504, 4)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        idx = model.quantizer(model.quant_conv(model.encoder(x)))[0]
    assert torch.equal(tok.encode(x)[1][..., 0], idx.long())


def test_bfloat16_export_like_the_releases(tmp_path):
    """The releases are traced in bfloat16: the file runs in it; the codes are the float32 bound
    of its latents, equal to the file's own bfloat16 rounding away from rounding boundaries;
    float32 is refused with a clear error (the trace casts to bfloat16)."""
    model = tiny_di(seed=1, dtype=torch.bfloat16)
    folder = export(model, str(tmp_path / "bf16"), torch.bfloat16)
    tok = Q.load_fsq(os.path.join(folder, "encoder.jit"), image_size=16, verbose=False)
    assert tok.dtype == torch.bfloat16
    x = torch.randn(4, 3, 16, 16)
    z, codes = tok.encode(x)
    assert z.dtype == torch.float32 and codes.shape == (4, 4, 4, 1)
    with torch.no_grad():
        raw = model.quant_conv(model.encoder(x.bfloat16()))
        idx = model.quantizer(raw)[0]
    torch.testing.assert_close(z, fsq_bound(raw.float().permute(0, 2, 3, 1), LEVELS))
    assert (codes[..., 0] == idx.long()).float().mean() > 0.9
    assert tok.decode(codes).dtype == torch.float32
    with pytest.raises(ValueError, match="do not run on a 16 px image in torch.float32"):
        Q.load_fsq(folder, image_size=16, dtype=torch.float32, verbose=False)


def test_interface_for_training_and_sampling(f64):
    """What encode.py / train.py (token_groups) / sample.py use."""
    from support.factorized import TokenGroups
    _, folder = f64
    tok = Q.load_fsq(folder, image_size=32, verbose=False)        # convolutional: any multiple
    assert tok.grid == 8 and tok.metric == "l2" and tok.config.levels == 1
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z, codes = tok.encode(x)
    assert z.shape == (2, 8, 8, 6) and z.abs().max() < 1.001 + 1e-6  # (L-1)(1+eps)/2 / (L//2)
    res = tok.residuals(z, codes)
    torch.testing.assert_close(res[..., 0, :], z)
    groups = TokenGroups(tok, (3, 3), 1, 6, "cpu")
    assert groups.level_vocab == (512, 125)
    assert len(tok.fingerprint()) == 16 and tok.fingerprint() == tok.fingerprint()


# -----------------------------------------------------------------------------
# errors and the one loader


def test_clear_errors(tmp_path, f64):
    _, folder = f64
    with pytest.raises(ValueError, match="image_size"):
        Q.load_fsq(folder, verbose=False)
    with pytest.raises(ValueError, match="multiple of downsample=4"):
        Q.load_fsq(folder, image_size=18, verbose=False)
    with pytest.raises(FileNotFoundError, match="encoder.jit and decoder.jit"):
        Q.load_fsq(str(tmp_path / "nothing"), image_size=16)
    with pytest.raises(ValueError, match="model folder or its encoder.jit"):
        Q.load_fsq(os.path.join(folder, "decoder.jit"), image_size=16)
    tok = Q.load_fsq(folder, image_size=16, verbose=False)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 16, 16\)"):
        tok.encode(torch.zeros(1, 3, 32, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"integers in \[0, 64000\)"):
        tok.decode(torch.full((1, 4, 4, 1), 64000))

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, str(bad / "encoder.jit"))
    torch.jit.save(torch.jit.load(os.path.join(folder, "decoder.jit")), str(bad / "decoder.jit"))
    with pytest.raises(ValueError, match="not a TorchScript file"):
        Q.load_fsq(str(bad), image_size=16)

    class Identity(nn.Module):
        def forward(self, x):
            return x

    def save_enc(name, children):
        d = tmp_path / name
        d.mkdir()
        torch.jit.save(torch.jit.trace(nn.Sequential(OrderedDict(children)),
                                       torch.randn(1, 3, 16, 16, dtype=torch.float64)),
                       str(d / "encoder.jit"))
        torch.jit.save(torch.jit.load(os.path.join(folder, "decoder.jit")), str(d / "decoder.jit"))
        return str(d)

    m = tiny_di(seed=2)
    ci = save_enc("ci", [("encoder", m.encoder), ("quant_conv", m.quant_conv),
                         ("distribution", Identity())])
    with pytest.raises(ValueError, match="continuous"):
        Q.load_fsq(ci, image_size=16)

    class ResidualFSQuantizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([FSQuantizer(LEVELS, torch.float64)])

        def forward(self, z):
            return self.layers[0](z)

    res = save_enc("res", [("encoder", m.encoder), ("quant_conv", m.quant_conv),
                           ("quantizer", ResidualFSQuantizer())])
    with pytest.raises(ValueError, match="not an FSQuantizer"):
        Q.load_fsq(res, image_size=16)
    other = tiny_di(seed=2, levels=[8, 8, 8, 6, 5, 5])   # decoder.jit of another model
    mixed = save_enc("mixed", [("encoder", other.encoder), ("quant_conv", other.quant_conv),
                               ("quantizer", other.quantizer)])
    with pytest.raises(ValueError, match="different models"):
        Q.load_fsq(mixed, image_size=16)


def test_open_tokenizer_routes_cosmos_folders_and_encoder_files(f64):
    from support import pretrained as P
    _, folder = f64
    for path in (folder, os.path.join(folder, "encoder.jit")):
        tok, info = P.open_tokenizer(path, image_size=16, verbose=False)
        assert isinstance(tok, Q.FSQTokenizer) and info["kind"] == "fsq"
        assert info["weights"] == "main" and info["iter"] is None
    with pytest.raises(ValueError, match="image_size"):
        P.open_tokenizer(folder, verbose=False)


# -----------------------------------------------------------------------------
# the pipeline: encode a split with the folder, train a factorised-head generator, sample


def test_encode_train_sample_with_a_cosmos_folder(tmp_path):
    """support.encode reads the folder like any tokenizer file; train.py --token_groups=3,3 (two
    heads of 8*8*8 = 512 and 5*5*5 = 125 codes) trains with SNCE on the stored latents; sample.py
    joins the sub-tokens and decodes through decoder.jit."""
    import numpy as np
    from helpers import NUM_CLASSES, class_images
    from support.encode import encode_split
    from test_train import base_args, read_log, run_script, run_train
    folder = export(tiny_di(dtype=torch.float32), str(tmp_path / "Cosmos-DI-tiny"), torch.float32)
    dirs = []
    for i, (split, n) in enumerate((("train", 24), ("val", 8))):
        x, y = class_images(n, size=16, seed=i)
        ds = torch.utils.data.TensorDataset(x.repeat(1, 3, 1, 1), y)
        dirs.append(encode_split(folder, split, str(tmp_path / split), batch_size=8, image_size=16,
                                 dataset_name="synthetic", dataset=(ds, list(range(NUM_CLASSES)))))
    codes = np.load(os.path.join(dirs[0], "codes.npy"))
    assert codes.shape == (24, 4, 4, 1) and 0 <= codes.min() and codes.max() < 64000
    out = str(tmp_path / "run")
    run_train(base_args((dirs[0], dirs[1]), out, tokenizer_ckpt=folder, token_groups="3,3", loss="snce",
                        tau=0.5, batch_size=4, max_iters=2, eval_interval=2))
    evals = [r for r in read_log(out) if "val_nll" in r]
    assert len(evals[-1]["val_nll_levels"]) == 2
    assert abs(evals[0]["val_nll_levels"][0] - math.log(512)) < 0.3   # untrained: ~log K_g
    assert abs(evals[0]["val_nll_levels"][1] - math.log(125)) < 0.3
    run_script("sample.py", [f"--ckpt={out}/ckpt.pt", "--per_class=1", "--num_samples=4",
                             "--batch_size=4", f"--out_dir={tmp_path / 's'}"])
    npz = [f for f in os.listdir(tmp_path / "s") if f.endswith(".npz")]
    assert len(npz) == 1 and np.load(tmp_path / "s" / npz[0])["arr_0"].shape == (4, 16, 16, 3)
