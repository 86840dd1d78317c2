"""The one exception type nmsparse raises for a file it cannot use.

:class:`LoadError` covers every load path (training checkpoints, ``final.safetensors``, the JSON files
of a run or a grid): the file is missing, a directory, unreadable, empty, truncated, corrupted, not in
the expected format, or written for another model or other settings. ``str(error)`` is one line that
names the file, the problem and what to do; the CLIs print it on stderr and exit with code 2.

It subclasses :class:`ValueError`, so code that already treats bad input as ``ValueError`` keeps
working; catch :class:`LoadError` to tell a bad file from other bad input. Compressed model files
raise :class:`nmsparse.export.FormatError`, a subclass (its message is its own, without "cannot load").

:class:`WriteError` is the one exception for a file that cannot be written (disk full, read-only,
no permission): one line naming the user's path and the cause.
"""

from __future__ import annotations

import os


class LoadError(ValueError):
    """A file cannot be used. ``path`` names it, ``problem`` says what is wrong with it and ``hint``
    (or ``None``) what to do; ``action`` is the failed operation ("cannot load", "cannot resume from").
    """

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None, *,
                 action: str = "cannot load") -> None:
        self.path, self.problem, self.hint, self.action = str(path), problem, hint, action
        super().__init__(self._message())

    def _message(self) -> str:
        msg = f"{self.action} {self.path}: {self.problem}"
        return f"{msg}; {self.hint}" if self.hint else msg

    def __reduce__(self):
        # pickled (multiprocessing hands errors between processes) as message and fields: the default
        # would call ``cls(message)``, which the required ``problem`` refuses
        return _restore, (type(self), str(self), dict(self.__dict__))

    def with_hint(self, hint: str | None, *, action: str | None = None) -> "LoadError":
        """The same error with another ``hint`` (and ``action``): callers know what the user should do."""
        return LoadError(self.path, self.problem, hint, action=action or self.action)


def _restore(cls: type, message: str, fields: dict) -> LoadError:
    err = cls.__new__(cls)
    ValueError.__init__(err, message)
    err.__dict__.update(fields)
    return err


class WriteError(OSError, ValueError):
    """A file cannot be written: ``str(error)`` is one line ``cannot write PATH: CAUSE`` naming the
    user's path (never a temporary name) and the cause (no space left on the device, read-only
    file system, permission denied, ...). ``errno`` is the OS error code (or ``None``).

    An ``OSError`` (what it is) and a ``ValueError`` (so the CLIs' one-line ``except ValueError``
    handlers report it with exit code 2, like a :class:`LoadError`)."""

    def __init__(self, path: str | os.PathLike, cause: str, code: int | None = None) -> None:
        super().__init__(f"cannot write {path}: {cause}")
        self.path, self.cause, self.errno = str(path), cause, code

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.cause}"

    def __reduce__(self):
        return type(self), (self.path, self.cause, self.errno)


__all__ = ["LoadError", "WriteError"]
