"""Pictures and pages: overlays, training curves, the HTML evaluation report.

matplotlib is imported inside the functions (Agg backend), so importing this package is cheap.
"""

from medsight.report.curves import plot_curves
from medsight.report.overlay import overlay_png

__all__ = ["overlay_png", "plot_curves", "write_report"]


def __getattr__(name: str):
    if name == "write_report":  # pulls in medsight.evaluate only when asked for
        from medsight.report.html import write_report

        return write_report
    raise AttributeError(name)
