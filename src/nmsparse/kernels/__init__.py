"""Back ends that run N:M layers on sparse kernels.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.

* CPU inference: :class:`NMLinear` (packed weight, numba kernel), :func:`to_nm_linear` (module conversion).
  Kernels: :mod:`~nmsparse.kernels.cpu_nm` (layout, packing, AVX-512 kernel), :mod:`~nmsparse.kernels.cpu_nm_avx2`
  (AVX2+FMA kernel), :mod:`~nmsparse.kernels.cpu_select` (which one this CPU runs, overrides),
  :mod:`~nmsparse.kernels.tune` (crossovers timed at conversion), :mod:`~nmsparse.kernels.nm_op`
  (custom ops for ``torch.compile`` / ``torch.export``).
* NVIDIA 2:4 semi-structured kernels for training and inference (CUDA; a CPU emulation for tests):
  :mod:`nmsparse.kernels.semi_structured`, :mod:`nmsparse.kernels.semi_structured_autograd`; training on
  them (:mod:`~nmsparse.kernels.semi_training`, registered as ``sparsify(..., backend="semi-structured")``
  when this package is imported) and inference (:mod:`~nmsparse.kernels.semi_convert`:
  :func:`to_semi_structured`).
"""

from nmsparse.kernels.convert import ConvertedLayer, NMLinearReport, to_nm_linear
from nmsparse.kernels.nm_linear import NMLinear
from nmsparse.kernels.semi_structured import (
    CudaOps,
    EmulatedOps,
    SemiStructuredOps,
    cutlass_supported,
    force_emulation,
    ops_for,
    shape_problem,
)
from nmsparse.kernels.semi_structured_autograd import compute_dtype, semi_structured_linear
from nmsparse.kernels.semi_convert import semi_structured_plan, to_semi_structured
from nmsparse.kernels.semi_training import SemiStructuredBackend  # registers backend="semi-structured"

__all__ = ["ConvertedLayer", "CudaOps", "EmulatedOps", "NMLinear", "NMLinearReport", "SemiStructuredOps",
           "compute_dtype", "cutlass_supported", "force_emulation", "ops_for", "semi_structured_linear",
           "SemiStructuredBackend", "semi_structured_plan", "shape_problem", "to_nm_linear", "to_semi_structured"]
