"""Run under torchrun by tests/test_safety.py: resume RUN with ``api.pretrain`` and save,
per rank, the torch RNG state at the first training forward (what the masks are drawn
from) as OUT/rank<r>.npy. Not a test itself."""

import os
import sys
from pathlib import Path

import numpy as np
import torch

import maesil_core.models as models
from maesil_core import api
from maesil_core.config import preset

run, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
build = models.build_model


def build_and_probe(cfg):
    model = build(cfg)

    def first_forward(module, args):
        rank = int(os.environ.get("RANK", "0"))
        target = out / f"rank{rank}.npy"
        if not target.exists():
            np.save(target, torch.get_rng_state().numpy())

    model.register_forward_pre_hook(first_forward)
    return model


models.build_model = build_and_probe
cfg = preset("smoke").override("train", steps=steps)
result = api.pretrain(None, run, cfg, resume=True)
assert result.step == steps, result
