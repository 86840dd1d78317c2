"""``nmsparse inspect``: is this checkpoint really N:M, and which layers?

* :func:`inspect` -> :class:`InspectReport` (per weight: shape, dtype, finest N:M pattern along its
  reduction axis, transposable or not; a summary line); :mod:`nmsparse.cli.inspect` is the command.
"""

from nmsparse.inspection.api import inspect
from nmsparse.inspection.patterns import Pattern, finest_pattern
from nmsparse.inspection.report import InspectReport, TensorInfo

__all__ = ["InspectReport", "Pattern", "TensorInfo", "finest_pattern", "inspect"]
