"""The package's import graph, read from the source (AST, nothing imported): no circle among
``minicpmv_attn`` modules and no import from a lower layer up to a higher one.

Layers, lowest first (a module may import its own layer or any layer below it):

0. ``shipped``: the .py files directly in ``modeling/`` (the model and capture; they ship as
   HF remote code, so they import nothing of the package's subpackages);
1. ``upstream`` (the upstream comparison tools) and ``bench`` (benchmark runners);
2. ``maps``: the attention maps of one record (geometry, rows, shares, heatmaps, relevancy),
   what both the demo and the analysis tools need, so it lies below both;
3. ``demo``: the tiny demo model (checkpoint, vocabulary, scenes, pointing game);
4. ``analysis``: the tools: viewer, plots, extraction, summary and report, and the public
   re-exports of ``maps`` (it loads the demo model as a source; the demo must not import the
   analysis package it is the example for);
5. ``train``: fine-tuning, which reads the maps through ``analysis``.

Inside ``analysis`` the no-circle rule fixes one direction too: extraction writes results, the
summary reads them and the report reads the summary (``dataset_report -> summary ->
results_folder``; ``extract`` only calls the report at the end of a run).

Every import counts, also one inside a function (a lazy import is still an arrow).
"""
import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "modeling"
NAME = "minicpmv_attn"

LAYERS = [("shipped",), ("upstream", "bench"), ("maps",), ("demo",), ("analysis",), ("train",)]
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def module_files(root: Path = PACKAGE) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([NAME] + parts)] = path
    return out


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    """module -> the package modules it imports (``from pkg import mod`` points at the module)."""
    files = module_files(root)
    graph: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[:len(here) - node.level + 1]
                    assert base, f"{path}: relative import above the package"
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target]
                names += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
            else:
                continue
            for name in names:
                while name and name not in files:  # import a.b.c of a module a.b
                    name = name.rpartition(".")[0]
                if name.startswith(NAME) and name in files and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


SUBPACKAGES = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def room(mod: str) -> str:
    """The layer name of a module: its subpackage, or ``shipped`` for a top-level module."""
    parts = mod.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in SUBPACKAGES else "shipped"


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = room(mod), room(t)
            if LAYER_OF[b] > LAYER_OF[a]:
                bad.append(f"{mod} ({a}) imports {t} ({b})")
    return bad


def test_every_room_has_a_layer():
    rooms = {room(m) for m in module_files()}
    assert rooms == set(LAYER_OF), f"rooms without a layer: {rooms - set(LAYER_OF)}; layers without a room: {set(LAYER_OF) - rooms}"


def test_graph_reads_relative_and_module_imports():
    """The reader sees what the tests below rely on (a wrong reader would pass them vacuously)."""
    g = import_graph()
    am = f"{NAME}.analysis.attention_map"
    assert f"{NAME}.maps.heatmap" in g[am]  # from ..maps.heatmap import (...)
    assert am in g[f"{NAME}.analysis.plotting"]  # from . import attention_map as am
    assert f"{NAME}.attention_record" in g[f"{NAME}.maps.rows"]  # from ..attention_record import
    assert am in g[f"{NAME}.train.figures"]  # from ..analysis import attention_map as am


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = upward_imports(import_graph())
    assert not bad, "imports up a layer (" + " < ".join("/".join(r) for r in LAYERS) + "):\n" + "\n".join(bad)


def test_extraction_summary_report_run_one_way():
    """Extraction writes the run folder, the summary reads it, the report reads the summary: neither
    reader imports the extraction, and the folder's file names live below all three."""
    g = import_graph()
    a = f"{NAME}.analysis."
    assert a + "extract" not in g[a + "summary"] and a + "extract" not in g[a + "dataset_report"]
    assert a + "summary" in g[a + "dataset_report"] and a + "dataset_report" not in g[a + "summary"]
    for mod in ("extract", "summary"):
        assert a + "results_folder" in g[a + mod], mod
    assert not {a + m for m in ("extract", "summary", "dataset_report")} & g[a + "results_folder"]


def test_checker_finds_a_planted_circle_and_upward_arrow(tmp_path):
    pkg = tmp_path / "modeling"
    (pkg / "demo").mkdir(parents=True)
    (pkg / "analysis").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "demo" / "__init__.py").write_text("")
    (pkg / "analysis" / "__init__.py").write_text("")
    (pkg / "analysis" / "a.py").write_text("def f():\n    from .b import x\n")
    (pkg / "analysis" / "b.py").write_text("from . import a\nx = 1\n")
    (pkg / "demo" / "d.py").write_text("from ..analysis import a as am\n")
    g = import_graph(pkg)
    assert find_cycles(g) == [[f"{NAME}.analysis.a", f"{NAME}.analysis.b"]]
    assert f"{NAME}.analysis.a" in g[f"{NAME}.demo.d"]


def test_attention_map_face_reexports_every_name_of_the_maps_it_split_into():
    """``analysis.attention_map`` was one module; its names (private helpers too) stay importable
    from it, as the very objects their ``maps`` module owns."""
    import importlib

    face = importlib.import_module(f"{NAME}.analysis.attention_map")
    missing = []
    for part in ("image_geometry", "rows", "shares", "heatmap"):
        mod = importlib.import_module(f"{NAME}.maps.{part}")
        tree = ast.parse((PACKAGE / "maps" / f"{part}.py").read_text(encoding="utf-8"))
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        names += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
        assert names, part
        missing += [f"{part}.{n}" for n in names if getattr(face, n, None) is not getattr(mod, n)]
    assert not missing, f"not re-exported by analysis.attention_map: {missing}"
    assert all(hasattr(face, n) for n in face.__all__)
