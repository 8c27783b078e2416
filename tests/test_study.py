"""support/study.py and support/study_report.py: the plan, resumability decisions, steps-to-target
and the table from hand-made run logs, the k-th nearest code against a naive sort, the premise numbers against a direct decode,
argument errors, and (slow) the driver end to end on a tiny tokenizer with a random classifier
and a fake Inception (train.py and sample.py run as subprocesses, as in a real study)."""

import json
import os
import time
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from support import data  # noqa: E402
from support import mnist_classifier as mc  # noqa: E402
from support import study  # noqa: E402
from support import study_report  # noqa: E402
from support.common import read_jsonl  # noqa: E402
from support.encode import encode_split  # noqa: E402
from helpers import make_tokenizer_ckpt  # noqa: E402
from test_sample import FakeInception  # noqa: E402
from tokenizer import Tokenizer, psnr  # noqa: E402


def test_plan_pairs_objectives_by_seed():
    jobs = study.plan([1024, 16384], [0, 1, 2], {1024: 25.0, 16384: 25.0}, [0], [5.0, 25.0, 95.0], [0], [0, 1, 2])
    names = [j[0] for j in jobs]
    assert len(names) == len(set(names))
    # per K: 3 CE + 3 SNCE + 1 LS + 2 sweep (25 is the main SNCE); largest K: + 6 MaskGIT
    assert sum(n.startswith("k1024/") for n in names) == 9 and sum(n.startswith("k16384/") for n in names) == 15
    by = {j[0]: j for j in jobs}
    assert by["k1024/ce_s2"][2:] == ("CE", 2, {"loss": "ce"})
    assert by["k16384/snce_p25_s1"][4] == {"loss": "snce", "target_perplexity": 25.0}
    assert by["k16384/snce_p95_s0"][4] == {"loss": "snce", "target_perplexity": 95.0}
    assert by["k16384/maskgit_snce_p25_s2"][4] == {"loss": "snce", "target_perplexity": 25.0, "mode": "maskgit"}
    assert by["k1024/ls0.1_s0"][4] == {"loss": "ls", "label_smoothing": 0.1}
    assert by["k1024/snce_p5_s0"][4] == {"loss": "snce", "target_perplexity": 5.0}
    assert "k1024/snce_p5_s1" not in by and "k1024/maskgit_ce_s0" not in by  # sweep: seed 0; MaskGIT: largest K


def test_plan_with_a_main_perplexity_per_K():
    jobs = study.plan([1024, 16384], [0, 1], {1024: 5.0, 16384: 25.0}, [], [5.0, 25.0, 95.0], [0], [0])
    by = {j[0]: j for j in jobs}
    assert len(by) == len(jobs)
    # K = 1,024: 5 has every seed, 25 and 95 are its sweep; K = 16,384 the other way round
    assert {n for n in by if n.startswith("k1024/snce")} == {"k1024/snce_p5_s0", "k1024/snce_p5_s1",
                                                              "k1024/snce_p25_s0", "k1024/snce_p95_s0"}
    assert {n for n in by if n.startswith("k16384/snce")} == {"k16384/snce_p25_s0", "k16384/snce_p25_s1",
                                                               "k16384/snce_p5_s0", "k16384/snce_p95_s0"}
    assert by["k16384/maskgit_snce_p25_s0"][2:] == ("MaskGIT SNCE p=25", 0, {
        "loss": "snce", "target_perplexity": 25.0, "mode": "maskgit"})
    order = [j[0] for j in study.run_order(jobs, {1024: 5.0, 16384: 25.0})]
    assert order[:4] == ["k16384/ce_s0", "k16384/snce_p25_s0", "k1024/ce_s0", "k1024/snce_p5_s0"]


