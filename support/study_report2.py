"""
The report of the codebook-size study's second design (v2, support/study_plan.py's plan): from
what the runs left on disk it writes {out}/results.md (the tokenizers, the tuning and its choices,
a table per K, the comparisons with bootstrap intervals, the verdicts) and
{assets}/study2_{gain,curves,grids,tuning}.png. Nothing here trains or samples:

    python -m support.study --report_only      # the study's arguments, then report2() below

Every reported number of a run is taken at its early-stopping step (the eval with the lowest
held-out NLL among those that scored samples: the tuning rule's, applied to every run); the last
step's values are shown beside them.
Tests: python -m pytest -q tests/test_study.py
"""

import os

import numpy as np

from support.common import read_json, save_figure
from support.study_plan import OBJECTIVES, TUNE_GRID, early_stop, report_jobs, tok_dir, tuned
from support.study_report import (METRICS, curves_figure, digits, eval_curves, fmt, grid_figure, legend,
                                  pyplot, steps_to, write_results)
from support.study_stats import (below_one, bootstrap_mean, bootstrap_slope, fmt_ratio, log_error_ratio,
                                 log_ratio)

PAIRS = (("SNCE", "CE"), ("SNCE", "control"), ("LS", "CE"), ("SNCE", "LS"))


def collect2(a):
    """-> {K: {"chosen", "tuning", "runs": {objective: {seed: curves (+ "dir", "es")}}}} for every K
    whose tuning is complete; runs that have not reached a.iters are left out."""
    res = {}
    for K in a.ks:
        t = tuned(a.out, K, eval_curves, a.tune_seed, iters=a.iters)
        if t is None:
            continue
        chosen, detail = t
        runs = {}
        for job in report_jobs(K, a.tok_seeds, chosen):
            d = os.path.join(a.out, job.name)
            if not os.path.isfile(os.path.join(d, "log.jsonl")):
                continue
            c = eval_curves(d)
            if a.iters in c["val_nll"] and early_stop(c):
                c["dir"], c["es"] = d, early_stop(c)
                runs.setdefault(job.label, {})[job.seed] = c
        res[K] = {"chosen": chosen, "tuning": detail, "runs": runs}
    return res


def config_label(obj, value):
    key = {"CE": "dropout", "LS": "eps", "SNCE": "p", "control": "p"}[obj]
    return f"{obj} ({key} {value:g})"


def tokenizer_table(a):
    lines = ["| K | tokenizer seed | role | val PSNR (dB) | val code usage | usage perplexity |", "|---" * 6 + "|"]
    for K in a.ks:
        for s in list(a.tok_seeds) + [a.tune_seed]:
            f = os.path.join(tok_dir(a.out, K, s), "metrics.json")
            if not os.path.isfile(f):
                continue
            m = read_json(f, "tokenizer metrics")
            role = "tuning only" if s == a.tune_seed else "reported"
            lines.append(f"| {K:,} | {s} | {role} | {m['psnr']:.2f} | {m['util'][0]:.3f} | {m['ppl'][0]:.0f} |")
    return "\n".join(lines)


def tuning_table(K, r):
    lines = ["| objective | value | early-stopping step | val NLL | accuracy | FLD | chosen |", "|---" * 7 + "|"]
    for obj, per in r["tuning"].items():
        for v, (step, m) in per.items():
            lines.append(f"| {obj} | {v:g} | {step} | {m['val_nll']:.3f} | {m['sample_accuracy']:.3f} | "
                         f"{m['sample_fld']:.1f} | {'yes' if r['chosen'][obj] == v else ''} |")
    return "\n".join(lines)


