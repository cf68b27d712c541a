"""The one training loop: pretraining and fine-tuning, CLI, Python API and napari widgets.

:func:`fit` has the shape of nanoGPT's ``train.py``: prepare the state (model on the device,
optimiser, resume, DDP, precision), then ``while step < steps``: set the learning rate, one
train step (accumulation, autocast, clipping, optimiser, the model's after-step hook such as
GL-MAE's EMA teacher), log (:class:`~.records.MetricsLog`, validation and
:class:`~.records.BestCheckpoint`), checkpoint. The user contract: a ``progress`` callback
receiving plain dicts and a ``cancel`` flag checked after each step and, in a single
process from the second step on, inside it (:class:`~maesil_core.progress.CancelHooks`: a
step cancelled half-way is dropped, the run stops at the last whole step). What a step
computes is the task's business: ``loss_fn(model, batch) -> (loss, logs)``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
)
from ..config import RunConfig, TrainConfig
from ..errors import Cancelled, CheckpointError, ConfigError
from ..files import atomic_write_text
from ..progress import CancelFlag, CancelHooks, ProgressFn, cancel_fn
from ..resume_state import load_resume_state
from ..threads import torch_threads
from . import distributed as D
from .optim import autocast_dtype, lr_at, make_optimizer, set_lr
from .records import BestCheckpoint, MetricsLog
from .seeding import resume_rng, rng_state, seed_everything, set_rng_state

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[nn.Module], dict[str, float]]

__all__ = ["FitResult", "autocast_dtype", "fit", "lr_at", "make_optimizer", "pretrain_loss"]


@dataclass
class FitResult:
    """What a finished (or cancelled) run leaves behind."""

    run_dir: Path
    checkpoint: Path | None
    step: int
    cancelled: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None


def pretrain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Loss of a pretraining model on ``batch["image"]`` (B, C, D, H, W), leaving out the
    padding marked by ``batch["valid"]`` (B, 1, D, H, W) when the batch has it."""
    valid = batch.get("valid")
    out = model(batch["image"]) if valid is None else model(batch["image"], valid=valid)
    return out.loss, dict(out.logs)


def has_trained_buffers(model: nn.Module) -> bool:
    """True when the model has persistent buffers, which training may change (VQ-VAE's EMA
    codebook); non-persistent ones (position embeddings) are constants derived from the
    config."""
    saved = set(model.state_dict())
    return any(name in saved for name, _ in model.named_buffers())


def after_optimizer_step(model: nn.Module) -> None:
    """Call the model's ``after_optimizer_step()`` if it has one (GL-MAE: the EMA teacher
    follows the student once per optimiser step, whatever the accumulation)."""
    hook = getattr(model, "after_optimizer_step", None)
    if hook is not None:
        hook()


