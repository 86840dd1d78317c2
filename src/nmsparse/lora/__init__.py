"""LoRA (``peft``) on N:M models that stays N:M: the update is masked by the base weight's support,
so the adapted and the merged weights are N:M (see :mod:`nmsparse.lora.api`, :mod:`nmsparse.lora.layer`).
Needs ``peft`` (imported on first use, not with ``nmsparse``)."""

from nmsparse.lora.masks import lora_masks

_API = ("check_nm_targets", "get_nm_peft_model", "load_nm_adapter", "merge", "nm_lora_config")

__all__ = ["NMLoraLinear", "lora_masks", *_API]


def __getattr__(name: str):
    if name in _API:
        from nmsparse.lora import api

        return getattr(api, name)
    if name == "NMLoraLinear":
        from nmsparse.lora.layer import NMLoraLinear

        return NMLoraLinear
    raise AttributeError(f"module 'nmsparse.lora' has no attribute {name!r}")
