"""
Where a training step's time goes: train.py logs ms per step spent in each of PHASES (ms_data,
ms_forward, ms_loss, ms_backward, ms_optimizer beside ms_per_iter).

    timer = StepTimer(cuda=device_type == "cuda")
    timer.start(on=True); ...; timer.lap("data"); ...; timer.lap("forward"); ...
    split = timer.pop()          # {phase: ms per measured step} since the last pop

The phases are disjoint laps of one clock. "data" is loading the batch (on the fly: reading the
images and running the tokenizer's encoder too); "loss" is the fused loss's whole cost, since it
computes its gradients chunk by chunk in its forward (snce.fused_linear_snce_levels); "backward"
is the transformer's, DDP's all-reduce included; "optimizer" is clipping, AdamW and the EMA.
"""

import time

import torch

PHASES = ("data", "forward", "loss", "backward", "optimizer")


class StepTimer:
    """Wall time per phase of a training step, summed over the steps it measured. CUDA runs
    asynchronously, so a phase boundary must synchronize the device: train.py measures only the
    logged steps on CUDA (start(on=False) elsewhere costs nothing), every step on the CPU."""

    def __init__(self, cuda=False):
        self.cuda = cuda
        self.ms, self.steps, self.on = dict.fromkeys(PHASES, 0.0), 0, False

    def start(self, on):
        self.on = on
        self.steps += on
        self.t = self.now()

    def now(self):
        if self.on and self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase):
        if self.on:
            t = self.now()
            self.ms[phase] += 1000 * (t - self.t)
            self.t = t

    def pop(self):
        """-> {phase: ms per measured step} since the last pop."""
        out = {k: v / max(1, self.steps) for k, v in self.ms.items()}
        self.ms, self.steps = dict.fromkeys(PHASES, 0.0), 0
        return out
