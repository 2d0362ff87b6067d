"""The symbol inventory of a module's source, from its AST, and what differs between two.

Classes, functions and methods (nested classes included) with their signatures (parameter
names, kinds, defaults, decorators; annotations ignored) and a hash of their body
(comments, docstrings and formatting ignored); the differences between the fork's and
upstream's inventories of one file, and which pin entry documents each.
"""
from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .common import sha256_bytes


@dataclass
class Symbol:
    qualname: str
    kind: str  # class | function | method
    signature: str  # compared: parameter names, kinds, defaults, decorators (no annotations)
    display: str  # shown: the parameter list as written (with annotations)
    body_hash: str  # comments, docstrings, formatting ignored
    lineno: int


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


def symbol_inventory(source: str, filename: str = "<source>") -> Dict[str, Symbol]:
    """Classes, functions and methods (nested classes included) of a module's source."""
    tree = ast.parse(source, filename=filename)
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
                out[qual] = Symbol(qual, "method" if in_class else "function", sig, display,
                                   _hash_nodes(_strip_docstring(node.body)), node.lineno)
            elif isinstance(node, ast.ClassDef):
                qual = prefix + node.name
                bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
                sig = _decorators(node) + f"({', '.join(bases)})"
                # class-level statements other than methods/classes (attributes, config_class, ...)
                own = [n for n in _strip_docstring(node.body)
                       if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
                out[qual] = Symbol(qual, "class", sig, f"{_decorators(node)}class {node.name}({', '.join(bases)})",
                                   _hash_nodes(own), node.lineno)
                visit(node.body, qual + ".", True)

    visit(tree.body, "", False)
    return out


@dataclass
class SymbolChange:
    file: str
    qualname: str
    change: str  # added (fork only) | removed (upstream only) | signature | body
    kind: str
    fork: Optional[str] = None
    upstream: Optional[str] = None


def diff_inventories(fork: Dict[str, Symbol], upstream: Dict[str, Symbol], file: str) -> List[SymbolChange]:
    out = []
    for q in sorted(set(fork) | set(upstream), key=lambda q: (q.split(".")[0], q)):
        f, u = fork.get(q), upstream.get(q)
        if u is None:
            out.append(SymbolChange(file, q, "added", f.kind, fork=f.display))
        elif f is None:
            out.append(SymbolChange(file, q, "removed", u.kind, upstream=u.display))
        elif f.signature != u.signature or f.kind != u.kind:
            out.append(SymbolChange(file, q, "signature", f.kind, fork=f.display, upstream=u.display))
        elif f.body_hash != u.body_hash:
            out.append(SymbolChange(file, q, "body", f.kind, fork=f.display, upstream=u.display))
    return out


def documented_by(change: SymbolChange, pin: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The pin entry that documents ``change``, if any.

    An entry ``{"file", "symbol", "kind"}`` (``symbol`` is an fnmatch pattern on the
    qualified name) documents changes of its kind: ``changed`` covers ``signature`` and
    ``body``; ``added`` (a fork-only symbol), ``removed`` (an upstream symbol the fork
    drops) and ``replaced`` (both) cover presence.
    """
    covers = {
        "changed": {"signature", "body"},
        "added": {"added", "signature", "body"},
        "removed": {"removed"},
        "replaced": {"added", "removed", "signature", "body"},
    }
    for entry in pin.get("changes", []):
        if entry.get("file") not in (change.file, "*"):
            continue
        if not fnmatch.fnmatchcase(change.qualname, entry.get("symbol", "")):
            continue
        if change.change in covers.get(entry.get("kind", "changed"), set()):
            return entry
    return None


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
