"""The fine-tuning recipe after pruning: inherited from the training run, overridable, never silently wrong."""

from __future__ import annotations

import pytest

from nmsparse.training.recipe import FALLBACK_LR, finetune_recipe

ADAMW_RUN = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9}
SGD_RUN = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.8}


def test_inherits_the_training_run_at_a_tenth_of_its_lr():
    assert finetune_recipe(SGD_RUN) == {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "momentum": 0.8}
    assert finetune_recipe(ADAMW_RUN) == {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05}
    # a training config without an optimizer entry was trained by the default, SGD
    assert finetune_recipe({"lr": 0.2})["lr"] == 0.02


def test_no_training_config_uses_the_fallbacks():
    assert finetune_recipe({}) == {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-5, "momentum": 0.9}
    assert finetune_recipe({}, optimizer="adamw") == {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 5e-5}


@pytest.mark.parametrize("run, optimizer", [(ADAMW_RUN, "sgd"), (SGD_RUN, "adamw")])
def test_another_optimizer_inherits_nothing(run, optimizer):
    r = finetune_recipe(run, optimizer=optimizer)
    assert r["optimizer"] == optimizer and r["lr"] == FALLBACK_LR[optimizer] and r["weight_decay"] == 5e-5


def test_explicit_values_win():
    r = finetune_recipe(SGD_RUN, lr=0.3, weight_decay=0.0, momentum=0.0)
    assert r == {"optimizer": "sgd", "lr": 0.3, "weight_decay": 0.0, "momentum": 0.0}


@pytest.mark.parametrize("run, message", [
    ({"optimizer": "lion"}, "the checkpoint records optimizer 'lion': not one of sgd, adamw; pass --finetune-optimizer"),
    ({"lr": "1e-3"}, "the checkpoint records lr '1e-3': must be a positive number; pass --finetune-lr"),
    ({"lr": True}, "the checkpoint records lr True"),
    ({"lr": float("nan")}, "the checkpoint records lr nan"),
    ({"weight_decay": None}, "the checkpoint records weight_decay None: must be a number >= 0; pass --finetune-weight-decay"),
    ({"momentum": 1.0}, "the checkpoint records momentum 1.0: must be in [0, 1); pass --finetune-momentum"),
])
def test_bad_recorded_values_are_named(run, message):
    with pytest.raises(ValueError) as e:
        finetune_recipe(run)
    assert message in str(e.value)


def test_bad_recorded_values_are_overridable():
    assert finetune_recipe({"lr": "1e-3", "weight_decay": None}, lr=0.05, weight_decay=0.0)["lr"] == 0.05


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "lion"}, "--finetune-optimizer 'lion': not one of sgd, adamw"),
    ({"lr": 0.0}, "--finetune-lr 0.0: must be a positive number"),
    ({"lr": float("inf")}, "--finetune-lr inf"),
    ({"weight_decay": -1.0}, "--finetune-weight-decay -1.0"),
    ({"optimizer": "adamw", "momentum": 0.9}, "--finetune-momentum 0.9 applies to SGD, not adamw"),
])
def test_bad_explicit_values(kwargs, message):
    with pytest.raises(ValueError) as e:
        finetune_recipe(SGD_RUN, **kwargs)
    assert message in str(e.value)
