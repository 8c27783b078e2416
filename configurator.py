"""
Shared plumbing for the scripts (tokenizer.py, train.py, sample.py): config overrides, DDP setup,
atomic checkpoints. nanoGPT's configurator idea, with clear errors instead of silent acceptance.

In a script, right after its block of module-level config globals:

    config = configure(globals())        # python script.py config/foo.py --lr=3e-4 --compile=False

Config keys are the script's globals with plain values (int/float/bool/str/None/tuple/list), except
_private names and UPPER_CASE constants. Positional arguments are config files (python, exec'd;
only assignments to existing keys allowed); `--key=value` overrides are parsed with
ast.literal_eval and fall back to the raw string. Unknown keys and values whose type does not
match the default (int is accepted for float; a None default accepts anything) fail with a
message listing the valid keys.
"""

import ast
import os
import sys

import torch

_TYPES = (int, float, bool, str, tuple, list, type(None))


def _config_keys(g):
    """Config = plain-valued globals, minus _private names and CONSTANTS (e.g. imported METRICS)."""
    return sorted(k for k, v in g.items() if not k.startswith("_") and not k.isupper()
                  and isinstance(v, _TYPES) and not isinstance(v, type))


def _check(key, value, g, keys, where):
    if key not in keys:
        raise ValueError(f"unknown config key {key!r} ({where}); valid keys: {', '.join(keys)}")
    default = g[key]
    if default is None:  # None default: anything goes
        return value
    want = type(default)
    ok = (isinstance(value, want) and not (want is int and isinstance(value, bool))
          or want is float and isinstance(value, int) and not isinstance(value, bool)
          or want in (tuple, list) and isinstance(value, (tuple, list)))
    if not ok:
        raise ValueError(f"config key {key!r} ({where}): expected {want.__name__} like the default "
                         f"{default!r}, got {type(value).__name__} {value!r}")
    if want is float:
        value = float(value)
    if want in (tuple, list):
        value = want(value)
    return value


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the globals dict g. Returns the snapshot."""
    argv = sys.argv[1:] if argv is None else argv
    keys = _config_keys(g)
    for arg in argv:
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (expected a path like config/x.py "
                                 "or an override like --key=value)")
            scope = {}
            with open(arg) as f:
                exec(f.read(), {}, scope)
            for k, v in scope.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(sys)):
                    g[k] = _check(k, v, g, keys, f"in {arg}")
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --dataset=mnist
            g[key] = _check(key, value, g, keys, f"from {arg}")
    return {k: g[k] for k in keys}


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


def save_checkpoint(obj, path):
    """Atomic: write a temp file in the same directory, then os.replace (never a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True (a checkpoint can't run code); loud error when missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found: fix the path, or train one "
                                "first (tokenizer.py / train.py write out_dir/ckpt.pt)")
    return torch.load(path, map_location=map_location, weights_only=True)
