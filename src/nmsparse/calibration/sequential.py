"""Sequential calibration: run the model block by block instead of once per pruned layer.

A model's repeated blocks are an ``nn.ModuleList`` (or ``nn.Sequential``) of modules of one type with
the same parameter names and shapes (BERT's ``encoder.layer``, a ViT's or LLaMA's layers, ``nn.TransformerEncoder``'s
``layers``). :func:`plan` splits the pruned layers, in forward order, into *runs*: the layers of one
such list, contiguous in the forward order, and everything else ("loose" layers, pruned as before:
one calibration pass through the whole model per layer group).

For a run, :func:`capture` runs each calibration batch through the model as it is now, once, up to
the run's first block and records that block's arguments (positional and keyword: hidden states,
attention masks, position embeddings); on the first batch it runs on to the run's last block and
works out, from the data flow alone, how each block's arguments come from the one before: every
argument is either the very object the first block got (a mask, rotary embeddings) or an element of
the previous block's output (the hidden states; T5's position bias). Blocks that are not called
once each in order, or whose arguments come from anywhere else, are not run block-wise: the run
falls back to whole-model passes, and the report says why. A cache argument (``past_key_values``)
(an object of a class named ``...Cache``, e.g. transformers' ``DynamicCache``, whatever its keyword)
is replaced by None: a block runs several times on the same inputs, and a cache would grow.

Each block's layers are then calibrated from the cached arguments (:class:`BlockRunner` calls the
block alone), pruned, and the pruned block is run once to give the next block its arguments. The
layers' inputs are the same tensors as a whole-model pass computes (same modules, same batches,
same order), so the pruned weights are the same bits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from nmsparse.calibration import collect as calibration

NO_BLOCKS = "no nn.ModuleList or nn.Sequential of identical blocks (same type, same parameter shapes) holds a pruned layer"
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class BlockRunner(nn.Module):
    """Calls ``block`` with recorded arguments. A calibration item for it is
    ``{"block_args": tuple, "block_kwargs": dict, "attention_mask": 2-D token mask or absent}``; the
    token mask is where :mod:`nmsparse.calibration.collect` looks for padding."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, block_args: tuple, block_kwargs: dict, attention_mask: torch.Tensor | None = None) -> Any:
        return self.block(*block_args, **block_kwargs)


@dataclasses.dataclass
class Run:
    """Consecutive layer groups (forward order) pruned the same way: ``path`` is the block list's
    module name (None: loose layers, whole-model passes); ``groups[i]`` are the groups of block
    ``first + i`` (for loose layers, one entry holding all groups)."""

    path: str | None
    groups: list[list[list[str]]]
    first: int = 0
    blocks: nn.ModuleList | None = None


def _signature(mod: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in mod.state_dict().items())


def block_lists(model: nn.Module, names: Iterable[str]) -> dict[str, nn.ModuleList]:
    """The outermost ``nn.ModuleList``s / ``nn.Sequential``s of ``model`` whose modules share one type and
    one state-dict signature and that hold at least one of ``names`` (module names), by module path."""
    names = list(names)
    found: dict[str, nn.ModuleList] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        if any(path.startswith(p + ".") for p in found):
            continue  # inside a block list already found (e.g. a block's experts)
        if len({type(b) for b in mod}) != 1 or len({_signature(b) for b in mod}) != 1:
            continue
        if not any(n.startswith(path + ".") for n in names):
            continue
        found[path] = mod
    return found


def _block_of(name: str, lists: dict[str, nn.ModuleList]) -> tuple[str, int] | None:
    for path in lists:
        if name.startswith(path + "."):
            idx = name[len(path) + 1:].split(".", 1)[0]
            if idx.isdigit():
                return path, int(idx)
    return None


