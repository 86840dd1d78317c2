"""Block-wise reconstruction: refit a pruned block's parameters jointly, masks fixed.

After the masks of a block's layers are chosen (by any method), :func:`refit_block` runs Adam over
every floating-point parameter of the block (the kept weights of its pruned layers, their biases,
its dense layers and norms) on the mean squared error between the block's output and a target (the
dense block's output on the same inputs, or the dense model's hidden states), over the cached
calibration inputs of the block, one calibration batch per step. Pruned positions stay exactly zero:
their gradient is masked and the weights are multiplied by the mask after every step. Padded tokens
(a 2-D ``attention_mask`` in the calibration item) are left out of the loss.

Some calibration batches are held out: every ``eval_every`` steps their loss is measured and the
parameters with the lowest held-out loss so far are kept (the starting point included, so the
held-out loss never rises); training stops after ``patience`` evaluations without improvement.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nmsparse.calibration import collect as calibration
from nmsparse.pruning.options import BlockReconstruct
from nmsparse.calibration.sequential import block_output


def _loss(block: nn.Module, item: dict, target: torch.Tensor) -> torch.Tensor:
    out = block_output(block(*item["block_args"], **item["block_kwargs"]))
    diff = (out.float() - target.float()).pow(2)
    mask = item.get("attention_mask")
    if mask is not None and diff.dim() >= 3 and tuple(mask.shape) == tuple(diff.shape[:2]):
        keep = mask.to(device=diff.device, dtype=torch.bool)
        return diff[keep].mean() if bool(keep.any()) else diff.sum() * 0.0
    return diff.mean()


def _held_loss(block: nn.Module, items: list[dict], targets: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(_loss(block, it, t)) for it, t in zip(items, targets)) / max(1, len(items))


def refit_block(
    block: nn.Module,
    items: list[dict],
    targets: list[torch.Tensor],
    masks: dict[str, torch.Tensor],
    opts: BlockReconstruct,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit ``block``'s parameters in place so that its output on ``items`` (calibration items of a
    :class:`~nmsparse.calibration.sequential.BlockRunner`) approaches ``targets`` (one tensor per item, the
    block's hidden-state output's shape). ``masks``: parameter name (in ``block``) -> bool keep-mask;
    those parameters keep their zeros. Returns what happened: steps run, best step, loss on the
    held-out batches (or on the training batches when none is held out) before and after."""
    n = len(items)
    k = max(1, round(opts.held_out * n)) if n >= 2 and opts.held_out > 0 else 0
    train, held = list(range(n - k)), list(range(n - k, n))
    val_items = [items[i] for i in (held or train)]
    val_targets = [targets[i] for i in (held or train)]
    params = {name: p for name, p in block.named_parameters() if p.dtype.is_floating_point}
    fmasks = {name: masks[name].to(device=p.device, dtype=p.dtype) for name, p in params.items() if name in masks}
    was_training = block.training
    block.eval()  # no dropout
    saved = {name: p.requires_grad for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"held_out_batches": len(held), "train_batches": len(train)}
    try:
        with calibration.no_attention_fastpath():
            best = _held_loss(block, val_items, val_targets)
            info["loss_before"] = best
            best_state = {name: p.detach().clone() for name, p in params.items()}
            best_step, bad, step = 0, 0, 0
            if opts.steps == 0 or not train:
                info.update(steps=0, best_step=0, loss_after=best)
                return info
            for p in params.values():
                p.requires_grad_(True)
            opt = torch.optim.Adam(list(params.values()), lr=opts.lr)
            order: list[int] = []
            while step < opts.steps:
                if not order:
                    order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
                i = order.pop()
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss = _loss(block, items[i], targets[i])
                    loss.backward()
                for name, mk in fmasks.items():
                    g = params[name].grad
                    if g is not None:
                        g.mul_(mk)
                opt.step()
                with torch.no_grad():
                    for name, mk in fmasks.items():
                        params[name].mul_(mk)
                step += 1
                if step % opts.eval_every == 0 or step == opts.steps:
                    cur = _held_loss(block, val_items, val_targets)
                    if not math.isfinite(cur):
                        break
                    if cur < best:
                        best, best_step, bad = cur, step, 0
                        best_state = {name: p.detach().clone() for name, p in params.items()}
                    else:
                        bad += 1
                        if bad >= opts.patience:
                            break
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best_state[name])
            info.update(steps=step, best_step=best_step, loss_after=best)
            return info
    finally:
        for name, p in params.items():
            p.requires_grad_(saved[name])
            p.grad = None
        block.train(was_training)
