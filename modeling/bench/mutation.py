"""A small mutation pass: does the test suite fail when the code is wrong?

Each *mutant* is one small edit of one source file (an operator, a constant, a swapped
argument, a dropped mask ...), made from the file's AST and applied as a text edit of the
exact span, so the rest of the file is untouched. For each mutant the file is rewritten,
the tests mapped to that file run (``pytest -x -q``), and the file is put back (always: in
a ``finally``, even on Ctrl-C or SIGTERM, and checked byte for byte). A mutant is *killed*
when a test fails (the first failing test is named), *SURVIVED* when every test passes.

Speed on a small shared CPU: torch, transformers and pytest are imported once in the
parent and each mutant runs in a forked child (``fork=True``) that imports the package
afresh (bytecode goes to a throw-away folder, so a stale ``.pyc`` can never stand in for
the mutated source). ``fork=False`` runs a plain ``python -m pytest`` subprocess instead.
"""
from __future__ import annotations

import ast
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

CMP_SWAP = {ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">", ast.Eq: "!=", ast.NotEq: "==",
            ast.In: "not in", ast.NotIn: "in", ast.Is: "is not", ast.IsNot: "is"}
CMP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
            ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
BIN_SWAP = {ast.Add: ("+", "-"), ast.Sub: ("-", "+"), ast.Div: ("/", "*"), ast.FloorDiv: ("//", "*")}
METHOD_SWAP = {"mean": "amax", "amax": "mean", "max": "min", "min": "max", "sum": "mean", "argmax": "argmin",
               "argmin": "argmax", "any": "all", "all": "any", "floor": "ceil", "ceil": "floor"}


@dataclass(frozen=True)
class Mutant:
    """One edit: replace ``source[start:end]`` with ``new``; ``line`` and ``what`` describe it."""
    path: str
    line: int
    start: int
    end: int
    new: str
    what: str

    def apply(self, source: str) -> str:
        return source[:self.start] + self.new + source[self.end:]


