"""support/config.py (overrides, config files, clear errors) and support/common.py (atomic
checkpoints, files and figures, the lr schedule, the data order, run directories)."""

import errno
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
    assert sorted(os.listdir(d)) == sorted([".lock", "ckpt.pt", os.path.basename(live), "notes.tmp.txt"])
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


# ---- one process per run directory (dirlock) ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from support import common; "
        "common.prepare_run_dir(sys.argv[1], 'scratch'); print('locked', flush=True); time.sleep(60)")


def _holder(d):
    """A live process that prepared run dir d (and so holds its lock) -> the Popen."""
    import subprocess
    p = subprocess.Popen([sys.executable, "-c", HOLD, d, ROOT], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_run_dir_is_locked_for_the_life_of_the_process(tmp_path):
    d = str(tmp_path / "run")
    p = _holder(d)
    try:
        for init in ("scratch", "resume"):
            if init == "resume":
                save_checkpoint({"iter": 1}, os.path.join(d, "ckpt.pt"))
            with pytest.raises(RuntimeError, match=r"run is in use by another process \(pid %d" % p.pid):
                common.prepare_run_dir(d, init)
    finally:
        p.kill()
        p.wait()
    common.prepare_run_dir(d, "resume")   # the holder is gone: the kernel dropped its lock
    common.prepare_run_dir(d, "resume")   # this process holds it: a second run in-process may go on


def _ddp_prepare(rank, world, init_file, d, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        common.prepare_run_dir(d, "scratch")
        results.put((rank, "ok"))
    except Exception as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    dist.destroy_process_group()


def test_refused_run_dir_stops_every_ddp_rank(tmp_path):
    """Only rank 0 takes the lock; the others get its verdict and raise too (none waits forever)."""
    import torch.multiprocessing as mp
    d = str(tmp_path / "run")
    p = _holder(d)
    try:
        ctx = mp.get_context("spawn")
        q = ctx.SimpleQueue()
        mp.spawn(_ddp_prepare, args=(2, str(tmp_path / "store"), d, q), nprocs=2, join=True)
        got = dict(q.get() for _ in range(2))
    finally:
        p.kill()
        p.wait()
    assert all(v.startswith("DirInUseError") and "in use by another process" in v for v in got.values()), got


def test_two_trainings_of_one_out_dir(tmp_path):
    """Two real train.py processes on one out_dir: the second (scratch or resume) stops at once
    with the lock's message and writes nothing; the first one's log stays in order."""
    import subprocess
    import time
    from helpers import make_encoded
    tr, va, _ = make_encoded(str(tmp_path / "enc"), n_train=24, n_val=6)
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(init, max_iters, stdout=subprocess.PIPE):
        args = dict(data_dir=tr, val_dir=va, out_dir=out, model_size="tiny", batch_size=8, max_iters=max_iters,
                    eval_interval=10**6, warmup_iters=1, grid_per_class=1, log_interval=1, init_from=init)
        cmd = [sys.executable, os.path.join(ROOT, "train.py")] + [f"--{k}={v}" for k, v in args.items()]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True)

    first_out = open(tmp_path / "first.txt", "w")
    first = train("scratch", 10**6, stdout=first_out)
    log = os.path.join(out, "log.jsonl")
    try:
        deadline = time.time() + 120
        while not (os.path.isfile(log) and os.path.getsize(log)) and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, open(tmp_path / "first.txt").read()[-3000:]
        for init in ("scratch", "resume"):
            second = train(init, 5)
            text = second.communicate(timeout=120)[0]
            assert second.returncode != 0, text[-3000:]
            assert "DirInUseError" in text and "is in use by another process" in text, text[-3000:]
            assert first.poll() is None   # refused by the lock, not by the first run's end
    finally:
        first.kill()
        first.wait()
        first_out.close()
    iters = [r["iter"] for r in common.read_jsonl(log) if "loss" in r]
    assert iters == list(range(1, len(iters) + 1)) and iters   # one run's steps, once each


# ---- bad content in the files the runs read ----

@pytest.mark.parametrize("line, msg", [
    ("[1, 2]", r"log.jsonl, line 2: expected one JSON object per line .*; got a list: \[1, 2\]"),
    ('{"loss": 1.0}', r"log.jsonl, line 2: expected .* integer \"iter\".*; got a record without \"iter\""),
    ('{"iter": "3"}', r"log.jsonl, line 2: expected .*; got \"iter\": '3'"),
    ("{not json", r"log.jsonl, line 2: not a JSON record"),
    ('{"iter": 1, "x": "\udcff"}', r"log.jsonl, line 2: not a JSON record"),   # bytes that are no UTF-8
])
def test_malformed_log_line_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"iter": 0}\n' + line.encode("utf-8", "surrogateescape") + b'\n{"iter": 2}\n')
    with pytest.raises(ValueError, match=msg):
        common.read_jsonl(str(p))


