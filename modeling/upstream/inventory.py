"""The symbol inventory of a module's source, from its AST, and what differs between two.

Classes, functions and methods (nested classes included) with their signatures (parameter
names, kinds, defaults, decorators; annotations ignored), a hash of their body (comments,
docstrings and formatting ignored) and a hash of their own source lines (everything, so a
comment edit shows too); ``<module>`` stands for the module-level statements (imports,
constants, registrations) and ``<import NAME>`` for the package a name is imported from
(``.`` for the folder itself: transformers' class swapped for the fork's own shows there). Used two
ways: the fork's inventory against upstream's (which pin entry documents each difference),
and upstream's against the pinned snapshot of itself (:func:`snapshot`, any change is news).
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .common import sha256_bytes


MODULE = "<module>"


@dataclass
class Symbol:
    qualname: str
    kind: str  # class | function | method | module | import
    signature: str  # compared: parameter names, kinds, defaults, decorators (no annotations)
    display: str  # shown: the parameter list as written (with annotations)
    body_hash: str  # comments, docstrings, formatting ignored
    lineno: int
    end_lineno: int = 0
    text_hash: str = ""  # the symbol's own source lines (nested definitions excluded), as written
    parts: Tuple[Tuple[int, int, str], ...] = ()  # class / module: (first, last line, text hash) per own statement


def _strip_docstring(body: List[ast.stmt]) -> List[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def _signature_of(args: ast.arguments) -> str:
    def names(xs):
        return [a.arg for a in xs]

    pos = names(args.posonlyargs) + names(args.args)
    defaults = [None] * (len(pos) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    parts = []
    n_posonly = len(args.posonlyargs)
    for i, (name, default) in enumerate(zip(pos, defaults)):
        parts.append(name if default is None else f"{name}={default}")
        if n_posonly and i == n_posonly - 1:
            parts.append("/")
    if args.vararg:
        parts.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        parts.append("*")
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(a.arg if d is None else f"{a.arg}={ast.unparse(d)}")
    if args.kwarg:
        parts.append("**" + args.kwarg.arg)
    return ", ".join(parts)


def _hash_nodes(nodes: Sequence[ast.AST]) -> str:
    dumped = "\n".join(ast.dump(n, annotate_fields=True, include_attributes=False) for n in nodes)
    return sha256_bytes(dumped.encode("utf-8"))[:16]


def _decorators(node) -> str:
    return "".join(f"@{ast.unparse(d)} " for d in node.decorator_list)


def _span(node) -> Tuple[int, int]:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), node.end_lineno


def _text_hash(lines: List[str], span: Tuple[int, int], children: Sequence[ast.AST]) -> str:
    skip = set()
    for c in children:
        a, b = _span(c)
        skip.update(range(a, b + 1))
    own = [lines[i - 1] for i in range(span[0], span[1] + 1) if i not in skip and i <= len(lines)]
    return sha256_bytes("\n".join(own).encode("utf-8"))[:16]


def _is_def(n) -> bool:
    return isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


def _parts(lines: List[str], stmts: Sequence[ast.AST]) -> Tuple[Tuple[int, int, str], ...]:
    return tuple((n.lineno, n.end_lineno, _text_hash(lines, (n.lineno, n.end_lineno), ())) for n in stmts)


def _assigned_name(node) -> Optional[str]:
    """``NAME`` of a module-level ``NAME = ...`` / ``NAME: T = ...`` (one plain name), else None."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        return targets[0].id
    return None


