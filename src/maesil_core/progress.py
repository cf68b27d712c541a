"""How a long job reports and stops, the same for the CLI, the Python API and napari.

A job (``api.pretrain``, ``segmentation.finetune``, ``segment``, ...) takes ``progress``, a
callable receiving plain dicts (``{"phase", "step", "steps", "loss", ...}``), and ``cancel``,
a callable returning True or a :class:`threading.Event`, checked between units of work
(a training step, a batch of windows, a slab of a volume) and, through
:class:`CancelHooks`, between the modules of a model's forward and backward pass.
Nothing here touches Qt (nor imports torch: the hooks only call a model's methods).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .errors import Cancelled

#: receives one plain dict per report (never blocks for long: it runs in the job's thread)
ProgressFn = Callable[[dict[str, Any]], None]
#: "stop after this unit of work": a callable, an Event, or None (never)
CancelFlag = Callable[[], bool] | threading.Event | None


def cancel_fn(cancel: CancelFlag) -> Callable[[], bool]:
    """``cancel`` as a plain ``() -> bool``."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return lambda: bool(cancel())


def stop_fn(cancel: CancelFlag) -> Callable[[], None]:
    """``check()`` that raises :class:`~maesil_core.errors.Cancelled` once ``cancel`` is set:
    what a loop over the slabs of a volume calls between slabs."""
    is_cancelled = cancel_fn(cancel)

    def check() -> None:
        if is_cancelled():
            raise Cancelled()

    return check


class CancelHooks:
    """A cancel that lands inside a model's forward and backward pass, not only between steps.

    While installed (``with CancelHooks(model, cancel):``), a forward pre-hook on every
    submodule raises :class:`~maesil_core.errors.Cancelled` before the module runs once
    ``cancel`` is set, and each submodule's output that needs a gradient gets a tensor hook
    that raises it before that module's part of the backward pass. One window or training
    step of a large model at a busy CPU takes seconds; a module takes a fraction of that.
    ``armed`` False lets the model run to its end (nothing raised). The hooks are removed on
    leaving the block. Not for a ``torch.compile``d model (the check would be traced) nor
    under DDP (one rank stopping mid-step leaves the others waiting in a collective).

    Whoever catches the Cancelled owns the half-done work: a training step's gradients are
    partial and the optimiser has not stepped (``train.loop`` drops them).
    """

    def __init__(self, model: Any, cancel: CancelFlag) -> None:
        self.model = model
        self.is_cancelled = cancel_fn(cancel)
        self.armed = True
        self._handles: list[Any] = []

    def check(self, *_: Any) -> None:
        """Raise Cancelled when armed and the flag is set (the hooks' body)."""
        if self.armed and self.is_cancelled():
            raise Cancelled()

    def _after_forward(self, _module: Any, _args: Any, output: Any) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        for out in outputs:
            if getattr(out, "requires_grad", False) and hasattr(out, "register_hook"):
                out.register_hook(self._in_backward)

    def _in_backward(self, grad: Any) -> None:
        self.check()
        return None

    def __enter__(self) -> CancelHooks:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self.check))
            self._handles.append(module.register_forward_hook(self._after_forward))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
