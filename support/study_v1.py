"""
The plan of the codebook-size study's first design (v1: `python -m support.study --design v1`),
kept so that README.md's results of that design can be rebuilt from their logs with
`--design v1 --report_only`: per K one tokenizer ({out}/k{K}/tokenizer/), CE and SNCE at a main
perplexity with every seed, label smoothing eps 0.1, the perplexity sweep with seed 0, MaskGIT
and the long pair at the largest K -> {out}/k{K}/{run}_s{seed}/. support/study_plan.py has the
second design (the default), support/study.py runs either.

Tests: python -m pytest -q tests/test_study.py
"""



def plan(ks, seeds, perplexity, ls_seeds, sweep, sweep_seeds, maskgit_seeds, long_iters=0, long_seeds=()):
    """-> [(run name "k{K}/{objective}_s{seed}", K, objective label, seed, train.py overrides)].
    perplexity: {K: SNCE's main target perplexity}, the one with every seed. Objectives of one
    seed share model, data order, initialisation and steps (train.py seeds all of them from
    --seed), so paired differences seed by seed are meaningful. long_iters: CE and SNCE at the
    largest K trained that many steps (overrides "max_iters"), for long_seeds."""
    jobs = []

    def add(K, seed, label, slug, over):
        jobs.append((f"k{K}/{slug}_s{seed}", K, label, seed, over))

    def snce(p, prefix=""):   # (label, slug, overrides) of SNCE at target perplexity p
        return f"{prefix}SNCE p={p:g}", f"{prefix.lower().replace(' ', '_')}snce_p{p:g}", {
            "loss": "snce", "target_perplexity": p}

    for K in ks:
        for s in seeds:
            add(K, s, "CE", "ce", {"loss": "ce"})
            add(K, s, *snce(perplexity[K]))
        for s in ls_seeds:
            add(K, s, "LS eps=0.1", "ls0.1", {"loss": "ls", "label_smoothing": 0.1})
    for K in ks:  # the sweep at every K: the best softness may depend on the codebook
        for p in sweep:
            if p != perplexity[K]:
                for s in sweep_seeds:
                    add(K, s, *snce(p))
    big = max(ks)
    for s in maskgit_seeds:
        add(big, s, "MaskGIT CE", "maskgit_ce", {"loss": "ce", "mode": "maskgit"})
        label, slug, over = snce(perplexity[big], "MaskGIT ")
        add(big, s, label, slug, {**over, "mode": "maskgit"})
    for s in long_seeds if long_iters else ():
        for label, slug, over in (("CE", "ce", {"loss": "ce"}), snce(perplexity[big])):
            add(big, s, f"{label}, {long_iters} steps", f"{slug}_{long_iters}", {**over, "max_iters": long_iters})
    return jobs


def main_perplexity(items, ks):
    """--perplexity items -> {K: perplexity}: a bare number is every K's, "K=P" one K's (later
    items win). Raises ValueError naming the bad item."""
    out = {}
    for it in items:
        k, _, v = it.rpartition("=")
        try:
            p, K = float(v), int(k) if k else None
        except ValueError:
            raise ValueError(f"--perplexity: expected P or K=P (numbers), got {it!r}") from None
        if p <= 1:
            raise ValueError(f"--perplexity: perplexities must be > 1 (1 = CE), got {it!r}")
        if K is not None and K not in ks:
            raise ValueError(f"--perplexity: {it!r} names K = {K}, not one of --ks {ks}")
        out.update({K: p} if K is not None else {K: p for K in ks})
    missing = [K for K in ks if K not in out]
    if missing:
        raise ValueError(f"--perplexity: no perplexity for K = {missing} (give a bare number for every K)")
    return out


def job_group(label, perplexity):
    """Order of a seed's runs: 0 CE and SNCE at the main perplexity (the headline), 1 label
    smoothing, 2 the other perplexities, 3 MaskGIT, 4 the long runs."""
    if " steps" in label:
        return 4
    if label.startswith("MaskGIT"):
        return 3
    if label in ("CE", f"SNCE p={perplexity:g}"):
        return 0
    return 1 if label.startswith("LS") else 2


def run_order(jobs, perplexity):
    """Seed 0 first; within a seed CE / SNCE at every K (largest K first), then LS, the sweep,
    MaskGIT; the long runs after every seed's. A study cut off part way still has the headline
    comparison. perplexity: {K: main}."""
    def key(j):
        g = job_group(j[2], perplexity[j[1]])
        return g == 4, j[3], g, -j[1]
    return sorted(jobs, key=key)
