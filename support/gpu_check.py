"""
The GPU check: one command that runs everything CPU CI cannot show on one CUDA device and writes
one markdown report (device, versions, each check's pass / fail with its error against the
float64 / CPU reference, the loss benchmark, a chunk-size sweep of the fused loss).

    python -m support.gpu_check --out out/gpu_check.md          # on a machine with one CUDA GPU
    python -m support.gpu_check --device cpu --out out/gpu_check_dry.md   # dry run: small sizes
    python -m support.gpu_check --out out/gpu_check.md --work /tmp/gpu_check   # logs elsewhere

Parts, each in its own process with its own time limit (a part that fails, crashes or times out
is recorded and the next one runs; the report is rewritten after every part):
    Loss tests     pytest -m cuda tests/test_cuda.py -k LOSS_TESTS (JUnit XML for pass / fail,
                   the errors the tests measured from $GPU_CHECK_RECORD)
    Pipeline tests the other tests of tests/test_cuda.py: training steps and resume, torchrun,
                   sampling, the pretrained tokenizer
    Loss benchmark python -m support.bench_snce at the GPU size 16384 x 1024 x 131072 (bf16)
                   against the peers it supports (torch, Cut Cross-Entropy, Liger when installed)
    Chunk sizes    fused_linear_snce at an IBQ-B step (6,144 rows, H = 1024) for K = 131,072 and
                   262,144 over several chunk_size values against snce_kernels.default_chunk's
                   device size (two fp32 (chunk, K) buffers within min(4 GiB, memory / 16)).
Without CUDA (and without --device cpu) it exits with status 2 and says why.
"""

import argparse
import datetime
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from snce import fused_linear_snce
from support.snce_kernels import default_chunk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_GPU = "16384x1024x131072x8"
BENCH_DRY = "256x32x2048x8"


# -----------------------------------------------------------------------------
# running a part: a process group with a time limit, its output kept


class PartTimeout(Exception):
    """A part's process ran past its limit; `output` is what it printed until then."""

    def __init__(self, seconds, output):
        super().__init__(f"timed out after {seconds} s")
        self.output = output


def run_cmd(cmd, timeout, log_path, env=None):
    """Run cmd in its own process group (so a timeout also stops what it started, e.g. train.py
    under pytest) -> (returncode, stdout + stderr). The output is also written to log_path."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        with open(log_path, "w") as f:
            f.write(out or "")
        raise PartTimeout(timeout, out or "") from None
    with open(log_path, "w") as f:
        f.write(out)
    return p.returncode, out


def tail(text, n=25):
    lines = (text or "").rstrip().splitlines()[-n:]
    return "```\n" + "\n".join(lines) + "\n```\n"


# -----------------------------------------------------------------------------
# parts 1 and 2: the tests (the loss's, then the pipeline's)


def read_junit(path):
    """pytest's --junitxml file -> [{name, outcome (passed|failed|error|skipped), time, message}]."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (el.get("message") or el.text or "").strip().splitlines()[0][:300] \
                    if (el.get("message") or el.text) else ""
                break
        cases.append({"name": tc.get("name"), "outcome": outcome,
                      "time": float(tc.get("time") or 0), "message": message})
    return cases


