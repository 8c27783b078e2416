"""study.py: the report (table numbers, best-over-cfg FID, steps to CE's final value) from
hand-made run logs, argument errors, and the whole driver end to end on a tiny encoded dataset
with a fake Inception (train.py and sample.py run as subprocesses, as in a real study)."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fid  # noqa: E402
from common import read_jsonl  # noqa: E402
import study  # noqa: E402
from test_sample import FakeInception  # noqa: E402
from helpers import make_encoded  # noqa: E402


def write_run(out, name, seed, nll, fid):
    """nll: {iter: v}; fid: {(iter, cfg): v} as train.py / sample.py would log them."""
    d = study.run_dir(out, name, seed)
    os.makedirs(d)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        for it, v in nll.items():
            f.write(json.dumps({"iter": it, "loss": 9.0}) + "\n")  # a training line: ignored
            f.write(json.dumps({"iter": it, "val_nll": v, "val_loss": v + 1}) + "\n")
    with open(os.path.join(d, "fid.jsonl"), "w") as f:
        for (it, cfg), v in fid.items():
            f.write(json.dumps({"fid": v, "num_samples": 1000, "iter": it, "cfg_scale": cfg}) + "\n")
        f.write(json.dumps({"fid": 0.1, "num_samples": 10, "iter": 200, "cfg_scale": 1.5}) + "\n")  # other n


def report_args(out, *extra):
    return ["--report_only", "--out", out, "--assets", os.path.join(out, "assets"), "--iters", "200",
            "--fid_at", "100", "200", "--cfg", "3", "1.5", "--taus", "0.01", "--ls", "0.1", "--seeds", "0", "1",
            "--toy_metrics", os.path.join(out, "none.json"), *extra]


def test_report_numbers(tmp_path):
    out = str(tmp_path)
    its = [50, 100, 150, 200]
    for s, off in ((0, 0.0), (1, 0.2)):
        write_run(out, "CE", s, dict(zip(its, np.add([6.0, 5.0, 4.5, 4.4], off))),
                  {(100, 1.5): 30 + 10 * off, (100, 3.0): 25 + 10 * off,
                   (200, 1.5): 20 + 10 * off, (200, 3.0): 22 + 10 * off})
        write_run(out, "SNCE tau=0.01", s, dict(zip(its, np.add([5.5, 4.6, 4.3, 4.2], off))),
                  {(100, 1.5): 19 + 10 * off, (100, 3.0): 22, (200, 1.5): 15 + 10 * off, (200, 3.0): 18})
        write_run(out, "LS eps=0.1", s, dict(zip(its, [7.0] * 4)),
                  {(100, 1.5): 40, (100, 3.0): 41, (200, 1.5): 40, (200, 3.0): 41})
    table = study.main(report_args(out))
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in table.splitlines() if r.startswith("| ")}
    # CE: final NLL mean 4.5 +- 0.1; FID curve at the first cfg (3): (25, 27), (22, 24); at the last
    # step the best over the sweep: (20, 22) via cfg 1.5
    assert rows["CE"][2] == "4.500 ± 0.100" and rows["CE"][3] == "4.500 (200)"
    assert rows["CE"][4:7] == ["26.0 ± 1.0", "23.0 ± 1.0", "21.0 ± 1.0 (cfg 1.5/1.5)"]
    assert "CE's final NLL (4.500)" in table and "CE's final FID (23.0)" in table
    # SNCE: mean NLL 4.4 at step 150 <= 4.5; mean FID (cfg 3) 22 at step 100 <= 23
    assert rows["SNCE tau=0.01"][4:9] == ["22.0 ± 0.0", "18.0 ± 0.0", "16.0 ± 1.0 (cfg 1.5/1.5)", "150", "100 |"]
    assert rows["LS eps=0.1"][7:9] == ["not reached", "not reached |"]
    assert rows["CE"][7:9] == ["200", "200 |"]  # CE reaches its own final values at the end
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == table
    for png in ("study_curves.png", "study_tau.png"):
        assert os.path.getsize(os.path.join(out, "assets", png)) > 1000


def test_report_skips_unfinished_runs_and_idle_columns(tmp_path):
    """A run still training (no NLL / FID at --iters yet) is left out, not allowed to cut its
    objective's curves short; with one cfg and one FID step the sweep and FID-convergence columns go."""
    out = str(tmp_path)
    for s in (0, 1):
        write_run(out, "CE", s, {100: 5.0 + s, 200: 4.0 + s}, {(200, 3.0): 30.0 + s})
    write_run(out, "SNCE tau=0.01", 0, {100: 4.5, 200: 3.5}, {(200, 3.0): 20.0})
    write_run(out, "SNCE tau=0.01", 1, {100: 9.0}, {})  # in progress
    args = report_args(out, "--fid_at", "200", "--cfg", "3")
    table = study.main(args)
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in table.splitlines() if r.startswith("| ")}
    assert rows["objective"][4:] == ["FID @ 200", "steps to CE's final NLL (4.500) |"]
    assert rows["CE"][2:] == ["4.500 ± 0.500", "4.500 (200)", "30.5 ± 0.5", "200 |"]
    assert rows["SNCE tau=0.01"][2:] == ["3.500 ± 0.000", "3.500 (200)", "20.0 ± 0.0", "100 |"]  # 4.5 at 100
    assert "LS eps=0.1" not in rows
    assert "Incomplete (fewer finished seeds than asked): SNCE tau=0.01, LS eps=0.1." in table


