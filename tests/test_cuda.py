"""The GPU check: what CPU CI cannot show, run on one CUDA device against float64 / fp32 CPU
references. Every test here is marked `cuda` and skips with "needs CUDA" on a machine without
one; support/gpu_check.py runs them (plus the loss benchmark) and writes one report.

    python -m support.gpu_check --out out/gpu_check.md         # the whole check, one report
    python -m pytest -q -m cuda tests/test_cuda.py             # the tests alone, on CUDA
    GPU_CHECK_DEVICE=cpu python -m pytest -q -m cuda tests/test_cuda.py   # dry run on the CPU
                                                               # (small sizes, same code paths)

Covered, in this order (the slowest last, so a time limit cuts the least): fused SNCE
(fused_linear_snce_levels, fused_linear_snce, snce_loss) forward and backward in fp32 / bf16,
eager / compiled, soft / hard, every metric, masks and levels, against the dense float64 form
(Eq. 5, 8, 11); code assignment under bf16 autocast; KV-cache AR and MaskGIT sampling logits
against full forwards; factorised heads (per-sub-token vocabularies); a pretrained-format
tokenizer under bf16 autocast; a 1-rank NCCL torchrun; the ImageNet generator config for a few
steps (bf16, compile, fused AdamW, EMA) and how close a resumed run comes to a straight one.
Each measured error is appended to $GPU_CHECK_RECORD (JSON lines) when set, for the report. The
unmarked tests at the end check the report's plumbing on any machine.
"""

import copy
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import GPT, MODELS, GPTConfig  # noqa: E402
from snce import (METRICS, fused_linear_snce, fused_linear_snce_levels, nearest_code,  # noqa: E402
                  neighbor_probs, snce_loss)
from support import gpu_check, snce_kernels  # noqa: E402
from test_snce import dense_loss, naive_d  # noqa: E402  the float64 references of test_snce.py

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SMALL = DEVICE == "cpu"        # the CPU dry run: same code paths at sizes 2 cores can afford
f64 = torch.float64
needs_device = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                  reason="needs CUDA")


def gpu_test(fn):
    """The `cuda` marker (pytest -m cuda selects these) and the skip without a device."""
    return pytest.mark.cuda(needs_device(fn))

# max |got - ref| / max |ref|; bf16: the logits are rounded to bf16. bf16w32: hidden bf16 and the
# head weight fp32, train.py's setting under autocast
TOL = {"fp32": 1e-4, "bf16": 3e-2, "bf16w32": 3e-2}


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: TF32 (on by default for cuDNN convs) would look like a 1e-3 bug."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def record(request):
    """record(what, err, tol): append the measured error to $GPU_CHECK_RECORD, then require
    err <= tol (tol = None: a measurement only)."""
    def rec(what, err, tol=None):
        err = float(err)
        path = os.environ.get("GPU_CHECK_RECORD")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, "what": what, "err": err,
                                    "tol": tol}) + "\n")
        assert math.isfinite(err), f"{what}: not finite"
        assert tol is None or err <= tol, f"{what}: error {err:.3g} > tolerance {tol:.3g}"
    return rec


