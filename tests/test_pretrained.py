"""Pretrained tokenizers (pretrained_arch.py, pretrained.py): module layout vs the upstream releases, forward pass vs
a functional float64 reference written from the key layout, codes = argmin of the metric, the
upstream checkpoint containers (IBQ Lightning with model_ema.*, LlamaGen model / ema, bare state
dicts), EMA selection, the safe reader, and bad inputs. Full-size encode / decode: `-m slow`."""

import argparse
import hashlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support import bench_pretrained as B  # noqa: E402
from support import latents as LT  # noqa: E402
from support import pretrained as P  # noqa: E402
from support import pretrained_arch as A  # noqa: E402
from support import views as V  # noqa: E402


def tiny(family, **kw):
    # attention at different levels in encoder and decoder: catches a decoder run in the wrong order
    base = dict(family=family, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, enc_attn=(1,),
                dec_attn=(0,), z_channels=32, code_dim=8, codebook_size=64)
    return A.PretrainedConfig(**{**base, **kw})


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = A.PretrainedTokenizer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a skipped op changes the output
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" in n else 1.0) + (1.0 if "norm" in n and
                                                                             n.endswith("weight") else 0))
        for n, p in m.named_parameters():
            if "conv" in n and n.endswith("weight") or n.endswith((".q.weight", ".k.weight", ".v.weight",
                                                                   "proj_out.weight")):
                p.mul_(1 / math.sqrt(p[0].numel()))
    return m.eval()


def layout_of(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    return len(sd), sum(v.numel() for v in sd.values()), h.hexdigest()[:16]


# measured by building the upstream modules (SEED-Voken's IBQ Encoder / Decoder + quantize.embedding
# + quant convs; LlamaGen's VQ_16() without its codebook_used counter) and hashing "key:shape;"
UPSTREAM_LAYOUT = {
    "ibq-1024": (543, 107049859, "53e0f33742f5b9fa"),
    "ibq-16384": (543, 110982019, "6d1c0915b223313a"),
    "ibq-262144": (543, 173896579, "3906435907b35aa3"),
    "llamagen-vq16": (343, 71883403, "481c7330fb6f2c19"),
}


@pytest.mark.parametrize("name", sorted(UPSTREAM_LAYOUT))
def test_full_size_layout_matches_upstream(name):
    with torch.device("meta"):
        m = A.PretrainedTokenizer(A.PretrainedConfig(**A.PRETRAINED[name]))
    assert layout_of(m.state_dict()) == UPSTREAM_LAYOUT[name]
    assert P.infer_config(m.config.family, m.state_dict()) == m.config  # sizes read back from shapes


# ---- a functional reference, written from the upstream key layout (float64) ----

def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, **kw):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], **kw)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", F.silu(_gn(sd, p + ".norm1", x)), padding=1)
    h = _conv(sd, p + ".conv2", F.silu(_gn(sd, p + ".norm2", h)), padding=1)
    return (_conv(sd, p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in sd else x) + h


def _attn(sd, p, x):
    B, C, H, W = x.shape
    h = _gn(sd, p + ".norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h).reshape(B, C, H * W) for n in "qkv")
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
    return x + _conv(sd, p + ".proj_out", torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))


def _level(sd, p, res, h):
    j = 0
    while f"{p}.{res}.{j}.conv1.weight" in sd:
        h = _res(sd, f"{p}.{res}.{j}", h)
        if f"{p}.attn.{j}.q.weight" in sd:
            h = _attn(sd, f"{p}.attn.{j}", h)
        j += 1
    if f"{p}.downsample.conv.weight" in sd:
        h = _conv(sd, f"{p}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    if f"{p}.upsample.conv.weight" in sd:
        h = _conv(sd, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1)
    return h


def _mid(sd, p, family, h):
    names = ("block_1", "attn_1", "block_2") if family == "ibq" else ("0", "1", "2")
    return _res(sd, f"{p}.{names[2]}", _attn(sd, f"{p}.{names[1]}", _res(sd, f"{p}.{names[0]}", h)))


def ref_encode(sd, family, x):
    enc, res = ("encoder.down", "block") if family == "ibq" else ("encoder.conv_blocks", "res")
    h, i = _conv(sd, "encoder.conv_in", x, padding=1), 0
    while f"{enc}.{i}.{res}.0.conv1.weight" in sd:
        h, i = _level(sd, f"{enc}.{i}", res, h), i + 1
    h = _mid(sd, "encoder.mid", family, h)
    return _conv(sd, "quant_conv", _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", h)),
                                         padding=1))


def ref_decode(sd, family, z_q):
    dec, res = ("decoder.up", "block") if family == "ibq" else ("decoder.conv_blocks", "res")
    n = sum(1 for k in sd if k.startswith(dec) and k.endswith(f".{res}.0.conv1.weight"))
    order = reversed(range(n)) if family == "ibq" else range(n)  # IBQ: up[i] = resolution i, lowest first
    h = _mid(sd, "decoder.mid", family, _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z_q),
                                               padding=1))
    for i in order:
        h = _level(sd, f"{dec}.{i}", res, h)
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)), padding=1)


