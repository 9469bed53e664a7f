"""matplotlib figures as inline SVG strings: no display, no pyplot state, byte-identical reruns.

matplotlib is imported inside the functions so ``retool --help`` does not pay for it."""
from __future__ import annotations

import html
import io
import re
import threading

#: shared by the reports and the load-test plot so the same series keep the same colour
COLORS = {"candidate": "#2563eb", "reference": "#f97316"}
SERIES = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d", "#475569",
          "#a16207", "#0f766e", "#7c3aed")


_RC_LOCK = threading.Lock()  # rc_context changes process-wide settings: one figure saved at a time


def figure(width_in: float, height_in: float):
    """A Figure bound to the SVG canvas (object-oriented API: the global backend is left alone)."""
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasSVG(fig)
    return fig


def to_svg(fig, key: str, css_class: str = "", label: str = "") -> str:
    """The figure as one ``<svg>`` element, ready to inline in HTML or save as plot.svg.

    ``key`` salts the element ids, so several figures inlined in one page never share an id, and
    fixes them, so the same figure gives the same bytes on every run."""
    import matplotlib

    buf = io.StringIO()
    rc = {"svg.hashsalt": f"retool:{key}", "svg.id": f"retool-{re.sub(r'[^A-Za-z0-9_-]', '-', key)}",
          "svg.fonttype": "none"}  # text stays text: searchable, selectable, small
    with _RC_LOCK, matplotlib.rc_context(rc):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the element is inlined
    # matplotlib numbers its groups per figure (figure_1, axes_1 ...): prefix them so inlined figures
    # never share an id (the referenced ids, clip paths and markers, are already salted per key)
    text = re.sub(r'\bid="([A-Za-z][\w.]*_\d+)"', lambda m: f'id="{rc["svg.id"]}-{m.group(1)}"', text)
    attrs = ""
    if css_class:
        attrs += f' class="{html.escape(css_class)}"'
    if label:
        attrs += f' role="img" aria-label="{html.escape(label)}"'
    return text.replace("<svg", "<svg" + attrs, 1).rstrip() + "\n" if attrs else text.rstrip() + "\n"
