"""VQGAN-LC and FVQ tokenizers (support/vqgan_arch.py) and their routing in
support/pretrained.open_tokenizer: module layout vs the upstream architectures, forward pass vs a
functional float64 reference written from the key layout (test_pretrained.py's), codes = a naive
nearest-code search under l2 with the projected / raw codebook, the upstream checkpoint
containers, EMA choice, and errors that name the file and the key. No weights are downloaded:
state dicts are random, in the upstream format."""

import argparse
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_pretrained as TP  # noqa: E402  (the functional reference and container helpers)
from support import pretrained as P  # noqa: E402
from support import vqgan_arch as V  # noqa: E402

# measured by building the upstream modules and hashing "key:shape;" (test_pretrained.layout_of):
# VQGAN-LC's vqgan-gpt-lc/models/encoder_decoder.py Encoder + Decoder (vq-f16.yaml / vq-f8.yaml
# ddconfig) + tok_embeddings Embedding(100000, 768) + quant_conv / post_quant_conv + the
# codebook_projection of use_cblinear 1 (Linear) or 2 (MLP); FVQ's tokenizer_image/vq_model.py
# VQ_16(codebook_size=K, codebook_embed_dim=256, codebook_l2_norm=False) without codebook_used
UPSTREAM_LAYOUT = {
    "lc-f16-dim8": (dict(V.VQGAN_LC["vqgan-lc-100K-f16-dim8"]), (345, 148558483, "9623ee645ae21116")),
    "lc-f8-dim4": (dict(ch_mult=(1, 2, 2, 4), enc_attn=(), dec_attn=(), code_dim=4),
                   (251, 141521547, "b69a8fea1146c1fe")),
    "lc-f16-mlp": (dict(code_dim=8, projector="mlp"), (347, 148751251, "c352c435cd5a3a2e")),
}
FVQ_LAYOUT = {"fvq-16384": (343, 76073859, "9fecec70c5afb0df"),
              "fvq-65536": (343, 88656771, "850bdd1bdca2ebde"),
              "fvq-262144": (343, 138988419, "e0f6e2214d315ae6")}


@pytest.mark.parametrize("name", sorted(UPSTREAM_LAYOUT))
def test_vqgan_lc_full_size_layout_matches_upstream(name):
    kw, want = UPSTREAM_LAYOUT[name]
    with torch.device("meta"):
        m = V.VQGANLCTokenizer(V.VQGANLCConfig(**kw))
    assert TP.layout_of(m.state_dict()) == want
    assert V.infer_vqgan_lc_config(m.state_dict()) == m.config          # sizes read back


@pytest.mark.parametrize("name", sorted(FVQ_LAYOUT))
def test_fvq_full_size_layout_matches_upstream(name):
    with torch.device("meta"):
        m = P.PretrainedTokenizer(V.FVQConfig(**V.FVQ[name]))
    assert TP.layout_of(m.state_dict()) == FVQ_LAYOUT[name]
    assert m.metric == "l2" and P.infer_config("llamagen", m.state_dict()).metric == "cos"


# ---- VQGAN-LC: forward and codes ----

def tiny_lc(seed=0, **kw):
    base = dict(image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, enc_attn=(1,), dec_attn=(0,),
                z_channels=32, code_dim=4, codebook_size=50, feature_dim=12)
    torch.manual_seed(seed)
    m = V.VQGANLCTokenizer(V.VQGANLCConfig(**{**base, **kw}))
    with torch.no_grad():  # non-trivial norms and biases, so a skipped op changes the output
        for n, p in m.named_parameters():
            scale = 0.1 if "norm" in n else (1.0 if p.ndim < 2 else 1 / p[0].numel() ** 0.5)
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in n and n.endswith("weight") else 0))
    return m.eval()


