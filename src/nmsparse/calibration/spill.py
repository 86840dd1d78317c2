"""Calibration hidden states of one block boundary, kept on disk with one batch in memory at a time.

Block-wise pruning needs, at every block boundary, the hidden states of all calibration batches
(``samples x seqlen x hidden`` floats: 512 MiB for 128 windows of 512 tokens of a 2048-wide model).
:class:`HiddenSpill` keeps them in two files in a folder, the current boundary's and the next one's, read
and written one batch at a time with plain file I/O (``readinto`` / ``write``, no memory map, whose
pages would count as the process's resident memory while mapped). The other keyword arguments of a
block's call (attention mask, position embeddings, position ids) are small and stay in memory.

The bytes read back are the bytes written, so a block sees exactly the tensors it would have seen in
memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor, as a writable buffer sharing its memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class HiddenSpill:
    """Per-batch keyword arguments of a block's call, ``"hidden_states"`` kept in files under ``folder``
    (a new temporary folder inside it; removed by :meth:`close`)."""

    KEY = "hidden_states"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=".hidden.", dir=folder))
        self._files = [open(self.folder / "a.bin", "w+b", buffering=0), open(self.folder / "b.bin", "w+b", buffering=0)]
        self._slots: list[tuple[int, torch.Size, torch.dtype]] = []  # the current file's batches
        self._next: list[tuple[int, torch.Size, torch.dtype]] = []
        self._extras: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self._slots)

    def append(self, kwargs: dict[str, Any]) -> None:
        """Add one batch's keyword arguments (its hidden states go to the current file)."""
        kw = dict(kwargs)
        self._slots.append(self._write(self._files[0], kw.pop(self.KEY)))
        self._extras.append(kw)

    def load(self, i: int) -> dict[str, Any]:
        """Batch ``i``'s keyword arguments, its hidden states read from disk into a new tensor."""
        off, shape, dtype = self._slots[i]
        t = torch.empty(shape, dtype=dtype)
        buf, f, done = _raw(t), self._files[0], 0
        while done < len(buf):
            got = os.preadv(f.fileno(), [buf[done:]], off + done)
            if got <= 0:
                raise OSError(f"{self.folder}: short read of calibration batch {i}")
            done += got
        return {**self._extras[i], self.KEY: t}

    def batches(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self.load(i)

    def advance(self, fn: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        """Replace every batch's hidden states by ``fn(its keyword arguments)``, one batch at a time
        (the results go to the other file, which then becomes the current one)."""
        out = self._files[1]
        out.seek(0)
        out.truncate(0)
        self._next = []
        for i in range(len(self)):
            self._next.append(self._write(out, fn(self.load(i))))
        self._files.reverse()
        self._slots, self._next = self._next, []

    @staticmethod
    def _write(f, t: torch.Tensor) -> tuple[int, torch.Size, torch.dtype]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"hidden states must be a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        off = f.seek(0, os.SEEK_END)
        buf, done = _raw(t), 0
        while done < len(buf):
            done += f.write(buf[done:])
        return off, t.shape, t.dtype

    def close(self) -> None:
        for f in self._files:
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "HiddenSpill":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SpilledItems:
    """A re-iterable calibration set for :func:`nmsparse.prune` over a :class:`HiddenSpill`: item ``i`` is
    ``wrap(spill.load(i), i)``, read from disk when reached."""

    def __init__(self, spill: HiddenSpill, wrap: Callable[[dict[str, Any], int], Any]) -> None:
        self.spill, self.wrap = spill, wrap

    def __len__(self) -> int:
        return len(self.spill)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.spill)):
            yield self.wrap(self.spill.load(i), i)