def rel_err(got, ref):
    """max |got - ref| / max |ref|, both brought to float64 on the CPU."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# -----------------------------------------------------------------------------
# the fused loss against the dense float64 form (Eq. 5, 8, 11)

def loss_problem(L=3, seed=0):
    """hidden (B, T, L, H), weight (K, H), bias (K,), latents (B, T, L, D), codebooks (L, K, D),
    mask (B, T, L): logits of order 1, latents near their codes (a peaked q)."""
    B, T, K, H, D = (2, 20, 300, 16, 4) if SMALL else (4, 96, 8192, 256, 8)
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(L, K, D, generator=g)
    codes = torch.randint(0, K, (B, T, L), generator=g)
    z = torch.stack([C[l][codes[..., l]] for l in range(L)], -2) + 0.3 * torch.randn(B, T, L, D, generator=g)
    h = torch.randn(B, T, L, H, generator=g)
    W = torch.randn(K, H, generator=g) * (2 / math.sqrt(H))
    b = 0.5 * torch.randn(K, generator=g)
    mask = torch.rand(B, T, L, generator=g) < 0.6
    return h, W, b, z, C, mask, codes


def as_dtype(dtype, *xs):
    """The device copies of the loss inputs in the tested dtype (bf16w32: the first bf16, the
    rest fp32), and the float64 CPU copies of exactly those (rounded) values: the reference sees
    what the loss saw."""
    dts = [torch.bfloat16 if dtype == "bf16" or (dtype == "bf16w32" and i == 0) else torch.float32
           for i in range(len(xs))]
    dev = [x.to(DEVICE, dt).requires_grad_() for x, dt in zip(xs, dts)]
    return dev, [x.detach().cpu().double().requires_grad_() for x in dev]


def reference_levels(h, W, b, z, C, taus, metric, mask, reduction, targets=None, eps=0.0):
    """Per-level dense SNCE (test_snce.dense_loss) on hidden (..., L, H): (L,) or (..., L)."""
    K, out = W.shape[0], []
    for l in range(h.shape[-2]):
        logits = h[..., l, :] @ W.t() + b
        if targets is not None:
            q = (1 - eps) * torch.nn.functional.one_hot(targets[..., l], K).to(f64) + eps / K
        else:
            q = neighbor_probs(z[..., l, :].double(), C[l].double(), taus[l], metric)
        out.append(dense_loss(logits, q, mask[..., l], reduction))
    return torch.stack(out, -1)


def check_levels(record, got, ref, grads_of, tol, weights):
    """Loss values, then the gradients of (loss * weights).sum() (non-uniform weights exercise
    the per-level / per-row backward) against the reference's."""
    record("loss", rel_err(got, ref), tol)
    wd = weights.to(got.device, got.dtype)
    gg = torch.autograd.grad((got * wd).sum(), grads_of[0])
    gr = torch.autograd.grad((ref * weights.double()).sum(), grads_of[1])
    for name, a, b in zip(("grad hidden", "grad weight", "grad bias"), gg, gr):
        record(name, rel_err(a, b), tol)


