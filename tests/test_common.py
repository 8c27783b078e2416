"""support/config.py (overrides, config files, clear errors) and support/common.py (atomic
checkpoints, files and figures, the lr schedule, the data order, run directories)."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support import common  # noqa: E402
from support import config as cfg_mod  # noqa: E402
from support.common import load_checkpoint, save_checkpoint  # noqa: E402
from support.config import configure  # noqa: E402


def defaults():
    return {"lr": 1e-3, "steps": 10, "name": "mnist", "flag": True, "dims": (1, 2), "opt": None,
            "_private": 1, "torch": torch, "METRICS": ("l2",)}


def test_overrides_and_snapshot(tmp_path):
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("steps = 20\nname = 'folder'\n")
    g = defaults()
    snap = configure(g, [str(cfg_file), "--lr=1", "--dims=(3, 4, 5)", "--name=imagenet",
                         "--flag=False", "--opt=[1, 2]"])
    assert snap == {"lr": 1.0, "steps": 20, "name": "imagenet", "flag": False, "dims": (3, 4, 5),
                    "opt": [1, 2]}
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)
    assert "_private" not in snap and "METRICS" not in snap   # private names and constants


@pytest.mark.parametrize("arg, msg", [
    ("--nope=1", "unknown config key 'nope'.*valid keys: dims, flag, lr, name, opt, steps"),
    ("--steps=1.5", "expected int like the default 10, got float 1.5"),
    ("--flag=1", "expected bool"),
    ("--steps=True", "expected int"),
    ("--lr", "must look like --key=value"),
    ("missing.py", "config file 'missing.py' not found"),
])
def test_bad_config_is_a_clear_error(arg, msg):
    with pytest.raises(ValueError, match=msg):
        configure(defaults(), [arg])


def test_config_file_unknown_key(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'stepz' \(in .*bad.py\)"):
        configure(defaults(), [str(f)])


def test_checkpoint_atomic_and_missing(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pt")
    save_checkpoint({"w": torch.ones(2), "config": {"a": (1, 2)}, "iter": 3}, path)
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]          # no temp file left behind
    ck = load_checkpoint(path)
    assert ck["iter"] == 3 and ck["config"]["a"] == (1, 2) and torch.equal(ck["w"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="nope.pt' not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_checkpoint_refuses_pickles_and_names_bad_files(tmp_path):
    import collections
    pickled = str(tmp_path / "pickled.pt")
    torch.save({"x": collections.OrderedDict(a=object())}, pickled)   # not weights-only
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_checkpoint(pickled)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt' is empty"):
        load_checkpoint(str(empty))
    good = str(tmp_path / "good.pt")
    save_checkpoint({"w": torch.randn(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(good, "rb").read()[:500])
    with pytest.raises(ValueError, match="cut.pt'.*not a readable torch.save file"):
        load_checkpoint(str(cut))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, not a checkpoint" * 10)
    with pytest.raises(ValueError, match="junk.pt'.*not a readable"):
        load_checkpoint(str(junk))


def naive_lr(it, lr, min_lr, warmup, decay):
    """The schedule written out step by step: warmup is a straight line from lr/(warmup+1) at
    step 0 to lr*warmup/(warmup+1) at step warmup-1; then a half cosine period to min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= decay:
        return min_lr
    frac = (it - warmup) / (decay - warmup) if decay > warmup else 0.0
    return min_lr + (lr - min_lr) * (math.cos(math.pi * frac) + 1) / 2


