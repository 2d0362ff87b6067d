"""The whole diff of the fork against an upstream copy, and the transformers-only check.

:func:`run_diff` runs every check and writes, under the ``out_dir`` it is given,
``files/<name>.diff`` (``--- upstream/`` vs ``+++ fork/``), ``transformers/*.diff``,
``report.json`` and ``summary.txt``. The checks, in order: (1) upstream files vs the pin,
(2) unified diffs, (3) symbol inventories (undocumented differences need attention),
(4) structural parity, (5) numeric parity (optional), and the installed transformers vs its
pinned snapshot. Everything that needs attention is a :class:`~.report.Finding` with
``attention=True``; the CLI exits non-zero when any exists.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..attention_record import atomic_write_json, atomic_write_text
from .common import Log, fork_dir, log_stderr, read_json
from .inventory import diff_inventories, documented_by, symbol_inventory
from .parity import run_parity
from .pin import compare_files_to_pin, load_pin, pin_source, pinned_files
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


def _symbol_findings(name: str, fork_path: Path, up_path: Path, pin: Dict[str, Any], symbol_rows: List[dict]
                     ) -> List[Finding]:
    """The inventory diff of one file; every change is appended to ``symbol_rows`` too."""
    try:
        f_inv = symbol_inventory(fork_path.read_text(encoding="utf-8"), str(fork_path))
        u_inv = symbol_inventory(up_path.read_text(encoding="utf-8"), str(up_path))
    except SyntaxError as e:
        return [Finding("symbols", name, "error", f"cannot parse: {e}", attention=True)]
    out = []
    changes = diff_inventories(f_inv, u_inv, name)
    for ch in changes:
        entry = documented_by(ch, pin)
        row = asdict(ch)
        row["documented"] = entry is not None
        symbol_rows.append(row)
        item = f"{name}::{ch.qualname}"
        if ch.change == "body":
            out.append(Finding("symbols", item, "body differs" + (" (documented)" if entry else ""), ""))
        elif entry is not None:
            out.append(Finding("symbols", item, f"{ch.change} (documented)", entry.get("note", "")))
        else:
            detail = {"added": f"fork only: {ch.fork}", "removed": f"upstream only: {ch.upstream}",
                      "signature": f"fork {ch.fork} | upstream {ch.upstream}"}[ch.change]
            out.append(Finding("symbols", item, f"{ch.change} (undocumented)", detail, attention=True))
    if not [c for c in changes if c.change != "body"]:
        out.append(Finding("symbols", name, "ok", f"{len(f_inv)} symbols, same names and signatures"))
    return out


def run_diff(upstream_dir, out_dir, pin_path=None, fork=None, numeric: bool = False, structural: bool = True,
             check_transformers: bool = True, config_path=None, atol: float = 1e-4, seed: int = 0,
             fork_attn: Optional[str] = None, log: Log = log_stderr) -> Tuple[List[Finding], Dict[str, Any]]:
    """Every check; returns (findings, report dict). Writes diffs, report.json and summary.txt to
    ``out_dir``. ``pin_path`` defaults to the installed pin, ``fork`` to the installed package."""
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
    findings += _file_findings(statuses)
    report["files"] = [asdict(s) for s in statuses]

    # (2) unified diffs, (3) symbol inventories
    log("[2/5] unified diffs and (3/5) symbol inventories")
    names = sorted({s.name for s in statuses if s.status != "missing"} | set(pinned_files(pin)))
    symbol_rows: List[dict] = []
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
        findings += _symbol_findings(name, fork_path, up_path, pin, symbol_rows)
    report["symbols"] = symbol_rows
    report["fork_only_files"] = sorted(p.name for p in fork.glob("*.py")
                                       if p.name not in names and p.name != "__init__.py")

    # (4) structural parity, (5) numeric parity
    config_dict: Dict[str, Any] = {}
    if config_path is not None:
        config_dict = read_json(config_path)
    elif (upstream_dir / "config.json").is_file():
        config_dict = read_json(upstream_dir / "config.json")
    report["config_source"] = str(config_path or (upstream_dir / "config.json" if config_dict else "class defaults"))
    findings += run_parity(fork, upstream_dir, config_dict, pin, structural=structural, numeric=numeric, atol=atol,
                           seed=seed, fork_attn=fork_attn, log=log)

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
    atomic_write_text(out_dir / "summary.txt", format_table(summarize(findings), max_detail=10_000) + "\n")
    return findings, report


def check_installed_transformers(pin_path=None, fork=None, log: Log = log_stderr) -> List[Finding]:
    """Only the installed transformers vs its pinned snapshot (no upstream copy, nothing written)."""
    findings, _ = compare_transformers(load_pin(pin_path), Path(fork) if fork is not None else fork_dir(), None,
                                       log=log)
    return findings
