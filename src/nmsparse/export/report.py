"""What an export stored, tensor by tensor: dense bytes against stored bytes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TensorEntry:
    """One state-dict tensor of an exported model.

    ``layer`` is True for the weight of a Linear/Conv/Conv1D layer (a candidate for N:M storage);
    ``stored_as`` is ``"n:m"`` (compressed) or ``"dense"``; ``reason`` says why a layer weight stayed dense."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dense_bytes: int
    stored_bytes: int
    stored_as: str = "dense"
    layer: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), shape=list(self.shape))


@dataclasses.dataclass
class ExportReport:
    """Per-tensor sizes of one exported file; ``table()`` prints the layer weights and the totals."""

    path: str
    format: str
    n: int
    m: int
    layout: str
    entries: list[TensorEntry]
    file_bytes: int = 0

    @property
    def compressed(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.stored_as != "dense"]

    @property
    def dense_layers(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.layer and e.stored_as == "dense"]

    def totals(self) -> dict[str, int]:
        sparse = self.compressed
        return {
            "dense_bytes": sum(e.dense_bytes for e in self.entries),
            "stored_bytes": sum(e.stored_bytes for e in self.entries),
            "sparse_layers_dense_bytes": sum(e.dense_bytes for e in sparse),
            "sparse_layers_stored_bytes": sum(e.stored_bytes for e in sparse),
            "file_bytes": self.file_bytes,
        }

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "n": self.n, "m": self.m, "layout": self.layout,
                "compressed": len(self.compressed), "dense_layers": len(self.dense_layers), **self.totals(),
                "tensors": [e.to_dict() for e in self.entries]}

    def table(self) -> str:
        rows = [("tensor", "shape", "dtype", "stored as", "dense B", "stored B", "ratio")]
        for e in self.entries:
            if e.layer:
                ratio = f"{e.stored_bytes / e.dense_bytes:.1%}" if e.dense_bytes else "-"
                how = e.stored_as if e.stored_as != "dense" else f"dense{': ' + e.reason if e.reason else ''}"
                rows.append((e.name, "x".join(map(str, e.shape)), e.dtype, how, str(e.dense_bytes),
                             str(e.stored_bytes), ratio))
        other = [e for e in self.entries if not e.layer]
        t = self.totals()
        rows.append((f"{len(other)} other tensors", "", "", "dense", str(sum(e.dense_bytes for e in other)),
                     str(sum(e.stored_bytes for e in other)), ""))
        if self.compressed:
            rows.append((f"{len(self.compressed)} N:M layers", "", "", f"{self.n}:{self.m}",
                         str(t["sparse_layers_dense_bytes"]), str(t["sparse_layers_stored_bytes"]),
                         f"{t['sparse_layers_stored_bytes'] / max(t['sparse_layers_dense_bytes'], 1):.1%}"))
        rows.append(("all tensors", "", "", "", str(t["dense_bytes"]), str(t["stored_bytes"]),
                     f"{t['stored_bytes'] / max(t['dense_bytes'], 1):.1%}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"file {self.path}: {self.file_bytes} bytes ({self.format}"
                     f"{f', {self.n}:{self.m}, layout {self.layout}' if self.format == 'nmsparse' else ''})")
        return "\n".join(lines)
