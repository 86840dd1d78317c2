"""The layer rule, checked on the source: imports run only downward, nothing imports the facade, no cycles.

``LAYERS`` is the one place where the order of the layers is written (CONTRIBUTING.md explains it).
A module may import modules of its own subpackage and of subpackages in *earlier* entries; two
subpackages of one entry may not import each other. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

# bottom up: plumbing -> tensor functions -> module surgery -> back ends -> drivers
LAYERS: tuple[tuple[str, ...], ...] = (
    ("plumbing",),                                  # errors, files, checksums, progress, numba pool
    ("masking",),                                   # pure tensor functions: masks, patterns, metrics
    ("surgery",),                                   # which layers; parametrization; sparsify/finalize
    ("calibration",),                               # inputs of layers and blocks for one-shot methods
    ("permute",),                                   # channel permutations
    ("pruning", "lora"),                            # one-shot pruning; N:M LoRA
    ("kernels",),                                   # CPU and CUDA kernels, layer conversion
    ("export",),                                    # compressed files, ONNX
    ("integrations",),                              # transformers, compressed-tensors
    ("training",),                                  # training loop, checkpoints, DDP/FSDP
    ("distillation", "reproduce", "inspection"),    # drivers built on training / files
    ("cli",),                                       # the command line, on top of everything
)
TOP = {"__init__", "__main__", "_compat"}  # the facade and its helpers: the only top-level modules


def modules(root: pathlib.Path, package: str = "nmsparse") -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every module under ``root/package``."""
    out = {}
    for p in (root / package).rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def imports(root: pathlib.Path, package: str = "nmsparse") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    mods = modules(root, package)

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    k = known(t)
                    if k and k != mod:
                        edges[mod].add(k)
    return edges


def violations(root: pathlib.Path, layers=LAYERS, package: str = "nmsparse") -> list[str]:
    """Every break of the layer rule under ``root/package``, one line each (empty when the rule holds)."""
    rank = {sub: i for i, entry in enumerate(layers) for sub in entry}
    edges = imports(root, package)
    out = []

    def sub_of(mod: str) -> str:
        parts = mod.split(".")
        return parts[1] if len(parts) > 1 else "__init__"

    for mod in sorted(edges):
        s = sub_of(mod)
        if mod == package or (len(mod.split(".")) == 2 and s in TOP):
            continue
        if s not in rank:
            out.append(f"{mod}: not in a layer subpackage (add it to one, or its package to LAYERS)")
            continue
        for t in sorted(edges[mod]):
            ts = sub_of(t)
            if t == package:
                out.append(f"{mod} imports the facade {package} (import from the module that holds the name)")
            elif ts == s:
                continue
            elif ts not in rank:
                out.append(f"{mod} imports {t}, which is in no layer")
            elif rank[ts] > rank[s]:
                out.append(f"{mod} imports {t}: upward ({s} is below {ts})")
            elif rank[ts] == rank[s]:
                out.append(f"{mod} imports {t}: {s} and {ts} are one layer and may not import each other")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_layer_rule_holds():
    assert violations(SRC) == []


def test_every_subpackage_is_in_a_layer():
    subs = {p.name for p in (SRC / "nmsparse").iterdir() if (p / "__init__.py").exists()}
    listed = {s for entry in LAYERS for s in entry}
    assert subs == listed


def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
    for name, text in {"fake/__init__.py": "", **files}.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


LOW_HIGH = (("low",), ("high",), ("a", "b"))


def test_the_check_fails_on_an_upward_import(tmp_path):
    root = _tree(tmp_path, {"fake/low/__init__.py": "", "fake/low/x.py": "def f():\n    from fake.high.y import g\n",
                            "fake/high/__init__.py": "", "fake/high/y.py": "from fake.low import x\n"})
    v = violations(root, LOW_HIGH, "fake")
    assert "fake.low.x imports fake.high.y: upward (low is below high)" in v
    assert "import cycle: fake.high.y -> fake.low.x" in v


def test_the_check_fails_on_the_facade_siblings_and_strays(tmp_path):
    root = _tree(tmp_path, {"fake/a/__init__.py": "", "fake/a/x.py": "import fake\nfrom fake.b import y\n",
                            "fake/b/__init__.py": "", "fake/b/y.py": "from . import z\n", "fake/b/z.py": "",
                            "fake/stray.py": "from fake.a import x\n"})
    v = violations(root, LOW_HIGH, "fake")
    assert "fake.a.x imports the facade fake (import from the module that holds the name)" in v
    assert "fake.a.x imports fake.b.y: a and b are one layer and may not import each other" in v
    assert "fake.stray: not in a layer subpackage (add it to one, or its package to LAYERS)" in v
    assert not any("fake.b.y" in line and "z" in line for line in v)  # relative import inside a package: fine


def test_a_cycle_inside_one_package_is_found(tmp_path):
    root = _tree(tmp_path, {"fake/low/__init__.py": "", "fake/low/x.py": "from fake.low import y\n",
                            "fake/low/y.py": "from fake.low.x import f\n"})
    assert violations(root, LOW_HIGH, "fake") == ["import cycle: fake.low.x -> fake.low.y"]


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(violations(SRC)) or "the layer rule holds")
    pytest.main([__file__, "-q"])
