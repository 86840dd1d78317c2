"""Run a ``transformers`` model one block at a time, with the rest of it on disk.

A transformer is a *shell* (embeddings before the blocks; final norm, head and loss after them) around
a list of identical *blocks* (decoder or encoder layers, ``config.num_hidden_layers`` of them). This
module holds the machinery that lets a caller treat the blocks one by one without the model ever being
whole in memory:

* :class:`CheckpointReader` reads tensors by name from a ``save_pretrained`` folder (``model.safetensors``
  or a sharded ``model.safetensors.index.json``), memory-mapped, one tensor at a time.
* :class:`BlockStream` builds the model's structure on the ``meta`` device (no memory), finds its block
  list, materialises the shell (built with zero blocks, so its non-persistent buffers such as rotary
  frequencies are computed as usual) and loads block ``i`` on demand.
* :meth:`BlockStream.block_inputs` runs calibration batches through the shell and captures, per batch,
  the arguments the model passes to its first block (hidden states, attention mask, position
  embeddings); :meth:`BlockStream.run_tail` feeds final hidden states back through the shell's tail
  (final norm, head, loss) by putting a stand-in block in the block list.

Blocks whose modules hold non-persistent buffers (not in the checkpoint) are refused, since their
values would be undefined. Only safetensors and JSON are read: nothing from a file is executed.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from nmsparse.plumbing.errors import LoadError
from nmsparse.calibration import collect as calibration
from nmsparse.surgery.selection import tied_aliases


class CheckpointReader:
    """Tensors of a ``save_pretrained`` folder by name, read from its safetensors files on demand.

    Each read opens the file, copies the tensors out of the memory map and closes it again, so pages
    of the file never stay mapped (mapped pages count as resident memory while the map is open)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        single, index = self.path / "model.safetensors", self.path / "model.safetensors.index.json"
        if not (single.is_file() or index.is_file()):
            raise ValueError(f"{self.path} has no model.safetensors (nor model.safetensors.index.json): "
                             "save the model with save_pretrained first")
        try:
            self._records: dict[Path, Any] = {}  # file -> its nmsparse checksum record (files we wrote)
            if single.is_file():
                with safe_open(single, framework="pt") as f:
                    self._where: dict[str, Path] = {k: single for k in f.keys()}
                    self._record(single, f)
            else:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise ValueError("weight_map is not an object")
                self._where = {k: self.path / v for k, v in wm.items()}
                for f in set(self._where.values()):
                    with safe_open(f, framework="pt") as h:
                        present = set(h.keys())
                        self._record(f, h)
                    absent = [k for k, v in self._where.items() if v == f and k not in present]
                    if absent:
                        raise ValueError(f"{f.name} lacks {absent[:3]} that the index places there")
        except LoadError:
            raise
        except Exception as e:  # safetensors' own error type, OSError, bad JSON, a lying index
            raise ValueError(f"cannot read the weights in {self.path}: {e}") from None

    def _record(self, path: Path, h) -> None:
        """Keep ``path``'s checksum record (files nmsparse wrote carry one; others load as they are)."""
        from nmsparse.plumbing import checksum

        meta = h.metadata() or {}
        rec = checksum.recorded(path, meta)
        if rec is not None:
            rec.check_metadata(meta)
            rec.check_names(h.keys())
            self._records[path] = rec

    def keys(self) -> list[str]:
        return list(self._where)

    @torch.no_grad()
    def copy_into(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy each named checkpoint tensor into ``targets[name]`` (same shape; the dtype is cast), one
        tensor in memory at a time."""
        from safetensors import safe_open

        missing = [k for k in targets if k not in self._where]
        if missing:
            raise ValueError(f"{self.path}: the checkpoint has no tensor {missing[0]!r}")
        by_file: dict[Path, list[str]] = {}
        for k in targets:
            by_file.setdefault(self._where[k], []).append(k)
        try:
            for f, ks in by_file.items():
                with safe_open(f, framework="pt") as h:
                    for k in ks:
                        shape = tuple(h.get_slice(k).get_shape())
                        if shape != tuple(targets[k].shape):
                            raise ValueError(f"tensor {k} has shape {shape}, the model expects "
                                             f"{tuple(targets[k].shape)}")
                        t = h.get_tensor(k)
                        if f in self._records:
                            self._records[f].check(k, t)  # LoadError naming the file and the tensor
                        targets[k].copy_(t)
        except LoadError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read the weights in {self.path}: {e}") from None

    def nbytes(self) -> int:
        """Total size of the weight files in bytes."""
        return sum(f.stat().st_size for f in set(self._where.values()))


class _Catch(nn.Module):
    """Stand-in first block: records the arguments it is called with, then stops the pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: tuple[tuple, dict] | None = None

    def forward(self, *args: Any, **kwargs: Any):
        self.seen = (args, kwargs)
        raise calibration._Stop


class _Inject(nn.Module):
    """Stand-in block: ignores its input and returns the hidden states it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any):
        return self.hidden


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockStream:
    """A ``transformers`` model from ``path`` as a shell plus blocks loaded one at a time.

    ``model_class``: the class to build (``AutoModelForCausalLM`` or a concrete class); ``dtype``:
    compute dtype of the shell and blocks (default: the checkpoint's tensors' own dtype).
    """

    def __init__(self, path: str | Path, model_class: Any, dtype: torch.dtype | None = None) -> None:
        from transformers import AutoConfig

        self.reader = CheckpointReader(path)
        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.model_class = model_class
        self.dtype = dtype
        layers = getattr(self.config, "num_hidden_layers", None)
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"{self.path}/config.json has no num_hidden_layers: block-wise streaming needs a "
                             "transformers model made of a list of blocks")
        with torch.device("meta"):
            self.skeleton = build_model(model_class, self.config)
        self.blocks_path, blocks = find_blocks(self.skeleton, layers)
        kinds = set(getattr(self.config, "layer_types", None) or ()) | {
            getattr(b, "attention_type", None) for b in blocks} - {None}
        if len(kinds) > 1:
            raise ValueError(f"{type(self.skeleton).__name__} mixes block kinds {sorted(kinds)} (e.g. sliding-window "
                             "and full attention), which get different attention arguments: block-wise streaming "
                             "passes every block the first block's, so it refuses such models")
        self.num_blocks = len(blocks)
        self.prefix = self.blocks_path + "."
        shell_cfg = copy.deepcopy(self.config)
        shell_cfg.num_hidden_layers = 0
        self.shell = build_model(model_class, shell_cfg)
        self._shell_blocks: nn.ModuleList = self.shell.get_submodule(self.blocks_path)
        self._load_shell()
        self.shell.eval()

    # -- loading -----------------------------------------------------------------------------------
    def _load_shell(self) -> None:
        own = self.shell.state_dict()  # tensors sharing the shell's storage: filled in place
        keys = set(self.reader.keys())
        aliases = tied_aliases(self.shell)
        aliases.update({first: alias for alias, first in aliases.items()})  # either name may be the saved one
        missing = [k for k in own if k not in keys and not (k in aliases and aliases[k] in keys)]
        if missing:
            raise ValueError(f"{self.path}: the checkpoint lacks {missing[:3]} of the model outside its blocks")
        self.reader.copy_into({k: v for k, v in own.items() if k in keys})
        if self.dtype is not None:
            self.shell.to(self.dtype)
        if hasattr(self.shell, "tie_weights"):
            self.shell.tie_weights()

    def block_names(self, i: int) -> list[str]:
        """State-dict keys of block ``i`` in the whole model."""
        blk = self.skeleton.get_submodule(self.blocks_path)[i]
        return [f"{self.prefix}{i}.{k}" for k in blk.state_dict()]

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` materialised on the CPU with its weights from the checkpoint (eval mode)."""
        blk = copy.deepcopy(self.skeleton.get_submodule(self.blocks_path)[i]).to_empty(device="cpu")
        persistent = set(blk.state_dict())
        loose = [k for k, _ in blk.named_buffers() if k not in persistent]
        if loose:
            raise ValueError(f"block {i} of {type(self.skeleton).__name__} has non-persistent buffers {loose[:3]} "
                             "that a checkpoint does not hold: block-wise streaming cannot rebuild it")
        pre = f"{self.prefix}{i}."
        self.reader.copy_into({pre + k: v for k, v in blk.state_dict().items()})  # in place, one tensor at a time
        if self.dtype is not None:
            blk.to(self.dtype)
        return blk.eval()

    def drop_shell(self) -> None:
        """Free the shell's tensors (embeddings, head: 500 MiB for a 1B LLaMA) once nothing needs them;
        :meth:`block_inputs` and :meth:`run_tail` cannot be used afterwards, blocks still load."""
        self.shell = self._shell_blocks = None

    def shell_state(self) -> dict[str, torch.Tensor]:
        """The shell's tensors under their names in the whole model (tied duplicates once)."""
        aliases = tied_aliases(self.shell)
        return {k: v for k, v in self.shell.state_dict().items() if k not in aliases}

    # -- running -----------------------------------------------------------------------------------
    def block_inputs(self, calib: Iterable) -> list[dict[str, Any]]:
        """For each calibration batch (a tensor of token ids or a tokenizer's mapping), the keyword
        arguments of the first block's call, hidden states under ``"hidden_states"``."""
        return list(self.iter_block_inputs(calib))

    @torch.no_grad()
    def iter_block_inputs(self, calib: Iterable) -> Iterator[dict[str, Any]]:
        """:meth:`block_inputs` one batch at a time (the caller may store each away before the next)."""
        catch = _Catch()
        with self._stand_in(catch):
            for item in calib:
                inputs = calibration._inputs(item)
                try:
                    calibration._call(self.shell, self._no_cache(inputs))
                except calibration._Stop:
                    pass
                if catch.seen is None:
                    raise ValueError("the model's forward pass never reached its first block")
                args, kwargs = catch.seen
                kw = dict(kwargs)
                if args:
                    kw["hidden_states"] = args[0]
                    if len(args) > 1:
                        raise ValueError(f"{type(self.skeleton).__name__} passes {len(args)} positional "
                                         "arguments to its blocks: block-wise streaming supports one")
                kw.pop("past_key_values", None)
                kw.pop("past_key_value", None)
                catch.seen = None
                yield kw

    @torch.no_grad()
    def run_tail(self, inputs: Any, hidden: torch.Tensor) -> Any:
        """The model's output for ``inputs`` (as the model is called) with ``hidden`` standing for the
        output of the last block: runs the shell's tail (final norm, head, loss if labels given)."""
        inject = _Inject()
        inject.hidden = hidden
        with self._stand_in(inject):
            return self.shell(**self._no_cache(inputs))

    def _no_cache(self, inputs: Any) -> dict[str, Any]:
        """Keyword inputs of the shell, with ``use_cache=False`` where its forward takes it."""
        kw = dict(inputs) if isinstance(inputs, dict) else {"input_ids": inputs}
        params = inspect.signature(self.shell.forward).parameters
        if "use_cache" in params:
            kw["use_cache"] = False
        return kw

    def _stand_in(self, module: nn.Module):
        stream = self

        class _Ctx:
            def __enter__(self_inner):
                stream._shell_blocks.append(module)
                stream.shell.config.num_hidden_layers = 1
                return module

            def __exit__(self_inner, *exc):
                del stream._shell_blocks[0]
                stream.shell.config.num_hidden_layers = 0
                return False

        return _Ctx()


@torch.no_grad()
def run_block(block: nn.Module, batches: list[dict[str, Any]]) -> None:
    """Replace each batch's ``hidden_states`` by the block's output on it (in place), the block in
    eval mode (no dropout)."""
    block.eval()
    for kw in batches:
        kw["hidden_states"] = block_output(block(**kw))


def find_blocks(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of ``count`` same-type modules that holds the model's blocks."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == count and count
             and len({type(b) for b in mod}) == 1]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise ValueError(f"{type(model).__name__}: found {what} list of {count} identical blocks; block-wise "
                         "streaming needs exactly one (a transformer's decoder or encoder layers)")
    return found[0]


def build_model(model_class: Any, config: Any) -> nn.Module:
    """``model_class`` (a transformers model class, or an ``AutoModel...`` class) built from ``config``."""
    if isinstance(model_class, type) and issubclass(model_class, nn.Module):
        return model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)
    return model_class.from_config(config)


def iter_blocks(stream: BlockStream) -> Iterator[tuple[int, nn.Module]]:
    """Blocks in order, each loaded when reached (the caller drops it before the next)."""
    for i in range(stream.num_blocks):
        yield i, stream.load_block(i)
