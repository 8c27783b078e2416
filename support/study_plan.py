"""
The plan of the codebook-size study's second design (v2, support/study.py's default): which
tokenizers and runs, the tuning rule that picks each objective's configuration, and the compute
table. It answers three objections to the first design (v1: one tokenizer per K, SNCE's
perplexity picked on the reported seed, CE untuned):

  tokenizers  per K: TOK_SEEDS (reported) + TUNE_SEED (tuning only) -> {out}/k{K}/tok_s{S}/
  tuning      per K, on the tuning tokenizer with generator seed TUNE_SEED: every configuration of
              TUNE_GRID (CE: dropout, LS: eps, SNCE: target perplexity; as many for each) ->
              {out}/k{K}/runs_tok{T}/{slug}_s{T}/
  rule        (fixed before any run; select() below) each run is early-stopped at the eval with
              the lowest held-out NLL (among the evals that scored samples); each objective takes
              the configuration with the lowest sample FLD at its early-stopping step, ties by
              higher accuracy, then by TUNE_GRID's order. The same rule for CE, LS and SNCE; the
              geometry control (support/geometry_control.py) takes SNCE's chosen perplexity, so
              it is exactly as soft.
  reported    per K and reported tokenizer seed S: tuned CE, tuned LS, tuned SNCE and the control,
              generator seed S (objectives of one seed share init, data order and steps) ->
              {out}/k{K}/runs_tok{S}/{slug}_s{S}/

Neither the tuning tokenizer nor the tuning generator seed appears in a reported table.

    python -m support.study --plan       # the table of pieces x seconds (plan_table below)
Tests: python -m pytest -q tests/test_study.py
"""

import os
from collections import namedtuple

KS = (1024, 4096, 32768)      # 32x, one size above 16,384; why these: README.md, Study v2
TOK_SEEDS = (1, 2, 3)         # reported tokenizers; seed S also seeds its generator runs
TUNE_SEED = 9                 # the tuning tokenizer's and the tuning generator's seed
# objective -> (train.py loss, the key tuned, its values in tie-break order, slug prefix)
# Four configurations each. The first plan had three (dropout 0 / 0.1 / 0.2, eps 0.03 / 0.1 / 0.3,
# perplexity 5 / 25 / 95); K = 4,096's tuning runs chose an edge for every objective, SNCE's an
# open one (FLD at the stop 49.9 / 44.7 / 39.8), so each grid gained one value toward its
# choice: perplexity 300, dropout 0.05, eps 0.01. Only the tuning seed was read to decide it.
TUNE_GRID = {
    "CE": ("ce", "dropout", (0.0, 0.05, 0.1, 0.2), "ce_do"),
    "LS": ("ls", "label_smoothing", (0.01, 0.03, 0.1, 0.3), "ls"),
    "SNCE": ("snce", "target_perplexity", (5.0, 25.0, 95.0, 300.0), "snce_p"),
}
OBJECTIVES = ("CE", "LS", "SNCE", "control")   # the reported ones, in table order

# role: "tune" or "report"; tok: the tokenizer seed; value: the tuned key's value
Job = namedtuple("Job", "name K label seed over tok role value")

# Measured wall seconds per piece with 2 workers x 1 thread in the v1 study (README.md, Results,
# Compute): a tokenizer (600 steps + encoding) and an AR run (1,200 steps, 8 evals of 1,000 samples);
# K = 32,768's tokenizer: v2's tuning tokenizer (seed 9), the same setting
MEASURED = {"tokenizer": {1024: 898, 4096: 985, 16384: 2562, 32768: 2502},
            "run": {1024: 350, 4096: 480, 16384: 1170}}
CONTROL_COST = 1.3   # a control run's cost over an SNCE run, measured (README.md, Study v2)


def tok_dir(out, K, s):
    return os.path.join(out, f"k{K}", f"tok_s{s}")


def config_of(obj, value):
    """-> (slug, train.py overrides) of one objective's configuration (control: SNCE's perplexity)."""
    if obj == "control":
        return f"control_p{value:g}", {"loss": "control", "target_perplexity": value}
    loss, key, _, prefix = TUNE_GRID[obj]
    return f"{prefix}{value:g}", {"loss": loss, key: value}


def make_job(K, obj, value, tok, seed, role):
    slug, over = config_of(obj, value)
    return Job(f"k{K}/runs_tok{tok}/{slug}_s{seed}", K, obj, seed, over, tok, role, value)


def tuning_jobs(ks, tune_seed=TUNE_SEED, grid=None):
    """Every configuration of every objective at every K, on the tuning tokenizer and seed."""
    grid = TUNE_GRID if grid is None else grid
    return [make_job(K, obj, v, tune_seed, tune_seed, "tune") for K in ks for obj in grid for v in grid[obj][2]]