@gpu_test
def test_grad_weight_accumulates_in_place(record):
    """The bf16 grad_weight sum per chunk: on CUDA addmm(out_dtype=fp32) adds into the fp32
    accumulator without a (K, H) bf16 temporary; the probe must find it, and the sum must match
    float64 to fp32 precision (the CPU fallback rounds each product to bf16 first)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(512, 300, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(300, 64, generator=g).to(DEVICE, torch.bfloat16)
    acc = torch.randn(512, 64, generator=g).to(DEVICE)
    ref = acc.double().cpu() + a.double().cpu() @ b.double().cpu()
    snce_kernels.accumulate_mm(acc, a, b)
    if DEVICE == "cuda":
        assert snce_kernels.ADDMM_OUT_DTYPE["cuda"], "addmm(out_dtype=fp32) unavailable: a (K, H) temporary per chunk"
        record("addmm out_dtype", rel_err(acc, ref), 1e-5)
    else:
        record("bf16 product then add", rel_err(acc, ref), 1e-2)
    rows = snce_kernels.default_chunk(262144, 4 * 1024, DEVICE)
    assert rows >= (256 if DEVICE == "cuda" else 8)


@gpu_test
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16w32"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_levels_soft(record, reduction, metric, dtype, compile):
    """fused_linear_snce_levels, soft q (Eq. 5) at a different tau per level, a mask per level."""
    h, W, b, z, C, mask, _ = loss_problem()
    taus = [0.5, 1.0, 2.0]
    (hd, Wd, bd), (hr, Wr, br) = as_dtype(dtype, h, W, b)
    chunk = 16 if SMALL else 100
    got = fused_linear_snce_levels(hd, Wd, z.to(DEVICE), C.to(DEVICE), taus, metric, bias=bd,
                                   mask=mask.to(DEVICE), chunk_size=chunk, reduction=reduction,
                                   compile=compile)
    ref = reference_levels(hr, Wr, br, z, C, taus, metric, mask, reduction)
    w = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    check_levels(record, got, ref, ((hd, Wd, bd), (hr, Wr, br)), TOL[dtype], w)


@gpu_test
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("hard", ["tau0-l2", "tau0-cos", "tau0-dot", "targets", "ls"])
def test_fused_single_hard(record, hard, dtype, compile):
    """fused_linear_snce with a hard q: tau = 0 (CE on the nearest code, every metric), given
    targets (CE), targets with label smoothing; masked, mean."""
    h, W, b, z, C, mask, codes = loss_problem(L=1)
    h, z, C, mask, codes = h[..., 0, :], z[..., 0, :], C[0], mask[..., 0], codes[..., 0]
    (hd, Wd, bd), (hr, Wr, br) = as_dtype(dtype, h, W, b)
    metric = hard[5:] if hard.startswith("tau0") else "l2"
    eps = 0.1 if hard == "ls" else 0.0
    kw = (dict(latents=z.to(DEVICE), codebook=C.to(DEVICE), tau=0.0) if hard.startswith("tau0")
          else dict(latents=None, codebook=None, tau=0.0, targets=codes.to(DEVICE), label_smoothing=eps))
    got = fused_linear_snce(hd, Wd, metric=metric, bias=bd, mask=mask.to(DEVICE),
                            chunk_size=16 if SMALL else 100, compile=compile, **kw)
    # the nearest code of tau = 0 in float64 (ties at fp32 precision would be a false alarm:
    # code assignment has its own test below)
    tgt = naive_d(z.double(), C.double(), metric).argmin(-1) if hard.startswith("tau0") else codes
    ref = reference_levels(hr[..., None, :], Wr, br, None, None, None, metric, mask[..., None],
                           "mean", tgt[..., None], eps)[0]
    check_levels(record, got, ref, ((hd, Wd, bd), (hr, Wr, br)), TOL[dtype], torch.tensor(1.0))


@gpu_test
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
def test_snce_loss_on_logits(record, metric, dtype, compile):
    """snce_loss on materialised logits (..., K), soft, masked, per-row grad_output."""
    h, W, b, z, C, mask, _ = loss_problem(L=1)
    logits = (h[..., 0, :] @ W.t() + b)
    (ld,), (lr,) = as_dtype(dtype, logits)
    got = snce_loss(ld, z[..., 0, :].to(DEVICE), C[0].to(DEVICE), 0.7, metric,
                    mask=mask[..., 0].to(DEVICE), chunk_size=16 if SMALL else 100,
                    reduction="none", compile=compile)
    ref = dense_loss(lr, neighbor_probs(z[..., 0, :].double(), C[0].double(), 0.7, metric),
                     mask[..., 0], "none")
    record("loss", rel_err(got, ref), TOL[dtype])
    w = torch.rand(ref.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    (gd,) = torch.autograd.grad((got * w.to(got.device)).sum(), [ld])
    (gr,) = torch.autograd.grad((ref * w.double()).sum(), [lr])
    record("grad logits", rel_err(gd, gr), TOL[dtype])


# -----------------------------------------------------------------------------
# code assignment (CE's target, tau = 0) under the tokenizer's bf16 autocast

@gpu_test
@pytest.mark.parametrize("metric", METRICS)
def test_code_assignment_under_autocast(record, metric):
    """nearest_code and neighbor_probs on the device inside a bf16 autocast are the device's
    fp32 numbers exactly, and the codes are the fp32 CPU codes except at ties: rows whose two
    candidate codes are within fp32 rounding of each other in float64 distance."""
    N, K, D = (512, 1024, 8) if SMALL else (16384, 16384, 8)
    g = torch.Generator().manual_seed(0)
    C, z = torch.randn(K, D, generator=g), torch.randn(N, D, generator=g)
    zd, Cd = z.to(DEVICE), C.to(DEVICE)
    plain = nearest_code(zd, Cd, metric), neighbor_probs(zd[:256], Cd, 0.5, metric)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        auto = nearest_code(zd, Cd, metric), neighbor_probs(zd[:256], Cd, 0.5, metric)
    for a, b in zip(auto, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
    cpu = nearest_code(z, C, metric)
    got = auto[0].cpu()
    rows = (got != cpu).nonzero()[:, 0]                             # only these need float64
    d = naive_d(z[rows].double(), C.double(), metric)               # (rows, K)
    gap = (d.gather(1, got[rows, None]) - d.gather(1, cpu[rows, None])).abs()[:, 0]
    bad = gap > 1e-5 * d.abs().amax(1).clamp_min(1.0)
    record("codes differing from fp32 CPU (not ties)", bad.sum().item(), 0)
    record("codes differing at fp32 ties (fraction)", (got != cpu).double().mean().item())
    q = neighbor_probs(z[:256], C, 0.5, metric)
    record("q vs fp32 CPU", rel_err(auto[1], q), 1e-4)


# -----------------------------------------------------------------------------
# sampling: the logits the samplers draw from against full forwards in float64 on the CPU

def sampling_model(mode):
    torch.manual_seed(0)
    grid, K, L = (2, 37, 2) if SMALL else (4, 1024, 2)
    cfg = GPTConfig(mode=mode, vocab_size=K, levels=L, grid_h=grid, grid_w=grid, num_classes=5,
                    bias=True, **MODELS["tiny" if SMALL else "mini"])
    return GPT(cfg).eval()


@gpu_test
def test_ar_kv_cache_sampling_logits(record):
    """Each step's guided logits through the KV cache (fp32 on the device) equal the full causal
    forward of the sampled codes (float64, CPU) at that slot."""
    model = sampling_model("ar")
    ref = copy.deepcopy(model).double()
    dev = model.to(DEVICE)
    seen = []
    hook = dev.head.register_forward_hook(lambda m, i, o: seen.append(o.detach().cpu()))
    labels, cfg_scale = torch.tensor([0, 3, 4, 1]), 2.0
    g = torch.Generator(DEVICE).manual_seed(0)
    codes = dev.generate(labels.to(DEVICE), cfg_scale=cfg_scale, temperature=1.0, generator=g)
    hook.remove()
    B, T = labels.numel(), dev.config.seq_len
    codes = codes.cpu().view(B, T)
    with torch.no_grad():   # guided in logit space: u + s (c - u)
        c = ref.head(ref._hidden(codes, labels))                            # (B, T, K)
        u = ref.head(ref._hidden(codes, torch.full_like(labels, ref.null_class)))
        full = u + cfg_scale * (c - u)
    got = torch.stack(seen, 1)                                              # (B, T, K)
    record("AR KV-cache logits vs full forward", rel_err(got, full), 1e-4)


@gpu_test
def test_maskgit_sampling_logits(record, monkeypatch):
    """Each MaskGIT pass's guided logits at the masked positions (fp32 on the device) equal the
    full bidirectional forward of that pass's input (float64, CPU)."""
    model = sampling_model("maskgit")
    ref = copy.deepcopy(model).double()
    dev = model.to(DEVICE)
    passes, heads = [], []
    inner = dev._hidden

    def spy(codes, labels, mask=None):
        passes.append((codes.cpu(), labels.cpu(), mask.cpu()))
        heads.append([])
        return inner(codes, labels, mask)

    monkeypatch.setattr(dev, "_hidden", spy)
    hook = dev.head.register_forward_hook(lambda m, i, o: heads[-1].append(o.detach().cpu()))
    labels, cfg_scale = torch.tensor([0, 3, 4, 1]), 3.0
    g = torch.Generator(DEVICE).manual_seed(0)
    dev.generate(labels.to(DEVICE), cfg_scale=cfg_scale, temperature=1.0, steps=4, generator=g)
    hook.remove()
    assert len(passes) == 4
    B, errs = labels.numel(), []
    for (codes, lab, mask), got in zip(passes, heads):
        with torch.no_grad():   # cond rows first, then the null class; logit space
            logits = ref.head(ref._hidden(codes, lab, mask))                # (2B, T, K)
            c, u = logits[:B], logits[B:]
            want = (u + cfg_scale * (c - u))[mask[:B]]                      # (masked, K)
        errs.append(rel_err(torch.cat(got), want))
    record("MaskGIT logits vs full forward (max over passes)", max(errs), 1e-4)


