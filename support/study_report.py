"""
The report of the codebook-size study (support/study.py runs it): from what the study left on
disk (each run's log.jsonl and fid.jsonl, the tokenizers' metrics.json, premise.json, the
.seconds clock files) it writes {out}/results.md (a table per K, the differences paired by seed,
the long pair, the premise, the compute) and assets/study_{delta,curves,grids,sweep}.png, each
written atomically. Nothing here trains or samples, so the tables and figures can be rebuilt at
any time:

    python -m support.study --report_only      # the study's arguments, then report() below

The premise figure (assets/study_premise.png) is drawn by premise_figure() from the decoded
images the premise stage computes; they are not saved, so it is not rebuilt here.
Tests: python -m pytest -q tests/test_study.py
"""

import os

import numpy as np

from support.common import atomic_write_text, read_json, read_jsonl, save_figure

# what each eval metric is called in log.jsonl, its label, and whether higher is better
METRICS = (("val_nll", "val NLL", False), ("sample_accuracy", "accuracy", True), ("sample_fld", "FLD", False))


# the two below are shared with the runner (support/study.py imports them from here, so that the
# report imports nothing of the runner)


def job_iters(job, default):
    """How many steps a job (study.plan's (name, K, label, seed, overrides)) trains: its
    "max_iters" override (the long runs), else default."""
    return job[4].get("max_iters", default)


def read_seconds(path):
    """A Clock file's seconds (0 when it does not exist yet)."""
    return float(open(path).read()) if os.path.isfile(path) else 0.0


# -----------------------------------------------------------------------------
# pure functions on {iter: value} curves, then the tables and plots


def eval_curves(d):
    """{metric key: {iter: value}} from a run's log.jsonl."""
    recs = read_jsonl(os.path.join(d, "log.jsonl"))
    return {key: {r["iter"]: r[key] for r in recs if key in r} for key, _, _ in METRICS}


def final_fid(d, iters):
    fids = [r["fid"] for r in read_jsonl(os.path.join(d, "fid.jsonl")) if r["iter"] == iters]
    return fids[-1] if fids else None


def seed_stats(curves):
    """Per-seed {iter: v} dicts -> (iters all seeds have, mean, min, max) arrays."""
    its = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    v = np.array([[c[i] for i in its] for c in curves], dtype=float).reshape(len(curves), len(its))
    return np.array(its), v.mean(0), v.min(0), v.max(0)


def steps_to(its, curve, target, higher_better):
    """First evaluated step at which a curve reaches target (>= if higher_better else <=), or None."""
    curve = np.asarray(curve, dtype=float)
    hit = np.nonzero(curve >= target - 1e-12 if higher_better else curve <= target + 1e-12)[0]
    return int(its[hit[0]]) if len(hit) else None


def paired_delta(a_runs, b_runs, key, at):
    """Differences b - a at step `at` of runs paired by seed ({seed: curves}). -> array over seeds."""
    seeds = sorted(s for s in set(a_runs) & set(b_runs) if at in a_runs[s][key] and at in b_runs[s][key])
    return np.array([b_runs[s][key][at] - a_runs[s][key][at] for s in seeds])


def digits(key):
    """Decimals a metric is reported with: FLD is in the tens to hundreds, the others below 10."""
    return 1 if key == "sample_fld" else 3


