"""
Plumbing shared by the scripts (train_tokenizer.py, encode.py, train.py, sample.py): DDP and
device setup, the learning-rate schedule, the data order, atomic files (checkpoints, logs, json,
images, figures; a full disk is a clear error), run directories (one process each: dirlock.py),
portable paths. One place for each of these ideas; importing this module configures nothing.
Config parsing (configure, check_range, check_resume, ...) is support/config.py; its names are
importable from here too.
"""

import errno
import functools
import hashlib
import json
import math
import os
import shutil
import zipfile
from contextlib import contextmanager, nullcontext, suppress

import numpy as np
import torch

from support.config import (check_choice, check_range, check_resume, config_diff,  # noqa: F401 (re-exported)
                            configure, warn_ignored)
from support.dirlock import hold_dir

# -----------------------------------------------------------------------------
# processes and devices


def init_distributed(device):
    """-> (ddp, rank, local_rank, world_size, device). DDP iff torchrun set RANK; nccl on CUDA,
    gloo on CPU (so the multi-process path runs in CI). Each rank gets cuda:<local_rank>."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if str(device).startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return True, rank, local_rank, world_size, device


def setup_device(device, dtype="bfloat16"):
    """-> (device_type, ptdtype, autocast context). bf16 autocast on CUDA when dtype says so;
    fp32 on the CPU (its bf16 matmuls are not faster through autocast here). TF32 on CUDA."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype: expected 'bfloat16' or 'float32', got {dtype!r}")
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device (use --device=cpu)")
        index = str(device)[4:]
        if index:  # cuda:N is made the current device: synchronize() and the peak-memory
            # statistics act on the current device, cuda:0 unless set
            if not (index[0] == ":" and index[1:].isdigit()):
                raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
            if int(index[1:]) >= torch.cuda.device_count():
                raise ValueError(f"device={device!r} but torch sees {torch.cuda.device_count()} CUDA "
                                 f"device(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
            torch.cuda.set_device(str(device))
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif str(device) != "cpu":
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    ptdtype = torch.bfloat16 if device_type == "cuda" and dtype == "bfloat16" else torch.float32
    autocast = torch.autocast(device_type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    return device_type, ptdtype, autocast


def step_seed(seed, it, rank, world_size):
    """The global RNG seed of step `it` on `rank`: randomness (dropout, masks, flips) is a
    function of (seed, step, rank), so resume is exact without saving RNG states."""
    return seed * 1_000_003 + it * world_size + rank


def ddp_initialized():
    """True inside an initialised torch.distributed process group (torchrun, or mp.spawn in the
    tests): the one test of whether collectives (all_reduce, broadcast) must run."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


# -----------------------------------------------------------------------------
# learning rate and data order


def lr_at(it, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup ((it + 1) / (warmup + 1) of the peak, never 0), then cosine from
    learning_rate down to min_lr at decay_iters, min_lr after."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def resume_decay_iters(ck, requested, max_iters, ckpt_path):
    """The cosine length (lr_at's decay_iters) a run resumed from checkpoint ck trains with, and a
    line to print or None. The run's own length is ck's "lr_decay_iters" (older checkpoints: their
    config's, else its max_iters); requested: lr_decay_iters set explicitly now (None when not
    set). Not set: the run keeps its own schedule whatever max_iters is now (past its end lr stays
    at min_lr), so continuing a run never re-warms it. Set and different: the new length, with a
    warning that the lr jumps at the checkpoint's step."""
    saved = ck.get("lr_decay_iters") or ck["config"].get("lr_decay_iters") or ck["config"]["max_iters"]
    if requested is None:
        note = (f"note: the cosine schedule of {ckpt_path} ends at iter {saved} (kept; lr = min_lr "
                f"after it); pass --lr_decay_iters=N to stretch it") if max_iters > saved else None
        return saved, note
    if requested != saved:
        return requested, (f"warning: lr_decay_iters={requested} changes the run's cosine schedule "
                           f"(it was {saved}) at iter {ck['iter']}: the learning rate jumps")
    return requested, None


@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    """The data order of one epoch: a permutation of range(n) seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


@functools.lru_cache(maxsize=2)
def epoch_flips(n, seed, epoch):
    """Which of n images are mirrored in epoch `epoch`: (n,) bool, a fair coin per image drawn
    from (seed, epoch) alone, a stream of its own (numpy's SeedSequence, not torch's seeds), so
    a resume mirrors the same images and each epoch mirrors others."""
    return np.random.default_rng([seed % 2**64, epoch, 0x666C6970]).random(n) < 0.5


def batches_per_epoch(n, world_size, batch_size):
    """Full batches per rank per epoch; every rank gets the same number (collectives match)."""
    return n // world_size // batch_size


def batch_indices(n, seed, step, rank, world_size, batch_size):
    """Rows of batch number `step` (counted over the whole run) for this rank: epoch e is
    epoch_permutation(n, seed, e) cut into contiguous per-rank shards of n // world_size rows,
    each read in batch_size pieces (the tail that does not fill a batch is dropped). Stateless:
    the data position is just the step, so resume is exact. Sorted: sequential memmap reads."""
    per_epoch = batches_per_epoch(n, world_size, batch_size)
    if per_epoch == 0:
        raise ValueError(f"{n} training items are too few for batch_size={batch_size} x "
                         f"{world_size} ranks")
    epoch, pos = divmod(step, per_epoch)
    start = rank * (n // world_size) + pos * batch_size
    return np.sort(epoch_permutation(n, seed, epoch)[start:start + batch_size])


def shard_range(n, rank, world_size):
    """[lo, hi) of rank's contiguous share of n items (ceil split; the last ranks may get less
    or nothing): how encode.py and sample.py split their outputs across ranks."""
    per_rank = -(-n // world_size)
    return min(n, rank * per_rank), min(n, (rank + 1) * per_rank)


# -----------------------------------------------------------------------------
# files: atomic writes, checkpoints, logs, run directories, portable paths


def _tmp_name(path):
    return f"{path}.tmp.{os.getpid()}"


# what torch.save's C++ writer says when a write comes up short (it raises RuntimeError, not OSError)
_SHORT_WRITE = ("unexpected pos", "file write failed", "failed writing")


def _disk_full(e, path):
    """-> an OSError(ENOSPC) saying where and how much is free if e is a write failure of a full
    disk (or quota), else None."""
    if not (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            or isinstance(e, RuntimeError) and any(m in str(e) for m in _SHORT_WRITE)):
        return None
    d = os.path.dirname(os.path.abspath(path))
    free = f"{shutil.disk_usage(d).free / 2**20:.1f} MiB free" if os.path.isdir(d) else "?"
    return OSError(errno.ENOSPC, f"no space left on {d} ({free}) while writing {path}: nothing was "
                   "written (an older version of the file is unchanged); free some space or write "
                   "elsewhere")


@contextmanager
def atomic_path(path):
    """Yield a temp name beside path for a writer to fill (torch.save, PIL, matplotlib, np.savez
    on an open file); then it replaces path with os.replace, so a kill leaves the old or the new
    file, never a truncated one. If the writer raises, the temp file is removed and path is left
    as it was; a full disk is an OSError(ENOSPC) naming path and the free space. The temp name
    ends in .tmp.<pid> (clean_stale_tmp removes those a kill left, here for this path first),
    not in path's extension: give writers that guess the format from the name the format
    explicitly."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean_stale_tmp(path)  # what a killed earlier writer of this file left
    tmp = _tmp_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: no half-written temp file stays behind
        with suppress(FileNotFoundError):
            os.remove(tmp)
        full = _disk_full(e, path)
        if full:
            raise full from e
        raise


def _fsync(path):
    """Flush a closed file's data to disk before it is renamed over the old one (else a crash of
    the machine could leave the new name pointing at an empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text):
    """Write text to path through a temp file + os.replace (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_figure(fig, path, **savefig_kwargs):
    """fig.savefig(path) through atomic_path; the format is path's extension (png if it has
    none), given explicitly because the temp name has another one."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)


def write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path, what="json file"):
    """-> the parsed JSON object (a dict); a missing or malformed file, or one that holds
    something else than an object, is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({e}); it may be truncated") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path!r}: expected a JSON object {{...}}, got a "
                         f"{type(obj).__name__}: {json.dumps(obj)[:80]}")
    return obj


def read_jsonl(path):
    """Records of a .jsonl log ([] if missing): one JSON object per line, each with an integer
    "iter" (log.jsonl, fid.jsonl). A partial last line (a kill mid-append) is dropped with a
    warning; any other bad line is an error naming the file, the line and what was expected."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    out, want = [], 'expected one JSON object per line with an integer "iter", like {"iter": 0, ...}'
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if i == len(lines) - 1:  # no newline after it: the append was cut short
                print(f"warning: {path}: dropping a partial last line ({len(raw)} bytes)")
                continue
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e}); {want}") from e
        if isinstance(rec, dict) and type(rec.get("iter")) is int:
            out.append(rec)
            continue
        got = (f"a {type(rec).__name__}" if not isinstance(rec, dict) else
               f"\"iter\": {rec['iter']!r}" if "iter" in rec else "a record without \"iter\"")
        raise ValueError(f"{path}, line {i + 1}: {want}; got {got}: {raw[:80].decode('utf-8', 'replace')}")
    return out


def append_jsonl(path, rec):
    """Append one record as one line. A failed write (a full disk) is cut back off the file, so
    the log never ends in a half-written line, and raised as OSError(ENOSPC) naming path."""
    line = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):  # a short write: the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise (_disk_full(e, path) or e) from e
    finally:
        os.close(fd)


def rewrite_jsonl(path, records):
    """Atomically replace a .jsonl log by these records (e.g. cut back to a checkpoint)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def save_checkpoint(obj, path):
    """torch.save through atomic_path: never a half-written checkpoint (a full disk: the old one
    stays, and the error says so)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _check_crcs(path, what):
    """One sequential read of a torch.save zip archive, checking every member's CRC-32 (torch.load
    itself does not: altered bytes would load as altered weights). Non-zip files pass (torch.load
    judges them)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.CRC == 0 and info.file_size:  # written without CRCs: nothing to compare
                    continue
                with z.open(info) as f:
                    while f.read(1 << 24):  # the zip reader raises BadZipFile on a CRC mismatch
                        pass
    except zipfile.BadZipFile as e:
        bad = f"member {info.filename} fails its CRC" if "CRC" in str(e) else f"{e}"
        raise ValueError(f"{what} {path!r} is corrupt: {bad} (its bytes changed after it was "
                         "written); restore it from a copy") from None
    except (EOFError, OSError) as e:
        raise ValueError(f"{what} {path!r} is corrupt or truncated ({type(e).__name__}: {e}); "
                         "restore it from a copy") from None


def load_checkpoint(path, map_location="cpu", what="checkpoint"):
    """Load with weights_only=True (a checkpoint can't run code) after checking the archive's
    CRCs; a missing, empty, truncated, altered or foreign file is an error that names it and says
    what was expected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} not found: fix the path, or train one first "
                                "(train_tokenizer.py / train.py write out_dir/ckpt.pt)")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes): expected a torch.save file")
    _check_crcs(path, what)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / ...
        msg = str(e)
        if "weights_only" in msg or "Unpickler" in msg or "GLOBAL" in msg:
            why = ("it holds Python objects other than tensors and plain values; this repo refuses "
                   "to unpickle them (loading could run code). Expected a checkpoint written by "
                   "this repo")
        else:
            why = f"it is not a readable torch.save file (truncated or corrupt?): {type(e).__name__}: {msg.splitlines()[0] if msg else ''}"
        raise ValueError(f"{what} {path!r}: {why}") from None
    if not isinstance(ck, dict):
        raise ValueError(f"{what} {path!r}: expected a dict of tensors and values (torch.save of a "
                         f"dict), got a {type(ck).__name__}")
    return ck


def clean_stale_tmp(path):
    """Remove what killed writers left: atomic_path's `<name>.tmp.<pid>` files whose pid no
    longer runs, in directory `path` (every name) or, for a file path, of that file alone. A live
    pid's temp file is kept: sample.py writes into a run directory without its lock, and two
    samplers may fill one cache file. -> the removed paths."""
    d, base = (path, None) if os.path.isdir(path) else os.path.split(os.path.abspath(path))
    removed = []
    for name in os.listdir(d) if os.path.isdir(d) else []:
        stem, sep, pid = name.rpartition(".tmp.")
        if not (sep and stem and pid.isdigit() and base in (None, stem)):
            continue
        try:
            os.kill(int(pid), 0)  # no error: its writer still runs
        except ProcessLookupError:  # no such process: a killed writer's
            with suppress(FileNotFoundError):  # another process cleaning the directory got it first
                os.remove(os.path.join(d, name))
                removed.append(os.path.join(d, name))
        except (PermissionError, OverflowError):  # another user's live process; not a pid
            pass
    return removed


def _lock_run_dir(out_dir, init_from, run_files):
    """Rank 0's part of prepare_run_dir: the lock before the scratch check (so two runs never both
    find the directory free), then the leftovers."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if init_from == "resume" and not os.path.isfile(ckpt):  # before the lock makes out_dir
        raise FileNotFoundError(f"init_from=resume: no checkpoint at {ckpt} (train with "
                                "init_from=scratch first, or set out_dir to the run to continue)")
    hold_dir(out_dir)
    found = [f for f in run_files if os.path.exists(os.path.join(out_dir, f))]
    if init_from == "scratch" and found:
        raise FileExistsError(
            f"out_dir {out_dir!r} already holds a run ({', '.join(found)}): continue it with "
            f"--init_from=resume, choose another --out_dir, or delete {out_dir!r} to start over")
    for p in clean_stale_tmp(out_dir):
        print(f"removed {p} (left by a killed writer)")


