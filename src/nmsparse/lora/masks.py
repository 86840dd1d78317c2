"""The keep-masks of N:M LoRA layers, read without importing ``peft`` (for drivers such as
:func:`nmsparse.distill`)."""

from __future__ import annotations

import torch
from torch import nn


def lora_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: copy of its keep-mask E}`` for every N:M LoRA layer (:mod:`nmsparse.lora.layer`)
    of ``model``; ``{}`` when it has none."""
    return {name: mod.nm_mask.clone() for name, mod in model.named_modules()
            if getattr(mod, "is_nm_lora", False) and isinstance(getattr(mod, "nm_mask", None), torch.Tensor)}
