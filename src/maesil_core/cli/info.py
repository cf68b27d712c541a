"""``maesil info``: describe a checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import add_command

EXAMPLES = """examples:
  maesil info runs/demo
  maesil info runs/seg                       # a segmentation run: its classes and settings
  maesil info runs/demo/checkpoints/step_000300.safetensors --json"""

#: pretraining-only rows left out for a segmentation checkpoint (its masking is unused)
_PRETRAIN_ONLY = ("mask",)

#: what the fields of a segmentation checkpoint's settings mean, in the order shown
_SEG_SETTINGS = {
    "roi": "training crop / window (voxels)",
    "feature_size": "decoder width",
    "layers": "encoder blocks to the decoder",
    "norm": "decoder normalisation",
    "freeze_encoder": "encoder frozen",
    "layer_decay": "layer-wise lr decay",
    "pos_weight": "crops on an organ : anywhere",
    "eval_every": "steps between validations",
    "overlap": "sliding-window overlap",
    "blend": "window blending",
    "sw_batch_size": "windows per forward pass",
    "largest_component": "largest component only",
    "body_mask": "inside the body only",
    "air_margin": "air around training scans (ROIs)",
}


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(x, (int, float)) for x in v):
            return " x ".join(f"{x:g}" for x in v)
        return ", ".join(str(x) for x in v)
    return "default" if v is None else str(v)


def _table(rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Rows of cells as aligned text lines (the last column left as it is)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _files(items: list[Any], limit: int = 5) -> list[str]:
    shown = [f"  {x}" for x in items[:limit]]
    if len(items) > limit:
        shown.append(f"  ... and {len(items) - limit} more")
    return shown


def format_info(info: dict[str, Any]) -> str:
    """``maesil info``'s text: the checkpoint's fields as aligned rows; for a segmentation
    run its classes as a table (id, name, source label ids) and its settings and training
    data as rows with their meaning, not as raw dicts."""
    seg = info.get("kind") == "segmentation"
    extra = dict(info.get("extra") or {})
    plain = {
        k: v
        for k, v in info.items()
        if k not in ("metrics", "extra") and not (seg and k in _PRETRAIN_ONLY)
    }
    if isinstance(plain.get("hu_window"), (list, tuple)) and len(plain["hu_window"]) == 2:
        plain["hu_window"] = "{:g} .. {:g} HU".format(*plain["hu_window"])
    width = max(len(k) for k in plain)
    lines = [f"{k.ljust(width)}  {_value(v)}" for k, v in plain.items()]
    metrics = info.get("metrics") or {}
    if metrics:
        lines.append(
            f"{'metrics'.ljust(width)}  "
            + ", ".join(f"{k} {_value(v)}" for k, v in metrics.items() if k != "step")
        )
    labels = extra.pop("labels", None)
    if isinstance(labels, dict) and labels.get("classes"):
        lines += ["", "classes"]
        rows = [("id", "name", "from source label ids")]
        for c in labels["classes"]:
            src = ", ".join(str(s) for s in c.get("source_ids", []))
            rows.append((str(c.get("id")), str(c.get("name")), src))
        lines += _table(rows)
    settings = extra.pop("segmentation", None)
    if isinstance(settings, dict):
        lines += ["", "segmentation settings"]
        keys = [k for k in _SEG_SETTINGS if k in settings]
        keys += [k for k in settings if k not in _SEG_SETTINGS and k != "neg_weight"]
        rows = []
        for k in keys:
            v = settings[k]
            if k == "roi" and v is None:
                v = "the superpatch"
            if k == "pos_weight":
                v = f"{_value(v)} : {_value(settings.get('neg_weight', 1.0))}"
            rows.append((k, _SEG_SETTINGS.get(k, ""), _value(v)))
        lines += _table(rows)
    if extra:
        lines += ["", "training"]
        for k, v in extra.items():
            if isinstance(v, list):
                lines.append(f"  {k}: {len(v)}")
                lines += ["  " + s for s in _files(v)]
            elif isinstance(v, dict):
                lines.append(f"  {k}:")
                lines += _table([(str(a), _value(b)) for a, b in v.items()], indent="    ")
            else:
                lines.append(f"  {k}: {_value(v)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .. import api

    info = api.describe_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(format_info(info))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "info", "describe a checkpoint", run, EXAMPLES)
    p.add_argument("checkpoint", help="run directory or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")
