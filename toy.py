"""
The paper's toy experiment (Fig. 2), with numbers: L2 regression vs CE vs SNCE on a 2D
two-Gaussian latent quantized by a large uniform grid, from only 100 training points.

    python toy.py                                  # 3 seeds: out/toy/toy.png, out/toy/toy_metrics.json
    python toy.py --tau 0.02 0.05 0.1 0.2 0.5 1    # + a tau sweep, toy_tau.png (first tau = main)
    python toy.py --tau 0.1 0.005 0.02 0.05 0.2 0.5 1.0 --out_dir assets   # README's figures + numbers

The README's assets (toy.png, toy_tau.png, toy_metrics.json with its tau sweep, which
support/study_report.py plots beside the study's perplexity sweep) come from the last command
only: a plain run writes under out/ and leaves them as they are.

Setting (the paper's equations and numbers were lost from its text; these are ours):
- ground truth: 0.5 N((-1.2, -1.2), 0.5^2 I) + 0.5 N((1.2, 1.2), 0.5^2 I)
- quantizer: the 64 x 64 grid of cell centres over [-3, 3]^2 (cell width 0.094, K = 4,096
  tokens); a point maps to its nearest centre (points outside the square to the edge cells)
- data: 100 samples; model: a 10-layer MLP (width 128, GELU) fed a constant input; its output
  is 4,096 logits (CE, SNCE) or one 2D point (L2); Adam, lr 1e-3, 2,000 full-batch steps
- SNCE: snce.snce_loss with metric l2 and tau = 0.1 (q is then a Gaussian kernel of std
  sqrt(tau / 2) = 0.22 around each point: a kernel density estimate snapped to the grid).
  CE is the same function with tau = 0 and the cells as hard targets.
Metrics, per seed, on 10,000 fresh ground-truth samples:
- nll: mean -log p(cell of the sample) in nats under the model's token distribution
- tv: total variation between the model's token distribution and the exact cell probabilities
  (products of normal CDF differences per axis)
- mode_dist (L2 only): distance from the predicted point to the nearest mode
"""

import argparse
import math
import multiprocessing as mp
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from tqdm import tqdm

from support.common import save_figure, write_json
from snce import snce_loss

CENTERS = torch.tensor([[-1.2, -1.2], [1.2, 1.2]], dtype=torch.float64)
STD = 0.5
HALF_WIDTH = 3.0   # the grid covers [-3, 3]^2
GRID = 64          # cells per axis: K = 4,096
N_TRAIN, N_EVAL = 100, 10_000
DEPTH, WIDTH, STEPS, LR = 10, 128, 2000, 1e-3


# -----------------------------------------------------------------------------
# ground truth and the quantizer