@pytest.mark.parametrize("family", ["ibq", "llamagen"])
def test_forward_matches_functional_reference_and_codes_are_metric_argmin(family):
    m = random_model(tiny(family)).double()
    sd = {k: v for k, v in m.state_dict().items()}
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z32, codes = m.encode(x)
    z = m.encode_latents(x)                                              # float64 here
    assert z32.dtype == torch.float32 and torch.equal(m.quantize(z), codes)
    h = ref_encode(sd, family, x).permute(0, 2, 3, 1)                    # (B, h, w, D)
    C = sd["quantize.embedding.weight"]
    if family == "llamagen":                                             # cos: both unit vectors
        h, C = h / h.norm(dim=-1, keepdim=True), C / C.norm(dim=-1, keepdim=True)
        assert torch.allclose(z.norm(dim=-1), torch.ones(3, 4, 4, dtype=torch.float64))
    assert z.shape == (3, 4, 4, 8) and codes.shape == (3, 4, 4, 1) and codes.dtype == torch.int64
    assert torch.allclose(z, h, atol=1e-10)
    assert torch.allclose(m.codebooks[0], C, atol=1e-12) and m.codebooks.shape == (1, 64, 8)
    for b, i, j in [(0, 0, 0), (1, 2, 3), (2, 3, 1), (2, 1, 2)]:         # naive argmin of d = -z.c
        d = [-(h[b, i, j] * C[k]).sum().item() for k in range(64)]
        assert codes[b, i, j, 0].item() == min(range(64), key=d.__getitem__)
    assert (codes[..., 0] == (h @ C.t()).argmax(-1)).all()
    img = m.decode(codes)
    ref = ref_decode(sd, family, C[codes[..., 0]].permute(0, 3, 1, 2))
    assert img.shape == (3, 3, 8, 8) and torch.allclose(img, ref, atol=1e-9)
    r = m.residuals(z, codes)
    assert r.shape == (3, 4, 4, 1, 8) and torch.equal(r[..., 0, :], z)