def test_plan_long_runs():
    jobs = study.plan([1024, 16384], [0, 1], {1024: 5.0, 16384: 25.0}, [0], [5.0], [0], [0], 2400, [0])
    by = {j[0]: j for j in jobs}
    assert by["k16384/ce_2400_s0"][2:] == ("CE, 2400 steps", 0, {"loss": "ce", "max_iters": 2400})
    assert by["k16384/snce_p25_2400_s0"][2:] == ("SNCE p=25, 2400 steps", 0, {
        "loss": "snce", "target_perplexity": 25.0, "max_iters": 2400})
    assert [n for n in by if "2400" in n] == ["k16384/ce_2400_s0", "k16384/snce_p25_2400_s0"]  # largest K only
    assert [study_report.job_iters(by[n], 1200) for n in ("k16384/ce_2400_s0", "k16384/ce_s1")] == [2400, 1200]
    order = [j[0] for j in study.run_order(jobs, {1024: 5.0, 16384: 25.0})]
    assert order[-2:] == ["k16384/ce_2400_s0", "k16384/snce_p25_2400_s0"]  # after all of seed 1
    assert study.plan([16384], [0], {16384: 25.0}, [], [], [], [], 0, [0]) == study.plan(
        [16384], [0], {16384: 25.0}, [], [], [], [])  # long_iters 0: none


def test_main_perplexity():
    assert study.main_perplexity(["25"], [8, 16]) == {8: 25.0, 16: 25.0}
    assert study.main_perplexity(["25", "8=5"], [8, 16]) == {8: 5.0, 16: 25.0}
    assert study.main_perplexity(["8=5", "16=95"], [8, 16]) == {8: 5.0, 16: 95.0}
    for bad, msg in ((["8=5"], "no perplexity for K = \\[16\\]"), (["25", "32=5"], "names K = 32"),
                     (["1"], "must be > 1"), (["8=x"], "expected P or K=P"), (["a=5"], "expected P or K=P")):
        with pytest.raises(ValueError, match=msg):
            study.main_perplexity(bad, [8, 16])


def write_log(d, curves, fid=None, iters=None):
    """curves: {key: {iter: v}} written as train.py's eval records; fid: the final FID."""
    os.makedirs(d, exist_ok=True)
    its = sorted(set().union(*(set(c) for c in curves.values())))
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        f.write(json.dumps({"iter": 0, "snce_target": {}}) + "\n")
        for it in its:
            f.write(json.dumps({"iter": it, "loss": 9.0}) + "\n")  # a training line: ignored
            f.write(json.dumps({"iter": it, **{k: c[it] for k, c in curves.items() if it in c}}) + "\n")
    if fid is not None:
        with open(os.path.join(d, "fid.jsonl"), "w") as f:
            f.write(json.dumps({"fid": 1e9, "num_samples": 10, "iter": iters, "cfg_scale": 3.0}) + "\n")  # other n
            f.write(json.dumps({"fid": fid, "num_samples": 1000, "iter": iters, "cfg_scale": 3.0}) + "\n")


def test_run_state(tmp_path):
    d = str(tmp_path / "r")
    assert study.run_state(d, 8, 1000) == "scratch"
    write_log(d, {"val_nll": {0: 9.0, 4: 8.0}})
    assert study.run_state(d, 8, 1000) == "scratch"  # a log without a checkpoint is not resumable
    open(os.path.join(d, "ckpt.pt"), "w").close()
    assert study.run_state(d, 8, 1000) == "resume"
    write_log(d, {"val_nll": {0: 9.0, 4: 8.0, 8: 7.0}})
    assert study.run_state(d, 8, 1000) == "fid"
    assert study.run_state(d, 8, 0) == "done"  # no FID asked for
    write_log(d, {"val_nll": {0: 9.0, 4: 8.0, 8: 7.0}}, fid=20.0, iters=8)
    assert study.run_state(d, 8, 1000) == "done"
    assert study.run_state(d, 8, 500) == "fid"  # another sample count
    assert study.run_state(d, 12, 1000) == "resume"  # --iters raised later


