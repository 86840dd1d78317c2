"""A ``peft`` LoRA layer whose update keeps an N:M ``nn.Linear`` N:M.

Plain LoRA adds ``s * B A`` (rank r, dense) to the frozen weight ``W``: merged, the weight is dense.
:class:`NMLoraLinear` keeps ``E = (W != 0)``, the support of the N:M base weight, as the buffer
``nm_mask`` and uses ``W + (s * B A) * E`` instead: the forward is ``x W^T + dropout(x) ((s B A) * E)^T``
(the delta masked, so the layer the model computes is N:M at every step), and ``get_delta_weight``
(which ``merge`` / ``merge_and_unload`` / ``unmerge`` use) returns the masked delta, so the merged
weight has its zeros where ``W`` had them. Registered through ``LoraConfig._register_custom_module``
for ``nn.Linear`` (:func:`nmsparse.lora.nm_lora_config`). The low-rank shortcut ``B (A x)`` cannot be
used with a mask: the masked delta is formed once per forward (an ``out x in`` matrix, like the base).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class NMLoraLinear(LoraLinear):
    """``peft``'s LoRA ``Linear`` with the delta masked by the base weight's support (module doc)."""

    is_nm_lora = True

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if getattr(config, "use_dora", False) or getattr(config, "fan_in_fan_out", False):
            raise ValueError("N:M LoRA supports plain LoRA on nn.Linear only (no use_dora, no fan_in_fan_out)")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        w = self.get_base_layer().weight
        self.register_buffer("nm_mask", (w.detach() != 0), persistent=False)

    def _masked(self, delta: torch.Tensor) -> torch.Tensor:
        return delta * self.nm_mask.to(delta.dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``(s * B A) * E`` of ``adapter`` (shape of the base weight, zeros where it has zeros)."""
        return self._masked(super().get_delta_weight(adapter))

    def _mixed_batch_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ValueError("N:M LoRA layers do not support adapter_names (several adapters in one batch)")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            return self._mixed_batch_forward()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            delta = self._masked((b @ a) * self.scaling[adapter])
            xa = self._cast_input_dtype(x, a.dtype)
            result = result + F.linear(self.lora_dropout[adapter](xa), delta)
            if self.lora_bias[adapter]:
                result = result + self.lora_B[adapter].bias * self.scaling[adapter]
        return result.to(dtype)

    def __repr__(self) -> str:
        return "nm" + super().__repr__()
