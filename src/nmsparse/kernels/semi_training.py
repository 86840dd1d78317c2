"""Training on NVIDIA 2:4 semi-structured kernels: ``nmsparse.sparsify(..., backend="semi-structured")``.

Each sparse ``nn.Linear`` runs on 2:4 semi-structured kernels
(:func:`nmsparse.kernels.semi_structured_autograd.semi_structured_linear`): the module gets an instance
attribute ``forward`` (a :class:`SemiStructuredForward`, which shadows ``nn.Linear.forward``) that reads
the dense weight and the mask straight from the parametrization and never materialises ``E * W`` in
float32. The mask refresh (the forward pre-hook of :func:`nmsparse.sparsify`) runs before it as before,
so masks are recomputed every ``update_every`` training passes. :func:`nmsparse.finalize` removes it.
Only 2:4 and only Linear layers; a layer whose ``(out, in)`` weight does not meet the kernels' minimum
shape keeps the masked-dense path, and one whose transpose does not (or whose mask is not
transposable) gets a sparse forward only: :meth:`SemiStructuredBackend.attach` returns that note for the
report. Registered with :mod:`nmsparse.surgery.backends` when :mod:`nmsparse.kernels` is imported.
"""

from __future__ import annotations

from torch import nn

from nmsparse.kernels.semi_structured import shape_problem
from nmsparse.kernels.semi_structured_autograd import semi_structured_linear
from nmsparse.surgery import backends


class SemiStructuredForward:
    """``forward`` of one sparsified ``nn.Linear`` on the semi-structured kernels (see module doc)."""

    def __init__(self, module: nn.Linear, sparse_input_grad: bool) -> None:
        self.module = module
        self.sparse_input_grad = sparse_input_grad

    def __call__(self, x):
        mod = self.module
        plist = mod.parametrizations["weight"]
        p = plist[0]
        return semi_structured_linear(
            x, plist.original, p.mask, mod.bias, method=p.method, decay=p.decay,
            sparse_input_grad=self.sparse_input_grad,
        )


class SemiStructuredBackend:
    """The ``"semi-structured"`` training back end (see module doc)."""

    name = "semi-structured"

    def check(self, n: int, m: int) -> None:
        if (n, m) != (2, 4):
            raise ValueError(
                f"backend='semi-structured' needs n=2, m=4 (the only pattern of the 2:4 sparse kernels), "
                f"got n={n}, m={m}; use backend='dense' for other N:M"
            )

    def attach(self, module: nn.Module, parametrization: nn.Module) -> str:
        if not isinstance(module, nn.Linear):
            kind = type(module).__name__.removeprefix("Parametrized")
            return f"masked dense: {kind} has no semi-structured kernel (Linear only)"
        plist = module.parametrizations["weight"]
        if len(plist) != 1 or plist[0] is not parametrization:
            return "masked dense: the weight has other parametrizations as well"
        out_f, in_f = module.weight.shape
        problem = shape_problem((out_f, in_f))
        if problem:
            return f"masked dense: weight {problem}"
        transposed = shape_problem((in_f, out_f))
        if not parametrization.transposable:
            backward = "input gradient dense (mask not transposable; use transposable=True)"
        elif transposed:
            backward = f"input gradient dense (transposed weight {transposed})"
        else:
            backward = "input gradient sparse"
        module.forward = SemiStructuredForward(module, sparse_input_grad=backward == "input gradient sparse")
        return f"semi-structured forward, {backward}; fp16/bf16 compute only (fp32 runs masked dense)"

    def detach(self, module: nn.Module) -> None:
        if isinstance(module.__dict__.get("forward"), SemiStructuredForward):
            del module.__dict__["forward"]


backends.register(SemiStructuredBackend())
