"""Plumbing every layer may use: errors, reading and atomic writing of files with their checksums,
progress bars, numba's thread pool, the version.

* :mod:`~nmsparse.plumbing.errors`: :class:`LoadError`, :class:`WriteError`.
* :mod:`~nmsparse.plumbing.checksum`: the per-tensor SHA-256 every safetensors file we write carries.
* :mod:`~nmsparse.plumbing.io` (verified reading), :mod:`~nmsparse.plumbing.writing` (atomic, signed writing).
* :mod:`~nmsparse.plumbing.progress`: tqdm bars or one closing line.
* :mod:`~nmsparse.plumbing.numba_pool`: numba's threading layer and thread count.
"""

from nmsparse.plumbing.errors import LoadError, WriteError
from nmsparse.plumbing.version import __version__

__all__ = ["LoadError", "WriteError", "__version__"]
