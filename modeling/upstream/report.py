"""Findings (the rows of every check's report) and the summary table the CLI prints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple


@dataclass
class Finding:
    """One row of the report. ``attention`` marks what a maintainer must look at."""

    section: str  # files | symbols | state_dict | config | numeric | transformers | setup
    item: str
    status: str
    detail: str = ""
    attention: bool = False


def needs_attention(findings: Iterable[Finding]) -> bool:
    return any(f.attention for f in findings)


def format_table(findings: Sequence[Finding], max_detail: int = 70) -> str:
    """A fixed-width table: a ``!!`` in the first column marks rows needing attention."""
    head = ("", "section", "item", "status", "detail")
    rows = []
    for f in findings:
        detail = f.detail.replace("\n", " ")
        if len(detail) > max_detail:
            detail = detail[: max_detail - 3] + "..."
        rows.append(("!!" if f.attention else "", f.section, f.item, f.status, detail))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(4)]
    lines = []
    fmt = "  ".join("{:<%d}" % w for w in widths) + "  {}"
    lines.append(fmt.format(*head).rstrip())
    lines.append(fmt.format(*("-" * w for w in widths), "-" * 6).rstrip())
    for r in rows:
        lines.append(fmt.format(*r).rstrip())
    n_att = sum(f.attention for f in findings)
    lines.append("")
    lines.append(f"{len(findings)} rows, {n_att} need attention" if n_att else f"{len(findings)} rows, nothing needs attention")
    return "\n".join(lines)


def summarize(findings: Sequence[Finding]) -> List[Finding]:
    """Collapse the many per-symbol rows into counts, keeping every attention row."""
    out: List[Finding] = []
    info_counts: Dict[Tuple[str, str], int] = {}
    for f in findings:
        if f.attention or f.section not in ("symbols", "transformers") or f.status in ("ok", "error"):
            out.append(f)
        else:
            key = (f.section, f.status)
            info_counts[key] = info_counts.get(key, 0) + 1
    for (section, status), n in sorted(info_counts.items()):
        out.append(Finding(section, f"({n} symbols)", status, "informational; see report.json"))
    return out