def test_read_json_wants_an_object(tmp_path):
    p = tmp_path / "meta.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"meta.json': expected a JSON object \{...\}, got a list"):
        common.read_json(str(p), "encoded meta.json")


def _flip_tensor_byte(path, value):
    """Change one byte of a stored tensor filled with `value` (as bit rot or a bad copy would)."""
    raw = bytearray(open(path, "rb").read())
    i = raw.find(torch.full((4,), value).numpy().tobytes())
    assert i > 0
    raw[i + 1] ^= 0x01
    open(path, "wb").write(bytes(raw))


def test_altered_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"w": torch.full((256,), 3.25), "iter": 1}, path)
    _flip_tensor_byte(path, 3.25)
    assert torch.load(path, weights_only=True)["w"][0] != 3.25  # torch itself loads it silently
    with pytest.raises(ValueError, match=r"ckpt.pt' is corrupt: member .*data/0 fails its CRC.*restore it from"):
        load_checkpoint(path)


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = str(tmp_path / "t.pt")
    save_checkpoint(torch.ones(2), path)
    with pytest.raises(ValueError, match="expected a dict.*got a Tensor"):
        load_checkpoint(path)


# ---- a full disk: a clear error, and nothing half-written ----

def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"w": torch.ones(3), "iter": 1}, path)
    before = open(path, "rb").read()

    def torch_save_on_a_full_disk(obj, f):  # what torch's zip writer raises when a write comes up short
        open(f, "wb").write(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1984 vs 1898")
    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(OSError, match=r"no space left on .* MiB free\) while writing .*ckpt.pt") as e:
        save_checkpoint({"w": torch.zeros(3), "iter": 2}, path)
    assert e.value.errno == errno.ENOSPC
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_full_disk_while_writing_text_and_json(tmp_path):
    path = str(tmp_path / "metrics.json")
    common.write_json(path, {"a": 1})

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=r"no space left on .*metrics.json"):
        with common.atomic_path(path) as tmp:
            open(tmp, "w").write('{"a": ')
            Full().write("2}")
    assert common.read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["metrics.json"]


def test_full_disk_while_appending_a_log_line(tmp_path, monkeypatch):
    path = str(tmp_path / "log.jsonl")
    common.append_jsonl(path, {"iter": 0})
    before = open(path, "rb").read()
    real_write = os.write

    def short_write(fd, data):  # the disk fills up half way through the line
        return real_write(fd, data[:len(data) // 2]) if data.startswith(b'{"iter": 1') else real_write(fd, data)
    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError, match=r"no space left on .*log.jsonl"):
        common.append_jsonl(path, {"iter": 1, "loss": 0.5})
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    common.append_jsonl(path, {"iter": 1})
    assert common.read_jsonl(path) == [{"iter": 0}, {"iter": 1}]


# ---- config files and devices ----

@pytest.mark.parametrize("text, msg", [
    ("steps = 20\nlr = 1e-3\nname = mnist\n", r"c.py line 3: NameError: name 'mnist' is not defined"),
    ("steps = 20\nlr = (1e-3\n", r"c.py line 2: SyntaxError: '\(' was never closed"),
    ("steps = 1 / 0\n", r"c.py line 1: ZeroDivisionError"),
])
def test_config_file_errors_name_file_and_line(tmp_path, text, msg):
    f = tmp_path / "c.py"
    f.write_text(text)
    with pytest.raises(ValueError, match=msg):
        configure(defaults(), [str(f)])


def test_explicit_cuda_index_becomes_the_current_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # setup_device sets them
    try:
        assert common.setup_device("cuda:1", "float32")[0] == "cuda" and calls == ["cuda:1"]
        common.setup_device("cuda", "float32")                # plain cuda: torch's current device
        assert calls == ["cuda:1"]
        for bad, msg in (("cuda:2", "torch sees 2 CUDA device"), ("cuda:x", "expected 'cpu', 'cuda' or 'cuda:N'")):
            with pytest.raises(ValueError, match=msg):
                common.setup_device(bad, "float32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
