"""What a run writes down besides checkpoints: the metrics log and the best checkpoint."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint import read_meta, save_checkpoint
from ..config import RunConfig
from ..figures import plot_loss
from ..files import atomic_write_csv


class MetricsLog:
    """``metrics.csv`` and ``loss.png`` (always) and TensorBoard (when installed), on rank 0.

    A resumed run keeps the rows up to the step it resumes at, in both: TensorBoard is told to
    drop the events after it (``purge_step``), which a run stopped after its last checkpoint
    had logged and the resumed run logs again.
    """

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                self.rows = [
                    {k: float(v) for k, v in r.items() if v not in ("", None)}
                    for r in csv.DictReader(f)
                ]
            self.rows = [r for r in self.rows if r.get("step", 0) <= resume_step]
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        except Exception:  # tensorboard not installed: CSV only
            self._tb = None

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(row["step"]))

    def flush(self, plot: bool = True) -> None:
        """Rewrite metrics.csv and, with ``plot``, loss.png (atomically) and flush TensorBoard."""
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        atomic_write_csv(self.path, keys, ({k: _fmt(v) for k, v in r.items()} for r in self.rows))
        if self._tb is not None:
            self._tb.flush()
        if plot:
            plot_loss(self.rows, self.path.parent / "loss.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:.6g}"


class BestCheckpoint:
    """``RUN_DIR/best.safetensors`` (+ .json): the weights with the highest ``metric`` so far.

    A resumed run starts from the score of the best the run kept before.
    """

    def __init__(self, run_dir: Path, metric: str, *, resume: bool):
        self.run_dir, self.metric = run_dir, metric
        self.value: float | None = None
        self.path: Path | None = None
        best = run_dir / "best.safetensors"
        if resume and best.is_file() and best.with_suffix(".json").is_file():
            value = read_meta(best).metrics.get(metric)
            if value is not None:
                self.value, self.path = float(value), best

    def offer(
        self,
        row: dict[str, float],
        model: nn.Module,
        cfg: RunConfig,
        step: int,
        kind: str,
        extra: dict[str, Any] | None,
    ) -> bool:
        """Keep ``model`` as the best when ``row[metric]`` beats the best so far."""
        value = row.get(self.metric)
        if value is None or (self.value is not None and value <= self.value):
            return False
        tmp_dir = self.run_dir / ".best"
        path = save_checkpoint(tmp_dir, model, cfg, step, kind=kind, extra=extra, metrics=row)
        best = self.run_dir / "best.safetensors"
        shutil.move(str(path), best)
        shutil.move(str(path.with_suffix(".json")), best.with_suffix(".json"))
        shutil.rmtree(tmp_dir, ignore_errors=True)
        self.value, self.path = float(value), best
        return True
