"""What :func:`nmsparse.permute_channels` did, layer by layer and channel space by channel space."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PermuteLayer:
    """One weight-bearing layer. ``status``: ``"permuted"`` (its input channels were reordered),
    ``"identity"`` (searched; no better grouping than the current one), ``"rejected"`` (a better
    grouping was found but raised the calibration output error; not applied; ``reason`` says by how
    much), or ``"unpermuted"`` with ``reason``. ``kept_before`` / ``kept_after``: fraction of the
    layer's ``|w|`` (or Wanda score) an N:M mask keeps without / with the permutation (sparse layers
    only). ``space``: id of its input-channel space; ``search_s``: seconds of that space's search
    (shared by its layers)."""

    param: str
    kind: str
    shape: tuple[int, ...]
    sparse: bool
    status: str
    reason: str = ""
    space: int | None = None
    kept_before: float | None = None
    kept_after: float | None = None
    search_s: float | None = None
    exact: bool | None = None


@dataclasses.dataclass
class SpaceResult:
    """One channel space: the layers tied to one permutation and the search on them."""

    id: int
    size: int
    producers: list[str]
    consumers: list[str]
    members: list[str]
    blocked: str | None
    searched: list[str]
    permuted: bool = False
    before: float | None = None
    after: float | None = None
    exact: bool | None = None
    moves: int = 0
    time_s: float = 0.0
    error_before: float | None = None  # summed relative calibration output error of the searched layers
    error_after: float | None = None  # ... with the permutation (accept="error" only)
    rejected: bool = False  # found, but it raised that error: not applied
    network_before: float | None = None  # accept="network": the pruned network's calibration output error
    network_after: float | None = None  # ... with this space's best candidate on top of the choices before


@dataclasses.dataclass
class PermuteReport:
    """Per-layer results, per-space results, settings, total time, and ``max_abs_diff``: the largest
    difference of the model's outputs on ``example_inputs`` before and after (checked)."""

    n: int
    m: int
    layers: list[PermuteLayer]
    spaces: list[SpaceResult]
    settings: dict
    time_s: float
    traced: bool = True
    max_abs_diff: float | None = None
    kept_abs: dict = dataclasses.field(default_factory=dict)  # param -> (sum kept before, after, total)

    @property
    def permuted(self) -> list[PermuteLayer]:
        return [e for e in self.layers if e.status == "permuted"]

    def total(self) -> tuple[float | None, float | None]:
        """Kept fraction over every sparse layer's score together, without and with permutation."""
        tot = sum(v[2] for v in self.kept_abs.values())
        if not tot:
            return None, None
        return (sum(v[0] for v in self.kept_abs.values()) / tot, sum(v[1] for v in self.kept_abs.values()) / tot)

    def to_dict(self) -> dict:
        before, after = self.total()
        return {"n": self.n, "m": self.m, "settings": self.settings, "time_s": self.time_s, "traced": self.traced,
                "max_abs_diff": self.max_abs_diff, "kept_total_before": before, "kept_total_after": after,
                "layers": [dataclasses.asdict(e) for e in self.layers],
                "spaces": [dataclasses.asdict(s) for s in self.spaces]}

    def table(self) -> str:
        def f(v):
            return "-" if v is None else f"{v:.4f}"

        rows = [("layer", "shape", "space", "kept before", "kept after", "search", "input channels")]
        for e in self.layers:
            status = e.status if e.status != "unpermuted" else f"unpermuted: {e.reason}"
            if e.status == "identity":
                status = "identity: no better grouping found"
            elif e.status == "rejected":
                status = f"rejected: {e.reason}"
            rows.append((e.param, "x".join(map(str, e.shape)), "-" if e.space is None else str(e.space),
                         f(e.kept_before), f(e.kept_after),
                         "-" if e.search_s is None else f"{e.search_s:.2f}s" + (" exact" if e.exact else ""),
                         status + ("" if e.sparse else " (layer stays dense)")))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + "  " + r[6] for r in rows]
        before, after = self.total()
        lines.append(f"{self.n}:{self.m} {self.settings.get('method', '')}: {len(self.permuted)} layers with permuted "
                     f"inputs; kept fraction of the sparse layers {f(before)} -> {f(after)}; {self.time_s:.1f}s"
                     + ("" if self.traced else " (model not traced: nothing permuted)"))
        net = self.settings.get("network")
        if net:
            lines.append(f"pruned network's relative calibration output error: {net['unpermuted']:.5g} unpermuted -> "
                         f"{net['permuted']:.5g} with the accepted permutations ({net['evaluations']} evaluations)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