def read_records(path):
    """The tests' JSON lines {test, what, err, tol} -> {test name: [records]}."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out.setdefault(r["test"], []).append(r)
    return out


def tests_section(cases, records, note):
    """Markdown: a count line and one row per test with its measured errors."""
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    head = ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("passed", "failed"))
    rows = ["| test | result | measured (max error vs reference) | s |", "|---|---|---|---:|"]
    label = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skipped"}
    for c in cases:
        meas = "; ".join(f"{r['what']} {r['err']:.1e}" + (f" (tol {r['tol']:.1e})" if r["tol"] is not None else "")
                         for r in records.get(c["name"], []))
        if c["outcome"] != "passed" and c["message"]:
            meas = (meas + "; " if meas else "") + c["message"]
        meas = meas.replace("|", "\\|")               # a table cell
        rows.append(f"| {c['name']} | {label[c['outcome']]} | {meas} | {c['time']:.1f} |")
    return f"{head}{note}\n\n" + "\n".join(rows) + "\n"


LOSS_TESTS = "fused or snce_loss or code_assignment"     # pytest -k: the loss and its targets


def run_tests(args, work, name, select, timeout):
    """pytest -m cuda tests/test_cuda.py -k select -> (ok, markdown)."""
    junit, rec = os.path.join(work, f"{name}.xml"), os.path.join(work, f"{name}.jsonl")
    for p in (junit, rec):
        if os.path.exists(p):
            os.remove(p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           "tests/test_cuda.py", "-k", select, f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    env = {"GPU_CHECK_RECORD": rec, "GPU_CHECK_DEVICE": args.device}
    log = os.path.join(work, f"{name}.log")
    try:
        rc, out = run_cmd(cmd, timeout, log, env)
    except PartTimeout as e:
        rc, out, why = None, e.output, f"pytest {e}"
    else:
        why = f"pytest exited with {rc} and wrote no JUnit file (a crashed process?)"
    if rc is None or not os.path.exists(junit):   # junit is written at the end only: the records
        done = "\n".join(f"- {t}: " + "; ".join(f"{r['what']} {r['err']:.1e}" for r in rs)
                         for t, rs in read_records(rec).items())
        return False, f"{why}; the tests that recorded errors before that:\n\n{done}\n\n" + tail(out)
    cases = read_junit(junit)
    ok = rc == 0 and not any(c["outcome"] in ("failed", "error") for c in cases)
    note = "" if ok else f" (pytest exit status {rc}; log: {log})"
    return ok, f"`pytest -m cuda tests/test_cuda.py -k \"{select}\"`\n\n" + tests_section(
        cases, read_records(rec), note)


def part_loss_tests(args, work):
    return run_tests(args, work, "loss_tests", LOSS_TESTS, args.timeout_loss_tests)


def part_pipeline_tests(args, work):
    return run_tests(args, work, "pipeline_tests", f"not ({LOSS_TESTS})", args.timeout_pipeline_tests)


# -----------------------------------------------------------------------------
# part 3: the loss benchmark (support/bench_snce.py) against its peers


def peers_installed():
    return {name: importlib.util.find_spec(mod) is not None
            for name, mod in (("Cut Cross-Entropy", "cut_cross_entropy"), ("Liger-Kernel", "liger_kernel"))}


def part_bench(args, work):
    size = BENCH_DRY if args.small else BENCH_GPU
    cmd = [sys.executable, "-m", "support.bench_snce", f"--device={args.device}",
           f"--dtype={'fp32' if args.device == 'cpu' else 'bf16'}", f"--sizes={size}",
           f"--metrics={args.bench_metrics}", f"--reps={args.reps}"]
    missing = [k for k, v in peers_installed().items() if not v]
    note = ("Peers not installed (their rows say so): " + ", ".join(missing) + ". "
            if missing else "All optional peers installed. ")
    rc, out = run_cmd(cmd, args.timeout_bench, os.path.join(work, "bench.log"))
    table = "\n".join(l for l in out.splitlines() if l.startswith(("|", "N=")))
    mem = ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "the peak resident set")
    return rc == 0, (f"`python {' '.join(cmd[1:])}`\n\n{note}Peak memory: the rise of {mem} over the "
                     f"inputs.\n\n{table}\n" + ("" if rc == 0 else tail(out)))


# -----------------------------------------------------------------------------
# part 4: the fused loss's chunk size at IBQ-B sizes (run in a child: python -m support.gpu_check
# --part chunks prints the table)


def chunk_sweep(device, small, reps, emit=print):
    """Markdown table, emitted line by line (a time limit keeps the rows so far): fused_linear_snce
    forward + backward time (its default: the compiled chunk kernel where available) and peak
    extra memory per chunk_size, hidden bf16 and the head weight fp32 as train.py's autocast
    gives them."""
    dev = torch.device(device)
    N, H, D = (256, 64, 8) if small else (6144, 1024, 8)
    Ks = (4096, 8192) if small else (131072, 262144)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for line in (f"N = {N} rows, H = {H}, D = {D}, metric dot, tau 1, hidden bf16 / weight fp32, "
                 f"median of {reps}\n", "| K | chunk_size | one fp32 (chunk, K) buffer | fwd+bwd ms | "
                 "peak extra MiB | x default time |", "|---:|---:|---:|---:|---:|---:|"):
        emit(line)
    for K in Ks:
        g = torch.Generator().manual_seed(0)
        C = torch.randn(K, D, generator=g).to(dev)
        z = torch.randn(N, D, generator=g).to(dev)
        h = torch.randn(N, H, generator=g).to(dev, torch.bfloat16).requires_grad_()
        W = (0.02 * torch.randn(K, H, generator=g)).to(dev).requires_grad_()
        default = default_chunk(K, 4 * H)
        sizes = sorted({default, *((64, 128) if small else (128, 512, 1024, 2048, 4096))})
        base_t = None
        for c in [default] + [s for s in sizes if s != default]:
            times, peak = [], 0
            for i in range(reps + 1):                  # the first call compiles and warms up
                h.grad = W.grad = None
                if dev.type == "cuda":
                    sync()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                fused_linear_snce(h, W, z, C, 1.0, "dot", chunk_size=c).backward()
                sync()
                if i:
                    times.append(time.perf_counter() - t0)
                if dev.type == "cuda":
                    peak = max(peak, torch.cuda.max_memory_allocated() - base)
            t = statistics.median(times)
            base_t = base_t or t
            mark = " (default)" if c == default else ""
            mem = f"{peak / 2**20:.0f}" if dev.type == "cuda" else "-"
            emit(f"| {K} | {c}{mark} | {c * K * 4 / 2**20:.0f} MiB | {1e3 * t:.1f} | "
                 f"{mem} | {t / base_t:.2f} |")


def part_chunks(args, work):
    cmd = [sys.executable, "-m", "support.gpu_check", "--part", "chunks", "--device", args.device,
           "--reps", str(args.reps)] + (["--small"] if args.small else [])
    text = ("The fused loss's default chunk on a GPU (support/snce_kernels.py default_chunk: "
            "two fp32 (chunk, K) buffers within min(4 GiB, memory / 16), multiples of 128 rows) "
            "against other sizes: each chunk re-reads the whole head weight and read-modify-writes "
            "the fp32 grad_weight, so these rows show what larger chunks buy.\n\n")
    try:
        rc, out = run_cmd(cmd, args.timeout_chunks, os.path.join(work, "chunks.log"))
    except PartTimeout as e:
        rc, out, text = 1, e.output, text + f"**{e}**: the rows measured before that.\n\n"
    table = "\n".join(l for l in out.splitlines() if l.startswith(("|", "N =")))
    return rc == 0, text + table + "\n" + ("" if rc == 0 else tail(out))


PARTS = [("Loss tests", part_loss_tests), ("Pipeline tests", part_pipeline_tests),
         ("Loss benchmark", part_bench), ("Chunk sizes", part_chunks)]


# -----------------------------------------------------------------------------
# the report


def environment(device):
    """Markdown lines: the device and the software versions the numbers come from."""
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        lines.append(f"- device: {torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), "
                     f"{torch.cuda.device_count()} visible")
    else:
        lines.append(f"- device: CPU dry run ({os.cpu_count()} cores), small sizes")
    lines.append(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
                 f"{torch.backends.cudnn.version()}, Python {sys.version.split()[0]}")
    triton = importlib.util.find_spec("triton")
    lines.append(f"- triton: {'installed' if triton else 'not installed'}; peers: " + ", ".join(
        f"{k} {'installed' if v else 'not installed'}" for k, v in peers_installed().items()))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        lines.append(f"- commit: {rev or 'unknown'}{' + uncommitted changes' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        pass
    return lines


def write_report(path, env_lines, results, total_s):
    summary = ", ".join(f"{name}: {'pass' if ok else 'FAIL'}" for name, ok, _, _ in results)
    text = ["# GPU check", "", *env_lines, f"- wall time: {total_s:.0f} s", "",
            f"Summary: {summary or 'nothing ran (yet)'}", ""]
    for name, ok, seconds, body in results:
        text += [f"## {name}", "", f"Result: {'pass' if ok else '**FAIL**'} ({seconds:.0f} s)", "", body, ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(text))


def main(argv=None):
    p = argparse.ArgumentParser(description="run the GPU check and write one markdown report")
    p.add_argument("--out", default="out/gpu_check.md")
    p.add_argument("--work", default="", help="the parts' logs, JUnit and record files "
                   "(default: beside --out, in <out>_files)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of the same code paths at small sizes")
    p.add_argument("--small", action="store_true", help="small sizes (implied by --device cpu)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bench_metrics", default="dot", help="bench_snce --metrics (the paper's: dot)")
    p.add_argument("--timeout_loss_tests", type=int, default=120)   # seconds per part: 480 in all
    p.add_argument("--timeout_pipeline_tests", type=int, default=220)
    p.add_argument("--timeout_bench", type=int, default=80)
    p.add_argument("--timeout_chunks", type=int, default=60)
    p.add_argument("--part", default="", help=argparse.SUPPRESS)   # internal: one child part
    args = p.parse_args(argv)
    args.small = args.small or args.device == "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device, and torch sees none (torch "
              f"{torch.__version__}, built with CUDA {torch.version.cuda}); on this machine "
              "`python -m support.gpu_check --device cpu` dry-runs the same checks at small sizes.",
              file=sys.stderr)
        sys.exit(2)
    if args.part == "chunks":
        chunk_sweep(args.device, args.small, args.reps, lambda line: print(line, flush=True))
        return 0
    work = os.path.abspath(args.work or os.path.splitext(args.out)[0] + "_files")
    os.makedirs(work, exist_ok=True)
    try:
        env_lines = environment(args.device)
    except Exception as e:  # noqa: BLE001  the report still gets written
        env_lines = [f"- environment: could not be read ({type(e).__name__}: {e})"]
    results, t_start = [], time.time()
    write_report(args.out, env_lines, results, 0)   # something on disk even if this process dies
    for name, fn in PARTS:
        t0 = time.time()
        try:
            ok, body = fn(args, work)
        except PartTimeout as e:
            ok, body = False, f"{e}\n\n" + tail(e.output)
        except Exception:  # noqa: BLE001  one broken part must not lose the others' results
            ok, body = False, "the part crashed:\n\n```\n" + traceback.format_exc() + "```\n"
        results.append((name, ok, time.time() - t0, body))
        write_report(args.out, env_lines, results, time.time() - t_start)
        print(f"{name}: {'pass' if ok else 'FAIL'} ({time.time() - t0:.0f} s)", flush=True)
    print(f"report: {args.out}")
    return 0 if all(ok for _, ok, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