def symbol_inventory(source: str, filename: str = "<source>", pseudo: bool = False) -> Dict[str, Symbol]:
    """Classes, functions and methods (nested classes included) of a module's source; with
    ``pseudo`` also module-level variables (``NAME = ...``, kind ``variable``), ``<module>`` (the
    other module-level statements: imports, registrations, ...) and ``<import NAME>``."""
    tree = ast.parse(source, filename=filename)
    lines = source.splitlines()
    out: Dict[str, Symbol] = {}

    def visit(body, prefix: str, in_class: bool):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + node.name
                sig = _decorators(node) + ("async " if isinstance(node, ast.AsyncFunctionDef) else "") + \
                    f"({_signature_of(node.args)})"
                display = f"{_decorators(node)}def {node.name}({ast.unparse(node.args)})"
                if node.returns is not None:
                    display += f" -> {ast.unparse(node.returns)}"
                span = _span(node)
                out[qual] = Symbol(qual, "method" if in_class else "function", sig, display,
                                   _hash_nodes(_strip_docstring(node.body)), span[0], span[1],
                                   _text_hash(lines, span, ()))
            elif isinstance(node, ast.ClassDef):
                qual = prefix + node.name
                bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
                sig = _decorators(node) + f"({', '.join(bases)})"
                # class-level statements other than methods/classes (attributes, config_class, ...)
                own = [n for n in _strip_docstring(node.body) if not _is_def(n)]
                span = _span(node)
                out[qual] = Symbol(qual, "class", sig, f"{_decorators(node)}class {node.name}({', '.join(bases)})",
                                   _hash_nodes(own), span[0], span[1],
                                   _text_hash(lines, span, [n for n in node.body if _is_def(n)]),
                                   _parts(lines, [n for n in node.body if not _is_def(n)]))
                visit(node.body, qual + ".", True)

    visit(tree.body, "", False)
    if not pseudo:
        return out
    variables: Dict[str, List[ast.AST]] = {}
    for node in tree.body:
        name = _assigned_name(node)
        if name is not None and name not in out:
            variables.setdefault(name, []).append(node)
    for name, nodes in variables.items():
        span = (nodes[0].lineno, nodes[-1].end_lineno)
        out[name] = Symbol(name, "variable", "", f"{name} = ...", _hash_nodes(nodes), span[0], span[1],
                           sha256_bytes("\n".join(p[2] for p in _parts(lines, nodes)).encode())[:16])
    in_vars = {id(n) for nodes in variables.values() for n in nodes}
    module_own = [n for n in _strip_docstring(tree.body) if not _is_def(n) and id(n) not in in_vars]
    covered = [n for n in tree.body if _is_def(n) or id(n) in in_vars]
    out[MODULE] = Symbol(MODULE, "module", "", "module-level statements", _hash_nodes(module_own), 1, len(lines),
                         _text_hash(lines, (1, len(lines)), covered),
                         _parts(lines, [n for n in tree.body if not _is_def(n) and id(n) not in in_vars]))
    for node in tree.body:  # where each imported name comes from: a package, or "." (the folder itself)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            module = "." * node.level + (node.module or "") if isinstance(node, ast.ImportFrom) else None
            for alias in node.names:
                name = alias.asname or alias.name.split(".")[0]
                origin = f"{module}:{alias.name}" if module is not None else alias.name
                root = "." if relative else (module or alias.name).split(".")[0]
                out[f"<import {name}>"] = Symbol(f"<import {name}>", "import", root, f"{name} from {origin}", "",
                                                 node.lineno, node.end_lineno)
    return out


def snapshot(inventory: Dict[str, Symbol]) -> Dict[str, Dict[str, Any]]:
    """What the pin keeps of an upstream file's inventory: per symbol its kind, signature, body
    and text hashes and lines (no code)."""
    out = {}
    for q, s in sorted(inventory.items()):
        if s.kind == "import":
            continue
        out[q] = {"kind": s.kind, "signature": s.signature, "body": s.body_hash, "text": s.text_hash,
                  "lines": [s.lineno, s.end_lineno]}
        if s.parts:
            out[q]["parts"] = [h for _, _, h in s.parts]
    return out