class StepUndo:
    """What a step changes before its optimiser step, taken before the step so a step
    cancelled half-way (:class:`~maesil_core.progress.CancelHooks`) leaves no trace: the
    random streams (masks drawn in the forward), the trained buffers (VQ-VAE's codebook,
    batch-norm statistics: a forward changes them), the learning rate set for the step and
    the gradients (dropped). The weights and the optimiser state are untouched until
    ``optimizer.step()``, which such a step never reaches; so the checkpoint written on
    cancel is the one a cancel between steps writes after the last whole step (weights,
    optimiser and random state alike), and resumes as exactly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.rng = rng_state()
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        saved = set(model.state_dict())
        self.buffers = {
            name: b.detach().clone() for name, b in model.named_buffers() if name in saved
        }

    def undo(self, state: TrainState) -> None:
        set_rng_state(self.rng)
        named = dict(state.model.named_buffers())
        with torch.no_grad():
            for name, value in self.buffers.items():
                named[name].copy_(value)
        state.optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(state.optimizer.param_groups, self.lrs):
            group["lr"] = lr


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything a step changes or needs: the model (bare and as trained: DDP / compiled),
    its optimiser, the step, the device, the ranks and the autocast dtype (None: fp32)."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    start_step: int
    device: torch.device
    dist: D.DistInfo
    amp_dtype: torch.dtype | None
    last_checkpoint: Path | None = None


def prepare_state(
    model: nn.Module, cfg: RunConfig, run_dir: Path, *, resume: bool, device: torch.device
) -> TrainState:
    """Model on the device, optimiser, and for ``resume`` the newest checkpoint's weights,
    optimiser state, step (from its metadata) and random streams; then DDP / compile."""
    tc = cfg.train
    amp_dtype = autocast_dtype(tc, device)  # a precision the device lacks: refused first
    dist = D.init_distributed(device)
    model = model.to(device)
    optimizer = make_optimizer(model, tc, device)
    start_step, last = 0, None
    if resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(
                f"`resume`: {run_dir} has no checkpoint to resume from; start without `resume`.",
                option="resume",
            )
        ckpt = load_checkpoint(found[-1])
        load_weights(model, ckpt.state_dict, str(ckpt.path))
        saved = load_resume_state(ckpt.path)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        rng = saved.get("rng") if saved is not None else None
        start_step, last = ckpt.step, ckpt.path  # the step from the metadata
        resume_rng(rng, tc.seed, dist.rank, dist.world_size, start_step)
    else:
        seed_everything(tc.seed + dist.rank)

    train_model: nn.Module = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # constant buffers (position embeddings) need no broadcast before every forward;
            # a model whose training changes its buffers (VQ-VAE's EMA codebook) keeps it
            broadcast_buffers=has_trained_buffers(model),
        )
    if tc.compile:
        train_model = torch.compile(train_model)
    return TrainState(
        model, train_model, optimizer, start_step, start_step, device, dist, amp_dtype, last
    )


# --------------------------------------------------------------------------- one step


def train_step(
    state: TrainState, batches: Iterator[dict[str, Any]], loss_fn: LossFn, tc: TrainConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``tc.accum_steps`` micro-batches forward and backward (gradients synchronised across
    ranks on the last one only), clipping, the optimiser step and the after-step hook.

    Returns the summed loss of the micro-batches (a device tensor: no sync per step) and the
    last micro-batch's logs (tensors are read at log time).
    """
    loss_sum = torch.zeros((), device=state.device)
    logs: dict[str, Any] = {}
    for micro in range(tc.accum_steps):
        batch = {
            k: v.to(state.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in next(batches).items()
        }
        sync = micro == tc.accum_steps - 1 or not state.dist.enabled
        no_sync = state.train_model.no_sync() if not sync else contextlib.nullcontext()
        amp = state.amp_dtype
        with (
            no_sync,
            torch.autocast(state.device.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            loss, logs = loss_fn(state.train_model, batch)
            (loss / tc.accum_steps).backward()
        loss_sum = loss_sum + loss.detach().float()
    if tc.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
        logs = {**logs, "grad_norm": grad_norm.detach()}
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    after_optimizer_step(state.model)
    state.step += 1
    return loss_sum, logs


class LossWindow:
    """Mean loss and throughput since the last log row (summed on the device, read once)."""

    def __init__(self, volumes_per_step: int, peak_lr: float):
        self.volumes_per_step, self.peak_lr = volumes_per_step, peak_lr
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.steps, self.loss_sum, self.losses = now, 0, 0.0, 0

    def add(self, loss_sum: torch.Tensor, losses: int) -> None:
        self.loss_sum = self.loss_sum + loss_sum
        self.losses += losses
        self.steps += 1

    def row(self, step: int, lr: float, now: float, device: torch.device) -> dict[str, float]:
        """``{"step", "loss", "lr", "volumes_per_s"}``; a ConfigError naming the learning
        rate when the mean loss (across ranks) is not finite."""
        mean_loss = D.mean_across_ranks(float(self.loss_sum) / max(1, self.losses), device)
        if not math.isfinite(mean_loss):
            raise ConfigError(
                f"the loss became {mean_loss} by step {step}; lower `lr` (now "
                f"{self.peak_lr:g}) or check the input intensities.",
                option="lr",
            )
        elapsed = max(now - self.t0, 1e-9)
        vps = self.volumes_per_step * self.steps / elapsed
        return {"step": step, "loss": mean_loss, "lr": lr, "volumes_per_s": vps}

    def steps_per_s(self, now: float) -> float:
        return self.steps / max(now - self.t0, 1e-9)


# --------------------------------------------------------------------------- the loop


def _with_torch_threads(fn):
    """Run ``fit`` with ``cfg.train.threads`` torch threads on the CPU (0: auto, one per free
    core, :mod:`maesil_core.threads`), say how many in a ``prepare`` progress message, then
    restore them: an in-process caller (napari) keeps its own setting."""

    @functools.wraps(fn)
    def wrapper(model, batches, cfg, *args, **kwargs):
        device = kwargs.get("device") or D.select_device(cfg.train.device)
        with torch_threads(cfg.train.threads, device) as choice:
            progress = kwargs.get("progress")
            if choice is not None and progress is not None and not D.launched_by_torchrun():
                progress({"phase": "prepare", "message": f"computing with {choice.describe()}"})
            return fn(model, batches, cfg, *args, **kwargs)

    return wrapper


@_with_torch_threads
def fit(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    loss_fn: LossFn = pretrain_loss,
    kind: str = "pretrain",
    extra_meta: dict[str, Any] | None = None,
    evaluate: EvalFn | None = None,
    eval_every: int | None = None,
    best_metric: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFlag = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> FitResult:
    """Train ``model`` on ``batches`` (an endless iterator of dicts of CPU tensors).

    progress receives ``{"step", "steps", "loss", "lr", "volumes_per_s", "elapsed_s",
    "eta_s", "phase", ...logs}`` every ``log_every`` steps and at checkpoints / the end.
    ``evaluate(model) -> {"val_...": value}`` runs every ``eval_every`` steps (a row is
    logged there too) and at the last, on rank 0 (give it on every rank: the ranks log
    together); with ``best_metric`` the best-scoring weights are kept as ``best.safetensors``.
    """
    tc = cfg.train
    run_dir = Path(run_dir)
    is_cancelled = cancel_fn(cancel)

    # ---- prepare: state, logs, best checkpoint
    state = prepare_state(
        model, cfg, run_dir, resume=resume, device=device or D.select_device(tc.device)
    )
    main = state.dist.is_main
    log = MetricsLog(run_dir, state.start_step if resume else None) if main else None
    best = BestCheckpoint(run_dir, best_metric, resume=resume) if best_metric else None
    if main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    window = LossWindow(tc.batch_size * tc.accum_steps * state.dist.world_size, tc.lr)
    t_start = t_last_ckpt = time.perf_counter()
    last_row: dict[str, float] = {}

    def emit(info: dict[str, Any]) -> None:
        if progress is not None and main:
            progress(info)

    def checkpoint(metrics: dict[str, float], plot: bool = True) -> Path | None:
        path = None
        if main:
            path = save_checkpoint(
                run_dir,
                state.model,
                cfg,
                state.step,
                kind=kind,
                optimizer=state.optimizer,
                extra=extra_meta,
                metrics=metrics,
                rng=rng_state(),
            )
            prune_checkpoints(run_dir, tc.keep_checkpoints)
            log.flush(plot)
        D.barrier()
        return path

    def record(lr: float, now: float, logs: dict[str, Any]) -> dict[str, float]:
        """One log row (mean loss since the last), validation and the best checkpoint."""
        row = window.row(state.step, lr, now, state.device)
        row.update(elapsed_s=now - t_start, **{k: float(v) for k, v in logs.items()})
        due = eval_every and (state.step % eval_every == 0 or state.step == tc.steps)
        if evaluate is not None and due:
            state.model.eval()
            try:
                with torch.no_grad():
                    row.update(evaluate(state.model) if main else {})
            except Cancelled:  # inside validation: the row goes without it, the loop stops
                pass
            else:
                if best is not None and main:
                    best.offer(row, state.model, cfg, state.step, kind, extra_meta)
            state.model.train()
        if main:
            log.add(row)
        eta = (tc.steps - state.step) / max(window.steps_per_s(now), 1e-9)
        emit({**row, "steps": tc.steps, "eta_s": eta, "phase": "train"})
        window.reset(now)
        return row

    # ---- train
    cancelled = False
    state.model.train()
    # a cancel inside a step (and inside validation) in a single, uncompiled process;
    # when it lands there, the step is dropped (StepUndo) and the run stops at the last one
    inside = cancel is not None and not state.dist.enabled and not tc.compile
    hooks = CancelHooks(state.model, is_cancelled) if inside else None
    with hooks if hooks is not None else contextlib.nullcontext():
        while state.step < tc.steps:
            undo = None
            if hooks is not None:
                # the first step of a run (or of a resumed run) always ends, so a cancelled
                # run has a checkpoint of its own to resume from
                hooks.armed = state.step > state.start_step
                undo = StepUndo(state.model, state.optimizer) if hooks.armed else None
            lr = lr_at(state.step, tc)
            set_lr(state.optimizer, lr)
            try:
                loss_sum, logs = train_step(state, batches, loss_fn, tc)
            except Cancelled:
                if undo is None:  # not from the hooks (the loader, on a step they leave
                    raise  # alone): what it was before them, the run stops as cancelled
                undo.undo(state)
                if window.steps:  # the whole steps since the last log row
                    last_row = record(lr_at(state.step - 1, tc), time.perf_counter(), {})
                cancelled = True
                break
            window.add(loss_sum, tc.accum_steps)

            now = time.perf_counter()
            ckpt_due = state.step % tc.checkpoint_every == 0 or (
                tc.checkpoint_minutes > 0 and now - t_last_ckpt > 60 * tc.checkpoint_minutes
            )
            ckpt_due = D.any_rank(ckpt_due, state.device)
            eval_due = evaluate is not None and bool(eval_every) and state.step % eval_every == 0
            logged = (
                state.step % tc.log_every == 0 or state.step == tc.steps or ckpt_due or eval_due
            )
            if logged:
                last_row = record(lr, now, logs)
            # checked after the progress report, so a cancel asked for in a callback stops here
            if D.any_rank(is_cancelled(), state.device):
                if not logged:
                    last_row = record(lr, now, logs)
                cancelled = True
                break
            if ckpt_due and state.step < tc.steps:
                state.last_checkpoint = checkpoint(last_row)
                t_last_ckpt = time.perf_counter()
                emit(
                    {
                        **last_row,
                        "steps": tc.steps,
                        "phase": "checkpoint",
                        "checkpoint": str(state.last_checkpoint),
                    }
                )

    # ---- finish: the last checkpoint, the logs, the report
    if state.step > state.start_step or state.last_checkpoint is None:
        # stopped early: what a resume needs is written, not loss.png (0.15-0.5 s of
        # matplotlib that a Cancel would wait for; the command line draws it after, a
        # widget plots its own curve, the next checkpoint redraws it)
        state.last_checkpoint = checkpoint(last_row, plot=not cancelled)
    if main:
        log.close()
    emit(
        {
            **last_row,
            "step": state.step,
            "steps": tc.steps,
            "phase": "cancelled" if cancelled else "done",
            "checkpoint": str(state.last_checkpoint),
        }
    )
    history = list(log.rows) if log is not None else []
    best_path = best.path if best is not None else None
    return FitResult(run_dir, state.last_checkpoint, state.step, cancelled, history, best_path)