def fmt(values, n):
    """One seed's value as it is; several seeds' as mean ± half-range, n decimals."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{n}f}" + (f" ± {(v.max() - v.min()) / 2:.{n}f}" if len(v) > 1 else "")


def collect(a, jobs):
    """-> ({K: {objective label: {seed: curves (+ "fid", "dir", "iters")}}} of the --iters runs,
    the same of the long runs), each run once it has finished its steps."""
    res, long = {}, {}
    for job in jobs:
        name, K, label, seed, _ = job
        d, iters = os.path.join(a.out, name), job_iters(job, a.iters)
        if not os.path.isfile(os.path.join(d, "log.jsonl")):
            continue
        c = eval_curves(d)
        if iters in c["val_nll"]:
            c["fid"], c["dir"], c["iters"] = final_fid(d, iters), d, iters
            (res if iters == a.iters else long).setdefault(K, {}).setdefault(label, {})[seed] = c
    return res, long


def table(K, objs, iters):
    """The markdown table of one K: per metric the final value (mean ± half-range over seeds) and
    the first step at which the seed-mean curve reaches CE's final mean (MaskGIT CE's for MaskGIT)."""
    ces = {"CE": objs.get("CE"), "MaskGIT": objs.get("MaskGIT CE")}  # MaskGIT rows against MaskGIT CE
    head = ["objective", "seeds"]
    for _, label, _ in METRICS:
        head += [f"{label} @ {iters}", f"steps to CE's {label}"]
    head += ["Inception FID @ %d" % iters]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, runs in objs.items():
        cells = [name, str(len(runs))]
        ce = ces["MaskGIT" if name.startswith("MaskGIT") else "CE"]
        for key, _, up in METRICS:
            its, m, _, _ = seed_stats([r[key] for r in runs.values()])
            if not len(its) or its[-1] != iters:
                cells += ["—", "—"]
                continue
            cells.append(fmt([r[key][iters] for r in runs.values()], digits(key)))
            if ce:
                cits, cm, _, _ = seed_stats([r[key] for r in ce.values()])
                s = steps_to(its, m, cm[-1], up) if len(cm) else None
                cells.append(str(s) if s is not None else "not reached")
            else:
                cells.append("—")
        f = [r["fid"] for r in runs.values() if r.get("fid") is not None]
        cells.append(fmt(f, 1) if f else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def delta_table(res, perplexity, iters):
    """The markdown table of SNCE (main perplexity) - CE, MaskGIT SNCE - MaskGIT CE and LS - CE at
    the last step, paired by seed, per K: mean [min, max] over seeds and each seed's value."""
    head = ["K", "difference", "seeds"] + [label for _, label, _ in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for K in sorted(res):
        main = f"SNCE p={perplexity[K]:g}"
        for base, other in (("CE", main), ("MaskGIT CE", f"MaskGIT {main}"), ("CE", "LS eps=0.1")):
            if base not in res[K] or other not in res[K]:
                continue
            seeds = sorted(set(res[K][base]) & set(res[K][other]))
            cells = []
            for key, _, _ in METRICS:
                d, n = paired_delta(res[K][base], res[K][other], key, iters), digits(key)
                each = ", ".join(f"{x:+.{n}f}" for x in d)
                cells.append("—" if not len(d) else each if len(d) == 1 else
                             f"{d.mean():+.{n}f} [{d.min():+.{n}f}, {d.max():+.{n}f}] ({each})")
            lines.append(f"| {K:,} | {other} - {base} | {', '.join(map(str, seeds))} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_seconds(out):
    """-> (wall seconds summed over study.py invocations, seconds summed over its pieces) from
    the Clock files under out: invocations/*.seconds and each piece's {log}.seconds."""
    wall = pieces = 0.0
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".seconds"):
                v = read_seconds(os.path.join(root, f))
                if os.path.basename(root) == "invocations" and os.path.dirname(root) == out.rstrip(os.sep):
                    wall += v
                else:
                    pieces += v
    return wall, pieces


def write_results(a, parts, what=""):
    """parts + the compute line -> out/results.md (atomically) and stdout; the text."""
    wall, pieces = compute_seconds(a.out)
    parts = parts + [f"Compute: {wall / 3600:.2f} h wall summed over the study.py invocations{what}, "
                     f"{pieces / 3600:.2f} h summed over the pieces they ran side by side (--workers).\n"]
    text = "\n".join(parts)
    atomic_write_text(os.path.join(a.out, "results.md"), text)
    print(text)
    return text


def curves_figure(plt, ks, series, path):
    """One row per K, one column per metric: each series' mean over seeds and its range against
    the step. series(K) -> [(colour index, label, {seed: run curves})]."""
    fig, axes = plt.subplots(len(ks), len(METRICS), figsize=(4.5 * len(METRICS), 3.3 * len(ks)), squeeze=False)
    for row, K in zip(axes, ks):
        for ax, (key, label, _) in zip(row, METRICS):
            for i, name, runs in series(K):
                its, m, lo, hi = seed_stats([r[key] for r in runs.values()])
                ax.plot(its, m, "-", color=f"C{i}", label=name)
                ax.fill_between(its, lo, hi, color=f"C{i}", alpha=0.15)
            ax.set(xlabel="step", ylabel=label, title=f"K = {K:,}: {label}")
        legend(row[0], 7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def grid_figure(plt, grids, cols, path):
    """The (title, sample-grid png) pairs whose files exist, `cols` to a row, as one figure."""
    grids = [(n, p) for n, p in grids if os.path.isfile(p)]
    if not grids:
        return
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (n, p) in zip(axes.flat, grids):
        ax.imshow(plt.imread(p), cmap="gray")
        ax.set_title(n, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def legend(ax, fontsize=7):
    """ax.legend, when something on ax has a label (an empty legend only warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def pyplot(assets=None):
    """matplotlib.pyplot on the file-only Agg backend (imported here, not at module load: the
    runner needs no plotting), with the figure folder made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if assets:
        os.makedirs(assets, exist_ok=True)
    return plt


def report(a, jobs, sampling):
    """Write results.md and the figures for the planned jobs (study.plan) of args a; sampling: the
    evals' sampling options (study.sampling()), named in the text. -> the text of results.md."""
    res, long = collect(a, jobs)
    if not res:
        raise SystemExit(f"no finished runs under {a.out}: run `python -m support.study` first")
    how = ", ".join(f"{k} {v:g}" for k, v in sampling.items())
    parts = [f"# SNCE vs CE across codebook sizes\n\n{a.iters} steps per run; every {a.iters // a.evals} steps "
             f"(and the NLL at step 0) the held-out NLL and {a.eval_samples} class-balanced samples ({how}) "
             "scored by the classifier. Mean ± half-range over seeds (one seed: its value); steps to CE's value: first eval at which "
             "the seed-mean curve reaches CE's final mean (MaskGIT rows: MaskGIT CE's; CE's own row: when CE "
             "first got there). Inception FID: the seeds in --fid_seeds only. SNCE's main target perplexity "
             "(all seeds, MaskGIT, the headline figure): "
             + ", ".join(f"{p:g} at K = {K:,}" for K, p in sorted(a.perplexity.items())) + ".\n"]
    for K in sorted(res):
        tok = os.path.join(a.out, f"k{K}", "tokenizer")
        m = read_json(os.path.join(tok, "metrics.json"), "tokenizer metrics") if os.path.isfile(
            os.path.join(tok, "metrics.json")) else {}
        info = (f"tokenizer: val PSNR {m['psnr']:.2f} dB; share of the K codes used by the val tokens "
                f"({m['images']} digits) "
                f"{m['util'][0]:.3f} (usage perplexity {m['ppl'][0]:.0f}), by the training tokens of the last "
                f"steps {m['train_util_window'][0]:.3f} (perplexity {m['train_ppl_window'][0]:.0f})"
                if m else "tokenizer: no metrics.json")
        parts.append(f"## K = {K:,}\n\n{info}\n\n{table(K, res[K], a.iters)}\n")
    parts.append(f"## Differences at step {a.iters}, paired by seed\n\nmean [min, max] over seeds (each "
                 f"seed's value, in seed order)\n\n{delta_table(res, a.perplexity, a.iters)}\n")
    for K in sorted(long):  # labels "CE, N steps": the table's CE reference is the long CE
        objs = {n.rsplit(", ", 1)[0]: runs for n, runs in long[K].items()}
        parts.append(f"## K = {K:,}, trained {a.long_iters} steps (CE and SNCE only)\n\n"
                     f"{table(K, objs, a.long_iters)}\n")
    pm = os.path.join(a.out, "premise.json")
    if os.path.isfile(pm):
        p = read_json(pm, "premise results")
        parts.append("## Premise (largest K): every token replaced by its k-th nearest code\n\n| k | "
                     + " | ".join(p) + " |\n" + "|---" * (len(p) + 1) + "|\n| PSNR (dB) | "
                     + " | ".join(f"{v['psnr']:.2f}" for v in p.values()) + " |\n| accuracy | "
                     + " | ".join(f"{v['accuracy']:.3f}" for v in p.values()) + " |\n")
    text = write_results(a, parts, " (tokenizers, runs, FID, premise)")
    plots(a, res, long)
    return text


def plots(a, res, long):
    plt = pyplot(a.assets)
    ks = sorted(res)
    # headline: SNCE - CE at the last step vs K, one point per seed and the mean
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 3.8))
    for ax, (key, label, up) in zip(axes, METRICS):
        for K in ks:
            snce = f"SNCE p={a.perplexity[K]:g}"
            if "CE" in res[K] and snce in res[K]:
                d = paired_delta(res[K]["CE"], res[K][snce], key, a.iters)
                ax.plot([K] * len(d), d, "o", color="C3", alpha=0.4, ms=4)
                if len(d):
                    ax.errorbar(K, d.mean(), yerr=[[d.mean() - d.min()], [d.max() - d.mean()]], fmt="s",
                                color="C3", capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="codebook size K", ylabel=f"{label}: SNCE - CE",
               title=f"{label} ({'higher' if up else 'lower'} is better)")
    fig.tight_layout()
    save_figure(fig, os.path.join(a.assets, "study_delta.png"), dpi=110)
    plt.close(fig)
    # curves per K
    curves_figure(plt, ks, lambda K: [(i, n, runs) for i, (n, runs) in enumerate(res[K].items())],
                  os.path.join(a.assets, "study_curves.png"))
    # final sample grids, first seed of each objective
    grids = [(f"K={K:,} {name}", os.path.join(runs[min(runs)]["dir"], f"samples_{runs[min(runs)]['iters']:06d}.png"))
             for r in (res, long) for K in sorted(r) for name, runs in r[K].items()]
    grid_figure(plt, grids, 4, os.path.join(a.assets, "study_grids.png"))
    # perplexity sweep: final metric vs the target's perplexity, one colour per K; CE dashed
    sweeps = {K: sorted((float(n.split("=")[1]), r) for n, r in res[K].items() if n.startswith("SNCE p="))
              for K in ks}
    toy = read_json(a.toy_metrics, "toy metrics") if os.path.isfile(a.toy_metrics) else {}
    if any(len(v) > 1 for v in sweeps.values()) or toy.get("tau_sweep"):
        fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4.5 * (len(METRICS) + 1), 3.8))
        for ax, (key, label, up) in zip(axes, METRICS):
            for i, K in enumerate(ks):
                pts = [(p, [r[key][a.iters] for r in runs.values() if a.iters in r[key]]) for p, runs in sweeps[K]]
                pts = [(p, v) for p, v in pts if v]
                if pts:
                    ax.errorbar([p for p, _ in pts], [np.mean(v) for _, v in pts],
                                yerr=[[np.mean(v) - min(v) for _, v in pts], [max(v) - np.mean(v) for _, v in pts]],
                                fmt="o-", color=f"C{i}", capsize=3, label=f"SNCE, K = {K:,}")
                ce = [r[key][a.iters] for r in res[K].get("CE", {}).values() if a.iters in r[key]]
                if ce:
                    ax.axhline(np.mean(ce), ls="--", color=f"C{i}", lw=1, label=f"CE, K = {K:,}")
            ax.set(xscale="log", xlabel="target perplexity exp H(q)", ylabel=label,
                   title=f"final {label} vs softness ({'higher' if up else 'lower'} is better)")
            legend(ax, 6)
        ax = axes[-1]  # the toy (toy.py): the same question where the truth is known
        if toy.get("tau_sweep"):
            t = sorted(toy["tau_sweep"], key=float)
            ax.plot([float(x) for x in t], [np.mean(toy["tau_sweep"][x]["tv"]) for x in t], "o-", color="C3",
                    label="SNCE")
            ax.axhline(np.mean(toy["ce"]["tv"]), color="C0", ls="--", label="CE")
            ax.set(xscale="log", xlabel="tau", ylabel="TV to the true cell probabilities", title="toy.py: TV vs tau")
            legend(ax, 7)
        else:
            ax.set_axis_off()
        fig.tight_layout()
        save_figure(fig, os.path.join(a.assets, "study_sweep.png"), dpi=110)
        plt.close(fig)


