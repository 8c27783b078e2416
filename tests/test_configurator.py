"""configurator.py: overrides, config files, clear errors, atomic checkpoints."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure, load_checkpoint, save_checkpoint  # noqa: E402


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