def _offsets(source: str) -> List[int]:
    starts, pos = [0], 0
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def mutants_of(path: str, source: str, functions: Optional[Iterable[str]] = None) -> List[Mutant]:
    """Every mutant of ``source`` inside the named functions (``"name"`` or ``"Class.name"``; None: all)."""
    tree = ast.parse(source)
    lines = _offsets(source)
    at = lambda ln, col: lines[ln - 1] + col  # noqa: E731  (character offset of an AST position)
    text = lambda n: source[at(n.lineno, n.col_offset):at(n.end_lineno, n.end_col_offset)]  # noqa: E731
    wanted = None if functions is None else set(functions)
    out: List[Mutant] = []

    def add(node, start, end, new, what):
        out.append(Mutant(path, node.lineno, start, end, new, what))

    def between(a, b, old, new, node, what):
        s, e = at(a.end_lineno, a.end_col_offset), at(b.lineno, b.col_offset)
        region = source[s:e]
        m = re.search(r"(?<![\w<>=!])" + re.escape(old) + r"(?![\w<>=])", region)
        if m and region.count("#") == 0:
            add(node, s + m.start(), s + m.end(), new, what)

    def visit_body(node):
        for sub in ast.walk(node):
            if isinstance(sub, (ast.JoinedStr, ast.Raise)):
                skip.update(id(x) for x in ast.walk(sub))
        for sub in ast.walk(node):
            if id(sub) in skip:
                continue
            if isinstance(sub, ast.Compare):
                left = sub.left
                for op, right in zip(sub.ops, sub.comparators):
                    if type(op) in CMP_SWAP:
                        between(left, right, CMP_TEXT[type(op)], CMP_SWAP[type(op)], sub,
                                f"{CMP_TEXT[type(op)]} -> {CMP_SWAP[type(op)]}")
                    left = right
            elif isinstance(sub, ast.BinOp):
                if type(sub.op) in BIN_SWAP:
                    old, new = BIN_SWAP[type(sub.op)]
                    between(sub.left, sub.right, old, new, sub, f"{old} -> {new}")
                if isinstance(sub.op, ast.Mult) and not isinstance(sub.right, ast.Constant):
                    add(sub, at(sub.lineno, sub.col_offset), at(sub.end_lineno, sub.end_col_offset),
                        text(sub.left), f"drop '* {text(sub.right)[:30]}'")
            elif isinstance(sub, ast.Constant) and type(sub.value) is int:
                v = sub.value
                s = at(sub.lineno, sub.col_offset)
                before = source[lines[sub.lineno - 1]:s][-14:].lstrip()  # which constant of the line
                for nv in ([1] if v == 0 else [v - 1, v + 1] if v == 1 else [v + 1]):
                    add(sub, s, at(sub.end_lineno, sub.end_col_offset), str(nv), f"{v} -> {nv} in '{before}{v}'")
            elif isinstance(sub, ast.Call):
                f = sub.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in METHOD_SWAP:
                    e = at(f.end_lineno, f.end_col_offset)
                    add(sub, e - len(name), e, METHOD_SWAP[name], f"{name}() -> {METHOD_SWAP[name]}()")
                args = [a for a in sub.args if not isinstance(a, (ast.Constant, ast.Starred))]
                if len(sub.args) >= 2 and args[:2] == sub.args[:2] and text(args[0]) != text(args[1]):
                    a, b = args[0], args[1]
                    s, e = at(a.lineno, a.col_offset), at(b.end_lineno, b.end_col_offset)
                    mid = source[at(a.end_lineno, a.end_col_offset):at(b.lineno, b.col_offset)]
                    add(sub, s, e, text(b) + mid + text(a), f"swap args {text(a)[:20]}, {text(b)[:20]}")
            elif isinstance(sub, (ast.If, ast.While)) and not isinstance(sub.test, ast.Constant):
                t = sub.test
                add(t, at(t.lineno, t.col_offset), at(t.end_lineno, t.end_col_offset), f"not ({text(t)})",
                    "negate condition")
            elif isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.Not):
                add(sub, at(sub.lineno, sub.col_offset), at(sub.end_lineno, sub.end_col_offset),
                    f"({text(sub.operand)})", "drop 'not'")
            elif isinstance(sub, ast.BoolOp) and len(sub.values) == 2:
                old, new = ("and", "or") if isinstance(sub.op, ast.And) else ("or", "and")
                between(sub.values[0], sub.values[1], old, new, sub, f"{old} -> {new}")

    skip: set = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    item._qual = f"{node.name}.{item.name}"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            qual = getattr(node, "_qual", node.name)
            if wanted is None or qual in wanted or node.name in wanted:
                visit_body(node)
    good = []
    for m in sorted(set(out), key=lambda m: (m.start, m.what)):
        try:
            compile(m.apply(source), path, "exec")
            good.append(m)
        except SyntaxError:
            pass
    return good


def family(m: Mutant) -> str:
    """The kind of edit (for a sample that mixes kinds): the part of ``what`` before its details."""
    w = m.what.split(" in '")[0]  # not the quoted context of a constant
    for key in ("drop '*", "drop 'not'", "negate", "swap args", "()", " and", " or"):
        if key in w:
            return key
    return "const" if w.split()[0].isdigit() else "op"


def pick(mutants: Sequence[Mutant], n: Optional[int], seed: int = 0, focus: Sequence[str] = (),
         source: str = "") -> List[Mutant]:
    """Up to ``n`` mutants: first every one on a line holding a ``focus`` snippet, then a seeded
    round-robin over the kinds of edit (so constants do not crowd out comparisons); file order."""
    lines = source.splitlines()
    chosen = [m for m in mutants if any(f in lines[m.line - 1] for f in focus)] if focus else []
    rng = random.Random(seed)
    pools: Dict[str, List[Mutant]] = {}
    for m in mutants:
        if m not in chosen:
            pools.setdefault(family(m), []).append(m)
    for pool in pools.values():
        rng.shuffle(pool)
    order = sorted(pools)
    while (n is None or len(chosen) < n) and any(pools.values()):
        for k in order:
            if pools[k] and (n is None or len(chosen) < n):
                chosen.append(pools[k].pop())
    return sorted(chosen, key=lambda m: (m.start, m.what))


@dataclass
class Outcome:
    mutant: Mutant
    verdict: str  # "killed", "SURVIVED", "TIMEOUT", "ERROR"
    by: str = ""
    seconds: float = 0.0