@gpu_test
@pytest.mark.parametrize("mode", ["ar", "maskgit"])
def test_factorized_heads_on_device(record, mode):
    """Per-sub-token heads (support/factorized.py) on the device: each level's logits equal its
    own head on the float64 CPU forward, and sampling draws every level from its own vocabulary."""
    from support.factorized import make_gpt
    torch.manual_seed(0)
    Ks = (4, 16) if SMALL else (64, 4096)
    cfg = GPTConfig(mode=mode, vocab_size=max(Ks), levels=2, level_vocab=Ks, grid_h=4, grid_w=4,
                    num_classes=5, **MODELS["tiny" if SMALL else "mini"])
    model = make_gpt(cfg).eval()
    ref = copy.deepcopy(model).double()
    dev = model.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(0, k, (3, 4, 4), generator=g) for k in Ks], -1)
    labels = torch.tensor([0, 2, 4])
    mask = model.sample_mask(3, generator=g, device="cpu") if mode == "maskgit" else None
    with torch.no_grad():
        got = dev(codes.to(DEVICE), labels.to(DEVICE), None if mask is None else mask.to(DEVICE))
        want = ref(codes, labels, mask)
    record("factorised logits vs float64", max(rel_err(a, b) for a, b in zip(got, want)), 1e-4)
    out = dev.generate(labels.to(DEVICE), cfg_scale=2.0, generator=torch.Generator(DEVICE).manual_seed(0))
    assert out.shape == (3, 4, 4, 2)
    assert all(0 <= out[..., l].min() and out[..., l].max() < k for l, k in enumerate(Ks))


