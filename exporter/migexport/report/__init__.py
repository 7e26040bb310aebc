"""The migration report (`migexport report`): one self-contained page (or a Markdown summary) with the
success criteria, the timeline, the alerts that fired, the checks and what got slower.

data.py gathers it from Prometheus and the local files (state, baseline, checks, run log); render.py
turns it into HTML (Jinja2 + inline matplotlib SVG) or Markdown. `write_report()` does both.
"""

from migexport.report.prometheus import ReportError
from migexport.report.render import write_report

__all__ = ["ReportError", "write_report"]