def plan(model: nn.Module, groups: list[list[str]]) -> tuple[list[Run], dict[str, str]]:
    """Split ``groups`` (layer groups in forward order) into runs (see module doc). Returns the runs
    and, per block list not used, why (a list whose layers are not contiguous in the forward order,
    or a group that spans two blocks)."""
    lists = block_lists(model, [k for g in groups for k in g])
    why: dict[str, str] = {} if lists else {"model": NO_BLOCKS}
    where = []
    for g in groups:
        places = {_block_of(k, lists) for k in g}
        if len(places) > 1:
            for p in places:
                if p is not None:
                    why[p[0]] = f"layers {g} read one input but sit in different blocks"
            where.append(None)
        else:
            where.append(places.pop())
    # a list whose groups are not contiguous in the forward order, or not in block order, falls back
    for path in lists:
        idx = [i for i, w in enumerate(where) if w is not None and w[0] == path]
        blocks = [where[i][1] for i in idx]
        if idx and (idx != list(range(idx[0], idx[-1] + 1)) or blocks != sorted(blocks)):
            why.setdefault(path, "its layers are not called block after block in the forward order")
    runs: list[Run] = []
    for g, w in zip(groups, where):
        if w is None or w[0] in why:
            if runs and runs[-1].path is None:
                runs[-1].groups[0].append(g)
            else:
                runs.append(Run(None, [[g]]))
            continue
        path, b = w
        if not runs or runs[-1].path != path:
            runs.append(Run(path, [[]], first=b, blocks=lists[path]))
        run = runs[-1]
        while run.first + len(run.groups) - 1 < b:
            run.groups.append([])
        run.groups[-1].append(g)
    return runs, why


class FlowError(Exception):
    """The blocks of a run do not pass their outputs on in a way :func:`capture` can replay."""


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str, type(None))) and isinstance(b, (bool, int, float, str, type(None))):
        return type(a) is type(b) and a == b
    return False


def _parts(out: Any) -> list[Any]:
    if isinstance(out, (tuple, list)):
        return list(out)
    return [out]


def _slot_recipe(args: tuple, kwargs: dict, first: tuple[tuple, dict], prev_out: Any) -> tuple:
    """How the arguments ``(args, kwargs)`` of a block come from the first block's and the previous
    block's output: per slot ``("out", k)`` (element k of the output, None: the output itself) or
    ``("same",)``. Raises FlowError when a slot is neither."""
    fa, fk = first
    if len(args) != len(fa) or set(kwargs) != set(fk):
        raise FlowError("the blocks are called with different arguments")
    parts = _parts(prev_out)
    whole = not isinstance(prev_out, (tuple, list))

    def one(value, ref):
        for k, p in enumerate(parts):
            if isinstance(p, torch.Tensor) and value is p:
                return ("out", None if whole else k)
        if _same(value, ref):
            return ("same",)
        raise FlowError("an argument of a block is neither the previous block's output nor the first block's")

    return (tuple(one(v, r) for v, r in zip(args, fa)), tuple((k, one(kwargs[k], fk[k])) for k in sorted(kwargs)))