def test_report_fid_step_not_measured_for_every_objective(tmp_path):
    """An objective without FID at an early --fid_at step: "—" there, and reaching CE's final FID at
    its first measured step can only be bounded ("<= step")."""
    out = str(tmp_path)
    for s in (0, 1):
        write_run(out, "CE", s, {100: 5.0, 200: 4.0}, {(100, 3.0): 40.0, (200, 3.0): 30.0})
        write_run(out, "SNCE tau=0.01", s, {100: 4.5, 200: 3.5}, {(200, 3.0): 20.0})
        write_run(out, "LS eps=0.1", s, {100: 6.0, 200: 5.0}, {(100, 3.0): 25.0, (200, 3.0): 20.0})
    table = study.main(report_args(out, "--cfg", "3"))
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in table.splitlines() if r.startswith("| ")}
    assert rows["SNCE tau=0.01"][4:] == ["—", "20.0 ± 0.0", "200", "<= 200 |"]
    assert rows["LS eps=0.1"][4:] == ["25.0 ± 0.0", "20.0 ± 0.0", "not reached", "100 |"]


def test_mean_curve_and_steps_to():
    runs = [{"nll": {0: 3.0, 50: 2.0, 100: 1.0}}, {"nll": {0: 5.0, 50: 4.0}}]  # seed 2 stopped early
    its, m, lo, hi = study.mean_curve(runs, "nll")
    assert its.tolist() == [0, 50] and m.tolist() == [4.0, 3.0] and lo.tolist() == [3.0, 2.0]
    assert study.steps_to(its, m, 3.0) == 50 and study.steps_to(its, m, 2.9) is None


def test_q_statistics_match_naive_rows(tmp_path):
    """Top-1 mass and perplexity of q on the first n training latents, against a per-row float64
    computation of Eq. 5 from the tokenizer's first codebook (l2, as the encoded meta says)."""
    from common import read_json
    from tokenizer import Tokenizer

    train_dir, _, ckpt = make_encoded(str(tmp_path))
    tok = os.path.join(str(tmp_path), "tok")
    os.makedirs(tok)
    os.rename(train_dir, os.path.join(tok, "encoded_train"))
    os.rename(ckpt, os.path.join(tok, "tok.pt"))  # meta.json stores it relative to the encoding
    ckpt = os.path.join(tok, "tok.pt")
    assert read_json(os.path.join(tok, "encoded_train", "meta.json"))["metric"] == "l2"
    z = np.load(os.path.join(tok, "encoded_train", "latents.npy"))
    z = torch.from_numpy(z.reshape(-1, z.shape[-1])).double()[:50]  # latents in file order, first 50
    book = Tokenizer.from_checkpoint(ckpt).codebooks[0].double()
    got = study.q_statistics(tok, [0.05, 0.5], n=50)
    for tau in (0.05, 0.5):
        top1, ppl = [], []
        for row in z:
            d = ((row - book) ** 2).sum(-1)
            q = torch.exp(-(d - d.min()) / tau)
            q /= q.sum()
            top1.append(q[d.argmin()].item())
            ppl.append(math.exp(-sum(p * math.log(p) for p in q.tolist() if p > 0)))
        assert got[f"SNCE tau={tau:g}"] == pytest.approx((sum(top1) / 50, sum(ppl) / 50), rel=1e-4)


def test_argument_errors(tmp_path):
    out = str(tmp_path)
    with pytest.raises(SystemExit, match="no finished CE runs"):
        study.main(report_args(out))
    for bad in (["--fid_at", "100"], ["--fid_at", "120", "200"], ["--taus", "0"], ["--ls", "1.0"],
                ["--set", "model_size"]):
        with pytest.raises(SystemExit):
            study.parse(report_args(out, *bad))
    with pytest.raises(SystemExit):
        study.parse(["--fid_weights", os.path.join(out, "missing.pt")])