def _failed_test(log: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", log, re.M)
    return m.group(1) if m else (log.strip().splitlines() or ["?"])[-1][:80]


def preload(package: str = "minicpmv_attn", probe: Sequence[str] = ()) -> int:
    """Import once, in this (parent) process, every third-party module that ``package`` and the
    ``probe`` modules pull in (found by importing them in a throw-away subprocess), but never
    the package itself: forked children then import only the package (the mutant). Returns
    how many modules were preloaded."""
    code = ("import sys, json, importlib\n"
            f"for m in {[package, *probe]!r}:\n    importlib.import_module(m)\n"
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] not in "
            f"({package!r}, '__main__')]))")
    names = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1")).stdout.strip().splitlines()[-1]
    import importlib
    import json
    count = 0
    for name in ["pytest", "hypothesis", *json.loads(names)]:
        try:
            importlib.import_module(name)
            count += 1
        except Exception:  # noqa: BLE001  (private or platform modules that only import in context)
            pass
    if any(k == package or k.startswith(package + ".") for k in sys.modules):
        raise RuntimeError(f"{package} is imported in the parent: forked children would not see the mutant")
    return count


def run_tests(tests: Sequence[str], timeout: float, fork: bool = True, extra: Sequence[str] = ()) -> tuple:
    """(rc, log, timed_out) of ``pytest -x -q tests`` with OMP_NUM_THREADS=1."""
    args = ["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *extra, *tests]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="mutpyc-") as pyc, tempfile.TemporaryFile("w+") as log:
        if not fork:
            try:
                p = subprocess.run([sys.executable, "-m", "pytest", *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONPYCACHEPREFIX=pyc, **env), timeout=timeout)
                rc, late = p.returncode, False
            except subprocess.TimeoutExpired:
                rc, late = -9, True
            log.seek(0)
            return rc, log.read(), late
        pid = os.fork()
        if pid == 0:  # child: own process group (killed as a whole on timeout), fresh bytecode
            try:
                os.setpgid(0, 0)
                os.environ.update(env)
                sys.pycache_prefix, sys.dont_write_bytecode = pyc, True
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                import pytest
                rc = int(pytest.main(args))
            except BaseException:  # noqa: BLE001  (the child must never return into the parent's code)
                rc = 99
            os._exit(rc)
        deadline, late = time.time() + timeout, False
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.time() > deadline:
                    late = True
                    os.killpg(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.1)
        except BaseException:
            try:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            raise
        log.seek(0)
        return (os.waitstatus_to_exitcode(status), log.read(), late)


def run_pass(plan: Dict[str, dict], root: Path, timeout: float = 120.0, fork: bool = True,
             report: Callable[[Outcome], None] = lambda o: None) -> List[Outcome]:
    """Run every mutant of ``plan`` (``{path: {"mutants": [...], "tests": [...]}}``), one at a time."""
    outcomes: List[Outcome] = []
    old_term = signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for path, entry in plan.items():
            target = root / path
            original = target.read_bytes()
            try:
                for m in entry["mutants"]:
                    target.write_text(m.apply(original.decode("utf-8")), encoding="utf-8")
                    start = time.time()
                    rc, log, late = run_tests(entry["tests"], timeout, fork, entry.get("pytest_args", ()))
                    verdict = "TIMEOUT" if late else "SURVIVED" if rc == 0 else "killed" if rc == 1 else "ERROR"
                    o = Outcome(m, verdict, _failed_test(log) if verdict in ("killed", "ERROR") else "",
                                time.time() - start)
                    outcomes.append(o)
                    report(o)
            finally:
                target.write_bytes(original)
                if target.read_bytes() != original:
                    raise RuntimeError(f"{target}: could not restore the original file")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return outcomes


def table(outcomes: Sequence[Outcome], why: Optional[Dict[str, str]] = None) -> str:
    """A markdown table: file:line, mutation, killed-by test or SURVIVED, seconds (and a why column)."""
    why = why or {}
    rows = ["| file:line | mutation | result | s |" + (" why |" if why else ""),
            "| --- | --- | --- | --- |" + (" --- |" if why else "")]
    for o in outcomes:
        key = f"{Path(o.mutant.path).name}:{o.mutant.line}"
        res = f"killed by `{o.by}`" if o.verdict == "killed" else o.verdict + (f" ({o.by})" if o.by else "")
        what = o.mutant.what.replace("|", "\\|")
        rows.append(f"| {key} | `{what}` | {res} | {o.seconds:.0f} |" + (f" {why.get(key + ' ' + o.mutant.what, '')} |"
                                                                          if why else ""))
    return "\n".join(rows)

