"""``maesil info``: describe a checkpoint."""

from __future__ import annotations

import argparse
import json

from .common import add_command

EXAMPLES = """examples:
  maesil info runs/demo
  maesil info runs/demo/checkpoints/step_000300.safetensors --json"""


def run(args: argparse.Namespace) -> int:
    from .. import api

    info = api.describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            if not value:
                continue
            value = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
            )
        print(f"{key.ljust(width)}  {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "info", "describe a checkpoint", run, EXAMPLES)
    p.add_argument("checkpoint", help="run directory or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")
