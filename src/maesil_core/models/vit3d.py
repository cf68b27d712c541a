"""A plain 3D Vision Transformer encoder, read top to bottom.

Shapes use B = batch, C = channels, (D, H, W) = voxels, (gd, gh, gw) = patch grid,
L = gd * gh * gw tokens in C order over the grid, E = embedding width.

- :func:`pos_embed_3d_sincos`  fixed 3D sin-cos position embedding (L, E).
- :func:`resize_pos_embed`     trilinear resize of any (learned or fixed) embedding to a new grid.
- :class:`PatchEmbed3D`        Conv3d with kernel = stride = patch: (B, C, D, H, W) -> (B, L, E).
- :class:`Attention`, :class:`MLP`, :class:`Block`  a pre-norm transformer block (SDPA attention).
- :class:`ViTEncoder3D`        patch embed + pos embed + blocks + final norm; runs on the visible
  tokens only when given their indices (MAE), or returns intermediate layers (UNETR decoders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Int3, ModelConfig
from ..errors import ConfigError

# --------------------------------------------------------------------------- position embeddings


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's 1D sin-cos embedding. dim even; pos (N,) -> (N, dim) = [sin(pos*w), cos(pos*w)]."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def _axis_dims(embed_dim: int) -> tuple[int, int, int]:
    """Split E over (d, h, w): an even share per axis, leftover pairs to the first axes.

    96 -> (32, 32, 32); 512 -> (172, 170, 170); 64 -> (22, 22, 20). An odd E leaves one
    channel that :func:`pos_embed_3d_sincos` pads with zeros.
    """
    base = (embed_dim // 6) * 2
    dims = [base, base, base]
    spare_pairs = (embed_dim - 3 * base) // 2  # 0, 1 or 2
    for i in range(spare_pairs):
        dims[i] += 2
    return dims[0], dims[1], dims[2]


def pos_embed_3d_sincos(embed_dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding, (gd*gh*gw, embed_dim) float32, C order over the grid.

    Each axis gets its own 1D sin-cos code of :func:`_axis_dims` channels, concatenated
    [depth | height | width]; an odd ``embed_dim`` gets one trailing zero channel.
    """
    if embed_dim < 6:
        raise ConfigError(
            f"embed_dim must be at least 6 for a 3D sin-cos embedding, got {embed_dim}."
        )
    gd, gh, gw = (int(g) for g in grid)
    dd, dh, dw = _axis_dims(embed_dim)
    zd, zh, zw = torch.meshgrid(
        torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij"
    )  # each (gd, gh, gw)
    parts = [
        _sincos_1d(dd, zd.reshape(-1)),
        _sincos_1d(dh, zh.reshape(-1)),
        _sincos_1d(dw, zw.reshape(-1)),
    ]
    pad = embed_dim - (dd + dh + dw)
    if pad:
        parts.append(torch.zeros(gd * gh * gw, pad, dtype=torch.float64))
    return torch.cat(parts, dim=1).float()  # (L, E)