def test_fid_step_replaces_its_own_leftover_npz(tmp_path, monkeypatch):
    """A run whose FID step was cut short after sample.py wrote the .npz (state "fid"): the rerun
    must tell sample.py to replace that scratch file, which it refuses to do otherwise."""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    a = study.parse(["--out", str(tmp_path / "study"), "--iters", "8", "--evals", "2", "--fid_samples", "6",
                     "--fid_weights", str(weights), "--only", "runs"])
    d = os.path.join(a.out, "k64", "ce_s0")
    write_log(d, {"val_nll": {0: 9.0, 4: 8.0, 8: 7.0}})
    open(os.path.join(d, "ckpt.pt"), "w").close()
    leftover = os.path.join(d, "samples_6_cfg3_t1_k0_p1_ema.npz")
    open(leftover, "w").close()
    calls = []
    monkeypatch.setattr(study, "sh", lambda args, log, threads: calls.append(args))
    study.run_job(("k64/ce_s0", 64, "CE", 0, {"loss": "ce"}), a, 1)
    assert [c[0] for c in calls] == ["sample.py"] and "--overwrite=True" in calls[0]  # no training
    assert not os.path.exists(leftover)


def test_steps_to_and_seed_stats():
    its = np.array([0, 10, 20, 30])
    assert study_report.steps_to(its, [5.0, 4.0, 3.0, 3.5], 3.0, False) == 20
    assert study_report.steps_to(its, [5.0, 4.0, 3.9, 3.5], 3.0, False) is None
    assert study_report.steps_to(its, [0.1, 0.5, 0.95, 0.9], 0.9, True) == 20
    assert study_report.steps_to(its, [0.1, 0.5, 0.85, 0.8], 0.9, True) is None
    its, m, lo, hi = study_report.seed_stats([{0: 1.0, 10: 2.0, 20: 5.0}, {0: 3.0, 10: 4.0}])
    assert its.tolist() == [0, 10] and m.tolist() == [2.0, 3.0] and lo.tolist() == [1.0, 2.0]
    assert hi.tolist() == [3.0, 4.0]
    a = {0: {"x": {8: 1.0}}, 1: {"x": {8: 2.0}}, 2: {"x": {4: 0.0}}}
    b = {0: {"x": {8: 1.5}}, 1: {"x": {8: 1.0}}, 3: {"x": {8: 9.0}}}
    assert study_report.paired_delta(a, b, "x", 8).tolist() == [0.5, -1.0]  # seeds 0 and 1 only


def report_args(out, *extra):
    """The report of a K = 64 study under out; the toy's metrics are read from out (a fixture, not
    the repo's assets/toy_metrics.json, which `python toy.py --out_dir assets` rewrites)."""
    return ["--report_only", "--out", out, "--assets", os.path.join(out, "assets"), "--ks", "64", "--iters", "8",
            "--evals", "2", "--seeds", "0", "1", "--ls_seeds", "0", "--perplexity", "4", "--sweep", "4",
            "--toy_metrics", os.path.join(out, "toy_metrics.json"), "--maskgit_seeds", *extra]


def write_toy_metrics(out):
    """toy.py's metrics with a tau sweep: the sweep figure's last panel."""
    with open(os.path.join(out, "toy_metrics.json"), "w") as f:
        json.dump({"ce": {"nll": [21.0, 20.9], "tv": [0.87, 0.88]},
                   "tau_sweep": {"0.1": {"nll": [7.0, 7.1], "tv": [0.18, 0.17]},
                                 "0.5": {"nll": [7.1, 7.0], "tv": [0.25, 0.24]}}}, f)


