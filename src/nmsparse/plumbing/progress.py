"""Progress reporting that suits where it goes: a tqdm bar on a terminal, plain lines in a log.

Every progress display of nmsparse (training epochs, pruning layers, the reproduce grid's runs) goes
through :class:`Progress`. Its ``mode``:

* ``"bar"``: a tqdm bar (redrawn in place with carriage returns: right on a terminal, thousands of
  ``\\r`` fragments in a log file);
* ``"lines"``: no bar; one plain line when the task ends (``summary=True``) and, for a long task, one
  line every ``interval`` seconds (60 by default) saying how far it is, so a log gets a bounded
  number of whole lines;
* ``"off"``: nothing;
* ``"auto"``: ``"bar"`` when the stream (standard error) is a terminal or a Jupyter kernel's,
  ``"lines"`` otherwise (a pipe, a file, CI).

``mode=True`` or ``None`` means the environment variable ``NMSPARSE_PROGRESS`` (one of the modes)
if it is set, else ``"auto"``; ``mode=False`` means ``"off"``. The CLIs' ``--progress`` flag (default:
the variable, else auto) and ``--no-progress`` (= ``--progress off``) map onto it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

MODES = ("auto", "bar", "lines", "off")
ENV = "NMSPARSE_PROGRESS"
HEARTBEAT_S = 60.0


def _now() -> float:
    return time.monotonic()


def _interactive(stream: IO[str]) -> bool:
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")  # Jupyter: tqdm.auto draws a widget


def check_mode(mode: object, source: str = "progress") -> str:
    """``mode`` if it is one of :data:`MODES` (``ValueError`` naming ``source`` otherwise)."""
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def resolve(mode: str | bool | None = None, stream: IO[str] | None = None) -> str:
    """The effective mode, ``"bar"``, ``"lines"`` or ``"off"``, of ``mode`` (see module doc) for
    ``stream`` (default ``sys.stderr``). Raises ``ValueError`` for an unknown mode, also in
    ``$NMSPARSE_PROGRESS``."""
    if mode is None or mode is True:
        env = os.environ.get(ENV, "").strip().lower()
        mode = check_mode(env, f"${ENV}") if env else "auto"
    elif mode is False:
        mode = "off"
    check_mode(mode)
    if mode == "auto":
        return "bar" if _interactive(stream if stream is not None else sys.stderr) else "lines"
    return mode  # type: ignore[return-value]


class Progress:
    """Progress over ``total`` units (``unit`` in the singular: "step", "layer") described by ``desc``.

    ``update(k)``, ``set_postfix(name=value, ...)``, ``close()`` (or use it as a context manager), as
    tqdm's. In ``"lines"`` mode, ``summary=False`` drops the closing line (for callers that print their
    own summary) and keeps the periodic ones. ``leave`` keeps a finished tqdm bar on screen.
    """

    def __init__(self, total: int, desc: str, *, mode: str | bool | None = None, unit: str = "it",
                 stream: IO[str] | None = None, summary: bool = True, interval: float = HEARTBEAT_S,
                 leave: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve(mode, self.stream)
        self.total, self.desc, self.unit = total, desc, unit
        self.summary, self.interval = summary, interval
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._t0 = self._last = _now()
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=leave)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif self.mode == "lines" and self.n < self.total:
            now = _now()
            if now - self._last >= self.interval:
                self._last = now
                self._write(f"{self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%), "
                            f"{now - self._t0:.0f}s so far")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.summary:
            secs = _now() - self._t0
            self._write(f"{self.n}/{self.total} {self.unit}s in {secs:.1f}s")

    def _write(self, text: str) -> None:
        post = "".join(f", {k} {v}" for k, v in self.postfix.items())
        try:
            self.stream.write(f"{self.desc}: {text}{post}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the work
            pass


def add_argument(parser: Any, what: str = "progress bars") -> None:
    """Add ``--progress MODE`` and ``--no-progress`` to an argparse parser (see :func:`from_args`)."""
    parser.add_argument("--progress", default=None, choices=MODES,
                        help=f"{what}: 'bar' (tqdm), 'lines' (one plain line per task, and one a minute while "
                             f"it runs: for logs), 'off', or 'auto' (a bar when stderr is a terminal, else "
                             f"lines). Default: ${ENV} if set, else auto")
    parser.add_argument("--no-progress", action="store_true", help="same as --progress off")


def from_args(args: Any) -> str:
    """The resolved mode of parsed ``--progress`` / ``--no-progress`` (``ValueError`` for a bad
    ``$NMSPARSE_PROGRESS``)."""
    return "off" if args.no_progress else resolve(args.progress)


__all__ = ["ENV", "MODES", "Progress", "add_argument", "check_mode", "from_args", "resolve"]
