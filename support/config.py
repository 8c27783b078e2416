"""
Config of the scripts (nanoGPT's configurator idea, with clear errors). In a script, right after
its block of module-level config globals,

    config = configure(globals())        # python script.py config/foo.py --lr=3e-4 --compile=False

Config keys are the script's globals with plain values (int/float/bool/str/None/tuple/list), except
_private names and UPPER_CASE constants. Positional arguments are config files (python, exec'd;
only assignments to existing keys allowed); `--key=value` overrides are parsed with
ast.literal_eval and fall back to the raw string. Unknown keys and values whose type does not
match the default (int is accepted for float; a None default accepts anything) fail with a
message listing the valid keys; an error inside a config file names the file and line ("config/x.py
line 3: NameError: ..."). check_range / check_choice validate values; config_diff + check_resume
refuse a resume whose config differs from the checkpoint's where it must not.
Tests: python -m pytest -q tests/test_common.py
"""

import ast
import math
import os
import sys

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
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r} ({where}): expected a finite number, got {value!r}")
    if want in (tuple, list):
        value = want(value)
    return value


def _run_config_file(path):
    """exec a config file -> the names it set. Compiled under its own name, so an error in it
    reads "config/x.py line 3: NameError: ..." (and its traceback names the file too)."""
    scope = {}
    try:
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, {}, scope)
    except SyntaxError as e:
        raise ValueError(f"{path} line {e.lineno}: SyntaxError: {e.msg}"
                         + (f": {e.text.strip()}" if e.text else "")) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e}); expected python assignments "
                         "like `max_iters = 1000`") from e
    except Exception as e:
        tb, line = e.__traceback__, "?"
        while tb is not None:  # the innermost frame of the config file itself
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        raise ValueError(f"{path} line {line}: {type(e).__name__}: {e}") from e
    return scope


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the globals dict g. Returns the snapshot
    and records which keys were set explicitly in g's `_explicit` (see `explicit`)."""
    argv = sys.argv[1:] if argv is None else argv
    keys = _config_keys(g)
    given = set()
    for arg in argv:
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} not found (expected a path like config/x.py "
                                 "or an override like --key=value)")
            scope = _run_config_file(arg)
            for k, v in scope.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(sys)):
                    g[k] = _check(k, v, g, keys, f"in {arg}")
                    given.add(k)
        else:
            key, eq, raw = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"override {arg!r} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare string such as --dataset=mnist
            g[key] = _check(key, value, g, keys, f"from {arg}")
            given.add(key)
    g["_explicit"] = frozenset(given)
    return {k: g[k] for k in keys}


def check_choice(config, key, allowed):
    """Raise unless config[key] is one of allowed."""
    if config[key] not in allowed:
        raise ValueError(f"config key {key!r}: expected one of {tuple(allowed)}, got {config[key]!r}")


def check_range(config, key, lo=None, hi=None, lo_open=False, hi_open=False):
    """Raise unless lo <= config[key] <= hi (strict where *_open); None = unbounded."""
    v = config[key]
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
          (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb = "-inf" if lo is None else f"{lo}"
        ub = "inf" if hi is None else f"{hi}"
        rng = f"{'(' if lo_open or lo is None else '['}{lb}, {ub}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"config key {key!r}: expected a value in {rng}, got {v!r}")


def warn_ignored(config, explicit, keys, why):
    """Print a warning for keys set explicitly (config file or --key=) that the run ignores."""
    unused = [k for k in keys if k in explicit]
    if unused:
        print(f"warning: {', '.join(f'{k}={config[k]!r}' for k in unused)} ignored: {why}")
    return unused


def config_diff(saved, now, keys):
    """{key: (saved, now)} for the keys whose values differ (missing counts as None)."""
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def check_resume(path, diff, what="config"):
    """Raise if a resume would continue a run with an incompatible config."""
    if diff:
        raise ValueError(f"init_from=resume: {path} is incompatible with this {what} "
                         f"(key: (checkpoint, now)): {diff}")