def test_report_numbers(tmp_path):
    out = str(tmp_path)
    k = os.path.join(out, "k64")
    for s, off in ((0, 0.0), (1, 0.2)):
        write_log(os.path.join(k, f"ce_s{s}"), {"val_nll": {0: 9.0, 4: 5.0 + off, 8: 4.4 + off},
                                                 "sample_accuracy": {0: 0.1, 4: 0.5, 8: 0.8 + off / 2},
                                                 "sample_fld": {0: 900.0, 4: 100.0, 8: 50.0 + 10 * off}}, 30 + s, 8)
        write_log(os.path.join(k, f"snce_p4_s{s}"), {"val_nll": {0: 9.0, 4: 4.5, 8: 4.2 + off},
                                                     "sample_accuracy": {0: 0.1, 4: 0.9, 8: 0.95},
                                                     "sample_fld": {0: 900.0, 4: 60.0, 8: 40.0}}, 20, 8)
    write_log(os.path.join(k, "ls0.1_s0"), {"val_nll": {0: 9.0, 4: 6.0, 8: 5.0}, "sample_accuracy": {0: 0.1, 4: 0.2,
                                                                                                  8: 0.3},
                                             "sample_fld": {0: 900.0, 4: 300.0, 8: 200.0}})
    write_log(os.path.join(k, "ls0.1_s1"), {"val_nll": {0: 9.0}})  # not in the plan (ls_seeds 0)
    write_toy_metrics(out)  # one perplexity here: the sweep figure is drawn for the toy's tau sweep
    text = study.main(report_args(out))
    rows = {r.split(" | ")[0].strip("| "): [c.strip(" |") for c in r.split(" | ")]
            for r in text.splitlines() if r.startswith("| ") and "---" not in r}
    # CE: NLL (4.4, 4.6) -> 4.500 ± 0.100, reached at 8; accuracy (0.8, 0.9) -> 0.850 ± 0.050; FLD (50, 52)
    assert rows["CE"][1:] == ["2", "4.500 ± 0.100", "8", "0.850 ± 0.050", "8", "51.0 ± 1.0", "8", "30.5 ± 0.5"]
    # SNCE: its mean curve reaches CE's final NLL 4.5 at step 4 (4.5), accuracy 0.85 at 4 (0.9), FLD 51 at 8
    assert rows["SNCE p=4"][1:] == ["2", "4.300 ± 0.100", "4", "0.950 ± 0.000", "4", "40.0 ± 0.0", "8",
                                    "20.0 ± 0.0"]
    assert rows["LS eps=0.1"][1:] == ["1", "5.000", "not reached", "0.300", "not reached", "200.0", "not reached",
                                      "—"]
    # paired by seed: SNCE - CE NLL -0.2 / -0.2, accuracy +0.15 / +0.05, FLD -10 / -12; LS - CE seed 0 only
    deltas = {r.split(" | ")[1]: r.split(" | ")[2:] for r in text.split("paired by seed")[1].splitlines()
              if r.startswith("| 64 |")}
    assert deltas["SNCE p=4 - CE"] == ["0, 1", "-0.200 [-0.200, -0.200] (-0.200, -0.200)",
                                       "+0.100 [+0.050, +0.150] (+0.150, +0.050)",
                                       "-11.0 [-12.0, -10.0] (-10.0, -12.0) |"]
    assert deltas["LS eps=0.1 - CE"] == ["0", "+0.600", "-0.500", "+150.0 |"]
    with open(os.path.join(out, "results.md")) as f:
        assert f.read() == text
    for png in ("study_delta.png", "study_curves.png", "study_sweep.png"):
        assert os.path.getsize(os.path.join(out, "assets", png)) > 1000