def resize_pos_embed(
    pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """Trilinearly resize a position embedding laid out on ``old_grid`` to ``new_grid``.

    pos (L, E) with L = prod(old_grid) -> (L', E) with L' = prod(new_grid). Returned
    unchanged when the grids are equal. Works for learned embeddings; for fixed sin-cos
    embeddings :func:`pos_embed_3d_sincos` on the new grid is the other option (it extends
    the code instead of stretching it; :class:`ViTEncoder3D` does that by default).
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if pos.shape[0] != math.prod(old_grid):
        raise ValueError(
            f"pos has {pos.shape[0]} rows but old grid {old_grid} has {math.prod(old_grid)}."
        )
    if old_grid == new_grid:
        return pos
    e = pos.shape[1]
    vol = pos.T.reshape(1, e, *old_grid)  # (1, E, gd, gh, gw)
    vol = F.interpolate(vol.float(), size=new_grid, mode="trilinear", align_corners=False)
    return vol.reshape(e, -1).T.to(pos.dtype).contiguous()  # (L', E)


# --------------------------------------------------------------------------- layers


class PatchEmbed3D(nn.Module):
    """(B, C, D, H, W) -> (B, L, E): one Conv3d with kernel = stride = patch (a linear map per patch)."""

    def __init__(self, patch: Sequence[int], in_channels: int, embed_dim: int):
        super().__init__()
        self.patch = tuple(int(p) for p in patch)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch, stride=self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, E, gd, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, L, E)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear + ``F.scaled_dot_product_attention`` (fused kernels)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, C/heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class MLP(nn.Module):
    """Linear -> GELU -> Linear, hidden width ``mlp_ratio * dim``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LocalMix(nn.Module):
    """Mixing with the neighbouring tokens of the patch grid, the local half of a local-global
    decoder: x + Linear(GELU(depthwise 3x3x3 conv(norm(x)))). (B, L, C) on ``grid`` -> (B, L, C).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dw = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.GELU()
        self.pw = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        b, n, c = x.shape
        y = self.norm(x).transpose(1, 2).reshape(b, c, *grid)  # (B, C, gd, gh, gw)
        y = self.dw(y).flatten(2).transpose(1, 2)  # (B, L, C)
        return x + self.pw(self.act(y))


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear (bias 0), LayerNorm (1, 0), patch conv as Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed3D):
            w = m.proj.weight  # (E, C, pd, ph, pw): initialise as a (E, C*pd*ph*pw) Linear
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.proj.bias is not None:
                nn.init.zeros_(m.proj.bias)


# --------------------------------------------------------------------------- encoder


class ViTEncoder3D(nn.Module):
    """3D ViT encoder for ``cfg`` (no class token).

    ``cfg.pos_embed``: ``"sincos"`` (default) keeps a fixed embedding that is not saved;
    ``"learned"`` makes it a parameter ``pos_embed`` (1, L, E), saved with the weights,
    initialised with the sin-cos code and resized trilinearly for other grids.
    ``cfg.norm_eps`` is the epsilon of every LayerNorm.

    ``forward(x, keep_idx)`` embeds all patches, adds the position embedding, keeps only the
    tokens in ``keep_idx`` (MAE: the encoder sees visible tokens only) and runs the blocks.
    ``forward_features(x, layers)`` returns intermediate hidden states for segmentation decoders
    and accepts any input whose size is a multiple of the patch.

    ``pos_resize`` chooses how the fixed embedding is adapted to another grid:
    ``"recompute"`` (default) evaluates the sin-cos code on the new grid, ``"interpolate"``
    resizes the stored one with :func:`resize_pos_embed` (what a learned embedding needs).
    """

    def __init__(self, cfg: ModelConfig, pos_resize: str = "recompute"):
        super().__init__()
        if pos_resize not in ("recompute", "interpolate"):
            raise ConfigError(f"pos_resize must be recompute or interpolate, got {pos_resize!r}.")
        self.cfg = cfg
        self.patch: Int3 = tuple(cfg.patch)  # type: ignore[assignment]
        self.grid: Int3 = tuple(cfg.grid)  # type: ignore[assignment]
        self.embed_dim = cfg.embed_dim
        self.depth = cfg.depth
        self.pos_resize = pos_resize

        self.patch_embed = PatchEmbed3D(cfg.patch, cfg.in_channels, cfg.embed_dim)
        pos = pos_embed_3d_sincos(cfg.embed_dim, self.grid)[None]  # (1, L, E)
        if getattr(cfg, "pos_embed", "sincos") == "learned":
            self.pos_embed = nn.Parameter(pos)  # saved; other grids get a trilinear resize
            self.pos_resize = "interpolate"
        else:
            # fixed, not trained, not saved: recomputed from cfg, so checkpoints do not depend
            # on the grid
            self.register_buffer("pos_embed", pos, persistent=False)
        eps = float(getattr(cfg, "norm_eps", 1e-6))
        self.blocks = nn.ModuleList(
            [Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, eps) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=eps)
        init_vit_weights(self)

    # ---------------------------------------------------------------- helpers

    def grid_of(self, x: torch.Tensor) -> Int3:
        """Patch grid of a (B, C, D, H, W) input; ConfigError when the patch does not divide it."""
        if x.ndim != 5:
            raise ConfigError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.patch)):
            raise ConfigError(
                f"input size {list(spatial)} is not a multiple of the patch {list(self.patch)}: "
                "pad or crop it to a multiple of the patch on every axis."
            )
        return tuple(s // p for s, p in zip(spatial, self.patch))  # type: ignore[return-value]

    def pos_embed_for(self, grid: Sequence[int]) -> torch.Tensor:
        """(1, prod(grid), E) position embedding for ``grid`` (the stored one for ``self.grid``)."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        if self.pos_resize == "recompute":
            pos = pos_embed_3d_sincos(self.embed_dim, grid)
        else:
            pos = resize_pos_embed(self.pos_embed[0], self.grid, grid)
        return pos.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)[None]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, L, E) patch tokens plus position embedding."""
        grid = self.grid_of(x)
        return self.patch_embed(x) + self.pos_embed_for(grid)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, D, H, W), keep_idx (B, L_keep) long or None -> (B, L_keep or L, E), normed."""
        tokens = self.embed(x)  # (B, L, E)
        if keep_idx is not None:
            idx = keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, L_keep, E)
            tokens = torch.gather(tokens, 1, idx)  # (B, L_keep, E)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states after the blocks in ``layers`` (0-based, negatives count from the end).

        Returns a list of (B, L, E) in the order asked; the last block's output is taken after
        the final norm (as ``forward`` returns it). Any input size that the patch divides works.
        """
        wanted = []
        for i in layers:
            j = int(i) + self.depth if int(i) < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ConfigError(f"layer {i} does not exist: the encoder has {self.depth} blocks.")
            wanted.append(j)
        if not wanted:
            return []
        tokens = self.embed(x)  # (B, L, E)
        found: dict[int, torch.Tensor] = {}
        for j, blk in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = blk(tokens)
            if j in wanted:
                found[j] = self.norm(tokens) if j == self.depth - 1 else tokens
        return [found[j] for j in wanted]