def test_bad_inputs_are_clear_errors():
    m = random_model(tiny("ibq"))
    with pytest.raises(ValueError, match=r"expected \(B, 3, 8, 8\)"):
        m.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"expected \(B, 4, 4, 1\)"):
        m.decode(torch.zeros(1, 4, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"integers in \[0, 64\)"):
        m.decode(torch.full((1, 4, 4, 1), 64))
    with pytest.raises(ValueError, match="same leading dims"):
        m.residuals(torch.zeros(2, 8), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="assigns codes by 'dot'"):
        tiny("ibq", metric="cos")
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny("ibq", ch=24)


# ---- upstream containers, EMA selection, the safe reader ----

def ibq_lightning(main, ema=None, drop=0):
    """IBQ's Lightning .ckpt: generator + loss modules + LitEma buffers (dots removed)."""
    sd = dict(main.state_dict())
    sd.update({"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
               "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3),
               "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(7)})
    if ema is not None:
        items = list(ema.state_dict().items())
        sd.update({"model_ema." + k.replace(".", ""): v for k, v in items[:len(items) - drop]})
        sd["model_ema.lossdiscriminatormain0weight"] = torch.randn(8, 3, 4, 4)
    return {"state_dict": sd, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0",
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
            "lr_schedulers": [], "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": ""}}}


def llamagen_ckpt(main, ema=None, drop=0):
    sd = dict(main.state_dict(), **{"quantize.codebook_used": torch.zeros(65536)})
    ck = {"model": sd, "steps": 5000, "args": argparse.Namespace(vq_model="VQ-16", lr=1e-4)}
    if ema is not None:
        items = list(ema.state_dict().items())
        ck["ema"] = dict(items[:len(items) - drop])
    return ck


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.mark.parametrize("family,make", [("ibq", ibq_lightning), ("llamagen", llamagen_ckpt)])
def test_ema_loaded_when_complete_else_main(tmp_path, capsys, family, make):
    main, ema = random_model(tiny(family), 1), random_model(tiny(family), 2)
    cases = [(make(main, ema), ema, "ema", "loaded the EMA weights"),
             (make(main, ema, drop=1), main, "main", "EMA set is incomplete"),
             (make(main), main, "main", "no EMA weights")]
    prints = []
    for i, (ck, want, which, says) in enumerate(cases):
        path = str(tmp_path / f"{i}.ckpt")
        torch.save(ck, path)
        tok = P.load_pretrained(path, image_size=8)
        out = capsys.readouterr().out
        prints.append(out)
        assert tok.weights == which and says in out, out
        assert same_weights(tok, want)
        assert tok.config == tiny(family) and tok.metric == A.FAMILY_METRIC[family]
    assert P.load_pretrained(str(tmp_path / "0.ckpt"), image_size=8).fingerprint() == ema.fingerprint() \
        != main.fingerprint()
    if family == "llamagen":  # the argparse.Namespace in the file: read as a placeholder, said so
        assert "argparse.Namespace" in prints[0]


def test_bare_state_dict_and_emu_style_wrapper(tmp_path):
    m = random_model(tiny("ibq", codebook_size=128), 3)
    for i, ck in enumerate([m.state_dict(), {"state_dict": m.state_dict()}]):
        torch.save(ck, tmp_path / f"{i}.ckpt")
        tok = P.load_any_tokenizer(str(tmp_path / f"{i}.ckpt"), image_size=8, verbose=False)
        assert isinstance(tok, A.PretrainedTokenizer) and tok.weights == "main" and same_weights(tok, m)


def test_loader_errors(tmp_path):
    m = random_model(tiny("ibq"))
    sd = dict(m.state_dict())
    cases = {"extra": ({**sd, "encoder.bridge.weight": torch.zeros(2)}, "keys this ibq architecture"),
             "missing": ({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, "lacks 1 of"),
             "shape": ({**sd, "decoder.conv_out.bias": torch.zeros(4)},
                           r"shape: tensor 'decoder.conv_out.bias' has shape \(4,\), expected \(3,\)"),
             "foreign": ({"encoder.conv_in.weight": torch.zeros(1)}, "neither IBQ"),
             "container": ({"weights": sd}, "expected an IBQ Lightning checkpoint")}
    for name, (ck, msg) in cases.items():
        torch.save({"state_dict": ck} if name not in ("foreign", "container") else ck, tmp_path / name)
        with pytest.raises(ValueError, match=msg):
            P.load_pretrained(str(tmp_path / name), verbose=False)
    with pytest.raises(FileNotFoundError):
        P.load_pretrained(str(tmp_path / "nope.ckpt"))


def test_non_finite_weights_and_missing_tensors_name_file_and_key(tmp_path, capsys):
    m = random_model(tiny("ibq"))
    sd = dict(m.state_dict())
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"].clone()
    sd["quantize.embedding.weight"][3, 0] = float("inf")
    torch.save({"state_dict": sd}, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"nan.ckpt: tensor 'quantize.embedding.weight' .* holds 1 "
                                         r"non-finite value\(s\)"):
        P.open_tokenizer(str(tmp_path / "nan.ckpt"), image_size=16)
    sd = {k: v for k, v in m.state_dict().items() if k != "encoder.conv_out.weight"}
    torch.save({"state_dict": sd}, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match=r"cut.ckpt: a ibq state dict needs the tensor "
                                         r"'encoder.conv_out.weight'"):
        P.load_pretrained(str(tmp_path / "cut.ckpt"), verbose=False)
    torch.save({"state_dict": dict(m.state_dict())}, tmp_path / "ok.ckpt")   # ch_mult (1, 2): factor 2
    with pytest.raises(ValueError, match=r"ok.ckpt: the ibq architecture .* not supported: image_size "
                                         r"must be divisible by downsample=2, got 7"):
        P.load_pretrained(str(tmp_path / "ok.ckpt"), image_size=7, verbose=False)


@pytest.mark.parametrize("name,source", [("imagenet256_262144.ckpt", "IBQ-Tokenizer-262144, the SEED-Voken"),
                                         ("model.ckpt", "Emu3.5-VisionTokenizer"),
                                         ("vq_ds16_c2i.pt", "LlamaGen's VQ-16")])
def test_missing_public_file_says_where_it_comes_from(tmp_path, name, source):
    with pytest.raises(FileNotFoundError, match=rf"{name}' not found: {name} is the upstream name of {source}"):
        P.open_tokenizer(str(tmp_path / name), image_size=256)
    with pytest.raises(FileNotFoundError, match=r"not found: expected this repo's \(train_tokenizer.py"):
        P.open_tokenizer(str(tmp_path / "mine.pt"))


RAN = []


def _side_effect(*args):
    RAN.append(args)
    return args


class Payload:
    def __reduce__(self):  # unpickling this with pickle would call _side_effect
        return (_side_effect, ("pwned",))


def test_read_checkpoint_never_runs_pickled_code(tmp_path, capsys):
    path = str(tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "hparams": Payload()}, path)
    ck = P.read_checkpoint(path)
    assert RAN == [] and torch.equal(ck["state_dict"]["w"], torch.arange(3.0))
    # an inert stand-in named after the pickled global, holding the arguments it was given
    assert type(ck["hparams"]).pickled_as.endswith("_side_effect") and ck["hparams"].args == ("pwned",)
    assert "_side_effect" in capsys.readouterr().out
    torch.save({"d": Dictish(a=1)}, path)  # a dict subclass can't be stood in for: clear error
    with pytest.raises(ValueError, match="extract its weights once"):
        P.read_checkpoint(path)


class Dictish(dict):
    pass


def test_load_any_tokenizer_dispatches_repo_checkpoints(tmp_path):
    import tokenizer as tk
    from support.common import save_checkpoint
    cfg = tk.TokenizerConfig(in_channels=1, image_size=16, channels=(8, 16, 16), downsample=4,
                             num_res_blocks=1, code_dim=4, levels=2, codebook_size=32)
    model = tk.Tokenizer(cfg)
    save_checkpoint({"model": model.state_dict(), "model_config": vars(cfg), "iter": 0}, str(tmp_path / "t.pt"))
    tok = P.load_any_tokenizer(str(tmp_path / "t.pt"))
    assert isinstance(tok, tk.Tokenizer) and same_weights(tok, model)


# ---- full size (random weights, upstream containers, one 256 px image) ----

@pytest.mark.slow  # ~110M-parameter models on CPU: building, saving, loading, encoding, decoding
@pytest.mark.parametrize("name,make", [("ibq-16384", ibq_lightning), ("llamagen-vq16", llamagen_ckpt)])
def test_full_size_round_trip(tmp_path, name, make):
    cfg = A.PretrainedConfig(**A.PRETRAINED[name])
    torch.manual_seed(0)
    main = A.PretrainedTokenizer(cfg).eval()
    path = str(tmp_path / "full.ckpt")
    torch.save(make(main, main), path)
    tok = P.load_pretrained(path)
    assert tok.weights == "ema" and tok.config == cfg and same_weights(tok, main)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    z, codes = tok.encode(x)
    assert z.shape == (1, 16, 16, cfg.code_dim) and codes.shape == (1, 16, 16, 1)
    assert torch.equal(codes[..., 0], (z @ tok.codebooks[0].t()).argmax(-1))
    assert tok.decode(codes).shape == (1, 3, 256, 256)


# ---- latent storage formats, LlamaGen's crops ----

def test_pack_latents_int8_matches_naive_and_float8_error_bound():
    torch.manual_seed(0)
    z = torch.randn(300, 256) * torch.rand(300, 1) * 5     # per-vector scales differ
    z[0] = 0                                               # a zero vector comes back as zeros
    z[1, 3] = 1e3                                          # an outlier sets its vector's scale
    p, s = LT.pack_latents(z, "int8")
    assert p.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (300, 1)
    back = LT.unpack_latents(p, s, "int8")
    for i in (0, 1, 2, 299):                               # naive: python floats, fp16 scale
        v = z[i].tolist()
        si = float(torch.tensor(max(abs(a) for a in v) / 127).half())
        want = [max(-127, min(127, round(a / si))) * si if si > 0 else 0.0 for a in v]
        assert back[i].tolist() == pytest.approx(want, abs=1e-6)
    assert (back - z).abs().le(s.float() / 2 + 1e-5).all() and back[0].eq(0).all()
    p8, s8 = LT.pack_latents(z, "float8_e4m3")
    assert p8.dtype == torch.float8_e4m3fn
    err = (LT.unpack_latents(p8, s8, "float8_e4m3") - z).abs()
    # 3 mantissa bits: relative error <= 2^-4 for normal values, 2^-10 * scale below 2^-6 * scale
    assert err.le(torch.maximum(z.abs() * 2 ** -4, s8.float() * 2 ** -10) * 1.001 + 1e-7).all()
    assert err.max() > 0 and not torch.isnan(err).any()
    f16, none = LT.pack_latents(z, "float16")
    assert f16.dtype == torch.float16 and none is None
    with pytest.raises(ValueError, match="latent format must be one of"):
        LT.pack_latents(z, "int4")


def test_ten_crop_order_and_views():
    x = torch.arange(2 * 3 * 7 * 9, dtype=torch.float).view(2, 3, 7, 9)   # every pixel distinct
    c = V.ten_crop(x, 4)
    assert c.shape == (2, 10, 3, 4, 4)
    assert torch.equal(c[:, 0], x[..., :4, :4]) and torch.equal(c[:, 3], x[..., 3:, 5:])
    assert torch.equal(c[:, 1], x[..., :4, 5:]) and torch.equal(c[:, 2], x[..., 3:, :4])
    assert torch.equal(c[:, 4], x[..., 2:6, 2:6])                         # (7-4)/2 -> 2, (9-4)/2 -> 2
    for k, m in ((5, 1), (6, 0), (7, 3), (8, 2), (9, 4)):                 # mirrored image's crops
        want = c[:, m].flip(-1) if k != 9 else x.flip(-1)[..., 2:6, 2:6]  # same offsets, mirrored
        assert torch.equal(c[:, k], want), k
    img = torch.randn(2, 3, 281, 281)
    assert V.crop_size("tencrop", 256) == 281 and V.augment_views(img, "tencrop", 256).shape == (2, 10, 3, 256, 256)
    v = V.augment_views(img[..., :256, :256], "flip", 256)
    assert v.shape == (2, 2, 3, 256, 256) and torch.equal(v[:, 1], img[..., :256, :256].flip(-1))
    with pytest.raises(ValueError, match="center-cropped to 281"):
        V.augment_views(img[..., :256, :256], "tencrop", 256)
    with pytest.raises(ValueError, match="augment must be one of"):
        V.augment_views(img, "rot90", 256)


def test_center_crop_arr_is_centered_and_sized():
    from PIL import Image
    import numpy as np
    a = np.zeros((600, 1000, 3), np.uint8)
    a[:, 500:] = 255                        # right half white: the crop's middle column is the edge
    out = np.asarray(V.center_crop_arr(Image.fromarray(a), 64))
    assert out.shape == (64, 64, 3)
    assert out[:, :30].max() < 10 and out[:, 34:].min() > 245
    small = V.center_crop_arr(Image.fromarray(a[:50, :80]), 64)          # upscaled: short side 64
    assert small.size == (64, 64)


def test_storage_error_vs_naive():
    torch.manual_seed(0)
    z, C = torch.randn(40, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    tau = 2.5
    q = torch.softmax(z @ C.t() / tau, -1)                      # dot: -d / tau = z.c / tau
    mean, mx = B.storage_error(z, C, tau, "int8")
    z8 = LT.unpack_latents(*LT.pack_latents(z, "int8"), "int8").double()
    tv = 0.5 * (q - torch.softmax(z8 @ C.t() / tau, -1)).abs().sum(-1)
    assert mean == pytest.approx(tv.mean().item(), rel=1e-4) and mx == pytest.approx(tv.max().item(), rel=1e-4)
    assert 0 < mean < mx and B.storage_error(z.float(), C.float(), tau, "float32") == (0.0, 0.0)


def test_bench_script_runs_with_its_options():
    """`python -m support.bench_pretrained` with the storage table only, small sizes: one row per
    format, one TV column per perplexity, and the yardstick row."""
    import subprocess
    out = subprocess.run([sys.executable, "-m", "support.bench_pretrained", "--names=()", "--rows=64",
                          "--codebook_size=128", "--code_dim=16", "--perplexities=(3.0, 30.0)",
                          "--formats=('float16', 'int8')"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    assert "TV@ppl3 (mean/max)" in out.stdout and "TV@ppl30 (mean/max)" in out.stdout
    assert rows["float16"].split()[1:3] == ["32", "8.0"]       # D = 16 x 2 bytes; 256 tokens: 8 KB
    assert rows["int8"].split()[1:3] == ["18", "4.5"]          # 16 x 1 byte + a float16 scale
    assert "tau -> 1.1 tau (yardstick)" in out.stdout


def test_code_flips_counts_changed_nearest_codes():
    C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[1.0, 0.999], [1.0, 0.5], [0.2, 1.0], [0.999, 1.0]])  # near-ties on rows 0, 3
    # int8 keeps 1.0 and rounds 0.999 * 127 = 126.87 up to 127: both near-ties become exact ties,
    # which the search breaks to code 0; row 0 keeps code 0, row 3 flips from code 1
    assert B.code_flips(z, C, "int8") == pytest.approx(0.25)
    assert B.code_flips(z, C, "float16") == 0.0
