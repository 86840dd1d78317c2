"""Re-estimating batch-norm statistics after pruning (:func:`recalibrate_batchnorm`)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from nmsparse.calibration import collect as calibration


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calib: Iterable) -> int:
    """Re-estimate the running mean and variance of every batch-norm layer of ``model`` from the
    calibration batches (a cumulative average over them), as the AdaPrune authors do after pruning.
    Other layers run in eval mode; the model's training mode is restored. Returns the number of
    batch-norm layers updated (0 when there are none; ``calib`` is then not used)."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
           and mod.track_running_stats]
    if not bns:
        return 0
    calib = calibration.prepare(calib)
    if calib is None:
        raise ValueError("recalibrate_batchnorm needs calibration data (an iterable of input batches)")
    was_training = model.training
    saved = [(mod, mod.momentum, mod.training) for mod in bns]
    model.eval()
    device = calibration._device(model)
    try:
        for mod in bns:
            mod.reset_running_stats()
            mod.momentum = None  # cumulative moving average over the calibration batches
            mod.train()
        for item in calib:
            calibration._call(model, calibration._to(calibration._inputs(item), device))
    finally:
        for mod, momentum, training in saved:
            mod.momentum = momentum
            mod.train(training)
        model.train(was_training)
    return len(bns)