def test_report_leaves_out_unfinished_runs(tmp_path):
    out = str(tmp_path)
    k = os.path.join(out, "k64")
    for s in (0, 1):
        write_log(os.path.join(k, f"ce_s{s}"), {"val_nll": {0: 9.0, 4: 5.0, 8: 4.0 + s}})
    write_log(os.path.join(k, "snce_p4_s0"), {"val_nll": {0: 9.0, 4: 3.0}})  # still training
    text = study.main(report_args(out))
    assert "| CE | 2 | 4.500 ± 0.500 |" in text and "SNCE" not in text.split("|---")[-1]
    # one perplexity and no toy metrics: nothing for the sweep figure
    assert not os.path.exists(os.path.join(out, "assets", "study_sweep.png"))
    with pytest.raises(SystemExit, match="no finished runs"):
        study.main(report_args(str(tmp_path / "empty")))


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_kth_nearest_codes_matches_naive_sort(metric):
    g = torch.Generator().manual_seed(0)
    z, book = torch.randn(37, 5, generator=g), torch.randn(50, 5, generator=g)
    z64, b64 = z.double(), book.double()
    d = ((z64[:, None] - b64[None]) ** 2).sum(-1) if metric == "l2" else -(z64 @ b64.t())
    order = torch.tensor(np.argsort(d.numpy(), axis=1, kind="stable"))
    for k in (1, 2, 7, 50):
        got = study.kth_nearest_codes(z, book, k, metric, chunk=8)  # chunks of 8 rows: 5 chunks
        assert torch.equal(got, order[:, k - 1]), k
    for bad in (0, 51):
        with pytest.raises(ValueError, match="expected 1..50"):
            study.kth_nearest_codes(z, book, bad, metric)


def test_premise_matches_direct_decode(tmp_path, monkeypatch):
    """k = 1 is the tokenizer's own code: the PSNR / accuracy of decoding the stored codes; k = 2
    decodes the second nearest code to each stored latent. 500 generated 32x32 images stand in
    for the MNIST-5k val digits (the suite needs no dataset)."""
    g = torch.Generator().manual_seed(3)
    fake = (torch.rand(500, 1, 32, 32, generator=g) * 2 - 1, torch.arange(500) % 10)
    monkeypatch.setattr(data, "load_mnist", lambda split: fake)
    ckpt = str(tmp_path / "tokenizer" / "ckpt.pt")
    os.makedirs(os.path.dirname(ckpt))
    make_tokenizer_ckpt(ckpt, image_size=32, channels=(8, 8, 8), downsample=4, levels=1, codebook_size=300,
                        code_dim=4, source={"dataset": "mnist", "data_root": ""})
    encode_split(ckpt, "val", batch_size=250)
    torch.manual_seed(0)
    clf_path = str(tmp_path / "clf.pt")
    mc.save_classifier(mc.LeNet(), {"val_accuracy": 0.0}, clf_path)
    res, pics, real = study.premise(str(tmp_path / "tokenizer"), clf_path, n_show=4)
    assert list(res) == ["1", "2", "4", "16", "256", "random"]
    tok = Tokenizer.from_checkpoint(ckpt)
    codes = torch.from_numpy(np.load(str(tmp_path / "tokenizer" / "encoded_val" / "codes.npy"))).long()
    x, y = data.load_mnist("val")
    with torch.no_grad():
        rec = tok.decode(codes).clamp(-1, 1)
    assert res["1"]["psnr"] == pytest.approx(psnr(rec, x).mean().item(), rel=1e-5)
    clf = mc.load_classifier(clf_path)
    assert res["1"]["accuracy"] == pytest.approx(mc.conditional_accuracy(clf, rec, y)["accuracy"])
    assert torch.allclose(pics["1"], rec[[0, 166, 333, 499]], atol=1e-5) and torch.equal(real, x[[0, 166, 333, 499]])
    # k = 2: the second nearest code to each stored latent, by a float64 sort
    z = torch.from_numpy(np.load(str(tmp_path / "tokenizer" / "encoded_val" / "latents.npy"))).double()
    d = ((z[..., None, :] - tok.codebooks[0].double()) ** 2).sum(-1)  # (N, 8, 8, K)
    second = d.argsort(-1)[..., 1:2]
    with torch.no_grad():
        rec2 = tok.decode(second).clamp(-1, 1)
    assert res["2"]["psnr"] == pytest.approx(psnr(rec2, x).mean().item(), rel=1e-5)
    assert (rec2 - rec).abs().max() > 1e-3  # k = 2 really decodes other codes than k = 1


