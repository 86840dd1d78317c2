"""LoRA adapters (``peft``) on an N:M model that keep it N:M, merged or not.

    config = nmsparse.lora.nm_lora_config(r=8, lora_alpha=16, target_modules=["query", "key", "value"])
    model = nmsparse.lora.get_nm_peft_model(pruned, config, n=2, m=4)   # a peft PeftModel
    ... train (e.g. nmsparse.distill(model, dense, batches, steps=..., finalize_student=False)) ...
    model.save_pretrained("adapter/")                                   # peft's adapter files
    merged = nmsparse.lora.merge(model, n=2, m=4)                       # plain N:M model, checked

``nmsparse.lora.load_nm_adapter(pruned, "adapter/")`` loads a saved adapter back onto the N:M base
(the N:M layer class is registered again: ``adapter_config.json`` cannot record it).
See :mod:`nmsparse.lora.layer` for what the layers compute.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from nmsparse.masking.layout import layer_is_nm
from nmsparse.masking.nm import check_nm

# LoRA initialisations that rewrite the base weight (W - B A ...): they would make it dense
_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "mica", "eva", "orthogonal")


def nm_lora_config(**lora_kwargs: Any):
    """A ``peft.LoraConfig(**lora_kwargs)`` whose ``nn.Linear`` targets get :class:`NMLoraLinear`
    layers. Raises ``ValueError`` for options that would not keep N:M (DoRA, ``fan_in_fan_out``,
    initialisations that rewrite the base weight)."""
    from peft import LoraConfig

    from nmsparse.lora.layer import NMLoraLinear

    init = lora_kwargs.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        raise ValueError(f"init_lora_weights={init!r} rewrites the base weight and would make it dense: use True, "
                         "False or 'gaussian' for an N:M model")
    for flag in ("use_dora", "fan_in_fan_out"):
        if lora_kwargs.get(flag):
            raise ValueError(f"{flag}=True is not supported for N:M LoRA (plain LoRA on nn.Linear only)")
    config = LoraConfig(**lora_kwargs)
    config._register_custom_module({nn.Linear: NMLoraLinear})
    return config


def _targets(model: nn.Module, config: Any) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import check_target_module_exists

    return [(name, mod) for name, mod in model.named_modules() if name and check_target_module_exists(config, name)]


def check_nm_targets(model: nn.Module, config: Any, n: int, m: int) -> list[str]:
    """Names of the modules ``config`` targets in ``model``; ``ValueError`` naming the first one that
    is not an ``nn.Linear`` with an N:M weight (N kept per group of M along its input), or when none is."""
    pattern = check_nm(n, m)
    n, m = pattern
    found = _targets(model, config)
    if not found:
        raise ValueError(f"target_modules {config.target_modules!r} match no module of {type(model).__name__}")
    for name, mod in found:
        if type(mod) is not nn.Linear:
            raise ValueError(f"LoRA target {name!r} is a {type(mod).__name__}: N:M LoRA adapts nn.Linear layers only; "
                             "narrow target_modules")
        if not layer_is_nm(mod.weight, pattern):
            raise ValueError(f"LoRA target {name!r} is not {n}:{m} (more than {n} non-zeros in some group of {m}): "
                             "prune it first, or leave it out of target_modules")
    return [name for name, _ in found]


def get_nm_peft_model(model: nn.Module, config: Any, n: int = 2, m: int = 4, **kwargs: Any):
    """``peft.get_peft_model(model, config)`` (``config`` from :func:`nm_lora_config`) after checking
    that every target is an N:M ``nn.Linear`` (:func:`check_nm_targets`; ``model`` untouched on error).
    Returns the ``PeftModel``: only the LoRA parameters train."""
    from peft import get_peft_model

    _check_config(config)
    check_nm_targets(model, config, n, m)
    return get_peft_model(model, config, **kwargs)


def load_nm_adapter(model: nn.Module, path: str | os.PathLike, n: int = 2, m: int = 4, **kwargs: Any):
    """``PeftModel.from_pretrained(model, path)`` with the N:M LoRA layers: an adapter saved from
    :func:`get_nm_peft_model`'s model, loaded onto the same N:M base (checked as there)."""
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(str(path))
    config._register_custom_module({nn.Linear: _layer_class()})
    check_nm_targets(model, config, n, m)
    return PeftModel.from_pretrained(model, str(path), config=config, **kwargs)


def merge(peft_model: nn.Module, n: int = 2, m: int = 4) -> nn.Module:
    """``peft_model.merge_and_unload()`` (each weight becomes ``W + (s B A) * E``), then every merged
    layer checked N:M (``RuntimeError`` otherwise: a bug). Returns the plain base model."""
    pattern = check_nm(n, m)
    n, m = pattern
    names = [name for name, mod in peft_model.named_modules() if getattr(mod, "is_nm_lora", False)]
    if not names:
        raise ValueError("the model has no N:M LoRA layer: build it with nmsparse.lora.get_nm_peft_model")
    prefix = "base_model.model."
    merged = peft_model.merge_and_unload()
    mods = dict(merged.named_modules())
    for name in names:
        key = name[len(prefix):] if name.startswith(prefix) else name
        if not layer_is_nm(mods[key].weight, pattern):
            raise RuntimeError(f"merged weight of {key!r} is not {n}:{m}")
    return merged


def _layer_class():
    from nmsparse.lora.layer import NMLoraLinear

    return NMLoraLinear


def _check_config(config: Any) -> None:
    custom = getattr(config, "_custom_modules", None) or {}
    if custom.get(nn.Linear) is not _layer_class():
        raise ValueError("config is a plain peft LoraConfig: its merged weights would be dense; build it with "
                         "nmsparse.lora.nm_lora_config(...)")