def ref_codebook(sd):
    """C = P(E) in float64 from the upstream keys: Linear, or Linear-ReLU-Linear."""
    E = sd["tok_embeddings.weight"]
    if "codebook_projection.weight" in sd:
        return E @ sd["codebook_projection.weight"].t() + sd["codebook_projection.bias"]
    h = (E @ sd["codebook_projection.0.weight"].t() + sd["codebook_projection.0.bias"]).clamp_min(0)
    return h @ sd["codebook_projection.2.weight"].t() + sd["codebook_projection.2.bias"]


def naive_l2_codes(z, C):
    """(..., D), (K, D) -> (...): argmin_k sum_d (z_d - C_kd)^2, by explicit differences."""
    d = ((z[..., None, :] - C) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_vqgan_lc_forward_matches_functional_reference_and_codes_are_l2_argmin(projector):
    m = tiny_lc(projector=projector, proj_hidden=16).double()
    sd = m.state_dict()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z32, codes = m.encode(x)
    z = m.encode_latents(x)
    assert z32.dtype == torch.float32 and codes.shape == (3, 4, 4, 1) and codes.dtype == torch.int64
    h = TP.ref_encode(sd, "ibq", x).permute(0, 2, 3, 1)                 # (B, h, w, D), no normalising
    torch.testing.assert_close(z, h, rtol=1e-10, atol=1e-10)
    C = ref_codebook(sd)
    torch.testing.assert_close(m.codebooks[0], C, rtol=1e-12, atol=1e-12)
    assert m.codebooks.shape == (1, 50, 4) and not m.codebooks.requires_grad
    assert torch.equal(m.quantize(z)[..., 0], naive_l2_codes(h, C))
    for b, i, j in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:                   # one by one, in Python
        d = [sum((h[b, i, j, e] - C[k, e]).item() ** 2 for e in range(4)) for k in range(50)]
        assert codes[b, i, j, 0].item() == min(range(50), key=d.__getitem__)
    # the projected codebook, not the stored CLIP one nor the dot product, decides the code
    assert not torch.equal(codes[..., 0], (h @ C.t()).argmax(-1))
    img = m.decode(codes)
    ref = TP.ref_decode(sd, "ibq", C[codes[..., 0]].permute(0, 3, 1, 2))
    assert img.shape == (3, 3, 8, 8) and torch.allclose(img, ref, atol=1e-9)
    r = m.residuals(z, codes)
    assert r.shape == (3, 4, 4, 1, 4) and torch.equal(r[..., 0, :], z)


def test_vqgan_lc_clip_width_latents_are_unit_vectors_like_upstream():
    m = tiny_lc(code_dim=768, feature_dim=768, codebook_size=20).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    h = TP.ref_encode(m.state_dict(), "ibq", x).permute(0, 2, 3, 1)
    z, codes = m.encode_latents(x), m.encode(x)[1]
    torch.testing.assert_close(z, h / h.norm(dim=-1, keepdim=True), rtol=1e-10, atol=1e-10)
    assert torch.equal(codes[..., 0], naive_l2_codes(z, ref_codebook(m.state_dict())))


def test_vqgan_lc_config_errors():
    with pytest.raises(ValueError, match="metric 'l2'"):
        V.VQGANLCConfig(metric="cos")
    with pytest.raises(ValueError, match="must equal code_dim"):
        V.VQGANLCConfig(projector="none")
    with pytest.raises(ValueError, match="divisible by 32"):
        V.VQGANLCConfig(ch=24)
    with pytest.raises(ValueError, match="'llamagen' module layout and metric 'l2'"):
        V.FVQConfig(metric="cos")


# ---- VQGAN-LC files ----

def lc_file(m, key="state_dict"):
    """What VQGAN-LC's misc.save_model_vqgan writes: the VQModel state dict (with discriminator
    and LPIPS weights), both optimizers, scalers, epoch and the argparse Namespace."""
    sd = {k: v.float() for k, v in m.state_dict().items()}
    sd.update({"discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
               "perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3),
               "perceptual_loss.scaling_layer.shift": torch.zeros(1, 3, 1, 1)})
    return {key: sd, "opt_ae": {"state": {}, "param_groups": [{"lr": 5e-4}]}, "epoch": 19,
            "args": argparse.Namespace(embed_dim=8, n_vision_words=100000, use_cblinear=1)}


def test_open_tokenizer_loads_vqgan_lc_files(tmp_path, capsys):
    m = tiny_lc(1)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    for i, ck in enumerate([lc_file(m), lc_file(m, "model"), m.state_dict()]):
        path = str(tmp_path / f"lc{i}.pth")
        torch.save(ck, path)
        tok, info = P.open_tokenizer(path, image_size=8)
        out = capsys.readouterr().out
        assert isinstance(tok, V.VQGANLCTokenizer) and not tok.training
        assert info == {"kind": "vqgan-lc", "weights": "main", "config": {}, "iter": None}
        assert TP.same_weights(tok, m) and tok.config == m.config and tok.metric == "l2"
        assert "vqgan-lc tokenizer, K=50, D=4" in out and "no EMA weights" in out, out
        assert torch.equal(tok.encode(x)[1], m.encode(x)[1])
        if i < 2:                        # the pickled Namespace: a placeholder, said so
            assert "argparse.Namespace" in out
    with pytest.raises(ValueError, match="VQGAN-LC tokenizer: load it with open_tokenizer"):
        P.load_pretrained(str(tmp_path / "lc0.pth"), image_size=8, verbose=False)


def test_vqgan_lc_loader_errors_name_file_and_key(tmp_path):
    sd = lc_file(tiny_lc())["state_dict"]
    cases = {"extra": ({**sd, "decoder.mystery.weight": torch.zeros(1)}, "keys this VQGAN-LC"),
             "missing": ({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, "lacks 1 of"),
             "shape": ({**sd, "codebook_projection.bias": torch.zeros(5)},
                       r"shape.pth: tensor 'codebook_projection.bias' has shape \(5,\), expected \(4,\)"),
             "nan": ({**sd, "tok_embeddings.weight": sd["tok_embeddings.weight"].clone().fill_(
                 float("nan"))}, r"nan.pth: tensor 'tok_embeddings.weight' .* non-finite"),
             "cut": ({k: v for k, v in sd.items() if k != "quant_conv.weight"},
                     r"cut.pth: a VQGAN-LC state dict needs the tensor 'quant_conv.weight'"),
             "ema": ({**sd, "cluster_size": torch.zeros(50), "embed_avg": torch.zeros(50, 12)},
                     "'ema' quantizer")}
    for name, (state, msg) in cases.items():
        path = str(tmp_path / f"{name}.pth")
        torch.save({"state_dict": state}, path)
        with pytest.raises(ValueError, match=msg):
            P.open_tokenizer(path, image_size=8, verbose=False)
    with pytest.raises(ValueError, match="not a VQGAN-LC tokenizer"):
        V.load_vqgan_lc(str(tmp_path / "lcx.pth"), ck={"state_dict": TP.random_model(
            TP.tiny("ibq")).state_dict()}, verbose=False)
    with pytest.raises(ValueError, match="codebook file alone is not a tokenizer"):
        V.load_vqgan_lc("codebook-100K.pth", ck=torch.zeros(50, 12), verbose=False)
    with pytest.raises(ValueError, match="image_size must be divisible by downsample=2"):
        V.load_vqgan_lc("x.pth", image_size=7, ck={"state_dict": sd}, verbose=False)


# ---- FVQ: LlamaGen's layout, metric l2 ----

def tiny_fvq(seed=0):
    return TP.random_model(V.FVQConfig(**{**TP.tiny("llamagen").__dict__, "metric": "l2"}), seed)


def test_fvq_forward_matches_reference_with_raw_latents_and_l2_codes():
    m = tiny_fvq().double()
    sd = m.state_dict()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z, codes = m.encode_latents(x), m.encode(x)[1]
    h = TP.ref_encode(sd, "llamagen", x).permute(0, 2, 3, 1)           # not normalised
    C = sd["quantize.embedding.weight"]
    torch.testing.assert_close(z, h, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(z.norm(dim=-1), torch.ones(3, 4, 4, dtype=torch.float64))
    assert torch.equal(codes[..., 0], naive_l2_codes(h, C)) and torch.equal(m.codebooks[0], C)
    cos = (h / h.norm(dim=-1, keepdim=True)) @ (C / C.norm(dim=-1, keepdim=True)).t()
    assert not torch.equal(codes[..., 0], cos.argmax(-1))              # LlamaGen's metric differs
    ref = TP.ref_decode(sd, "llamagen", C[codes[..., 0]].permute(0, 3, 1, 2))
    assert torch.allclose(m.decode(codes), ref, atol=1e-9)


def test_open_tokenizer_knows_fvq_files_by_name_and_takes_their_ema(tmp_path, capsys):
    main, ema = tiny_fvq(1), tiny_fvq(2)
    # as LlamaGen's trainer writes it (FVQ's converter keeps only "model": the EMA set when any)
    ck = TP.llamagen_ckpt(main, ema)
    for name, kind, metric in [("fullvq2vqgan_ds16_res2_64_8.pt", "fvq", "l2"),
                               ("fvq2vqgan_64_40ep.pt", "fvq", "l2"), ("vq_custom.pt", "llamagen", "cos")]:
        path = str(tmp_path / name)
        torch.save(ck, path)
        tok, info = P.open_tokenizer(path, image_size=8)
        out = capsys.readouterr().out
        assert info == {"kind": kind, "weights": "ema", "config": {}, "iter": None}
        assert tok.metric == metric and TP.same_weights(tok, ema), out
        if kind == "fvq":
            assert "fvq tokenizer (LlamaGen layout), K=64, D=8, metric l2" in out
            x = torch.rand(2, 3, 8, 8) * 2 - 1
            assert torch.equal(tok.encode(x)[1], ema.encode(x)[1])
    torch.save({"model": main.state_dict()}, tmp_path / "fvq2vqgan_main.pt")   # the converter's container
    tok, info = P.open_tokenizer(str(tmp_path / "fvq2vqgan_main.pt"), image_size=8, verbose=False)
    assert info["kind"] == "fvq" and tok.weights == "main" and TP.same_weights(tok, main)
    with pytest.raises(ValueError, match="LlamaGen's module layout"):
        V.as_fvq(TP.random_model(TP.tiny("ibq")))


@pytest.mark.parametrize("name,source", [("vqgan-lc-100K-f16-dim8.pth", "VQGAN-LC-100K"),
                                         ("fullvq2vqgan_ds16_res2_16384_256.pt", "FVQ-16384")])
def test_missing_public_file_says_where_it_comes_from(tmp_path, name, source):
    with pytest.raises(FileNotFoundError, match=rf"{name} is the upstream name of {source}"):
        P.open_tokenizer(str(tmp_path / name), image_size=256)


def test_llamagen_layout_with_large_codes_and_no_fvq_name_is_refused(tmp_path):
    """A LlamaGen-layout file whose codes are not LlamaGen's D = 8 may be FVQ (l2) or a custom
    LlamaGen VQ (cos): the loader refuses to guess the metric instead of picking other codes."""
    m = TP.random_model(TP.tiny("llamagen", code_dim=16))
    torch.save({"model": m.state_dict()}, tmp_path / "vq_renamed.pt")
    with pytest.raises(ValueError, match=r"D = 16 codes.*fullvq2vqgan"):
        P.open_tokenizer(str(tmp_path / "vq_renamed.pt"), image_size=8, verbose=False)
    torch.save({"model": m.state_dict()}, tmp_path / "fvq2vqgan_16.pt")     # its upstream name: l2
    assert P.open_tokenizer(str(tmp_path / "fvq2vqgan_16.pt"), image_size=8, verbose=False)[0].metric == "l2"
