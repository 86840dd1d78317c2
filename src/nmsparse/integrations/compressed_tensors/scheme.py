"""The ``quantization_config`` entry of a compressed-tensors ``config.json``: what nmsparse reads of it.

compressed-tensors 0.14 writes (``ModelCompressor.update_config``)::

    "quantization_config": {
      "quant_method": "compressed-tensors", "version": "0.14.0.1",
      "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                          "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 0.5, ...},
      "transform_config": {},
      # only for quantized models:
      "format": "float-quantized", "quantization_status": "compressed", "ignore": [...],
      "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
                                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", ...},
                                    "input_activations": {...} or null, "output_activations": null}},
      "kv_cache_scheme": null
    }

A target or ignore entry matches a module by its exact name, by ``re:<regex>`` (``re.match`` on the
name) or by its class name (``"Linear"``), as compressed-tensors' ``match_named_modules`` does.
Supported: ``sparse-24-bitmask`` with structure 2:4, either unquantized or with FP8 (``float8_e4m3fn``)
weights, per-tensor or per-channel, symmetric (formats ``float-quantized`` / ``naive-quantized``).
Anything else raises ``ValueError`` naming the scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

SPARSE_FORMAT = "sparse-24-bitmask"
QUANT_METHOD = "compressed-tensors"
FP8_FORMATS = ("float-quantized", "naive-quantized")
WEIGHT_STRATEGIES = ("tensor", "channel")
WRITER_VERSION = "0.14.0.1"  # the compressed-tensors release whose files ours match


@dataclass
class Scheme:
    """What a folder's config says: sparsity targets/ignore, and the FP8 groups (may be empty)."""

    targets: list[str]
    ignore: list[str]
    structure: str
    fp8_groups: list[dict] = field(default_factory=list)  # {"targets", "strategy", "activations"}
    quant_ignore: list[str] = field(default_factory=list)

    def is_target(self, name: str, module: nn.Module) -> bool:
        """Whether the sparsity config names module ``name`` (targets, less ignore)."""
        return matches(name, module, self.targets) and not matches(name, module, self.ignore)

    def fp8_group(self, name: str, module: nn.Module) -> dict | None:
        """The FP8 group that quantizes module ``name``, or None."""
        if matches(name, module, self.quant_ignore):
            return None
        for g in self.fp8_groups:
            if matches(name, module, g["targets"]):
                return g
        return None


def matches(name: str, module: nn.Module | None, patterns: list[str]) -> bool:
    """compressed-tensors' matching: exact name, ``re:`` regex (``re.match``) or class name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or (module is not None and p == type(module).__name__):
            return True
    return False


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, got {value!r}")
    return list(value)


def parse(qc: object) -> Scheme:
    """The :class:`Scheme` of a ``quantization_config`` dict; ``ValueError`` naming what is not supported."""
    if not isinstance(qc, dict):
        raise ValueError("config.json has no compressed-tensors 'quantization_config' (not a compressed-tensors "
                         "folder: load it with transformers' from_pretrained)")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config has quant_method {method!r}, not {QUANT_METHOD!r}: nmsparse reads "
                         "compressed-tensors folders only")
    sc = qc.get("sparsity_config") or {}
    fmt = sc.get("format") if isinstance(sc, dict) else None
    if fmt != SPARSE_FORMAT:
        raise ValueError(f"sparsity_config format is {fmt!r}: nmsparse reads {SPARSE_FORMAT!r} folders (2:4 "
                         "weights stored as values + bitmask)")
    structure = str(sc.get("sparsity_structure") or "")
    if structure.lower() != "2:4":
        raise ValueError(f"sparsity_config sparsity_structure is {structure!r}; {SPARSE_FORMAT} is 2:4 only")
    targets = _strings(sc.get("targets"), "sparsity_config targets") or ["Linear"]
    scheme = Scheme(targets, _strings(sc.get("ignore"), "sparsity_config ignore"), "2:4")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise ValueError(f"quantization_config config_groups must be an object, got {groups!r}")
    if qc.get("kv_cache_scheme"):
        raise ValueError("quantization scheme 'kv_cache_scheme' (quantized KV cache) is not supported: nmsparse "
                         "dequantizes weights only")
    for gname, g in groups.items():
        scheme.fp8_groups.append(_fp8_group(gname, g, qc.get("format")))
    scheme.quant_ignore = _strings(qc.get("ignore"), "quantization_config ignore")
    return scheme


def _fp8_group(gname: str, g: object, global_format: object) -> dict:
    if not isinstance(g, dict):
        raise ValueError(f"quantization_config group {gname!r} is not an object")
    fmt = g.get("format") or global_format
    w = g.get("weights")
    desc = _describe(w)
    if not isinstance(w, dict) or fmt not in FP8_FORMATS or w.get("type") != "float" or w.get("num_bits") != 8:
        raise ValueError(f"quantization scheme of group {gname!r} (format {fmt!r}, weights {desc}) is not supported: "
                         "nmsparse reads unquantized or FP8 (float8_e4m3, per-tensor or per-channel) 2:4 weights")
    if w.get("strategy") not in WEIGHT_STRATEGIES or w.get("dynamic") or w.get("symmetric") is False \
            or w.get("actorder"):
        raise ValueError(f"quantization scheme of group {gname!r} (FP8 weights {desc}) is not supported: nmsparse "
                         "dequantizes symmetric FP8 weights with per-tensor or per-channel scales")
    if g.get("output_activations"):
        raise ValueError(f"quantization scheme of group {gname!r} quantizes output activations, which is not "
                         "supported")
    return {"name": gname, "targets": _strings(g.get("targets"), f"group {gname!r} targets"),
            "strategy": w["strategy"], "activations": _describe(g.get("input_activations"))}


def _describe(args: object) -> str:
    if not isinstance(args, dict):
        return "none"
    kind = f"{args.get('type')}{args.get('num_bits')}"
    how = "dynamic" if args.get("dynamic") else "static"
    group = f", group {args.get('group_size')}" if args.get("group_size") else ""
    return f"{kind} {args.get('strategy')} {how}{group}"


def sparsity_entry(ignore: list[str], global_sparsity: float) -> dict:
    """The ``quantization_config`` compressed-tensors 0.14 writes for an unquantized 2:4 model whose
    ``Linear`` layers are all compressed except those named in ``ignore``."""
    return {
        "quant_method": QUANT_METHOD,
        "sparsity_config": {"format": SPARSE_FORMAT, "global_sparsity": global_sparsity, "ignore": list(ignore),
                            "registry_requires_subclass": False, "sparsity_structure": "2:4",
                            "targets": ["Linear"]},
        "transform_config": {},
        "version": WRITER_VERSION,
    }