def prepare_run_dir(out_dir, init_from, run_files=("ckpt.pt", "log.jsonl")):
    """Call on every rank before any work. Rank 0 locks out_dir for the rest of the process
    (dirlock.lock_dir: a second training of the same directory, scratch or resume, stops here
    with DirInUseError instead of interleaving its log and checkpoints with this one's); a
    scratch run refuses a directory that already holds a run (never overwrite one), a resume
    needs one; leftover temp files of killed writers are removed, of every file in the directory
    (a kill can hit any write, and a grid's name is not written again after a resume). Under DDP
    rank 0 sends its verdict to the other ranks, so all of them raise the same error at once."""
    if init_from not in ("scratch", "resume"):
        raise ValueError(f"init_from: expected 'scratch' or 'resume', got {init_from!r}")
    import torch.distributed as dist
    ddp, err = ddp_initialized(), None
    if not ddp or dist.get_rank() == 0:
        try:
            _lock_run_dir(out_dir, init_from, run_files)
        except Exception as e:  # DirInUseError, FileExistsError, FileNotFoundError, OSError
            err = e
    if ddp:
        msg = [err]
        dist.broadcast_object_list(msg, src=0)
        err = msg[0]
    if err is not None:
        raise err


def portable_path(path, start):
    """path as stored in a run's files: relative to the directory `start` (so the run can be
    moved or copied with what it refers to), absolute if on another drive."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(start))
    except ValueError:
        return os.path.abspath(path)


def resolve_path(stored, start, what="file"):
    """Find a path stored by portable_path: relative to `start` first, then as given (older
    runs stored absolute paths, or cwd-relative). A miss names both places tried."""
    tried = [os.path.normpath(os.path.join(start, stored)), stored]
    for p in tried:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{what} {stored!r} (recorded in {start!r}) not found; tried "
                            f"{tried}. Pass its path explicitly (e.g. --tokenizer_ckpt=...)")


def fingerprint(state_dict):
    """Content hash of a state dict (names, dtypes, shapes, bytes): identifies a tokenizer by
    its weights and codebooks, not by where its file is or which step it was saved at."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        if not torch.is_tensor(t):
            h.update(f"{k}={t!r};".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