@pytest.mark.parametrize("warmup, decay", [(0, 10), (3, 10), (5, 5), (4, 20)])
def test_lr_schedule_against_naive(warmup, decay):
    got = [common.lr_at(i, 1e-3, 1e-4, warmup, decay) for i in range(decay + 3)]
    want = [naive_lr(i, 1e-3, 1e-4, warmup, decay) for i in range(decay + 3)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[-1] == 1e-4 and max(got) <= 1e-3
    if warmup:
        assert got[0] > 0 and all(a < b for a, b in zip(got[:warmup - 1], got[1:warmup]))


def test_resume_keeps_the_cosine_length_unless_told():
    """Both trainers' rule: a resume keeps the stored schedule (a note when max_iters now runs
    past it), an explicit different length is taken with a warning, the same one silently; a
    checkpoint without a stored length falls back to its config's, then to its max_iters."""
    ck = lambda it, **stored: {"iter": it, "lr_decay_iters": 6, "config": {"max_iters": 99}, **stored}  # noqa: E731
    assert common.resume_decay_iters(ck(3), None, 6, "r/ckpt.pt") == (6, None)
    n, msg = common.resume_decay_iters(ck(6), None, 10, "r/ckpt.pt")
    assert n == 6 and msg.startswith("note:") and "r/ckpt.pt ends at iter 6" in msg
    n, msg = common.resume_decay_iters(ck(6), 10, 10, "r/ckpt.pt")
    assert n == 10 and msg.startswith("warning:") and "(it was 6) at iter 6" in msg
    assert common.resume_decay_iters(ck(4), 6, 10, "r/ckpt.pt") == (6, None)
    old = {"iter": 2, "config": {"lr_decay_iters": 0, "max_iters": 6}}  # written before it was stored
    assert common.resume_decay_iters(old, None, 6, "r/ckpt.pt") == (6, None)


def test_batch_indices_cover_each_epoch_once_and_shard_ranks():
    n, bs, world, seed = 50, 4, 3, 7
    per_epoch = common.batches_per_epoch(n, world, bs)            # 50 // 3 // 4 = 4
    assert per_epoch == 4
    for epoch in range(2):
        seen = []
        for rank in range(world):
            for pos in range(per_epoch):
                idx = common.batch_indices(n, seed, epoch * per_epoch + pos, rank, world, bs)
                assert len(idx) == bs and list(idx) == sorted(idx)
                seen += list(idx)
        assert len(seen) == len(set(seen)) == world * per_epoch * bs   # disjoint across ranks
        # the rows come from rank shards of the epoch's permutation, in order
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
        want = [sorted(perm[r * (n // world):][p * bs:(p + 1) * bs]) for r in range(world)
                for p in range(per_epoch)]
        got = [list(common.batch_indices(n, seed, epoch * per_epoch + p, r, world, bs))
               for r in range(world) for p in range(per_epoch)]
        assert got == [list(w) for w in want]
    with pytest.raises(ValueError, match="too few for batch_size=64"):
        common.batch_indices(10, 0, 0, 0, 1, 64)


def test_shard_range_partitions():
    for n, world in [(10, 3), (3, 4), (0, 2), (8, 2)]:
        parts = [common.shard_range(n, r, world) for r in range(world)]
        covered = [i for lo, hi in parts for i in range(lo, hi)]
        assert covered == list(range(n))


def test_jsonl_partial_last_line_and_atomic_rewrite(tmp_path, capsys):
    p = str(tmp_path / "log.jsonl")
    for i in range(3):
        common.append_jsonl(p, {"iter": i})
    with open(p, "a") as f:
        f.write('{"iter": 3, "lo')                                # a kill mid-append
    assert common.read_jsonl(p) == [{"iter": 0}, {"iter": 1}, {"iter": 2}]
    assert "partial last line" in capsys.readouterr().out
    common.rewrite_jsonl(p, [{"iter": 0}])
    assert common.read_jsonl(p) == [{"iter": 0}] and os.listdir(tmp_path) == ["log.jsonl"]
    with open(p, "w") as f:
        f.write('{"iter": 0}\nnot json\n{"iter": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl, line 2"):
        common.read_jsonl(p)
    bad = tmp_path / "meta.json"
    bad.write_text('{"a": ')
    with pytest.raises(ValueError, match="meta.json' is not valid JSON"):
        common.read_json(str(bad))


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    p = str(tmp_path / "a.txt")
    common.atomic_write_text(p, "old\n")
    with pytest.raises(RuntimeError, match="writer died"):
        with common.atomic_path(p) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise RuntimeError("writer died")
    assert open(p).read() == "old\n" and os.listdir(tmp_path) == ["a.txt"]
    open(p + ".tmp.999999999", "w").close()                    # a killed writer's (no such pid)
    common.atomic_write_text(p, "new\n")
    assert open(p).read() == "new\n" and os.listdir(tmp_path) == ["a.txt"]


def test_save_figure_format_from_the_name(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(1, 1))
    for name, magic in (("f.png", b"\x89PNG"), ("f.pdf", b"%PDF")):
        common.save_figure(fig, str(tmp_path / name), dpi=20)
        assert open(tmp_path / name, "rb").read(4) == magic
    plt.close(fig)
    assert sorted(os.listdir(tmp_path)) == ["f.pdf", "f.png"]


def test_run_dir_refuses_scratch_over_a_run_and_cleans_stale_tmp(tmp_path):
    d = str(tmp_path / "run")
    common.prepare_run_dir(d, "scratch")                        # new dir: fine
    save_checkpoint({"iter": 1}, os.path.join(d, "ckpt.pt"))
    with pytest.raises(FileExistsError, match="already holds a run.*--init_from=resume"):
        common.prepare_run_dir(d, "scratch")
    dead = os.path.join(d, "ckpt.pt.tmp.999999999")           # no such pid
    live = os.path.join(d, f"ckpt.pt.tmp.{os.getpid()}")       # a writer that still runs
    grid = os.path.join(d, "samples_000001.png.tmp.999999999")  # any file's, not only the run files'
    mine = os.path.join(d, "notes.tmp.txt")                     # not a temp file of atomic_path
    for p in (dead, live, grid, mine):
        open(p, "w").close()
    common.prepare_run_dir(d, "resume")
    assert sorted(os.listdir(d)) == sorted(["ckpt.pt", os.path.basename(live), "notes.tmp.txt"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        common.prepare_run_dir(str(tmp_path / "other"), "resume")


def test_portable_paths_survive_moving_the_tree(tmp_path):
    run, tok = tmp_path / "a" / "run", tmp_path / "a" / "tok.pt"
    run.mkdir(parents=True)
    tok.write_text("x")
    stored = common.portable_path(str(tok), str(run))
    assert stored == os.path.join("..", "tok.pt")
    moved = tmp_path / "b"
    os.rename(tmp_path / "a", moved)
    assert common.resolve_path(stored, str(moved / "run")) == str(moved / "tok.pt")
    with pytest.raises(FileNotFoundError, match="tok.pt.*tokenizer_ckpt"):
        common.resolve_path(stored, str(tmp_path))


def test_fingerprint_is_content_based():
    a = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}
    same = {"b": torch.zeros(3), "w": torch.arange(6.0).view(2, 3).clone()}
    assert common.fingerprint(a) == common.fingerprint(same)
    for other in ({**a, "w": a["w"] + 1e-6}, {**a, "w": a["w"].view(3, 2)},
                  {**a, "w": a["w"].double()}, {"w2": a["w"], "b": a["b"]}):
        assert common.fingerprint(other) != common.fingerprint(a)


def test_check_range_and_choice():
    cfg = {"n": 0, "d": 1.0, "m": "x"}
    cfg_mod.check_range(cfg, "n", lo=0)
    with pytest.raises(ValueError, match=r"'n': expected a value in \(0, inf\), got 0"):
        cfg_mod.check_range(cfg, "n", lo=0, lo_open=True)
    with pytest.raises(ValueError, match=r"'d': expected a value in \[0, 1\), got 1.0"):
        cfg_mod.check_range(cfg, "d", lo=0, hi=1, hi_open=True)
    with pytest.raises(ValueError, match=r"'m': expected one of \('a', 'b'\), got 'x'"):
        cfg_mod.check_choice(cfg, "m", ("a", "b"))


def test_configure_records_explicit_keys():
    g = defaults()
    configure(g, ["--lr=2e-3"])
    assert g["_explicit"] == {"lr"}


def test_common_reexports_the_config_names():
    """The scripts import the config names from support.common too: the same functions."""
    for name in ("configure", "check_range", "check_choice", "warn_ignored"):
        assert getattr(common, name) is getattr(cfg_mod, name)
