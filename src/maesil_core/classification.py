"""Classification fine-tuning on a pretrained ViT encoder (as VIS-MAE does for classification).

The task is derived from a label map, so any labelled CT gives one: for each superpatch crop,
is organ k present (at least ``min_voxels`` voxels of label id k)? That is a multi-label
binary problem over ``organs`` (one output per organ id), scored by accuracy (threshold 0.5)
and AUROC (MONAI ``compute_roc_auc``) on crops of held-out volumes.

:func:`finetune_classifier` is the Python API: build the
:class:`~maesil_core.models.classifier.EncoderClassifier` from a checkpoint (or from scratch),
cut crops from labelled (image, label map) pairs, fine-tune with the project's training loop,
score on the test pairs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .config import RunConfig, preset
from .errors import ConfigError, DataError
from .models.classifier import EncoderClassifier
from .segmentation.data import load_pair
from .train import fit

# --------------------------------------------------------------------------- data


def organ_presence(label_crop: np.ndarray, organs: Sequence[int], min_voxels: int) -> np.ndarray:
    """(K,) float32: 1.0 where organ id k has at least ``min_voxels`` voxels in the crop."""
    return np.array(
        [float((label_crop == k).sum() >= min_voxels) for k in organs], dtype=np.float32
    )


def _cases(pairs: Sequence[tuple[Any, Any]], cfg: RunConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (D, H, W) in [0, 1], label ids (D, H, W)) on the model grid, labels resampled
    onto the image in world coordinates where their grids differ."""
    from .data.io import Volume
    from .data.transforms import inference_transforms

    transform = inference_transforms(cfg.data)
    out = []
    for image, label in pairs:
        img, lab = load_pair(image, label, resample=True)
        d = transform({"image": img, "label": Volume(lab.array, img.affine, lab.path, False)})
        im = np.asarray(torch.as_tensor(d["image"]).as_subclass(torch.Tensor))[0]
        lb = np.rint(np.asarray(torch.as_tensor(d["label"]).as_subclass(torch.Tensor))[0])
        out.append((im.astype(np.float32), lb.astype(np.int32)))
    return out


def _pad_to(a: np.ndarray, size: Sequence[int]) -> np.ndarray:
    return np.pad(a, [(0, max(0, s - n)) for n, s in zip(a.shape, size)])


def random_crops(cases, size, n: int, organs, min_voxels: int, seed: int):
    """n random crops over the cases: (images (n, 1, *size), targets (n, K))."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        im, lb = cases[i % len(cases)]
        im, lb = _pad_to(im, size), _pad_to(lb, size)
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(im.shape, size)]
        sl = tuple(slice(a, a + c) for a, c in zip(start, size))
        xs.append(im[sl])
        ys.append(organ_presence(lb[sl], organs, min_voxels))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


def grid_crops(cases, size, organs, min_voxels: int, stride_frac: float = 0.5):
    """Every crop on a regular grid (stride = size * stride_frac) of every case, for testing."""
    xs, ys = [], []
    for im, lb in cases:
        im, lb = _pad_to(im, size), _pad_to(lb, size)
        steps = [max(1, int(c * stride_frac)) for c in size]
        ranges = [range(0, s - c + 1, st) for s, c, st in zip(im.shape, size, steps)]
        for a in ranges[0]:
            for b in ranges[1]:
                for c in ranges[2]:
                    sl = (slice(a, a + size[0]), slice(b, b + size[1]), slice(c, c + size[2]))
                    xs.append(im[sl])
                    ys.append(organ_presence(lb[sl], organs, min_voxels))
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))


# --------------------------------------------------------------------------- API


@dataclasses.dataclass
class ClassificationResult:
    """Scores on the test crops; per organ id and averaged over organs with both classes."""

    accuracy: float
    auroc: float
    per_organ: dict[int, dict[str, float]]
    n_train: int
    n_test: int
    checkpoint: Path | None
    pretrained_from: str | None


def _auroc(scores: np.ndarray, target: np.ndarray) -> float:
    if target.min() == target.max():
        return float("nan")  # one class only: AUROC undefined
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(target)))


def finetune_classifier(
    train: Sequence[tuple[Any, Any]],
    test: Sequence[tuple[Any, Any]],
    organs: Sequence[int],
    run_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    cfg: RunConfig | None = None,
    steps: int = 100,
    batch_size: int = 4,
    lr: float = 5e-4,
    train_crops: int = 64,
    min_voxels: int = 50,
    seed: int = 0,
    progress=None,
    cancel=None,
) -> ClassificationResult:
    """Fine-tune an organ-present classifier; ``checkpoint`` (a pretraining run) or from scratch.

    ``train`` / ``test``: (image, label map) pairs (paths or Volumes). The model config and
    preprocessing come from the checkpoint (else ``cfg`` or the tiny preset).
    """
    organs = [int(k) for k in organs]
    if not organs:
        raise ConfigError("give at least one organ label id to classify.")
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    base = ckpt.config if ckpt is not None else (cfg or preset("tiny"))
    run = dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=min(base.train.warmup_steps, max(1, steps // 10)),
            checkpoint_every=steps,
            log_every=max(1, min(10, steps // 5)),
            seed=seed,
        ),
    )
    model_cfg = dataclasses.replace(run.model)
    torch.manual_seed(seed)
    model = EncoderClassifier(model_cfg, len(organs))
    if ckpt is not None:
        model.load_encoder(ckpt.state_dict, str(ckpt.path))

    size = tuple(model_cfg.superpatch)
    tr_cases, te_cases = _cases(train, run), _cases(test, run)
    x_tr, y_tr = random_crops(tr_cases, size, train_crops, organs, min_voxels, seed)
    x_te, y_te = grid_crops(te_cases, size, organs, min_voxels)
    if len(x_te) == 0:
        raise DataError("the test volumes give no crop; they are smaller than the superpatch.")
    pos = y_tr.mean(0).clamp(0.05, 0.95)
    pos_weight = (1 - pos) / pos  # balance rare organs

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(x_tr), generator=g).split(batch_size):
                if len(idx) == batch_size:
                    yield {"image": x_tr[idx], "label": y_tr[idx]}

    def loss_fn(m, batch):
        logits = m(batch["image"])
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), batch["label"].float(), pos_weight=pos_weight.to(logits.device)
        )
        return loss, {}

    res = fit(
        model,
        batches(),
        run,
        run_dir,
        loss_fn=loss_fn,
        kind="classification",
        extra_meta={"organs": organs, "pretrained_from": str(ckpt.path) if ckpt else None},
        progress=progress,
        cancel=cancel,
    )
    model.eval().cpu()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(x_te[i : i + 8])) for i in range(0, len(x_te), 8)])
    p, t = probs.numpy(), y_te.numpy()
    per = {}
    for k, organ in enumerate(organs):
        per[organ] = {
            "accuracy": float(((p[:, k] >= 0.5) == (t[:, k] > 0.5)).mean()),
            "auroc": _auroc(p[:, k], t[:, k]),
            "positives": float(t[:, k].sum()),
        }
    aurocs = [v["auroc"] for v in per.values() if not math.isnan(v["auroc"])]
    return ClassificationResult(
        accuracy=float(np.mean([v["accuracy"] for v in per.values()])),
        auroc=float(np.mean(aurocs)) if aurocs else float("nan"),
        per_organ=per,
        n_train=len(x_tr),
        n_test=len(x_te),
        checkpoint=res.checkpoint,
        pretrained_from=str(ckpt.path) if ckpt else None,
    )
