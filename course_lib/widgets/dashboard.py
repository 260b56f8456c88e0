"""One mechanism for every course widget: controls + a matplotlib ``draw`` function.

``draw(fig, **values) -> str`` draws into a fresh figure and returns a one-line summary of what
it plotted (e.g. ``"r=8: 65,536 LoRA params, 256.0x fewer"``). The summary is shown under the
figure in the interactive version (so a browser test can read the plotted values from the DOM)
and printed under the static figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import matplotlib.pyplot as plt

DrawFn = Callable[..., str]


def frontend_has_widgets() -> bool:
    """True inside a Jupyter kernel with ipywidgets importable (a frontend may still lack them)."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def static_figure(draw: DrawFn, values: Mapping[str, Any], figsize=(9, 4)):
    """Draw once with ``values`` and return ``(figure, summary)``; the caller shows it."""
    fig = plt.figure(figsize=figsize)
    summary = draw(fig, **values)
    return fig, summary


class Dashboard:
    """Controls, an output area with the figure, and a summary label (``.widget`` is a VBox)."""

    def __init__(self, draw: DrawFn, controls: Mapping[str, Any], title: str, figsize=(9, 4)):
        import ipywidgets as W

        self.draw = draw
        self.controls = dict(controls)
        self.figsize = figsize
        self.output = W.Output(layout=W.Layout(min_height="300px"))
        self.summary = W.HTML(value="")
        self.summary.add_class("course-widget-summary")
        header = W.HTML(value=f"<b>{title}</b>")
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.widget = W.VBox([header, *self.controls.values(), self.output, self.summary])
        self.widget.add_class("course-widget")
        self.redraw()

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, _change: Any) -> None:
        self.redraw()

    def redraw(self) -> str:
        self.output.clear_output(wait=True)
        with self.output:
            fig, summary = static_figure(self.draw, self.values(), self.figsize)
            plt.show()
            plt.close(fig)
        self.summary.value = f"<code>{summary}</code>"
        return summary

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def dashboard(
    draw: DrawFn,
    controls: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    defaults: Mapping[str, Any],
    title: str,
    interactive: bool | None = None,
    figsize=(9, 4),
):
    """Show ``draw`` as an interactive dashboard, or as a static figure.

    ``controls`` maps each keyword of ``draw`` to an ipywidget (or is a zero-argument function
    building that mapping, so ipywidgets is imported only when needed); ``defaults`` holds the
    values for the static figure. ``interactive=None`` picks interactive inside a Jupyter kernel.
    Returns the :class:`Dashboard` (interactive) or the matplotlib figure (static; its summary
    is printed and the figure shown).
    """
    if interactive is None:
        interactive = frontend_has_widgets()
    if interactive:
        built = controls() if callable(controls) else controls
        return Dashboard(draw, built, title, figsize)
    fig, summary = static_figure(draw, defaults, figsize)
    print(summary)
    plt.show()
    return fig