def sample(n, g):
    """n points from the two-Gaussian mixture, (n, 2) float64."""
    which = torch.randint(0, 2, (n,), generator=g)
    return CENTERS[which] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def grid_centers():
    """(GRID,) 1D centres and the (K, 2) codebook, row-major: token = iy * GRID + ix."""
    w = 2 * HALF_WIDTH / GRID
    c = -HALF_WIDTH + w * (torch.arange(GRID, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return c, torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


def quantize(x):
    """Nearest grid centre of each point (the edge cells take everything outside): (n,) tokens."""
    w = 2 * HALF_WIDTH / GRID
    ij = ((x + HALF_WIDTH) / w).floor().long().clamp(0, GRID - 1)
    return ij[:, 1] * GRID + ij[:, 0]


def true_cell_probs():
    """Exact P(token) under the mixture: per axis a difference of normal CDFs between cell
    edges (outermost edges at +-inf), multiplied over the two axes, averaged over the modes."""
    w = 2 * HALF_WIDTH / GRID
    edges = -HALF_WIDTH + w * torch.arange(GRID + 1, dtype=torch.float64)
    edges[0], edges[-1] = -math.inf, math.inf
    P = 0
    for mu in CENTERS:
        px = torch.special.ndtr((edges - mu[0]) / STD).diff()   # (GRID,)
        py = torch.special.ndtr((edges - mu[1]) / STD).diff()
        P = P + 0.5 * py[:, None] * px[None, :]
    return P.reshape(-1)


# -----------------------------------------------------------------------------
# the model: an MLP with a constant input, so its output is a free (learned) distribution


def mlp(out_dim):
    layers, d = [], 1
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(d, WIDTH), nn.GELU()]
        d = WIDTH
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


def train(objective, seed, tau, steps):
    """Fit one objective on seed's 100 training points; returns the model's output: the
    predicted point (2,) for 'l2', log-probabilities over the K tokens otherwise."""
    torch.set_num_threads(1)   # batch-1 MLP steps: threads cost more than they give
    x = sample(N_TRAIN, torch.Generator().manual_seed(seed))       # (N, 2), same for every objective
    _, codebook = grid_centers()
    torch.manual_seed(seed)
    net = mlp(2 if objective == "l2" else codebook.shape[0])
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)
    one = torch.ones(1, 1)
    x32, C32, cells = x.float(), codebook.float(), quantize(x)
    for _ in range(steps):
        out = net(one)                                            # (1, 2) or (1, K)
        if objective == "l2":
            loss = (out - x32).pow(2).sum(-1).mean()
        elif objective == "ce":   # SNCE at tau = 0 with the cells as one-hot targets
            loss = snce_loss(out.expand(len(x), -1), None, None, 0.0, targets=cells)
        else:
            loss = snce_loss(out.expand(len(x), -1), x32, C32, tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(one)[0].double()
    return out if objective == "l2" else out.log_softmax(-1)


def _job(args):
    return args, train(*args)


def evaluate(logp, P, eval_tokens):
    """logp (K,) the model's log-probabilities, P (K,) the true cell probabilities, eval_tokens
    (n,) cells of fresh samples -> {"nll": mean -log p(cell), "tv": 0.5 * sum_k |p_k - P_k|}."""
    return {"nll": -logp[eval_tokens].mean().item(),
            "tv": 0.5 * (logp.exp() - P).abs().sum().item()}


def run(taus, seeds, steps, workers, bar):
    """Every seed: a fresh dataset, then L2, CE and SNCE at every tau, as independent runs
    spread over `workers` processes (one thread each). Returns the metrics and the first
    seed's outputs for the figure."""
    jobs = [(obj, seed, tau, steps) for seed in range(seeds)
            for obj, tau in [("l2", 0.0), ("ce", 0.0)] + [("snce", t) for t in taus]]
    out = {}
    with mp.get_context("spawn").Pool(workers) as pool:
        for (obj, seed, tau, _), o in pool.imap_unordered(_job, jobs):
            out[obj, seed, tau] = o
            bar.update(steps)
    P = true_cell_probs()
    eval_tokens = quantize(sample(N_EVAL, torch.Generator().manual_seed(12345)))
    m = {"ce": {"nll": [], "tv": []}, "l2": {"mode_dist": []},
         "snce": {t: {"nll": [], "tv": []} for t in taus}}
    for seed in range(seeds):
        m["l2"]["mode_dist"].append((CENTERS - out["l2", seed, 0.0]).norm(dim=1).min().item())
        for name, logp in [("ce", out["ce", seed, 0.0])] + [(t, out["snce", seed, t]) for t in taus]:
            for k, v in evaluate(logp, P, eval_tokens).items():
                (m["ce"] if name == "ce" else m["snce"][name])[k].append(v)
    shown = dict(x=sample(N_TRAIN, torch.Generator().manual_seed(0)), point=out["l2", 0, 0.0],
                 ce=out["ce", 0, 0.0].exp(), snce=out["snce", 0, taus[0]].exp(), P=P)
    truth = {"nll": -P[eval_tokens].log().mean().item(), "tv": 0.0}
    return m, truth, shown


# -----------------------------------------------------------------------------
# figure, table, files


def figure(shown, tau, path):
    c, _ = grid_centers()
    ext = [-HALF_WIDTH, HALF_WIDTH, -HALF_WIDTH, HALF_WIDTH]
    img = lambda p: p.reshape(GRID, GRID).numpy()   # row iy, column ix
    fine = torch.linspace(-HALF_WIDTH, HALF_WIDTH, 300, dtype=torch.float64)
    yy, xx = torch.meshgrid(fine, fine, indexing="ij")
    pts = torch.stack([xx, yy], -1)
    dens = sum(torch.exp(-((pts - mu) ** 2).sum(-1) / (2 * STD**2)) for mu in CENTERS)
    counts = torch.bincount(quantize(shown["x"]), minlength=GRID * GRID).double()
    x = shown["x"].numpy()
    fig, ax = plt.subplots(1, 6, figsize=(21, 3.9))
    panels = [("(a) ground-truth density", dens.numpy()), ("(b) 100 training samples", None),
              ("(c) quantized dataset (64x64 grid)", img(counts)), ("(d) L2 regression", None),
              ("(e) CE: model token distribution", img(shown["ce"])),
              (f"(f) SNCE (tau={tau}): model token distribution", img(shown["snce"]))]
    for a, (title, im) in zip(ax, panels):
        if im is not None:
            a.imshow(im, origin="lower", extent=ext, cmap="viridis", interpolation="nearest")
        a.set_title(title, fontsize=10)
        a.set_xlim(-HALF_WIDTH, HALF_WIDTH)
        a.set_ylim(-HALF_WIDTH, HALF_WIDTH)
        a.set_aspect("equal")
    ax[1].scatter(x[:, 0], x[:, 1], s=8, c="k")
    ax[3].scatter(x[:, 0], x[:, 1], s=8, c="0.75", label="data")
    p = shown["point"].numpy()
    ax[3].scatter([p[0]], [p[1]], s=160, marker="*", c="r", label="L2 prediction")
    ax[3].scatter(CENTERS[:, 0], CENTERS[:, 1], s=60, marker="x", c="b", label="modes")
    ax[3].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def tau_figure(m, truth, path):
    taus = sorted(m["snce"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for a, key in zip(ax, ["tv", "nll"]):
        mean = lambda v: sum(v) / len(v)
        a.plot(taus, [mean(m["snce"][t][key]) for t in taus], "o-", label="SNCE")
        a.axhline(mean(m["ce"][key]), color="r", ls="--", label="CE (tau = 0)")
        a.axhline(truth[key], color="k", ls=":", label="ground truth")
        a.set_xscale("log")
        a.set_xlabel("tau")
        a.set_ylabel({"tv": "total variation to the true cell probabilities",
                      "nll": "NLL of fresh samples (nats)"}[key])
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def table(m, truth, taus):
    fmt = lambda v: f"{sum(v) / len(v):.3f} +- {(max(v) - min(v)) / 2:.3f}"
    rows = ["| objective | nll (nats) | tv | per seed nll / tv |", "|---|---:|---:|---|"]
    per = lambda d: " ; ".join(f"{a:.2f} / {b:.3f}" for a, b in zip(d["nll"], d["tv"]))
    rows.append(f"| CE | {fmt(m['ce']['nll'])} | {fmt(m['ce']['tv'])} | {per(m['ce'])} |")
    for t in taus:
        d = m["snce"][t]
        rows.append(f"| SNCE tau={t} | {fmt(d['nll'])} | {fmt(d['tv'])} | {per(d)} |")
    rows.append(f"| ground truth | {truth['nll']:.3f} | 0 | |")
    md = m["l2"]["mode_dist"]
    rows.append(f"\nL2 regression: distance to the nearest mode {fmt(md)} (modes are "
                f"{(CENTERS[0] - CENTERS[1]).norm().item() / 2:.2f} from their midpoint)")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tau", type=float, nargs="+", default=[0.1],
                   help="SNCE temperature(s); the first is the figure's, several make a sweep")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per objective")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes running the independent fits in parallel")
    p.add_argument("--out_dir", default=os.path.join("out", "toy"),
                   help="where toy.png, toy_metrics.json (and toy_tau.png) go")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.workers < 1 or any(t <= 0 for t in args.tau):
        p.error(f"need --seeds, --steps, --workers >= 1 and every --tau > 0, got {args.seeds}, "
                f"{args.steps}, {args.workers} and {args.tau}")
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    with tqdm(total=args.seeds * (2 + len(args.tau)) * args.steps, desc="toy", unit="step") as bar:
        m, truth, shown = run(args.tau, args.seeds, args.steps, args.workers, bar)
    print(table(m, truth, sorted(args.tau)))
    fig_path = os.path.join(args.out_dir, "toy.png")
    figure(shown, args.tau[0], fig_path)
    out = {"ce": m["ce"], "snce": m["snce"][args.tau[0]], "l2": m["l2"], "ground_truth": truth,
           "config": dict(centers=CENTERS.tolist(), std=STD, square=[-HALF_WIDTH, HALF_WIDTH],
                          grid=GRID, vocab=GRID * GRID, n_train=N_TRAIN, n_eval=N_EVAL,
                          depth=DEPTH, width=WIDTH, steps=args.steps, lr=LR, tau=args.tau[0],
                          seeds=args.seeds, metric="l2")}
    if len(args.tau) > 1:
        out["tau_sweep"] = {str(t): m["snce"][t] for t in args.tau}
        tau_fig = os.path.join(args.out_dir, "toy_tau.png")
        tau_figure(m, truth, tau_fig)
        print(f"wrote {tau_fig}")
    json_path = os.path.join(args.out_dir, "toy_metrics.json")
    write_json(json_path, out)
    print(f"wrote {fig_path} and {json_path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