@pytest.mark.slow  # train.py and sample.py subprocesses: 271 s measured on 2 shared cores
def test_study_end_to_end(tmp_path):
    """Tokenizer stage skipped (--tokenizer), 3 objectives x 1 seed, FID at steps 2 and 4,
    2 workers; then a second call finds everything done and changes nothing."""
    root = str(tmp_path)
    train_dir, val_dir, tok_ckpt = make_encoded(root)
    tok = os.path.join(root, "tok")
    os.makedirs(tok)
    os.rename(tok_ckpt, os.path.join(tok, "tok.pt"))  # meta.json finds it relative to the encodings
    os.rename(train_dir, os.path.join(tok, "encoded_train"))
    os.rename(val_dir, os.path.join(tok, "encoded_val"))
    weights = os.path.join(root, "fake_inception.pt")
    torch.jit.save(torch.jit.script(FakeInception()), weights)
    out = os.path.join(root, "study")
    # the real images' statistics, pre-cached: the "synthetic" dataset exists only in this process
    feats = fid.load_inception(weights)
    ref = fid.FeatureStats(32)
    ref.add(feats(fid.to_uint8(torch.rand(20, 1, 8, 8) * 2 - 1)))
    mu, sigma = ref.mu_sigma()
    os.makedirs(os.path.join(out, "fid_refs"))
    np.savez(os.path.join(out, "fid_refs", f"synthetic_val_8_fake_inception.pt_{os.path.getsize(weights)}.npz"),
             mu=mu, sigma=sigma)
    args = ["--out", out, "--assets", os.path.join(root, "assets"), "--tokenizer", tok, "--iters", "4",
            "--fid_at", "2", "4", "--cfg", "1.5", "--num_samples", "6", "--sample_batch", "3", "--seeds", "0",
            "--taus", "0.5", "--ls", "0.1", "--workers", "2", "--fid_weights", weights,
            "--toy_metrics", os.path.join(ROOT, "assets", "toy_metrics.json"),
            "--set", "model_size=tiny", "batch_size=8", "eval_interval=2", "grid_per_class=2", "warmup_iters=1"]
    table = study.main(args)
    names = ["CE", "SNCE tau=0.5", "LS eps=0.1"]
    assert [r.split(" | ")[0][2:] for r in table.splitlines() if r.startswith("| ") and "---" not in r][1:] == names
    logs = {}
    for name in names:
        d = study.run_dir(out, name, 0)
        fids = read_jsonl(os.path.join(d, "fid.jsonl"))
        assert [(r["iter"], r["cfg_scale"], r["num_samples"]) for r in fids] == [(2, 1.5, 6), (4, 1.5, 6)]
        assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in fids)
        evals = [r["iter"] for r in read_jsonl(os.path.join(d, "log.jsonl")) if "val_nll" in r]
        assert evals == [0, 2, 4]  # the resumed segment does not re-evaluate step 2
        assert not [f for f in os.listdir(d) if f.endswith(".npz")]
        logs[name] = open(os.path.join(d, "log.jsonl")).read() + open(os.path.join(d, "fid.jsonl")).read()
    cfg = torch.load(os.path.join(study.run_dir(out, "SNCE tau=0.5", 0), "ckpt.pt"), weights_only=False)["config"]
    assert (cfg["loss"], cfg["tau"], cfg["model_size"], cfg["lr_decay_iters"]) == ("snce", 0.5, "tiny", 4)
    for png in ("study_curves.png", "study_tau.png", "study_grids.png"):
        assert os.path.isfile(os.path.join(root, "assets", png))
    assert study.main(args) == table  # everything done: nothing re-run, the same report
    for name in names:
        d = study.run_dir(out, name, 0)
        assert open(os.path.join(d, "log.jsonl")).read() + open(os.path.join(d, "fid.jsonl")).read() == logs[name]
    # a FID step missing from a run already past it (the step joined --fid_at later): a replay from
    # scratch to that step gives the same weights (checked on the val NLL) and the FID there
    d = study.run_dir(out, "SNCE tau=0.5", 0)
    fids = read_jsonl(os.path.join(d, "fid.jsonl"))
    with open(os.path.join(d, "fid.jsonl"), "w") as f:
        f.write(json.dumps(fids[1]) + "\n")
    study.main(args)
    again = read_jsonl(os.path.join(d, "fid.jsonl"))
    assert [(r["iter"], r["cfg_scale"]) for r in again] == [(4, 1.5), (2, 1.5)]
    assert again[1]["fid"] == pytest.approx(fids[0]["fid"], rel=1e-6)  # same weights, same sampling seed
    assert not [f for f in os.listdir(d) if f.startswith("replay")]
    with open(os.path.join(d, "fid.jsonl"), "w") as f:  # a run whose logged NLL the replay cannot match
        f.write(json.dumps(fids[1]) + "\n")
    lines = open(os.path.join(d, "log.jsonl")).read().replace('"val_nll": ', '"val_nll": 1', 1)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        f.write(lines)
    with pytest.raises(RuntimeError, match="differs from the run"):
        study.main(args)
