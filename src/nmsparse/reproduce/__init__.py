"""``nmsparse reproduce``: the SR-STE and transposable-mask papers' claims as a grid of training
runs (:mod:`.grid`), run and resumed by :mod:`.runner`, summarised by :mod:`.report` into report.md
with tables (mean ± std over seeds) and PNG plots (:mod:`.plots`)."""

from nmsparse.reproduce.grid import EXPERIMENTS, Cell, Scale, build_grid
from nmsparse.reproduce.runner import CellOutcome, run_grid


def __getattr__(name: str):  # matplotlib is imported only when a report is written
    if name == "write_report":
        from nmsparse.reproduce.report import write_report

        return write_report
    raise AttributeError(name)


__all__ = ["EXPERIMENTS", "Cell", "CellOutcome", "Scale", "build_grid", "run_grid", "write_report"]
