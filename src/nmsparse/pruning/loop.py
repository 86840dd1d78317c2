"""The loop of :func:`nmsparse.prune` over a model's layers: calibrate a group of layers (by whole-model
passes, or block by block from each block's cached inputs), then prune each of them with
:func:`nmsparse.pruning.layer.prune_layer`."""

from __future__ import annotations

import copy
import time
import warnings

from nmsparse.calibration import collect as calibration
from nmsparse.calibration import sequential as seq
from nmsparse.calibration.geometry import LayerGeometry
from nmsparse.pruning.layer import prune_layer
from nmsparse.pruning.reconstruct import refit_block

NEEDS_CALIB = ("wanda", "sparsegpt", "adaprune")
NEEDS_GRAM = ("sparsegpt", "adaprune")  # the others read feature norms only (calibration.gram.Gram)


def check_replayable(model, runs, why, calib) -> None:
    """reconstruct='block' needs block runs that replay: checked on the first calibration batch
    before anything is pruned, so that a model it cannot handle is refused untouched."""
    block_runs = [r for r in runs if r.path is not None]
    first = [next(iter(calib))]
    for r in block_runs:
        try:
            seq.capture(model, r, first)
        except seq.FlowError as e:
            why[r.path] = str(e)
    ok = [r for r in block_runs if r.path not in why]
    if not ok:
        reasons = "; ".join(f"{k}: {v}" for k, v in why.items()) or seq.NO_BLOCKS
        raise ValueError(f"reconstruct='block' needs repeated blocks that can be run one by one ({reasons}); "
                         "use reconstruct=None")


class State:
    """What the pruning loop shares: the model, its layers, the options and the results so far."""

    def __init__(self, model, modules, sparse, layout, bin_size, calib, pattern, opts, results, bar) -> None:
        self.model, self.modules, self.sparse, self.layout = model, modules, sparse, layout
        self.bin_size, self.calib, self.pattern, self.opts = bin_size, calib, pattern, opts
        self.results, self.bar = results, bar
        self.full = opts["method"] in NEEDS_GRAM

    def whole_model(self, group: list[str], reached: bool = True) -> None:
        """Calibrate ``group`` by whole-model passes (one per batch), then prune it."""
        t0 = time.perf_counter()
        collectors = None
        if self.calib is not None and reached:
            collectors = collect_group(self.model, {k: (self.modules[k], self.sparse[k].tensor_name) for k in group},
                                        self.layout, self.bin_size, self.calib, self.full)
        self.prune_group(group, collectors, (time.perf_counter() - t0) / len(group))

    def prune_group(self, group: list[str], collectors: dict | None, t_calib: float) -> None:
        for k in group:
            t1 = time.perf_counter()
            grams = collectors[k].grams if collectors else None
            note = ""
            if grams is None and self.opts["method"] in NEEDS_CALIB:
                note = "not reached by the calibration forward pass: pruned by magnitude"
                warnings.warn(f"layer {k}: {note}", stacklevel=3)
            res = prune_layer(self.modules[k], self.sparse[k].tensor_name, self.pattern, self.layout, grams,
                               self.opts)
            res.param, res.note = self.sparse[k].param, note
            res.time_s = t_calib + time.perf_counter() - t1
            self.results[self.sparse[k].param] = res
            self.bar.update(1)


def run_blocks(state: State, run, items: list[dict], recipe, recon, settings: dict, seed: int,
               one_pass: bool = False) -> None:
    """Prune a run's blocks one by one from their cached inputs ``items`` (see
    :mod:`nmsparse.calibration.sequential`), refitting each block when ``recon`` is given.
    Each layer group is calibrated by its own run of the block (earlier groups already pruned), or,
    ``one_pass``, all of a block's groups by one run of the unpruned block."""
    firsts = items
    teacher = items if recon is not None and recon.target == "teacher" else None
    for i, block_groups in enumerate(run.groups):
        j = run.first + i
        block = run.blocks[j]
        prefix = f"{run.path}.{j}."
        runner = seq.BlockRunner(block)
        dense = copy.deepcopy(block) if recon is not None else None
        for group in ([[k for g in block_groups for k in g]] if one_pass and block_groups else block_groups):
            t0 = time.perf_counter()
            local = {"block." + k[len(prefix):]: (state.modules[k], state.sparse[k].tensor_name) for k in group}
            collectors = collect_group(runner, local, state.layout, state.bin_size, items, state.full)
            collectors = {prefix + r[len("block."):]: c for r, c in collectors.items()}
            state.prune_group(group, collectors, (time.perf_counter() - t0) / len(group))
        if recon is not None and block_groups:
            targets = seq.outputs(dense, teacher if teacher is not None else items)
            masks = {k[len(prefix):] + "." + state.sparse[k].tensor_name:
                     getattr(state.modules[k], state.sparse[k].tensor_name).detach() != 0
                     for g in block_groups for k in g}
            info = refit_block(block, items, targets, masks, recon, seed=seed + j)
            settings["reconstruct"]["blocks"][f"{run.path}.{j}"] = info
        if i + 1 < len(run.groups):
            if teacher is not None:
                teacher = seq.advance(dense, teacher, firsts, recipe)
            items = seq.advance(block, items, firsts, recipe)


def collect_group(model, layers: dict, layout, bin_size, calib, full: bool = True) -> dict:
    """Collectors of ``layers`` (name in ``model`` -> (module, tensor name)) after one calibration pass
    per batch; layers reading the very same input share one (one Gram matrix), unless the data flow
    changes between batches (then none share). ``full``: see :class:`nmsparse.calibration.gram.Gram`."""
    device = calibration._device(model)

    def fresh():
        return {k: calibration.LayerCollector(LayerGeometry(mod, layout, t), device, bin_size, full)
                for k, (mod, t) in layers.items()}

    collectors = fresh()
    try:
        calibration.collect(model, collectors, calib, share=len(layers) > 1)
    except calibration.ShareMismatch:
        collectors = fresh()
        calibration.collect(model, collectors, calib)
    return collectors
