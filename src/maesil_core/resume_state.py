"""The state a ``--resume`` needs beyond the weights, stored without pickle.

``step_N.state.safetensors`` beside ``step_N.safetensors`` holds the optimiser's moment
tensors and the RNG states as tensors, and everything else (the step, the optimiser's
param groups and scalars, Python's random state, the layout) as JSON in the safetensors
header. Reading it runs no code: ``safetensors`` gives the tensors and ``json`` the rest.

A state file of the old format (``step_N.state.pt``, a pickle) is never opened: a resume
that finds one without a new-format state file beside it is refused with the fix, since
unpickling a file from someone else's run directory can run any code.

The codec (:func:`split` / :func:`join`) turns a nested structure of dicts, lists, tuples,
tensors, NumPy arrays and JSON scalars into flat tensors plus a JSON tree that refers to
them, and back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import atomic_write

FORMAT = "maesil-resume-state"
FORMAT_VERSION = 1
SUFFIX = ".state.safetensors"  #: beside step_N.safetensors
OLD_SUFFIX = ".state.pt"  #: the pickle of versions up to 0.1.0: refused, never opened
_HEADER = "maesil-resume-state"


def state_path(weights: Path) -> Path:
    """``.../step_N.safetensors`` -> ``.../step_N.state.safetensors``."""
    return Path(weights).with_suffix(SUFFIX)


# --------------------------------------------------------------------------- codec


def split(obj: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """A JSON-able tree for ``obj``; its tensors and arrays go into ``tensors`` under their
    path in the tree (``{"__tensor__": key}`` / ``{"__ndarray__": key, "dtype": ...}``);
    tuples become ``{"__tuple__": [...]}`` and dicts with non-string keys
    ``{"__items__": [[k, v], ...]}``."""
    if torch.is_tensor(obj):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):  # NumPy's RNG keys (uint32): stored as int64, exactly
        if obj.dtype.kind not in "iub":
            raise TypeError(f"only integer arrays are stored, got {obj.dtype} at {key}")
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [split(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: split(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, split(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {key or 'the top'}")


def join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split`. KeyError / TypeError / ValueError on a malformed tree."""
    if isinstance(tree, list):
        return [join(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy().astype(np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(join(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_key(k): join(v, tensors) for k, v in tree["__items__"]}
    return {k: join(v, tensors) for k, v in tree.items()}


def _key(k: Any) -> Any:
    if isinstance(k, list):  # a tuple key went through JSON as a list
        return tuple(k)
    return k


# --------------------------------------------------------------------------- files


def save_resume_state(weights: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (``{"step", "optimizer": optimizer.state_dict(), "rng": {...}}``)
    beside ``weights``, atomically; return its path."""
    tensors: dict[str, torch.Tensor] = {}
    tree = split(state, tensors)
    header = {
        _HEADER: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "state": tree})
    }
    path = state_path(weights)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def load_resume_state(weights: Path) -> dict[str, Any] | None:
    """The state saved beside ``weights``, or None when there is none.

    Loads with safetensors and JSON only. CheckpointError when the file is corrupt or when
    only an old-format pickle (``.state.pt``) is there: it is never unpickled.
    """
    path = state_path(weights)
    old = Path(weights).with_suffix(OLD_SUFFIX)
    if not path.is_file():
        if old.is_file():
            raise CheckpointError(
                f"{old} is a resume state in the old pickle format, which this maesil never "
                "opens (unpickling a file can run any code); delete it to resume from the "
                "weights alone (the optimiser restarts its moments), or finish the run with "
                "the version that wrote it."
            )
        return None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_HEADER])
        if header.get("format") != FORMAT or int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format {header.get('format')} v{header.get('format_version')}")
        state = join(header["state"], tensors)
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError("no optimiser state")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is corrupt ({exc}); delete it to resume from the weights alone."
        ) from exc
    return state
