"""The whole diff of the fork against an upstream copy, and the transformers-only check.

:func:`run_diff` runs every check and writes, under the ``out_dir`` it is given,
``files/<name>.diff`` (``--- upstream/`` vs ``+++ fork/``), ``transformers/*.diff``,
``report.json`` (every row and detail) and ``summary.txt`` (the summary table). The checks, in
order: (1) upstream files vs the pin; (2) unified diffs; (3) symbol inventories: the fork's
against upstream's (a difference no ``changes`` entry documents needs attention) and
upstream's against the pinned snapshot of itself (any change since the pin needs attention,
named by file and symbol); (4) structural and (5) numeric parity, which execute upstream's
code (here with shims, or in ``upstream_python``); and the installed transformers vs its
pinned snapshot. Everything that needs attention is a :class:`~.report.Finding` with
``attention=True``; the CLI exits non-zero when any exists.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..attention_record import atomic_write_json, atomic_write_text
from .common import Log, fork_dir, log_stderr, read_json
from .inventory import (diff_inventories, diff_snapshot, documented_by, entry_symbols, signature_change,
                        symbol_inventory)
from .parity import run_parity
from .pin import compare_files_to_pin, load_pin, notes_dir, pin_source, pinned_files, pinned_symbols
from .report import Finding, format_table, needs_attention, summarize
from .transformers_check import compare_transformers


def unified_file_diff(upstream_path: Optional[Path], fork_path: Optional[Path], name: str) -> str:
    a = upstream_path.read_text(encoding="utf-8").splitlines(True) if upstream_path and upstream_path.is_file() else []
    b = fork_path.read_text(encoding="utf-8").splitlines(True) if fork_path and fork_path.is_file() else []
    return "".join(difflib.unified_diff(a, b, fromfile=f"upstream/{name}", tofile=f"fork/{name}"))


def clean_generated(out_dir: Path) -> None:
    """Remove what a previous run wrote (only our own file kinds)."""
    for sub, pattern in (("files", "*.diff"), ("transformers", "*.diff"), (".", "report.json"), (".", "summary.txt")):
        for p in (out_dir / sub).glob(pattern):
            if p.is_file():
                p.unlink()


def _file_findings(statuses) -> List[Finding]:
    out = []
    for st in statuses:
        if st.status == "match":
            out.append(Finding("files", st.name, "matches pin"))
        elif st.status == "changed":
            out.append(Finding("files", st.name, "changed since pin",
                               f"sha256 {st.sha256[:12]}.. (pinned {st.pinned_sha256[:12]}..)", attention=True))
        elif st.status == "missing":
            out.append(Finding("files", st.name, "missing", "pinned file not in the upstream copy", attention=True))
        else:
            out.append(Finding("files", st.name, "not pinned", "extra upstream .py file; review", attention=True))
    return out



DRIFT_STATUS = {"added": "added since pin", "removed": "removed since pin", "signature": "signature changed since pin",
                "body": "body changed since pin", "text": "edited since pin (comments/docstrings/layout only)"}


def _symbol_findings(name: str, fork_path: Path, up_path: Path, pin: Dict[str, Any], symbol_rows: List[dict],
                     used_entries: set) -> List[Finding]:
    """The fork's inventory of one file against upstream's; every difference goes to ``symbol_rows``."""
    try:
        f_inv = symbol_inventory(fork_path.read_text(encoding="utf-8"), str(fork_path), pseudo=True)
        u_inv = symbol_inventory(up_path.read_text(encoding="utf-8"), str(up_path), pseudo=True)
    except SyntaxError as e:
        return [Finding("symbols", name, "error", f"cannot parse: {e}", attention=True)]
    out = []
    changes = diff_inventories(f_inv, u_inv, name)
    for ch in changes:
        entry = documented_by(ch, pin)
        if entry is not None:
            used_entries.add(id(entry))
        row = asdict(ch)
        row["documented"] = entry is not None
        row["note"] = entry.get("note") if entry else None
        symbol_rows.append(row)
        item = f"{name}::{ch.qualname}"
        if entry is not None:
            status = "body differs" if ch.change == "body" else ch.change
            out.append(Finding("symbols", item, f"{status} (documented)", entry.get("note", "")))
            continue
        detail = {"added": f"fork only: {ch.fork}", "removed": f"upstream only: {ch.upstream}",
                  "signature": f"fork {ch.fork} | upstream {ch.upstream}",
                  "body": "same signature, different body; no changes entry documents it"}[ch.change]
        status = "body differs" if ch.change == "body" else ch.change
        out.append(Finding("symbols", item, f"{status} (undocumented)", detail, attention=True))
    if not changes:
        n = len([q for q in f_inv if not q.startswith("<")])
        out.append(Finding("symbols", name, "ok", f"{n} symbols, same names, signatures and bodies"))
    return out


def _drift_findings(name: str, up_path: Path, pin: Dict[str, Any], drift_rows: List[dict]) -> List[Finding]:
    """Upstream's file against the pinned snapshot of itself: every symbol changed since the pin."""
    pinned = pinned_symbols(pin, name)
    if pinned is None:
        return [Finding("symbols", f"{name}::?", "changed since pin", "the pin has no symbol snapshot of this file "
                        "(re-pin with --write-pin after review)", attention=True)]
    try:
        inv = symbol_inventory(up_path.read_text(encoding="utf-8"), str(up_path), pseudo=True)
    except SyntaxError as e:  # name the pinned symbol around the broken line (lines may have shifted)
        around = [(b - a, q) for q, v in pinned.items() if q != "<module>"
                  for a, b in [v.get("lines", (0, -1))] if e.lineno is not None and a <= e.lineno <= b]
        item = f"{name}::{min(around)[1]}" if around else f"{name}::<module>"
        return [Finding("symbols", item, "error", f"cannot parse since pin: {e.msg} at line {e.lineno} (pinned "
                        "symbol there named)", attention=True)]
    out = []
    for ch in diff_snapshot(inv, pinned, name):
        drift_rows.append(asdict(ch))
        where = f"lines {ch.lines[0]}-{ch.lines[1]}" if ch.lines else ""
        if ch.change == "signature":
            detail = f"{signature_change(ch.upstream, ch.fork)} (now {ch.fork}, pinned {ch.upstream})"
        elif ch.change == "added":
            detail = f"{ch.fork}"
        elif ch.change == "removed":
            detail = f"was {ch.upstream}"
        else:
            detail = ""
        out.append(Finding("symbols", f"{name}::{ch.qualname}", DRIFT_STATUS[ch.change],
                           "; ".join(x for x in (where + (" (pinned)" if ch.change == "removed" else ""), detail) if x),
                           attention=True))
    if not out:
        out.append(Finding("symbols", f"{name}::?", "changed since pin", "bytes differ but no symbol, comment or "
                           "line of code does (whitespace or encoding only)", attention=True))
    return out