# -----------------------------------------------------------------------------
# a pretrained-format tokenizer (IBQ / LlamaGen layout, random weights) under bf16 autocast

@gpu_test
@pytest.mark.parametrize("family", ["ibq", "llamagen"])
def test_pretrained_tokenizer_autocast(record, tmp_path, family):
    """encode / decode on the device (fp32, and bf16 autocast as encode.py runs it) against fp32
    on the CPU; the file goes through load_pretrained as a downloaded one would."""
    from support import pretrained as P
    from test_pretrained import ibq_lightning, llamagen_ckpt, random_model, tiny
    size = 16 if SMALL else 64
    main = random_model(tiny(family, image_size=size, codebook_size=64 if SMALL else 1024))
    path = str(tmp_path / "tok.ckpt")
    torch.save((ibq_lightning if family == "ibq" else llamagen_ckpt)(main), path)
    cpu = P.load_pretrained(path, "cpu", size, verbose=False)
    dev = P.load_pretrained(path, DEVICE, size, verbose=False)
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z_ref, codes_ref = cpu.encode(x)
    img_ref = cpu.decode(codes_ref)
    z32, codes32 = dev.encode(x.to(DEVICE))
    record("fp32 latents vs CPU", rel_err(z32, z_ref), 1e-4)
    record("fp32 codes differing from CPU (fraction)", (codes32.cpu() != codes_ref).double().mean().item(), 0.01)
    record("fp32 decode vs CPU", rel_err(dev.decode(codes_ref.to(DEVICE)), img_ref), 1e-4)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        zb, codesb = dev.encode(x.to(DEVICE))
        imgb = dev.decode(codes_ref.to(DEVICE))
    assert zb.dtype == torch.float32 and codesb.dtype == torch.int64
    record("bf16 autocast latents vs fp32 CPU", rel_err(zb, z_ref), 5e-2)
    record("bf16 autocast codes differing from fp32 CPU (fraction)",
           (codesb.cpu() != codes_ref).double().mean().item(), 0.2)
    record("bf16 autocast decode vs fp32 CPU", rel_err(imgb.float(), img_ref), 5e-2)


