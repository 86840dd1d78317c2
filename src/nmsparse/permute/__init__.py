"""Channel permutations for N:M sparsity (Pool and Yu, NeurIPS 2021): reorder the input channels of
the layers to be sparsified, and the output channels of the layers producing them, so that N:M keeps
more of each weight, without changing the model's function.

* :mod:`~nmsparse.permute.search`: the permutation search on an importance matrix (exact or local).
* :mod:`~nmsparse.permute.graph`: which layers share a permutation (a walk over the model's graph).
* :mod:`~nmsparse.permute.tracing`, :mod:`~nmsparse.permute.export_graph`: that graph, from ``torch.fx``
  or, where it fails (transformers models), ``torch.export``.
* :mod:`~nmsparse.permute.apply`: permuting producers, consumers, norms and tied parameters.
* :mod:`~nmsparse.permute.channels`: :func:`permute_channels`, the driver.
"""

from nmsparse.permute.channels import SCORES, permute_channels
from nmsparse.permute.graph import Analysis, Space, TraceError
from nmsparse.permute.report import PermuteLayer, PermuteReport, SpaceResult
from nmsparse.permute.search import SearchResult, exact_cost, kept, search_permutation
from nmsparse.permute.tracing import analyse

__all__ = [
    "SCORES",
    "Analysis",
    "PermuteLayer",
    "PermuteReport",
    "SearchResult",
    "Space",
    "SpaceResult",
    "TraceError",
    "analyse",
    "exact_cost",
    "kept",
    "permute_channels",
    "search_permutation",
]