def _stale_entries(pin: Dict[str, Any], used: set, names) -> List[Finding]:
    """``changes`` entries that documented nothing in this run (informational)."""
    out = []
    for entry in pin.get("changes", []):
        if id(entry) in used or entry.get("file") not in names:
            continue
        out.append(Finding("notes", f"{entry.get('file')}::{','.join(entry_symbols(entry))}", "entry matches nothing",
                           f"{entry.get('note', '')}: no difference of its kind ({entry.get('kind', 'changed')}); "
                           "stale?"))
    return out


FORK_MARK = re.compile(r"#\s*fork:\s*([A-Za-z_][\w.]*)")


def _mark_findings(fork: Path, names, notes, marks: Dict[str, List[str]]) -> List[Finding]:
    """``# fork: <note>`` marks in the fork's upstream-named files that name no note (informational)."""
    out = []
    has_notes = notes.is_dir()
    for name in names:
        path = fork / name
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = FORK_MARK.search(line)
            if m is None:
                continue
            note = m.group(1).rstrip(".")
            marks.setdefault(name, []).append(note)
            if has_notes and not notes.joinpath(note + ".md").is_file():
                out.append(Finding("notes", f"{name}:{i}", "mark names no note", f"# fork: {note} (notes/{note}.md "
                                   "does not exist)"))
    return out


