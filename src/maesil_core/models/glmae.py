"""GL-MAE (Zhuang et al., TMI 2025): global-local masked autoencoding with consistency to an EMA anchor.

The paper's pretraining code is not released; every choice below that is not in the abstract
is OURS and listed in docs/method.md. Shapes: S = cfg.superpatch, s = ``extra["global_scale"]``
(default 2), V = S // s the view size, p = cfg.patch, g = V // p the view grid.

The input unit is the superpatch x (B, C, *S), as for every method. Per step:

- **local views**: ``extra["n_local"]`` (default 2) random V^3 crops of x at native resolution,
  each sample its own crop, corners on multiples of s*p voxels (so a local view covers whole
  tokens of the global view);
- **global view**: the whole superpatch down-sampled to V^3 (average pooling by s);
- both are masked at random (MAE, ratio ``cfg.mask_ratio``) and reconstructed by ONE student
  MAE (encoder on visible tokens + light decoder, MSE on masked patches): ``rec_local``,
  ``rec_global``;
- **anchor**: the complete, unmasked global view through an EMA **teacher** (encoder + projector);
- **global-to-global** consistency ``g2g = 1 - cos(pred(proj(mean student tokens of the masked
  global view))), proj_t(mean teacher tokens))``;
- **global-to-local** consistency ``g2l``: the same for each local view against the teacher
  tokens of the region of the global view that the local view covers;
- ``loss = rec_local + rec_global + extra["consistency_weight"] (default 1) * (g2g + g2l)``,
  all four terms in ``logs``.

**EMA timing.** The teacher follows the student once per optimiser step: the training loop
calls :meth:`GLMAE.after_optimizer_step` after each ``optimizer.step()`` (whatever the
gradient accumulation), so the teacher used at step k is the EMA of the student weights up
to step k-1. Forward passes (training, eval or no-grad) never move the teacher.

**Reconstruction** (``reconstruct``, inference, benchmark): the mask is drawn on the full grid
``S // p`` exactly as for MAESIL, then the superpatch is cut into the s^3 aligned V^3 crops the
student was trained on (local views), each crop is reconstructed with its part of the mask and
the crops are stitched back.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import PretrainOutput
from .losses import masked_patch_loss
from .maesil import MAESIL
from .masking import TokenMask, paste_visible
from .patches import patchify, unpatchify


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class GLMAE(MAESIL):
    """Global-local MAE with an EMA teacher anchor. ``.encoder`` is the student encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        opts = cfg.options  # GLMAEOptions
        self.scale = opts.global_scale
        self.n_local = opts.n_local
        self.momentum = opts.ema_momentum
        self.consistency_weight = opts.consistency_weight
        unit = tuple(self.scale * p for p in cfg.patch)
        if self.scale < 1 or any(s % (self.scale * u) for s, u in zip(cfg.superpatch, unit)):
            raise ConfigError(
                f"GL-MAE: the superpatch {list(cfg.superpatch)} must be a multiple of "
                f"global_scale x patch x global_scale = {[self.scale * u for u in unit]} on every "
                "axis (views of superpatch/global_scale voxels cut into whole patches)."
            )
        self.view = tuple(s // self.scale for s in cfg.superpatch)  # V
        self.view_grid = tuple(v // p for v, p in zip(self.view, cfg.patch))  # g
        if math.prod(self.view_grid) < 2:
            raise ConfigError("GL-MAE: a view must hold at least 2 patches; lower global_scale.")

        e = cfg.embed_dim
        proj_dim = opts.proj_dim
        hidden = opts.proj_hidden or 2 * e
        self.projector = _mlp(e, hidden, proj_dim)
        self.predictor = _mlp(proj_dim, hidden, proj_dim)
        # EMA teacher (saved in checkpoints, never trained by the optimiser)
        self.teacher_encoder = copy.deepcopy(self.encoder)
        self.teacher_projector = copy.deepcopy(self.projector)
        for p in self._teacher_params():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- EMA teacher

    def _teacher_params(self):
        return itertools.chain(
            self.teacher_encoder.parameters(), self.teacher_projector.parameters()
        )

    def _student_params(self):
        return itertools.chain(self.encoder.parameters(), self.projector.parameters())

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """teacher <- m * teacher + (1 - m) * student; the training loop calls it once after
        every optimiser step."""
        for t, s in zip(self._teacher_params(), self._student_params()):
            t.mul_(self.momentum).add_(s.detach(), alpha=1.0 - self.momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_encoder.eval()  # no dropout anyway; kept explicit
        return self

    # ---------------------------------------------------------------- student MAE on a view

    def _masked_mse(
        self, v: torch.Tensor, pred: torch.Tensor, mask: TokenMask, valid: torch.Tensor | None
    ) -> torch.Tensor:
        """MSE on the masked patches of view v (B, C, *V), weighted by valid (B, 1, *V)."""
        w = None if valid is None else patchify(valid.expand_as(v), self.patch)
        return masked_patch_loss(pred, patchify(v, self.patch), mask.mask, w)

    def _embed_pred(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(tokens.mean(dim=1)))

    # ---------------------------------------------------------------- forward

    def _local_corners(self, batch: int, device, generator) -> torch.Tensor:
        """(n_local, B, 3) voxel corners of the local crops, multiples of scale * patch."""
        step = torch.tensor([self.scale * p for p in self.patch], device=device)
        counts = [
            (s - v) // st + 1 for s, v, st in zip(self.cfg.superpatch, self.view, step.tolist())
        ]
        picks = [
            torch.randint(0, c, (self.n_local, batch), device=device, generator=generator)
            for c in counts
        ]
        return torch.stack(picks, dim=-1) * step  # (n_local, B, 3)

    def forward(
        self,
        x: torch.Tensor,
        mask: TokenMask | torch.Tensor | None = None,
        *,
        generator=None,
        valid: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """``mask`` (B, L) on the view grid, if given, is used for the global view; ``valid``
        (B, 1, *S) 0.0 on padding, left out of both reconstruction terms (None: all counts).

        Returns the loss, the global view's prediction (B, Lg, P) with its TokenMask
        (:meth:`to_voxels` draws it on the superpatch) and the four loss terms as logs."""
        self._check_input(x)
        b = x.shape[0]
        ratio = self.cfg.mask_ratio
        gview = F.avg_pool3d(x, self.scale) if self.scale > 1 else x  # (B, C, *V)
        valid = None if valid is None else valid.to(x.dtype)  # bool from the loader
        # share of scan (not padding) in each global-view voxel
        gvalid = valid if valid is None or self.scale == 1 else F.avg_pool3d(valid, self.scale)

        # global view: masked reconstruction + student embedding
        if mask is None:
            gmask = TokenMask.random(b, self.view_grid, ratio, device=x.device, generator=generator)
        else:
            gmask = TokenMask.of(mask, self.view_grid)
        g_lat = self.forward_encoder(gview, gmask)
        g_pred = self.forward_decoder(g_lat, gmask)
        rec_global = self._masked_mse(gview, g_pred, gmask, gvalid)
        s_global = self._embed_pred(g_lat)

        # teacher anchor: complete global view
        with torch.no_grad():
            t_tokens = self.teacher_encoder(gview)  # (B, Lg, E)
            t_global = self.teacher_projector(t_tokens.mean(dim=1))
            t_grid = t_tokens.transpose(1, 2).reshape(b, -1, *self.view_grid)  # (B, E, *g)

        # local views
        corners = self._local_corners(b, x.device, generator)
        sub = [g // self.scale for g in self.view_grid]  # teacher tokens per local view
        rec_local, g2l = x.new_zeros(()), x.new_zeros(())
        for i in range(self.n_local):
            crops, valids, anchors = [], [], []
            for j in range(b):
                c = corners[i, j].tolist()
                box = tuple(slice(c[k], c[k] + self.view[k]) for k in range(3))
                crops.append(x[(j, slice(None), *box)])
                if valid is not None:
                    valids.append(valid[(j, slice(None), *box)])
                t0 = [cc // (self.scale * p) for cc, p in zip(c, self.patch)]
                region = t_grid[j, :, t0[0] : t0[0] + sub[0], t0[1] : t0[1] + sub[1],
                                t0[2] : t0[2] + sub[2]]  # fmt: skip
                anchors.append(region.flatten(1).mean(dim=1))
            lv = torch.stack(crops)  # (B, C, *V)
            lmask = TokenMask.random(b, self.view_grid, ratio, device=x.device, generator=generator)
            l_lat = self.forward_encoder(lv, lmask)
            rec_local = rec_local + self._masked_mse(
                lv,
                self.forward_decoder(l_lat, lmask),
                lmask,
                torch.stack(valids) if valids else None,
            )
            with torch.no_grad():
                t_local = self.teacher_projector(torch.stack(anchors))
            g2l = g2l + (1 - F.cosine_similarity(self._embed_pred(l_lat), t_local, dim=-1)).mean()
        rec_local = rec_local / self.n_local
        g2l = g2l / self.n_local
        g2g = (1 - F.cosine_similarity(s_global, t_global, dim=-1)).mean()
        loss = rec_local + rec_global + self.consistency_weight * (g2g + g2l)

        logs = {  # read when a log row is written
            "rec_local": rec_local.detach(),
            "rec_global": rec_global.detach(),
            "g2g": g2g.detach(),
            "g2l": g2l.detach(),
        }
        return PretrainOutput(loss=loss, pred=g_pred, mask=gmask, logs=logs)

    def to_voxels(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """A prediction on the global view's grid (B, Lg, P) -> (B, C, *S), trilinear up to
        the superpatch (the display of ``forward``'s output); on the superpatch's own grid as
        :meth:`MAESIL.to_voxels`."""
        if pred.shape[1] == self.num_patches:
            return super().to_voxels(x, pred)
        g_vox = unpatchify(pred.to(x.dtype), self.view_grid, self.patch)
        return F.interpolate(g_vox, size=tuple(self.cfg.superpatch), mode="trilinear")

    # ---------------------------------------------------------------- reconstruction

    @torch.no_grad()
    def reconstruct(
        self,
        x: torch.Tensor,
        *,
        mode: str | None = None,
        ratio: float | None = None,
        mask: torch.Tensor | None = None,
        generator=None,
        return_raw: bool = False,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Same contract as :meth:`MAESIL.reconstruct`, through the V^3 local-view crops. ``valid`` is
        unused: no interpolation prior to keep off the padding."""
        self._check_input(x)
        if mask is None:
            mask = TokenMask.draw(
                self.cfg, x.shape[0], mode=mode, ratio=ratio, device=x.device, generator=generator
            ).mask
        b = x.shape[0]
        grid_mask = mask.view(b, *self.grid)
        raw = torch.zeros_like(x)
        g = self.view_grid
        for ci in itertools.product(*[range(self.scale)] * 3):
            vs = [slice(k * v, (k + 1) * v) for k, v in zip(ci, self.view)]
            ts = [slice(k * n, (k + 1) * n) for k, n in zip(ci, g)]
            for j in range(b):
                crop = x[j : j + 1, :, vs[0], vs[1], vs[2]]
                m = TokenMask.of(grid_mask[j : j + 1, ts[0], ts[1], ts[2]].reshape(1, -1), g)
                if m.n_keep == 0:  # this crop of the full-grid mask is hidden entirely
                    latent = crop.new_zeros(1, 0, self.cfg.embed_dim)
                else:
                    latent = self.forward_encoder(crop, m)
                pred = self.forward_decoder(latent, m)
                raw[j : j + 1, :, vs[0], vs[1], vs[2]] = unpatchify(pred.to(x.dtype), g, self.patch)
        return paste_visible(x, raw, mask, self.grid, self.patch, return_raw)