def run_table(K, r, iters):
    head = ["objective", "seeds", "early-stopping steps"] + [f"{lab} @ stop" for _, lab, _ in METRICS] + [
        f"accuracy @ {iters}", f"FLD @ {iters}"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for obj in OBJECTIVES:
        runs = r["runs"].get(obj)
        if not runs:
            continue
        value = r["chosen"]["SNCE" if obj == "control" else obj]
        cells = [config_label(obj, value), ", ".join(map(str, sorted(runs))),
                 ", ".join(str(runs[s]["es"][0]) for s in sorted(runs))]
        cells += [fmt([runs[s]["es"][1][key] for s in runs], digits(key)) for key, _, _ in METRICS]
        cells += [fmt([runs[s][key][iters] for s in runs if iters in runs[s][key]], digits(key))
                  if all(iters in runs[s][key] for s in runs) else "—" for key in ("sample_accuracy", "sample_fld")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(r, a_obj, b_obj):
    """-> (seeds, log error ratios, log FLD ratios) of a_obj vs b_obj at their stopping steps."""
    A, B = r["runs"].get(a_obj, {}), r["runs"].get(b_obj, {})
    seeds = sorted(set(A) & set(B))
    acc = [(A[s]["es"][1]["sample_accuracy"], B[s]["es"][1]["sample_accuracy"]) for s in seeds]
    fld = [(A[s]["es"][1]["sample_fld"], B[s]["es"][1]["sample_fld"]) for s in seeds]
    return (seeds, log_error_ratio([x for x, _ in acc], [y for _, y in acc]),
            log_ratio([x for x, _ in fld], [y for _, y in fld]))


def comparisons(res):
    """-> {(a, b): {K: (seeds, error (mean, lo, hi), FLD (mean, lo, hi))}} over PAIRS, >= 2 seeds."""
    out = {}
    for pair in PAIRS:
        for K, r in sorted(res.items()):
            seeds, le, lf = paired(r, *pair)
            if len(seeds) >= 2:
                out.setdefault(pair, {})[K] = (seeds, bootstrap_mean(le), bootstrap_mean(lf))
    return out


def verdict(name, held, lines):
    """held: True / False, or None while the runs it needs are not finished."""
    state = "not measured yet" if held is None else "held" if held else "not held"
    return f"- **{name}: {state}.** " + " ".join(lines)


def verdicts(a, res, comp):
    out = []
    big = max(res) if res else None

    def pair_verdict(name, pair):
        per = comp.get(pair, {})
        txt = [f"K = {K:,} ({len(s)} seeds): error ratio {fmt_ratio(*e)}, FLD ratio {fmt_ratio(*f)}."
               for K, (s, e, f) in sorted(per.items())]
        held = (below_one(*per[big][1]) and below_one(*per[big][2])) if big in per else None
        return verdict(name, held, txt + [f"(held: both intervals below 1 at K = {big:,})"] if big else txt)

    out.append(pair_verdict("SNCE beats tuned CE", ("SNCE", "CE")))
    out.append(pair_verdict("Geometry, not softness: SNCE beats the control at its own perplexity", ("SNCE", "control")))
    per = comp.get(("SNCE", "CE"), {})
    if len(per) >= 2:
        txt, held = [], True
        for i, scale in ((1, "error ratio"), (2, "FLD ratio")):
            vals = {K: paired(res[K], "SNCE", "CE")[i] for K in per}
            s, lo, hi = bootstrap_slope(vals)
            held &= hi < 0
            txt.append(f"{scale} SNCE / CE changes by x{np.exp(s * np.log(2)):.2f} "
                       f"[{np.exp(lo * np.log(2)):.2f}, {np.exp(hi * np.log(2)):.2f}] per doubling of K.")
        out.append(verdict("The gain grows with K", held, txt + ["(held: both intervals below 1)"]))
    else:
        out.append(verdict("The gain grows with K", None, ["fewer than 2 K's with >= 2 paired seeds."]))
    out.append(pair_verdict("Tuned label smoothing beats tuned CE", ("LS", "CE")))
    out.append(pair_verdict("SNCE beats tuned label smoothing", ("SNCE", "LS")))
    vals = TUNE_GRID["SNCE"][2]
    mid = {K: r["chosen"]["SNCE"] not in (min(vals), max(vals)) for K, r in sorted(res.items())}
    out.append(verdict("SNCE's best perplexity lies inside the sweep", bool(mid) and all(mid.values()), [
        f"K = {K:,}: chosen {res[K]['chosen']['SNCE']:g} of " + " / ".join(f"{v:g}" for v in vals)
        + " (FLD at the stop " + " / ".join(f"{res[K]['tuning']['SNCE'][v][1]['sample_fld']:.1f}" for v in vals) + ")."
        for K in mid]))
    out.append(steps_verdict(res, big))
    out.append(ninety(a, res, big))
    return "\n".join(out)


def steps_to_quality(snce, ce):
    """First eval at which SNCE's curves reach CE's early-stopped FLD and accuracy together, or None."""
    _, m = ce["es"]
    its = sorted(set(snce["sample_fld"]) & set(snce["sample_accuracy"]))
    ok = np.array([snce["sample_fld"][i] <= m["sample_fld"] and snce["sample_accuracy"][i] >= m["sample_accuracy"]
                   for i in its], dtype=float)
    return steps_to(np.array(its), ok, 1.0, True) if its else None


def steps_verdict(res, big):
    txt, held = [], None
    for K, r in sorted(res.items()):
        S, C = r["runs"].get("SNCE", {}), r["runs"].get("CE", {})
        seeds = sorted(set(S) & set(C))
        each = [(steps_to_quality(S[s], C[s]), C[s]["es"][0]) for s in seeds]
        txt.append(f"K = {K:,}: SNCE / CE's stop, per seed: " + ", ".join(
            f"{'never' if n is None else n} / {c}" for n, c in each) + ".")
        if K == big and each:
            held = all(n is not None and n < c for n, c in each)
    return verdict("SNCE reaches tuned CE's early-stopped quality (FLD and accuracy) in fewer steps", held,
                   txt + [f"(held: sooner than CE's own stop in every seed at K = {big:,})" if big else ""])


def ninety(a, res, big):
    """>= 90% accuracy at the largest K for the better tuned objective, or the measured reasons."""
    if big is None:
        return verdict(">= 90% conditional accuracy at the largest K", None, ["no K finished."])
    runs = res[big]["runs"]
    means = {o: np.mean([r["es"][1]["sample_accuracy"] for r in runs[o].values()]) for o in ("CE", "LS", "SNCE")
             if runs.get(o)}
    if not means:
        return verdict(">= 90% conditional accuracy at the largest K", None, ["no reported runs."])
    best = max(means, key=means.get)
    txt = [f"the better tuned objective at K = {big:,} is {best}: accuracy {means[best]:.3f} at its stop."]
    if means[best] < 0.9:
        rs = list(runs[best].values())
        top = np.mean([max(r["sample_accuracy"].values()) for r in rs])
        its = sorted(rs[0]["sample_accuracy"])
        rise = np.mean([r["sample_accuracy"][its[-1]] - r["sample_accuracy"][its[-2]] for r in rs]) if len(its) > 1 else 0
        why = [f"best eval accuracy (mean over seeds) {top:.3f}"
               + (" >= 0.9: stopping on held-out NLL stopped before it" if top >= 0.9 else " < 0.9")]
        why.append(f"last eval's change {rise:+.3f}" + (": still rising, more steps would help" if rise > 0 else
                                                         ": not rising"))
        pm = os.path.join(a.out, "premise.json")
        if os.path.isfile(pm):
            ceil = read_json(pm, "premise results")["1"]["accuracy"]
            why.append(f"the tokenizer's own reconstructions of val digits score {ceil:.3f}"
                       + (" < 0.9: the tokenizer is the ceiling" if ceil < 0.9 else " (not the ceiling)"))
        txt.append("Why not: " + "; ".join(why) + ".")
    return verdict(">= 90% conditional accuracy at the largest K", means[best] >= 0.9, txt)


def comparison_table(comp):
    lines = ["| K | comparison | seeds | error ratio [95%] | FLD ratio [95%] |", "|---" * 5 + "|"]
    for (x, y), per in comp.items():
        for K, (s, e, f) in sorted(per.items()):
            lines.append(f"| {K:,} | {x} / {y} | {', '.join(map(str, s))} | {fmt_ratio(*e)} | {fmt_ratio(*f)} |")
    return "\n".join(lines)


def report2(a, sampling):
    """Write results.md and the figures of the v2 study under a.out. -> the text of results.md."""
    res = collect2(a)
    if not res:
        raise SystemExit(f"no K with its tuning finished under {a.out}: run `python -m support.study` first")
    how = ", ".join(f"{k} {v:g}" for k, v in sampling.items())
    comp = comparisons(res)
    parts = [f"# SNCE vs tuned baselines across codebook sizes (v2)\n\n{a.iters} steps per run; every "
             f"{a.iters // a.evals} steps the held-out NLL and {a.eval_samples} class-balanced samples ({how}) "
             "scored by the classifier. Every run is read at its early-stopping step (lowest held-out NLL among "
             "the scored evals). Tuning (tokenizer and generator seed "
             f"{a.tune_seed}, never reported): per objective the configuration with the lowest FLD at its stop, "
             "ties by accuracy; the control takes SNCE's perplexity. Mean ± half-range over the reported seeds "
             f"(tokenizer seed = generator seed: {', '.join(map(str, a.tok_seeds))}). Ratios: geometric means over "
             "seeds with 95% percentile bootstrap intervals over seeds.\n",
             f"## Tokenizers\n\n{tokenizer_table(a)}\n"]
    for K, r in sorted(res.items()):
        parts.append(f"## K = {K:,}\n\nTuning:\n\n{tuning_table(K, r)}\n\nReported:\n\n{run_table(K, r, a.iters)}\n")
    parts.append(f"## Comparisons at the early-stopping step\n\n{comparison_table(comp)}\n")
    parts.append(f"## Verdicts\n\n{verdicts(a, res, comp)}\n")
    text = write_results(a, parts)
    plots2(a, res, comp)
    return text


def plots2(a, res, comp):
    plt = pyplot(a.assets)
    ks = sorted(res)
    # gain vs K: SNCE, the control and LS, each over tuned CE, with the bootstrap intervals
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, i, scale in ((axes[0], 1, "error ratio"), (axes[1], 2, "FLD ratio")):
        for j, obj in enumerate(("SNCE", "control", "LS")):
            per = comp.get((obj, "CE"), {})
            if not per:
                continue
            x = np.array(sorted(per)) * (1 + 0.06 * (j - 1))   # side by side at each K
            m, lo, hi = (np.exp([per[K][i][n] for K in sorted(per)]) for n in range(3))
            ax.errorbar(x, m, yerr=[m - lo, hi - m], fmt="o-", capsize=4, color=f"C{j + 1}", label=f"{obj} / tuned CE")
            for K, xx in zip(sorted(per), x):
                ax.plot([xx] * len(per[K][0]), np.exp(paired(res[K], obj, "CE")[i]), ".", color=f"C{j + 1}", alpha=0.4)
        ax.axhline(1, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="codebook size K", ylabel=f"{scale} (< 1: better than CE)")
        legend(ax, 7)
    fig.tight_layout()
    save_figure(fig, os.path.join(a.assets, "study2_gain.png"), dpi=110)
    plt.close(fig)
    # curves per K, mean over seeds with the range
    curves_figure(plt, ks, lambda K: [(i, o, res[K]["runs"][o]) for i, o in enumerate(OBJECTIVES)
                                       if res[K]["runs"].get(o)], os.path.join(a.assets, "study2_curves.png"))
    # sample grids at the stop, first reported seed of each objective
    grids = [(f"K={K:,} {obj} (step {r['es'][0]})", os.path.join(r["dir"], f"samples_{r['es'][0]:06d}.png"))
             for K in ks for obj in OBJECTIVES if res[K]["runs"].get(obj)
             for r in [res[K]["runs"][obj][min(res[K]["runs"][obj])]]]
    grid_figure(plt, grids, len(OBJECTIVES), os.path.join(a.assets, "study2_grids.png"))
    # the tuning: FLD and accuracy at the stop of each configuration, one line per K
    fig, axes = plt.subplots(2, len(TUNE_GRID), figsize=(4.2 * len(TUNE_GRID), 6.4), squeeze=False)
    for j, (obj, (_, key, vals, _)) in enumerate(TUNE_GRID.items()):
        for row, (mkey, mlabel) in enumerate((("sample_fld", "FLD at the stop"), ("sample_accuracy", "accuracy at the stop"))):
            ax = axes[row, j]
            for i, K in enumerate(ks):
                t = res[K]["tuning"][obj]
                ax.plot(range(len(vals)), [t[v][1][mkey] for v in vals], "o-", color=f"C{i}", label=f"K = {K:,}")
                c = vals.index(res[K]["chosen"][obj])
                ax.plot([c], [t[vals[c]][1][mkey]], "*", ms=14, color=f"C{i}")
            ax.set(xticks=range(len(vals)), xticklabels=[f"{v:g}" for v in vals], xlabel=f"{obj}: {key}",
                   ylabel=mlabel)
            legend(ax, 7)
    fig.tight_layout()
    save_figure(fig, os.path.join(a.assets, "study2_tuning.png"), dpi=100)
    plt.close(fig)