def test_argument_errors(tmp_path):
    out = str(tmp_path)
    for bad in (["--iters", "10", "--evals", "3"], ["--perplexity", "1"], ["--perplexity", "7=5"], ["--sweep", "0.5"],
                ["--set", "model_size"], ["--only", "nothing"]):
        with pytest.raises(SystemExit):
            study.parse(["--report_only", "--out", out] + bad)
    with pytest.raises(SystemExit):
        study.parse(["--only", "runs", "--fid_weights", os.path.join(out, "missing.pt")])


@pytest.mark.slow  # train.py and sample.py subprocesses
def test_study_end_to_end(tmp_path):
    """A tiny one-level MNIST tokenizer put where the tokenizer stage finds it finished, a random
    classifier, a fake Inception: 3 AR objectives x 1 seed + MaskGIT at K=64, the premise, the
    report; a second call finds everything done and changes nothing."""
    root = str(tmp_path)
    out = os.path.join(root, "study")
    tok = os.path.join(out, "k64", "tokenizer")
    os.makedirs(tok)
    make_tokenizer_ckpt(os.path.join(tok, "ckpt.pt"), image_size=32, channels=(8, 8, 8), downsample=4, levels=1,
                        codebook_size=64, source={"dataset": "mnist", "data_root": ""})
    with open(os.path.join(tok, "metrics.json"), "w") as f:  # "trained": the config's max_iters reached
        json.dump({"iter": 10 ** 6, "psnr": 10.0, "images": 500, "util": [0.5], "ppl": [30.0],
                   "train_util_window": [0.75], "train_ppl_window": [40.0]}, f)
    torch.manual_seed(0)
    clf = os.path.join(root, "clf.pt")
    mc.save_classifier(mc.LeNet(), {"val_accuracy": 0.0}, clf)
    weights = os.path.join(root, "fake_inception.pt")
    torch.jit.save(torch.jit.script(FakeInception()), weights)
    write_toy_metrics(root)
    args = ["--out", out, "--assets", os.path.join(root, "assets"), "--toy_metrics", os.path.join(root, "toy_metrics.json"),
            "--ks", "64", "--iters", "4", "--evals", "2",
            "--seeds", "0", "--ls_seeds", "0", "--perplexity", "4", "--sweep", "4", "--maskgit_seeds", "0",
            "--long_iters", "6", "--long_seeds", "0",
            "--eval_samples", "10", "--fid_samples", "6", "--fid_weights", weights, "--classifier", clf,
            "--workers", "2", "--only", "tokenizers", "runs", "premise", "report",
            "--set", "model_size=tiny", "batch_size=8", "grid_per_class=2", "warmup_iters=1"]
    text = study.main(args)
    names = ["ce_s0", "snce_p4_s0", "ls0.1_s0", "maskgit_ce_s0", "maskgit_snce_p4_s0", "ce_6_s0", "snce_p4_6_s0"]
    logs = {}
    for n in names:
        d = os.path.join(out, "k64", n)
        evals = [r for r in read_jsonl(os.path.join(d, "log.jsonl")) if "val_nll" in r]
        its = [0, 3, 6] if "_6_" in n else [0, 2, 4]  # the long runs: 6 steps, still 2 evals
        assert [r["iter"] for r in evals] == its
        assert ["sample_accuracy" in r for r in evals] == [False, True, True]  # no samples at step 0
        assert [(r["iter"], r["num_samples"]) for r in read_jsonl(os.path.join(d, "fid.jsonl"))] == [(its[-1], 6)]
        assert not [f for f in os.listdir(d) if f.endswith(".npz")]
        logs[n] = open(os.path.join(d, "log.jsonl")).read() + open(os.path.join(d, "fid.jsonl")).read()
    cfg = torch.load(os.path.join(out, "k64", "maskgit_snce_p4_s0", "ckpt.pt"), weights_only=False)["config"]
    assert (cfg["loss"], cfg["target_perplexity"], cfg["mode"], cfg["lr_decay_iters"]) == ("snce", 4.0, "maskgit", 4)
    for n in ("CE", "SNCE p=4", "LS eps=0.1", "MaskGIT CE", "MaskGIT SNCE p=4"):
        assert f"| {n} | 1 |" in text
    long = text.split("## K = 64, trained 6 steps (CE and SNCE only)")[1].split("##")[0]
    assert "| CE | 1 |" in long and "| SNCE p=4 | 1 |" in long and "val NLL @ 6" in long
    assert "## Premise" in text and "val PSNR 10.00 dB" in text and "training tokens of the last steps 0.750" in text
    for png in ("delta", "curves", "grids", "sweep", "premise"):
        assert os.path.isfile(os.path.join(root, "assets", f"study_{png}.png"))
    # everything done: nothing re-run, the same report but for the compute line (the second
    # invocation's own wall time is added to it)
    again = study.main(args)
    assert again.split("Compute: ")[0] == text.split("Compute: ")[0] and "Compute: " in again
    for n in names:
        d = os.path.join(out, "k64", n)
        assert open(os.path.join(d, "log.jsonl")).read() + open(os.path.join(d, "fid.jsonl")).read() == logs[n]