# -----------------------------------------------------------------------------
# train.py: the ImageNet generator config, shrunk (tiny model, tiny encoded data)

@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    from helpers import make_encoded
    return make_encoded(str(tmp_path_factory.mktemp("enc")))


def imagenet_args(enc, out_dir, **kw):
    """config/imagenet_ibqb.py with what a tiny run must change: data, a small model, a short
    schedule, the grid's classes (the tiny data has 3). GPU: bf16, compile, fused AdamW (train.py
    picks it on CUDA), EMA on."""
    args = dict(data_dir=enc[0], val_dir=enc[1], out_dir=out_dir, model_size="tiny", batch_size=8,
                gradient_accumulation_steps=1, max_iters=4, lr_decay_iters=4, warmup_iters=2,
                eval_interval=2, eval_iters=1, log_interval=1, grid_classes=(0, 1, 2),
                grid_per_class=2, ema_decay=0.9, device=DEVICE, dtype="bfloat16",
                compile=DEVICE == "cuda")
    args.update(kw)
    return [os.path.join(ROOT, "config/imagenet_ibqb.py")] + [f"--{k}={v}" for k, v in args.items()]


def run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def train(args, timeout=240):
    return run([sys.executable, os.path.join(ROOT, "train.py")] + args, timeout)


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["loss"] for r in recs if "loss" in r], [r["val_nll"] for r in recs if "val_nll" in r]


def max_weight_diff(a, b):
    """max |difference| over the final checkpoints' model and EMA weights."""
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True) for d in (a, b))
    assert ca["iter"] == cb["iter"]
    return max((x.double() - cb[key][k].double()).abs().max().item()
               for key in ("model", "ema") for k, x in ca[key].items())


@gpu_test
def test_torchrun_one_rank(enc, tmp_path):
    """train.py under torchrun, 1 rank: NCCL on CUDA (gloo on the CPU dry run), 2 steps."""
    out = str(tmp_path / "ddp")
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                  os.path.join(ROOT, "train.py")]
                 + imagenet_args(enc, out, max_iters=2, eval_interval=100, compile=False))
    assert "max |weight difference| between ranks = 0" in stdout, stdout[-2000:]
    train_losses, _ = losses(out)
    assert len(train_losses) == 2 and all(math.isfinite(x) for x in train_losses)


@gpu_test
def test_imagenet_config_steps_and_resume(record, enc, tmp_path):
    """A few steps of config/imagenet_ibqb.py finish with finite losses; then how close resume
    comes on this device: a straight run vs two runs resumed from one half-way checkpoint.
    On the CPU resume is bit-exact (0); on CUDA index_add_, scatter_add_ and the attention
    backward reduce in a nondeterministic order, so this is a measurement, not an equality."""
    import shutil
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(imagenet_args(enc, full))
    train_losses, val = losses(full)
    assert len(train_losses) == 4 and len(val) == 3
    record("non-finite losses", sum(not math.isfinite(x) for x in train_losses + val), 0)
    train(imagenet_args(enc, part, max_iters=2))          # stops at 2 with its checkpoint
    resumed = []
    for name in ("resumed_a", "resumed_b"):
        d = str(tmp_path / name)
        shutil.copytree(part, d)
        train(imagenet_args(enc, d, init_from="resume"))
        resumed.append(d)
    exact = 0.0 if DEVICE == "cpu" else None
    record("resume: max |weight diff| straight vs resumed A", max_weight_diff(full, resumed[0]), exact)
    record("resume: max |weight diff| straight vs resumed B", max_weight_diff(full, resumed[1]), exact)
    record("resume: max |weight diff| resumed A vs resumed B", max_weight_diff(*resumed), exact)
    record("resume: max |train loss diff| straight vs resumed A",
           max(abs(a - b) for a, b in zip(losses(full)[0], losses(resumed[0])[0])), exact)


