"""Back ends that run N:M layers: packed CPU inference (numba) and module conversion.

N is the number of weights **kept** in every group of M consecutive weights along ``in``.
"""

# --- CPU N:M inference (NMLinear, to_nm_linear): keep these re-exports in this one block ---
from nmsparse.kernels.convert import ConvertedLayer, NMLinearReport, to_nm_linear
from nmsparse.kernels.nm_linear import NMLinear

# --- end CPU N:M inference ---

__all__ = ["ConvertedLayer", "NMLinear", "NMLinearReport", "to_nm_linear"]
