"""Live curves in the widgets (loss, validation Dice) on napari-matplotlib's canvas, which
follows napari's theme (dark by default) and redraws when the theme changes.

napari-matplotlib needs Python 3.11; on 3.10 the same curves are drawn on a plain
matplotlib canvas in matplotlib's default (light) style.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

#: at most one redraw per this many seconds while a job reports (drawing costs ~50 ms)
REDRAW_EVERY_S = 0.5

try:  # the themed canvas (napari-matplotlib, Python >= 3.11)
    from napari_matplotlib.base import BaseNapariMPLWidget
except ImportError:  # pragma: no cover - Python 3.10
    BaseNapariMPLWidget = None


def _themed_canvas_class() -> Any:
    class ThemedCanvas(BaseNapariMPLWidget):
        """napari-matplotlib's canvas + a callback to redraw in a new theme."""

        redraw: Any = None

        def _on_napari_theme_changed(self, event: Any) -> None:
            super()._on_napari_theme_changed(event)
            if self.redraw is not None:
                self.redraw(rebuild=True)

    return ThemedCanvas


class CurvePlot:
    """A small plot of named curves ``{name: [(x, y), ...]}`` for a dock widget.

    Args:
        viewer: the napari viewer (its theme styles the plot).
        xlabel, ylabel: axis labels.
        height: minimum height in pixels.
    """

    def __init__(self, viewer: Any, xlabel: str, ylabel: str, height: int = 150) -> None:
        self.xlabel, self.ylabel = xlabel, ylabel
        self.series: dict[str, list[tuple[float, float]]] = {}
        #: matplotlib line settings per curve (colour, line style, marker)
        self.styles: dict[str, dict[str, Any]] = {}
        self.ylim: tuple[float, float] | None = None
        self.legend_columns = 1
        self._last_draw = 0.0
        if BaseNapariMPLWidget is not None:
            self.widget = _themed_canvas_class()(viewer)
            self.widget.toolbar.hide()  # a status display: no pan / zoom / save buttons
            self.widget.redraw = self.draw
            self.canvas = self.widget.canvas
            #: (emitter, callback) that napari-matplotlib connected: undone on close
            self.connections = [(viewer.events.theme, self.widget._on_napari_theme_changed)]
        else:  # pragma: no cover - Python 3.10
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg

            self.canvas = self.widget = FigureCanvasQTAgg()
            self.canvas.figure.set_layout_engine("constrained")
            self.connections = []
        self.widget.setMinimumHeight(height)
        self.figure = self.canvas.figure
        self.figure.set_size_inches(3.2, 1.8)
        self.axes: Any = None
        self.draw(force=True, rebuild=True)

    def _style(self) -> Any:
        sheet = getattr(self.widget, "napari_theme_style_sheet", None)
        if sheet is None:  # pragma: no cover - Python 3.10
            return contextlib.nullcontext()
        import matplotlib.style as mplstyle

        return mplstyle.context(sheet)

    def set(self, name: str, points: list[tuple[float, float]], **style: Any) -> None:
        """Replace curve ``name`` (drawn at the next :meth:`draw`); ``style``: matplotlib
        line settings (``color="C0"``, ``ls="--"``, ``marker=""``)."""
        self.series[name] = list(points)
        if style:
            self.styles[name] = style

    def clear(self) -> None:
        self.series.clear()
        self.styles.clear()
        self.draw(force=True)

    def draw(self, force: bool = False, rebuild: bool = False) -> None:
        """Redraw (at most every :data:`REDRAW_EVERY_S` unless ``force``)."""
        now = time.monotonic()
        if not force and not rebuild and now - self._last_draw < REDRAW_EVERY_S:
            return
        self._last_draw = now
        with self._style():
            if rebuild or self.axes is None:
                self.figure.clear()
                self.axes = self.figure.add_subplot()
            ax = self.axes
            ax.clear()
            ax.set_xlabel(self.xlabel, fontsize=8)
            ax.set_ylabel(self.ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
            for name, points in self.series.items():
                if points:
                    xs, ys = zip(*points)
                    kw = {"lw": 1.5, "label": name, "marker": "o" if len(xs) < 12 else None}
                    ax.plot(xs, ys, **{**kw, **self.styles.get(name, {})})
            if self.ylim is not None:
                ax.set_ylim(*self.ylim)
            if len(self.series) > 1 and any(self.series.values()):
                ax.legend(fontsize=7, loc="best", frameon=False, ncol=self.legend_columns)
        self.canvas.draw_idle()
