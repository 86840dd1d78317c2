"""Back ends that run N:M layers on sparse kernels (CPU and CUDA)."""

# --- semi-structured 2:4 (CUDA kernels; CPU emulation) ---
from nmsparse.kernels.semi_structured import (  # noqa: F401
    CudaOps,
    EmulatedOps,
    SemiStructuredOps,
    cutlass_supported,
    force_emulation,
    ops_for,
    shape_problem,
)
from nmsparse.kernels.semi_structured_autograd import compute_dtype, semi_structured_linear  # noqa: F401