def _is_cache(key: str, value: Any) -> bool:
    """A key/value cache argument (``transformers``' ``Cache`` objects, whatever the keyword)."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return False
    return key in CACHE_KWARGS or any(c.__name__.endswith("Cache") for c in type(value).__mro__)


def _clean(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kw = {k: (None if _is_cache(k, v) else v) for k, v in kwargs.items()}
    return tuple(None if _is_cache("", a) else a for a in args), kw


def _token_mask(item: Any, device: torch.device) -> torch.Tensor | None:
    mask = calibration._token_mask(calibration._inputs(item))
    return None if mask is None else mask.to(device)


class _StopAfter(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, run: Run, calib: Iterable) -> tuple[list[dict], tuple | None]:
    """The calibration items of the run's first block (one per calibration batch, see
    :class:`BlockRunner`) and the recipe that makes a block's arguments from the previous block's
    output (None when the run has one block). Raises FlowError (model untouched) when the blocks
    cannot be replayed one by one."""
    device = calibration._device(model)
    blocks = run.blocks
    first, last = run.first, run.first + len(run.groups) - 1
    state: dict[str, Any] = {"batch": 0, "calls": [], "outs": {}, "seen": {}}
    handles = []

    def pre(j):
        def hook(mod, args, kwargs):
            state["calls"].append(j)
            if state["batch"] == 0:
                state["seen"][j] = (args, kwargs)
            if j == first:
                state["first"] = (args, kwargs)
                if state["batch"] > 0 or first == last:
                    raise calibration._Stop
        return hook

    def post(j):
        def hook(mod, args, kwargs, out):
            state["outs"][j] = out
            if j == last:
                raise calibration._Stop
        return hook

    for j in range(first, last + 1):
        handles.append(blocks[j].register_forward_pre_hook(pre(j), with_kwargs=True))
        handles.append(blocks[j].register_forward_hook(post(j), with_kwargs=True))
    items: list[dict] = []
    recipe = None
    try:
        with calibration.no_attention_fastpath():
            for item in calib:
                inputs = calibration._to(calibration._inputs(item), device)
                state["calls"] = []
                state.pop("first", None)
                try:
                    calibration._call(model, inputs)
                except calibration._Stop:
                    pass
                if "first" not in state:
                    raise FlowError(f"the calibration pass never reached block {first} of {run.path}")
                if state["batch"] == 0:
                    if state["calls"] != list(range(first, last + 1)):
                        raise FlowError(f"blocks {first}..{last} of {run.path} are not called once each, in order "
                                        f"(calls: {state['calls'][:8]})")
                    recipes = {_slot_recipe(*_clean(*state["seen"][j]), _clean(*state["seen"][first]),
                                            state["outs"][j - 1]) for j in range(first + 1, last + 1)}
                    if len(recipes) > 1:
                        raise FlowError("the blocks pass their outputs on in different ways")
                    recipe = recipes.pop() if recipes else None
                    for h in handles[1:]:
                        h.remove()
                    handles = handles[:1]
                    state["seen"], state["outs"] = {}, {}
                args, kwargs = _clean(*state.pop("first"))
                entry = {"block_args": args, "block_kwargs": kwargs}
                mask = _token_mask(item, device)
                if mask is not None:
                    entry["attention_mask"] = mask
                items.append(entry)
                state["batch"] += 1
    finally:
        for h in handles:
            h.remove()
    return items, recipe


def advance(block: nn.Module, items: list[dict], firsts: list[dict], recipe: tuple) -> list[dict]:
    """The next block's items: ``block`` (eval mode) run on each item, its output placed by ``recipe``
    and the other arguments taken from the first block's item of the same batch (``firsts``)."""
    arg_r, kw_r = recipe
    out_items = []
    with torch.no_grad(), calibration.no_attention_fastpath():
        for item, f in zip(items, firsts):
            parts = _parts(block(*item["block_args"], **item["block_kwargs"]))

            def take(r, ref):
                return ref if r[0] == "same" else parts[0 if r[1] is None else r[1]]

            args = tuple(take(r, v) for r, v in zip(arg_r, f["block_args"]))
            kwargs = {k: take(r, f["block_kwargs"][k]) for k, r in kw_r}
            nxt = {"block_args": args, "block_kwargs": kwargs}
            if "attention_mask" in item:
                nxt["attention_mask"] = item["attention_mask"]
            out_items.append(nxt)
    return out_items


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden states: a tensor, or the first element of a tuple or list."""
    return out[0] if isinstance(out, (tuple, list)) else out


def outputs(block: nn.Module, items: list[dict]) -> list[torch.Tensor]:
    """The block's hidden-state output on each item (no gradient)."""
    with torch.no_grad(), calibration.no_attention_fastpath():
        return [block_output(block(*it["block_args"], **it["block_kwargs"])).detach() for it in items]