def report_jobs(K, tok_seeds, chosen):
    """The reported runs at K for chosen {objective: value} (select()); the control at SNCE's."""
    chosen = {**chosen, "control": chosen["SNCE"]}
    return [make_job(K, obj, chosen[obj], s, s, "report") for s in tok_seeds for obj in OBJECTIVES]


def early_stop(curves):
    """-> (step, {metric: value}) at the eval with the lowest val NLL among the evals that scored
    samples (ties: the earlier step), or None. curves: {metric: {iter: value}}."""
    its = [i for i in curves["val_nll"] if i in curves["sample_fld"] and i in curves["sample_accuracy"]]
    if not its:
        return None
    best = min(its, key=lambda i: (curves["val_nll"][i], i))
    return best, {k: c[best] for k, c in curves.items() if best in c}


def select(candidates, values):
    """The tuning rule: candidates {value: curves} of one objective's configurations, values in
    tie-break order. -> (chosen value, {value: (early-stopping step, metrics)}). Raises when a
    configuration has no scored eval."""
    es = {}
    for v in values:
        r = early_stop(candidates[v]) if v in candidates else None
        if r is None:
            raise ValueError(f"tuning run with value {v:g} has no eval with samples scored")
        es[v] = r
    order = {v: i for i, v in enumerate(values)}
    best = min(values, key=lambda v: (es[v][1]["sample_fld"], -es[v][1]["sample_accuracy"], order[v]))
    return best, es


def tuned(out, K, read_curves, tune_seed=TUNE_SEED, grid=None, iters=None):
    """Apply the rule at K from the tuning runs' logs only. read_curves(dir) -> curves.
    -> ({objective: chosen value}, {objective: {value: (step, metrics)}}), or None while a
    tuning run has not reached iters (a run's last eval)."""
    grid = TUNE_GRID if grid is None else grid
    chosen, detail = {}, {}
    for obj in grid:
        cands = {}
        for job in tuning_jobs([K], tune_seed, {obj: grid[obj]}):
            d = os.path.join(out, job.name)
            c = read_curves(d) if os.path.isfile(os.path.join(d, "log.jsonl")) else None
            if c is None or (iters is not None and iters not in c["val_nll"]):
                return None
            cands[job.value] = c
        chosen[obj], detail[obj] = select(cands, grid[obj][2])
    return chosen, detail


# -----------------------------------------------------------------------------
# the compute plan


def piece_seconds(kind, K, table=MEASURED):
    """-> (seconds, how it was got) for a tokenizer or an AR run at K: measured; else the next
    measured K above (an upper bound: both scale up with K); else linear in K from the largest
    measured one (an estimate)."""
    t = table[kind]
    if K in t:
        return t[K], "measured"
    above = [k for k in sorted(t) if k > K]
    if above:
        return t[above[0]], f"<= K={above[0]:,}'s"
    big = max(t)
    return t[big] * K / big, "estimate, linear in K"


def plan_table(ks, tok_seeds, workers=2, grid=None, iters=1200):
    """-> (markdown table of pieces x seconds, total worker-hours, wall hours with `workers`).
    Runs scale with iters / 1,200 (their measured length)."""
    grid = TUNE_GRID if grid is None else grid
    rows, total = [], 0.0
    for K in ks:
        ts, how_t = piece_seconds("tokenizer", K)
        rs, how_r = piece_seconds("run", K)
        rs *= iters / 1200
        n_tune = sum(len(g[2]) for g in grid.values())
        n_rep = len(tok_seeds) * (len(OBJECTIVES) - 1)
        for what, n, s, how in (("tokenizers (reported + tuning)", len(tok_seeds) + 1, ts, how_t),
                                ("tuning runs (CE, LS, SNCE configs)", n_tune, rs, how_r),
                                ("reported runs (CE, LS, SNCE)", n_rep, rs, how_r),
                                ("reported control runs", len(tok_seeds), rs * CONTROL_COST,
                                 f"{how_r} x {CONTROL_COST:g} (estimate)")):
            rows.append(f"| {K:,} | {what} | {n} | {s:,.0f} | {how} | {n * s / 3600:.2f} |")
            total += n * s
    head = ("| K | piece | count | s each | source | worker-h |\n|---|---|---:|---:|---|---:|")
    wall = total / 3600 / workers
    text = (head + "\n" + "\n".join(rows) + f"\n| all | | | | | {total / 3600:.2f} |\n\n"
            f"{total / 3600:.1f} worker-hours: {wall:.1f} h of wall time with {workers} workers x 1 thread "
            "(before the tail where one worker waits)")
    return text, total / 3600, wall
