"""PNG figures (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_write

#: screen-left / screen-right patient directions of each view, as drawn on the figure
VIEW_SIDES = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}
#: the column of the no-learning reference: the hidden voxels interpolated from the visible
REFERENCE_PANEL = "interpolation (reference)"


def orthogonal_slices(vol: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``center`` of a RAS-ordered (X, Y, Z)
    volume, each (rows, columns) as shown the radiological way, as napari shows this
    plugin's layers: axial with anterior at the top and the patient's right on the screen's
    left; coronal with the head at the top and the patient's right on the left; sagittal with
    the head at the top and anterior on the left."""
    x, y, z = center
    axial = vol[::-1, ::-1, z].T  # rows: A -> P, columns: R -> L
    coronal = vol[::-1, y, ::-1].T  # rows: S -> I, columns: R -> L
    sagittal = vol[x, ::-1, ::-1].T  # rows: S -> I, columns: A -> P
    return [axial, coronal, sagittal]


def reconstruction_title(name: str, method: str, mask_mode: str, scores: dict[str, float]) -> str:
    """The figure's title: the model's PSNR / SSIM on the hidden voxels and, on a second
    line, the score to beat (the hidden voxels interpolated from the visible ones), as
    ``maesil reconstruct`` prints them."""
    title = (
        f"{name}: {method} {mask_mode} mask, PSNR {scores['psnr']:.2f} dB, "
        f"SSIM {scores['ssim']:.3f} (masked region)"
    )
    if "interpolation_psnr" in scores:
        title += (
            f"\nto beat, interpolating the visible voxels: PSNR "
            f"{scores['interpolation_psnr']:.2f} dB, SSIM {scores['interpolation_ssim']:.3f}"
        )
    return title


def reconstruction_figure(
    path: str | Path,
    panels: dict[str, np.ndarray],
    affine: np.ndarray,
    *,
    window: tuple[float, float] | None = None,
    center: tuple[int, int, int] | None = None,
    title: str = "",
) -> Path:
    """Rows: axial / coronal / sagittal; columns: ``panels`` (e.g. CT, masked, reconstruction,
    error). Volumes are reoriented to RAS with nibabel so the picture reads the same for any
    input orientation, then drawn the radiological way (:func:`orthogonal_slices`; the
    patient's right on the screen's left, letters at the edges); aspect follows the voxel
    spacing. The title is also stored as the PNG's ``Title`` text, the columns' names as its
    ``Panels`` text (`` | `` between them)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import nibabel as nib
    from matplotlib.figure import Figure

    ornt = nib.orientations.io_orientation(affine)
    ras = {k: nib.orientations.apply_orientation(np.asarray(v), ornt) for k, v in panels.items()}
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = spacing[np.argsort(ornt[:, 0].astype(int))] if ornt.shape[0] == 3 else spacing
    shape = next(iter(ras.values())).shape
    if center is None:
        center = tuple(s // 2 for s in shape)
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    # rows as tall as their slices in millimetres (height / width), so a thin slab of slices
    # does not leave most of the page blank
    mm = np.asarray(shape, dtype=float) * spacing
    ratios = [mm[1] / mm[0], mm[2] / mm[0], mm[2] / mm[1]]
    ratios = [float(np.clip(r, 0.15, 3.0)) for r in ratios]
    names = list(ras)
    col_width = 3.0
    fig = Figure(figsize=(col_width * len(names), col_width * sum(ratios) + 1.2), dpi=100)
    axes = fig.subplots(3, len(names), squeeze=False, gridspec_kw={"height_ratios": ratios})
    for col, name in enumerate(names):
        vol = ras[name]
        slices = orthogonal_slices(vol, center)
        is_error = "error" in name.lower()
        if is_error:  # the range of what is drawn (a full-size float64 copy of the volume: 0.8 GB)
            drawn = np.concatenate([np.ravel(sl) for sl in slices]).astype(np.float32)
            vmin, vmax, cmap = 0.0, float(np.percentile(drawn, 99.5)) or 1.0, "magma"
        elif window is not None and name.lower() != "mask":
            vmin, vmax, cmap = window[0], window[1], "gray"
        else:
            vmin, vmax, cmap = float(vol.min()), float(vol.max()) or 1.0, "gray"
        for row, (sl, aspect) in enumerate(zip(slices, aspects)):
            ax = axes[row][col]
            ax.imshow(sl, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            view = ["axial", "coronal", "sagittal"][row]
            for x_pos, ha, letter in zip((0.02, 0.98), ("left", "right"), VIEW_SIDES[view]):
                ax.text(
                    x_pos,
                    0.5,
                    letter,
                    transform=ax.transAxes,
                    ha=ha,
                    va="center",
                    color="yellow",
                    fontsize=8,
                )
            if row == 0:
                ax.set_title(name)
            if col == 0:  # a thin slab's short rows: the name across, not along the edge
                flat = ratios[row] < 0.5
                ax.set_ylabel(view, rotation=0 if flat else 90, ha="right" if flat else "center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    meta = {"Software": "napari-maesil", "Panels": " | ".join(names)}
    if title:
        meta["Title"] = title
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", metadata=meta))
    return Path(path)


#: metrics columns of the probe scored while pretraining (maesil_core.probe_monitor)
PROBE_PREFIX, PROBE_REFERENCES = "probe_", ("probe_random_init_", "probe_patch_stats_")


def _plot_probe(ax, rows: list[dict[str, float]]) -> None:
    """The probe's Dice per class against step: the encoder solid, its references (random
    init dashed, patch statistics dotted) in the class's colour."""
    keys = {k for r in rows for k in r if k.startswith(PROBE_PREFIX)}
    classes = sorted(k[len(PROBE_PREFIX) :] for k in keys if not k.startswith(PROBE_REFERENCES))
    sources = [("", "o-", ""), (PROBE_REFERENCES[0], "--", " (random init)")]
    sources.append((PROBE_REFERENCES[1], ":", " (patch stats)"))
    for i, name in enumerate(classes):
        for prefix, style, what in sources:
            key = (prefix or PROBE_PREFIX) + name
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", lw=1.2, ms=3, label=name + what)
    ax.set_xlabel("step")
    ax.set_ylabel("probe Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_loss(rows: list[dict[str, float]], path: str | Path) -> None:
    """Loss curve (log scale) of a run's metrics rows, written atomically as PNG; with the
    linear probe's Dice per class beside it when the rows have probe columns."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    probed = any(k.startswith(PROBE_PREFIX) for r in rows for k in r)
    fig = Figure(figsize=(11 if probed else 6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 2 if probed else 1, 1)
    if probed:
        _plot_probe(fig.add_subplot(1, 2, 2), rows)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