# -----------------------------------------------------------------------------
# the report's plumbing (no device needed: these run in the normal suite)

FAKE_JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0"
failures="1" skipped="1" tests="3" time="9.5"><testcase classname="tests.test_cuda" name="test_a[l2]"
time="1.25" /><testcase classname="tests.test_cuda" name="test_b" time="2.0"><failure
message="AssertionError: loss: error 0.5 &gt; tolerance 0.0001">long traceback</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="0.0"><skipped message="needs CUDA" />
</testcase></testsuite></testsuites>"""


def test_report_assembles_from_junit_and_records(tmp_path):
    junit, rec = tmp_path / "junit.xml", tmp_path / "rec.jsonl"
    junit.write_text(FAKE_JUNIT)
    rec.write_text(json.dumps({"test": "test_a[l2]", "what": "loss", "err": 3e-6, "tol": 1e-4}) + "\n"
                   + json.dumps({"test": "test_b", "what": "loss", "err": 0.5, "tol": 1e-4}) + "\n")
    cases = gpu_check.read_junit(str(junit))
    assert [(c["name"], c["outcome"]) for c in cases] == [
        ("test_a[l2]", "passed"), ("test_b", "failed"), ("test_c", "skipped")]
    assert "error 0.5 > tolerance" in cases[1]["message"]
    errs = gpu_check.read_records(str(rec))
    text = gpu_check.tests_section(cases, errs, note="")
    assert "| test_a[l2] | pass | loss 3.0e-06 (tol 1.0e-04) | 1.2 |" in text
    assert "| test_b | **FAIL** |" in text and "error 0.5 > tolerance" in text
    assert gpu_check.tests_section([{"name": "t", "outcome": "failed", "time": 0.0,
                                     "message": "max |x| wrong"}], {}, "").count("\\|") == 2
    assert "1 passed, 1 failed, 1 skipped" in text


def test_report_is_written_when_parts_crash(tmp_path, monkeypatch):
    """A part that raises, one that times out and one that passes: all three in the report."""
    def boom(args, work):
        raise RuntimeError("exploded")

    def slow(args, work):
        raise gpu_check.PartTimeout(1, "half a log")

    def fine(args, work):
        return True, "all good"

    monkeypatch.setattr(gpu_check, "PARTS", [("Crashes", boom), ("Hangs", slow), ("Works", fine)])
    out = tmp_path / "report.md"
    monkeypatch.setattr(gpu_check, "environment", lambda device: ["- device: fake"])
    rc = gpu_check.main(["--out", str(out), "--device", "cpu"])
    text = out.read_text()
    assert rc == 1
    assert "## Crashes" in text and "RuntimeError: exploded" in text
    assert "## Hangs" in text and "timed out after 1 s" in text and "half a log" in text
    assert "## Works" in text and "all good" in text


def test_gpu_check_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", "unused.md"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_part_time_limit_stops_the_process_group_and_keeps_its_output(tmp_path):
    """run_cmd: past the limit the part's whole process group is killed (a child it started too)
    and what it printed so far comes back."""
    child = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); "
            "print('started', flush=True); time.sleep(60)")
    with pytest.raises(gpu_check.PartTimeout) as e:
        gpu_check.run_cmd([sys.executable, "-c", code, str(child)], 3, str(tmp_path / "log"))
    assert "started" in e.value.output and "timed out after 3 s" in str(e.value)
    assert "started" in (tmp_path / "log").read_text()
    pid = int(child.read_text())
    for _ in range(50):              # reaped by init once killed; gone from the process table
        if not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the part's child process survived the time limit")