def premise_figure(res, pics, real, big, path):
    """The premise stage's figure: rows of decoded val digits (the originals, then each k-th
    nearest code and random codes), beside PSNR and classifier accuracy vs k. res, pics, real:
    study.premise()'s results; big: the tokenizer's K."""
    plt = pyplot()

    names = ["original"] + list(pics)
    rows = len(names)
    fig = plt.figure(figsize=(12, 1.3 * rows + 1))
    gs = fig.add_gridspec(rows, 2, width_ratios=(2.2, 1), hspace=0.6)
    for i, n in enumerate(names):
        ax = fig.add_subplot(gs[i, 0])
        row = real if n == "original" else pics[n]
        ax.imshow(np.concatenate(list(row[:, 0].numpy()), axis=1), cmap="gray", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(n if n in ("original", "random") else f"k = {n}", fontsize=8, loc="left")
    ks = [k for k in res if k != "random"]
    for j, (key, label) in enumerate((("psnr", "PSNR (dB)"), ("accuracy", "classifier accuracy"))):
        ax = fig.add_subplot(gs[j * rows // 2 + j:(j + 1) * rows // 2, 1])  # two stacked plots, a row apart
        ax.plot([int(k) for k in ks], [res[k][key] for k in ks], "o-")
        ax.axhline(res["random"][key], ls="--", color="gray", label="random code")
        ax.set(xscale="log", xlabel="k (k-th nearest code)", ylabel=label)
        legend(ax, 7)
    fig.suptitle(f"K = {big:,}: val digits decoded with every token replaced by its k-th nearest code")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_figure(fig, path, dpi=100)
    plt.close(fig)