def test_table_compares_maskgit_with_maskgit_ce():
    def runs(nll):  # one seed, val NLL only
        return {0: {"val_nll": dict(zip([0, 4, 8], nll)), "sample_accuracy": {}, "sample_fld": {}}}
    objs = {"CE": runs([9.0, 3.0, 2.0]), "MaskGIT CE": runs([9.0, 6.0, 5.0]), "MaskGIT SNCE p=4": runs([9.0, 4.0, 3.0])}
    rows = {r.split(" | ")[0].strip("| "): [c.strip(" |") for c in r.split(" | ")]
            for r in study_report.table(64, objs, 8).splitlines()[2:]}
    assert rows["MaskGIT SNCE p=4"][2:4] == ["3.000", "4"]  # reaches MaskGIT CE's 5.0 at 4, never AR CE's 2.0
    assert rows["MaskGIT CE"][2:4] == ["5.000", "8"] and rows["CE"][4] == "—"  # no accuracy logged


def test_clock_accumulates_across_invocations_and_beats(tmp_path):
    out = tmp_path / "study"
    (out / "k8").mkdir(parents=True)
    path = str(out / "k8" / "ce_s0.seconds")
    with study.Clock(path, every=0.02):
        time.sleep(0.15)
        mid = float(open(path).read())  # written while running: a kill loses at most `every`
    first = float(open(path).read())
    assert 0.05 < mid <= first and 0.15 <= first < 1.0
    with study.Clock(path):
        time.sleep(0.05)
    second = float(open(path).read())
    assert first + 0.05 <= second < first + 1.0  # the second invocation adds to the first
    (out / "invocations").mkdir()
    (out / "invocations" / "20261129-080000-1.seconds").write_text("60.0\n")
    (out / "invocations" / "20261129-090000-2.seconds").write_text("40.0\n")
    (out / "k8" / "tokenizer").mkdir()
    (out / "k8" / "tokenizer" / "study.seconds").write_text("7.5\n")
    wall, pieces = study_report.compute_seconds(str(out))
    assert wall == 100.0 and pieces == pytest.approx(second + 7.5)  # invocations are not pieces


def test_job_order_puts_the_headline_first():
    a = study.parse(["--fid_samples=0"])
    jobs = study.run_order(a.jobs, a.perplexity)
    first = [j[0] for j in jobs[:6]]
    assert first == ["k16384/ce_s0", "k16384/snce_p25_s0", "k4096/ce_s0", "k4096/snce_p25_s0",
                     "k1024/ce_s0", "k1024/snce_p5_s0"]  # the default main perplexity at K = 1,024 is 5
    assert [study.job_group(j[2], a.perplexity[j[1]]) for j in jobs[6:17]] == [1] * 3 + [2] * 6 + [3] * 2  # then seed 0's rest
