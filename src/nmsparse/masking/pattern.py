"""An N:M pattern, checked once where it enters the library and trusted everywhere below.

N is the number of weights **kept** in every group of M consecutive weights (2:4 keeps 2 of every 4).
Public functions take ``n, m`` (or a pattern) and turn them into an :class:`NMPattern` with
:func:`check_nm` at their boundary; internal calls pass that pattern on, and :func:`check_nm` returns a
pattern it is given as it is, without checking again.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class NMPattern:
    """A valid N:M pattern: integers with ``0 < n < m`` (``n`` kept in every group of ``m``).

    Unpacks like a pair (``n, m = pattern``); ``str(pattern)`` is ``"n:m"``. Constructing one with
    anything else raises one ``ValueError`` that says what N:M means.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        for name, v in (("n", self.n), ("m", self.m)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(
                    f"{name} must be an integer, got {v!r} ({type(v).__name__}); "
                    "N:M means N weights kept in every group of M, e.g. n=2, m=4"
                )
        n, m = int(self.n), int(self.m)
        if not 0 < n < m:
            raise ValueError(
                f"need 0 < n < m (n = weights kept per group of m), got n={n}, m={m}; "
                "for example n=2, m=4 keeps 2 of every 4"
            )
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)

    def __iter__(self) -> Iterator[int]:
        yield self.n
        yield self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        """``"2:4"`` -> ``NMPattern(2, 4)``; one ``ValueError`` naming the text otherwise."""
        parts = str(text).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"an N:M pattern is written n:m (n kept in every group of m), e.g. 2:4; got {text!r}")
        return cls(int(parts[0]), int(parts[1]))


def check_nm(n: object, m: object = None) -> NMPattern:
    """The boundary check: ``n, m`` (or an :class:`NMPattern` as ``n`` with ``m`` left out) -> a pattern.

    A pattern is returned as it is (it was checked when it was made); integers are checked here, once.
    Raises ``ValueError`` unless both are integers with ``0 < n < m``. The result unpacks as ``n, m``.
    """
    if isinstance(n, NMPattern):
        if m is not None and m != n.m:
            raise ValueError(f"got the pattern {n} and a separate m={m!r}; pass one or the other")
        return n
    return NMPattern(n, m)  # type: ignore[arg-type]


def to_pattern(value: object) -> NMPattern:
    """An N:M setting as users write it: an :class:`NMPattern`, ``"2:4"`` or a pair ``(2, 4)``.

    One ``ValueError`` for anything else (or for an invalid pair)."""
    if isinstance(value, NMPattern):
        return value
    if isinstance(value, str):
        return NMPattern.parse(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return NMPattern(*value)
    raise ValueError(f"an N:M setting is a pair (n, m), a string 'n:m' or an NMPattern (n kept in every group of m), "
                     f"got {value!r}")