def run_diff(upstream_dir, out_dir, pin_path=None, fork=None, numeric: bool = False, structural: bool = True,
             check_transformers: bool = True, config_path=None, atol: float = 1e-4, seed: int = 0,
             fork_attn: Optional[str] = None, upstream_python=None, log: Log = log_stderr
             ) -> Tuple[List[Finding], Dict[str, Any]]:
    """Every check; returns (findings, report dict). Writes diffs, report.json and summary.txt to
    ``out_dir``. ``pin_path`` defaults to the installed pin, ``fork`` to the installed package.
    Structural and numeric parity execute the upstream folder's code."""
    upstream_dir = Path(upstream_dir)
    fork = Path(fork) if fork is not None else fork_dir()
    out_dir = Path(out_dir)
    pin = load_pin(pin_path)
    findings: List[Finding] = []
    report: Dict[str, Any] = {"upstream_dir": str(upstream_dir), "fork_dir": str(fork), "out_dir": str(out_dir),
                              "pin": pin_source(pin_path)}
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_generated(out_dir)

    # (1) files vs the pin
    log(f"[1/5] upstream files in {upstream_dir} vs the pin")
    statuses = compare_files_to_pin(upstream_dir, pin)
    file_rows = _file_findings(statuses)
    findings += file_rows
    report["files"] = [asdict(s) for s in statuses]
    changed = {s.name for s in statuses if s.status == "changed"}

    # (2) unified diffs, (3) symbol inventories: fork vs upstream, upstream vs the pin
    log("[2/5] unified diffs and (3/5) symbol inventories")
    names = sorted({s.name for s in statuses if s.status != "missing"} | set(pinned_files(pin)))
    symbol_rows: List[dict] = []
    drift_rows: List[dict] = []
    used_entries: set = set()
    for name in names:
        up_path, fork_path = upstream_dir / name, fork / name
        if not up_path.is_file():
            continue
        if not fork_path.is_file():
            findings.append(Finding("files", name, "not in fork", f"{fork_path} is missing", attention=True))
            continue
        text = unified_file_diff(up_path, fork_path, name)
        if text:
            atomic_write_text(out_dir / "files" / f"{name}.diff", text)
        findings += _symbol_findings(name, fork_path, up_path, pin, symbol_rows, used_entries)
        if name in changed:
            drift = _drift_findings(name, up_path, pin, drift_rows)
            findings += drift
            row = next(f for f in file_rows if f.item == name)
            syms = [f.item.split("::", 1)[1] for f in drift if f.item.split("::", 1)[1] != "?"]
            if syms:
                row.detail += f"; symbols: {', '.join(syms[:6])}" + (f" (+{len(syms) - 6} more)" if len(syms) > 6 else "")
    findings += _stale_entries(pin, used_entries, names)
    report["fork_marks"] = {}
    findings += _mark_findings(fork, names, notes_dir(pin_path), report["fork_marks"])
    report["symbols"] = symbol_rows
    report["upstream_changes_since_pin"] = drift_rows
    report["fork_only_files"] = sorted(p.name for p in fork.glob("*.py")
                                       if p.name not in names and p.name != "__init__.py")

    # (4) structural parity, (5) numeric parity: upstream's code is executed
    config_dict: Dict[str, Any] = {}
    if config_path is not None:
        config_dict = read_json(config_path)
    elif (upstream_dir / "config.json").is_file():
        config_dict = read_json(upstream_dir / "config.json")
    has_config = config_path is not None or (upstream_dir / "config.json").is_file()
    report["config_source"] = str(config_path or (upstream_dir / "config.json" if has_config else "class defaults"))
    parity_findings, report["parity"] = run_parity(
        fork, upstream_dir, config_dict, pin, structural=structural, numeric=numeric, atol=atol, seed=seed,
        fork_attn=fork_attn, upstream_python=upstream_python, has_config=has_config, log=log)
    findings += parity_findings

    # transformers
    if check_transformers:
        log("[+] transformers' Qwen2 / SigLIP / SDPA attention code vs the pin and the fork")
        try:
            t_findings, t_details = compare_transformers(pin, fork, out_dir, log=log)
        except Exception as e:  # noqa: BLE001
            t_findings, t_details = [Finding("transformers", "check", "error", f"{type(e).__name__}: {e}",
                                             attention=True)], {}
        findings += t_findings
        report["transformers"] = t_details

    report["findings"] = [asdict(f) for f in findings]
    report["needs_attention"] = needs_attention(findings)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "summary.txt", format_table(summarize(findings)) + "\n")
    return findings, report


def check_installed_transformers(pin_path=None, fork=None, log: Log = log_stderr) -> List[Finding]:
    """Only the installed transformers vs its pinned snapshot (no upstream copy, nothing written)."""
    findings, _ = compare_transformers(load_pin(pin_path), Path(fork) if fork is not None else fork_dir(), None,
                                       log=log)
    return findings
