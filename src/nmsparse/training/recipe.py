"""The fine-tuning recipe after pruning: which optimizer, learning rate, weight decay and momentum.

By default the recipe follows the run that trained the checkpoint (its ``config`` as recorded by
``nmsparse train``): the same optimizer, weight decay and momentum, at a tenth of its peak learning
rate. Values given explicitly win. When the optimizer differs from the training run's, nothing else is
inherited from it (an AdamW learning rate means nothing to SGD): the fallbacks below apply. A value the
checkpoint records but that is not valid is an error that names it, never silently replaced.
"""

from __future__ import annotations

import math

from nmsparse.training.config import OPTIMIZERS, TrainConfig

#: Peak learning rate when neither the caller nor a matching training run gives one.
FALLBACK_LR = {"sgd": 0.01, "adamw": 1e-4}


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None when it is not a real number (bools and strings included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def finetune_recipe(
    source: dict,
    *,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
) -> dict:
    """Resolve the fine-tuning recipe from explicit values and the training config ``source`` of the
    checkpoint (``{}`` if it records none). Returns ``{"optimizer", "lr", "weight_decay"}`` plus
    ``"momentum"`` for SGD. Raises ValueError naming the bad value and the option that replaces it
    (the ``--finetune-*`` flags of ``nmsparse prune``)."""

    def bad(what: str, value: object, rule: str, flag: str, recorded: bool) -> ValueError:
        where = f"the checkpoint records {what} {value!r}" if recorded else f"{flag} {value!r}"
        hint = f"; pass {flag}" if recorded else ""
        return ValueError(f"{where}: {rule}{hint}")

    trained_with = source.get("optimizer", "sgd") if source else None
    if optimizer is None:
        optimizer = trained_with or "sgd"
        if optimizer not in OPTIMIZERS:
            raise bad("optimizer", optimizer, f"not one of {', '.join(OPTIMIZERS)}", "--finetune-optimizer", True)
    elif optimizer not in OPTIMIZERS:
        raise bad("optimizer", optimizer, f"not one of {', '.join(OPTIMIZERS)}", "--finetune-optimizer", False)
    inherit = optimizer == trained_with

    def resolve(key: str, given: float | None, flag: str, ok, rule: str, fallback: float, divisor: float = 1.0):
        if given is not None:
            v = _number(given)
            if v is None or not ok(v):
                raise bad(key, given, rule, flag, False)
            return v
        if inherit and key in source:
            v = _number(source[key])
            if v is None or not ok(v):
                raise bad(key, source[key], rule, flag, True)
            return v / divisor
        return fallback

    recipe = {
        "optimizer": optimizer,
        "lr": resolve("lr", lr, "--finetune-lr", lambda v: v > 0, "must be a positive number",
                      FALLBACK_LR[optimizer], divisor=10),
        "weight_decay": resolve("weight_decay", weight_decay, "--finetune-weight-decay", lambda v: v >= 0,
                                "must be a number >= 0", TrainConfig.weight_decay),
    }
    if optimizer == "sgd":
        recipe["momentum"] = resolve("momentum", momentum, "--finetune-momentum", lambda v: 0 <= v < 1,
                                     "must be in [0, 1)", TrainConfig.momentum)
    elif momentum is not None:
        raise ValueError(f"--finetune-momentum {momentum!r} applies to SGD, not {optimizer}")
    return recipe
