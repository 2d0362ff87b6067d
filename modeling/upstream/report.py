"""Findings (the rows of every check's report) and the summary table the CLI prints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

TABLE_WIDTH = 120


@dataclass
class Finding:
    """One row of the report. ``attention`` marks what a maintainer must look at."""

    section: str  # files | symbols | notes | config | state_dict | parity | numeric | transformers | setup
    item: str
    status: str
    detail: str = ""
    attention: bool = False


def needs_attention(findings: Iterable[Finding]) -> bool:
    return any(f.attention for f in findings)


def _cut(text: str, width: int, keep_end: bool = False) -> str:
    """``text`` in at most ``width`` characters (``...`` where it was cut)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    if keep_end:  # items: keep the file and the end of the symbol
        head = width // 2 - 2
        return text[:head] + "..." + text[len(text) - (width - head - 3):]
    return text[: width - 3] + "..."


def format_table(findings: Sequence[Finding], width: int = TABLE_WIDTH) -> str:
    """A fixed-width table at most ``width`` characters wide (``None``: no limit, nothing cut): a
    ``!!`` in the first column marks rows needing attention. Long items are cut in the middle; a
    detail that does not fit beside its row goes on the next line, cut to the width
    (report.json has every row whole)."""
    head = ("", "section", "item", "status", "detail")
    rows = [("!!" if f.attention else "", f.section, f.item, f.status, " ".join(f.detail.split()))
            for f in findings]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(4)]
    if width is not None:
        widths[1], widths[2], widths[3] = min(widths[1], 12), min(widths[2], 54), min(widths[3], 30)
    room = None if width is None else width - sum(widths) - 2 * 4
    fmt = "  ".join("{:<%d}" % w for w in widths) + "  {}"
    lines = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths), "-" * 6).rstrip()]
    for r in rows:
        cells = [r[0], _cut(r[1], widths[1]), _cut(r[2], widths[2], keep_end=True), _cut(r[3], widths[3])]
        if room is None or len(r[4]) <= room:
            lines.append(fmt.format(*cells, r[4]).rstrip())
        else:
            lines.append(fmt.format(*cells, "").rstrip())
            lines.append("      " + _cut(r[4], width - 6))
    n_att = sum(f.attention for f in findings)
    lines.append("")
    lines.append(f"{len(findings)} rows, {n_att} need attention" if n_att else f"{len(findings)} rows, nothing needs attention")
    return "\n".join(lines)


def summarize(findings: Sequence[Finding]) -> List[Finding]:
    """Collapse the many informational per-symbol (and per-field) rows into counts, keeping every
    attention, error, ok and info row."""
    out: List[Finding] = []
    counts: Dict[Tuple[str, str], int] = {}
    for f in findings:
        collapsible = f.section in ("symbols", "transformers", "config") and f.status not in ("ok", "error", "info", "skipped")
        if f.attention or not collapsible:
            out.append(f)
        else:
            key = (f.section, f.status)
            counts[key] = counts.get(key, 0) + 1
    for (section, status), n in sorted(counts.items()):
        what = "fields" if section == "config" else "symbols"
        out.append(Finding(section, f"({n} {what})", status, "informational; every row in report.json"))
    return out