def _changed_lines(symbol: Symbol, pinned: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """For a class or ``<module>``: the first and last line of its statements that are new since
    the pin (None when the change is elsewhere, e.g. a comment between statements)."""
    old = set(pinned.get("parts", []))
    new = [(a, b) for a, b, h in symbol.parts if h not in old]
    return (new[0][0], new[-1][1]) if new and old else None


@dataclass
class SymbolChange:
    file: str
    qualname: str
    change: str  # added (fork only) | removed (upstream only) | signature | body | text
    kind: str
    fork: Optional[str] = None
    upstream: Optional[str] = None
    lines: Optional[Tuple[int, int]] = None


def diff_inventories(fork: Dict[str, Symbol], upstream: Dict[str, Symbol], file: str) -> List[SymbolChange]:
    """The fork's file against upstream's: symbols on one side only, re-signed, re-bodied, and
    names imported from elsewhere (``<import NAME>``, only names both import)."""
    out = []
    for q in sorted(set(fork) | set(upstream), key=lambda q: (q.split(".")[0], q)):
        f, u = fork.get(q), upstream.get(q)
        if q == MODULE or (f or u).kind in ("import", "variable"):
            if f is not None and u is not None and f.kind == u.kind == "import" and f.signature != u.signature:
                out.append(SymbolChange(file, q, "signature", "import", fork=f.display, upstream=u.display))
            continue
        if u is None:
            out.append(SymbolChange(file, q, "added", f.kind, fork=f.display))
        elif f is None:
            out.append(SymbolChange(file, q, "removed", u.kind, upstream=u.display))
        elif f.signature != u.signature or f.kind != u.kind:
            out.append(SymbolChange(file, q, "signature", f.kind, fork=f.display, upstream=u.display))
        elif f.body_hash != u.body_hash:
            out.append(SymbolChange(file, q, "body", f.kind, fork=f.display, upstream=u.display))
    return out


COVERS = {
    "changed": {"signature", "body"},
    "added": {"added", "signature", "body"},
    "removed": {"removed"},
    "replaced": {"added", "removed", "signature", "body"},
    "rewritten": {"added", "removed", "signature", "body"},
}


def entry_patterns(entry: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(pattern, kind) pairs of a ``changes`` entry: its per-kind lists (``"changed": [...]``,
    ``"added"``, ``"removed"``, ``"replaced"``, ``"rewritten"``), or the older form, one
    ``symbol`` (or a ``symbols`` list) with one ``kind``."""
    out = []
    for kind in COVERS:
        pats = entry.get(kind)
        if isinstance(pats, str):
            pats = [pats]
        if isinstance(pats, list):
            out += [(p, kind) for p in pats]
    old = entry.get("symbols", [entry["symbol"]] if entry.get("symbol") else [])
    out += [(p, entry.get("kind", "changed")) for p in ([old] if isinstance(old, str) else old)]
    return out


def entry_symbols(entry: Dict[str, Any]) -> List[str]:
    """The symbol patterns of a ``changes`` entry, whatever their kind."""
    return [p for p, _ in entry_patterns(entry)]


def documented_by(change: SymbolChange, pin: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The pin entry that documents ``change``, if any.

    One entry per note: ``{"file", "note", "what", "why", "changed": [patterns], "added": [...],
    "removed": [...]}`` (fnmatch patterns on the qualified name, ``<import NAME>`` included).
    ``changed`` covers a different signature or body; ``added`` a fork-only symbol (or its
    later changes); ``removed`` an upstream symbol the fork drops; ``replaced`` any of these;
    ``rewritten: ["*"]`` a whole file rewritten. The older form (``symbol`` + ``kind``) works too.
    """
    for entry in pin.get("changes", []):
        if entry.get("file") not in (change.file, "*"):
            continue
        for pattern, kind in entry_patterns(entry):
            if fnmatch.fnmatchcase(change.qualname, pattern) and change.change in COVERS.get(kind, set()):
                return entry
    return None


def diff_snapshot(current: Dict[str, Symbol], pinned: Dict[str, Dict[str, Any]], file: str) -> List[SymbolChange]:
    """Upstream's file now against the pinned snapshot of it: every symbol added, removed,
    re-signed, re-bodied, or edited only in comments / docstrings / formatting (``text``)."""
    now = snapshot(current)
    out = []
    for q in sorted(set(now) | set(pinned), key=lambda q: (q.split(".")[0], q)):
        n, p = now.get(q), pinned.get(q)
        if p is None:
            out.append(SymbolChange(file, q, "added", n["kind"], fork=current[q].display, lines=tuple(n["lines"])))
        elif n is None:
            out.append(SymbolChange(file, q, "removed", p["kind"], upstream=p["signature"], lines=tuple(p["lines"])))
        elif n["signature"] != p["signature"] or n["kind"] != p["kind"]:
            out.append(SymbolChange(file, q, "signature", n["kind"], fork=n["signature"], upstream=p["signature"],
                                    lines=tuple(n["lines"])))
        elif n["body"] != p["body"] or n["text"] != p.get("text", n["text"]):
            where = _changed_lines(current[q], p) or tuple(n["lines"])
            out.append(SymbolChange(file, q, "body" if n["body"] != p["body"] else "text", n["kind"], lines=where))
    return out


def class_names(path) -> List[str]:
    """The top-level class names of a module file."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    return [n.name for n in tree.body if isinstance(n, ast.ClassDef)]


def function_source(path: Path, qualname: str) -> Optional[str]:
    """The source text of the definition ``qualname`` (``Class.method``) in ``path``; None if absent."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return ast.get_source_segment(source, node)


def _split_signature(sig: str) -> Tuple[List[str], Dict[str, str]]:
    """``"@dec(...) (a, b=1, *, c)"`` -> (decorators, {name: "name=default"})."""
    depth, start = 0, 0
    for i in range(len(sig) - 1, -1, -1):  # the parameter list is the last parenthesised group
        depth += {")": 1, "(": -1}.get(sig[i], 0)
        if depth == 0:
            start = i
            break
    prefix = " " + sig[:start].strip()
    decorators = ["@" + d.strip() for d in prefix.split(" @") if d.strip()]
    params, depth, cur = {}, 0, ""
    for ch in sig[start + 1:-1] + ",":
        if ch == "," and depth == 0:
            part = cur.strip()
            if part and part not in ("/", "*"):
                params[part.partition("=")[0].lstrip("*")] = part
            cur = ""
            continue
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        cur += ch
    return decorators, params


def signature_change(old: str, new: str) -> str:
    """A one-line parameter diff, e.g. ``-past_key_values +cache +@deprecate_kwarg(...)``."""
    (da, a), (db, b) = _split_signature(old), _split_signature(new)
    parts = [f"-{n}" for n in a if n not in b] + [f"+{n}" for n in b if n not in a]
    parts += [f"~{b[n]}" for n in b if n in a and a[n] != b[n]]
    parts += [f"-{d.split('(')[0]}" for d in da if d not in db] + [f"+{d.split('(')[0]}" for d in db if d not in da]
    if not parts and list(a) != list(b):
        parts.append("parameters reordered")
    return " ".join(parts) or "parameter kinds changed"
