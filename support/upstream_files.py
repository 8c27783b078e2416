"""
Reading upstream checkpoint files safely: `read_checkpoint` (weights_only, with inert stand-ins
for pickled Lightning / argparse objects, so reading a file never runs its code) and
`select_weights` (the EMA set when complete, else the main weights). Shared by the pretrained
VQ loader (support/pretrained.py) and the LFQ loader (support/implicit_arch.py).
"""

import torch

from support.common import load_checkpoint


def read_checkpoint(path, what="tokenizer checkpoint", verbose=True):
    """torch.load with weights_only=True. Lightning / argparse objects pickled beside the weights
    (hyper-parameters, loop state) are swapped for inert placeholder classes registered under
    their names with torch.serialization.safe_globals: the file's own classes and functions are
    never imported or called, so reading it cannot run code. An object the safe unpickler can't
    stand in for (e.g. a dict subclass) is an error that says how to extract the weights."""
    try:
        return load_checkpoint(path, map_location="cpu", what=what)
    except ValueError as e:
        first = e
    try:  # lists the GLOBALs the pickle references, without executing anything
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        raise first from None
    if not names:
        raise first
    stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {"pickled_as": n}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{what} {path!r} pickles Python objects ({', '.join(names)}) that cannot be read "
            f"safely ({type(e).__name__}: {str(e).splitlines()[0]}). If you trust the file, extract "
            "its weights once: python -c \"import torch; ck = torch.load('IN', weights_only=False); "
            "torch.save({k: ck[k] for k in ('state_dict', 'model', 'ema') if k in ck}, 'OUT')\"") from None
    if verbose:
        print(f"{path}: read with {len(names)} pickled Python type(s) left as inert placeholders "
              f"(not needed, no code run): {', '.join(names)}")
    return ck


class _Inert:
    """Stands in for a class or function pickled in a checkpoint: keeps the arguments and state
    it is given, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# keys an upstream file holds beside the tokenizer's own: IBQ's loss modules (discriminator,
# LPIPS) and EMA bookkeeping; LlamaGen's codebook-usage counter (training statistics)
IGNORED_PREFIXES = {"ibq": ("loss.", "model_ema."), "llamagen": ("quantize.codebook_used",)}


def select_weights(ck, names, family):
    """-> (state dict over `names`, "ema" | "main", a sentence saying why). The EMA set when it is
    complete: IBQ's `model_ema.<name without dots>` entries of the same state dict; LlamaGen's
    "ema" entry. Otherwise the main weights."""
    if "state_dict" in ck:   # Lightning (IBQ, and Emu3.5's file when wrapped)
        main = ck["state_dict"]
        flat = {n: "model_ema." + n.replace(".", "") for n in names}
        if len(set(flat.values())) != len(flat):
            raise ValueError("two parameter names collide once their dots are removed: cannot "
                             "tell the EMA weights apart")
        ema = {n: main[k] for n, k in flat.items() if k in main}
        where = "model_ema.*"
    elif "model" in ck:      # LlamaGen
        main, src = ck["model"], ck.get("ema") or {}
        ema = {n: src[n] for n in names if n in src}
        where = '"ema"'
    else:                    # a bare state dict
        main, ema, where = ck, {}, ""
    if len(ema) == len(names):
        return ema, "ema", f"loaded the EMA weights ({where}, all {len(names)} tensors)"
    missing = [n for n in names if n not in main]
    if missing:
        raise ValueError(f"{family} checkpoint lacks {len(missing)} of the {len(names)} tokenizer "
                         f"tensors (e.g. {missing[:3]}); EMA set: {len(ema)} of {len(names)}")
    why = (f"the EMA set is incomplete ({len(ema)} of {len(names)} tensors in {where})" if ema
           else "the file has no EMA weights")
    return {n: main[n] for n in names}, "main", f"loaded the main weights: {why}"
