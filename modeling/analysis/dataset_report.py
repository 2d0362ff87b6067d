"""``report.html`` of an extraction folder: one offline, self-contained page about the dataset.

:func:`build_report` (what a run ends with, and ``extract_attention.py report DIR``, no model
needed) measures the records (:func:`~.summary.summarise`), writes the summary table and
renders one HTML file whose plots are embedded PNGs (no network, no CDN, nothing beside it
but relative links to the records):

* the image share of attention per LLM layer across the dataset (median, 25-75 % and 5-95 %
  bands);
* with a group column (``group_by``, default ``label`` when the lines have one): the mean image
  share per layer of each group and the difference (two groups: A - B; more: group - all);
* outliers: the records with the lowest and highest image share, each linked to its viewer page
  (``viewer/<name>.html``, written by :func:`~.outlier_pages.write_outlier_pages`: the maps on the
  record's image when the path the extraction recorded still holds it) and to its raw JSON;
* the mean answer heatmap per group over the images of the most common size.

Bounded: at most :data:`MAX_PLOT_ROWS` rows are plotted and keep a heatmap in memory (a seeded
sample when there are more, which the page says), :data:`MAX_GROUPS` groups (the largest) and :data:`OUTLIERS` per side.
"""
import base64
import io
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..attention_record import atomic_write_text
from .html_safe import plot_text, relative_href, text
from .outlier_pages import OutlierPage, write_outlier_pages
from .pipeline import ToolError
from .summary import SummaryTable, summarise, write_summary

__all__ = ["MAX_PLOT_ROWS", "BuiltReport", "build_report", "outlier_rows", "render_report"]

MAX_PLOT_ROWS = 20000
MAX_GROUPS = 8
OUTLIERS = 10


@dataclass
class BuiltReport:
    summary_path: str
    report_path: str
    rows: int


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "<img alt='plot' src='data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii") + "'>"


def _layer_columns(table: SummaryTable) -> List[str]:
    return [c for c in table.columns if c.startswith("img_share_L")]


def _matrix(rows: List[dict], cols: List[str]) -> np.ndarray:
    return np.array([[np.nan if r.get(c) is None else float(r[c]) for c in cols] for r in rows], dtype=float
                    ).reshape(len(rows), len(cols))


def _bands(rows, cols) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _matrix(rows, cols)
    x = np.arange(len(cols))
    q = np.nanquantile(m, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.fill_between(x, q[0], q[4], alpha=0.2, label="5-95 %")
    ax.fill_between(x, q[1], q[3], alpha=0.4, label="25-75 %")
    ax.plot(x, q[2], "k-", label="median")
    ax.set_xticks(x, [c[len("img_share_L"):] for c in cols])
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("image share")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _groups(rows: List[dict], group_by: str) -> Dict[str, List[dict]]:
    counts = Counter(str(r.get(group_by)) for r in rows if r.get(group_by) is not None)
    keep = [g for g, _ in counts.most_common(MAX_GROUPS)]
    return {g: [r for r in rows if str(r.get(group_by)) == g] for g in sorted(keep)}


def _group_plot(groups: Dict[str, List[dict]], cols: List[str], everyone: List[dict]) -> str:
    import matplotlib.pyplot as plt

    x = np.arange(len(cols))
    means = {g: np.nanmean(_matrix(rs, cols), axis=0) for g, rs in groups.items()}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2))
    for g, m in means.items():
        a.plot(x, m, marker=".", label=plot_text(f"{g} (n={len(groups[g])})"))
    a.set_title("mean image share per layer")
    a.legend(fontsize=8)
    names = list(means)
    if len(names) == 2:
        b.plot(x, means[names[0]] - means[names[1]], "r.-")
        b.set_title(plot_text(f"difference: {names[0]} - {names[1]}"))
    else:
        overall = np.nanmean(_matrix(everyone, cols), axis=0)
        for g, m in means.items():
            b.plot(x, m - overall, marker=".", label=plot_text(g))
        b.set_title("group - all")
    b.axhline(0, color="grey", lw=0.5)
    for ax in (a, b):
        ax.set_xticks(x, [c[len("img_share_L"):] for c in cols])
        ax.set_xlabel("LLM layer")
    esc = text
    if len(names) == 2:
        diff_name, diff = f"difference: {names[0]} - {names[1]}", means[names[0]] - means[names[1]]
    else:
        overall = np.nanmean(_matrix(everyone, cols), axis=0)
        diff_name, diff = "all", overall
    head = "".join(f"<th>{esc(g)} (n={len(groups[g])})</th>" for g in names) + f"<th>{esc(diff_name)}</th>"
    body = "".join(f"<tr><td>{c[len('img_share_L'):]}</td>" + "".join(f"<td>{means[g][i]:.4f}</td>" for g in names)
                   + f"<td>{diff[i]:+.4f}</td></tr>" for i, c in enumerate(cols))
    return (_png(fig) + f"<details><summary>mean image share per layer (table)</summary><table><tr><th>layer</th>"
            f"{head}</tr>{body}</table></details>")


def _heatmap_plot(table: SummaryTable, groups: Dict[str, List[dict]]) -> str:
    import matplotlib.pyplot as plt

    sizes = Counter((r.get("image_w"), r.get("image_h")) for r in table.rows if r["key"] in table.heatmaps)
    if not sizes:
        return "<p>No heatmaps: the records have no resampler attention (capture stage 'resampler').</p>"
    (w, h), n = sizes.most_common(1)[0]
    panels = []
    for g, rs in groups.items():
        maps = [table.heatmaps[r["key"]] for r in rs if r["key"] in table.heatmaps
                and (r.get("image_w"), r.get("image_h")) == (w, h)]
        if maps:
            panels.append((g, np.mean(maps, axis=0), len(maps)))
    if not panels:
        return f"<p>No heatmap of a {w} x {h} px image in these groups.</p>"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (g, m, k) in zip(axes[0], panels):
        ax.imshow(m, extent=(0, w, h, 0), cmap="inferno")
        ax.set_title(plot_text(f"{g} (n={k})"), fontsize=9)
    return (f"<p>Images of the most common size, {w} x {h} px ({n} records); each record's map is normalised "
            f"to 1 before averaging.</p>" + _png(fig))


def _record_link(row: dict, pages: Optional[Dict[str, OutlierPage]] = None) -> str:
    """The record's name, linked to its viewer page (``viewer/<name>.html``, when ``pages`` has one)
    and to its raw JSON, each only as a relative path inside the folder (never a URL:
    ``javascript:...`` is a file name here)."""
    name = text(str(row.get("id") or row["key"][:12]))
    href = relative_href(str(row.get("record")) + ".json")
    page = (pages or {}).get(row["key"])
    if page is None or page.href is None:
        cell = f'<a href="{href}">{name}</a>' if href else name
    else:
        cell = f'<a class=viewer href="{page.href}">{name}</a>' + (f' (<a href="{href}">json</a>)' if href else "")
    if page is not None and page.note:
        cell += f"<br><span class=dim>{text(page.note)}</span>"
    return cell


def outlier_rows(rows: List[dict]) -> Tuple[List[dict], List[dict]]:
    """(the :data:`OUTLIERS` rows with the lowest image share, lowest first; the highest, highest
    first) among the rows with a finite image share."""
    have = [r for r in rows if r.get("image_share") is not None and np.isfinite(r["image_share"])]
    have.sort(key=lambda r: r["image_share"])
    return have[:OUTLIERS], have[::-1][:OUTLIERS]


def _outliers(rows: List[dict], pages: Optional[Dict[str, OutlierPage]] = None) -> str:
    low, high = outlier_rows(rows)
    if not low:
        return "<p>No image shares measured.</p>"
    esc = text

    def table(title, part):
        body = "".join(
            f"<tr><td>{_record_link(r, pages)}</td>"
            f"<td>{r['image_share']:.3f}</td><td>{esc(str(r.get('answer'))[:80])}</td></tr>" for r in part)
        return f"<h3>{title}</h3><table><tr><th>record</th><th>image share</th><th>answer</th></tr>{body}</table>"

    intro = ("<p>Each record opens its viewer page (<code>viewer/</code>, the maps drawn on the record's image); "
             "<i>json</i> is the raw record.</p>" if pages else "")
    return intro + table("Lowest image share", low) + table("Highest image share", high)


def render_report(table: SummaryTable, group_by: Optional[str] = None, title: str = "extraction",
                  summary_name: str = "summary.parquet", pages: Optional[Dict[str, OutlierPage]] = None) -> str:
    """The page as a string (see the module doc). ``pages``: the outliers' viewer pages
    (:func:`~.outlier_pages.write_outlier_pages`); without them the outliers link their JSON."""
    esc = text
    rows = [r for r in table.rows if "summary_error" not in r]
    parts = [f"<p>{len(table.rows)} records in <code>{esc(summary_name)}</code>"
             f" ({len(table.rows) - len(rows)} could not be measured, see its <code>summary_error</code> column);"
             f" {table.failed_lines} line(s) failed (see <code>results.jsonl</code>).</p>"]
    plotted = rows
    if table.sampled is not None:
        plotted = [r for r in rows if r["key"] in table.sampled]
        parts.append(f"<p class=warn>{len(table.rows)} records: the plots show a random sample of "
                     f"{len(table.sampled)} (seeded); the table has them all.</p>")
    cols = _layer_columns(table)
    if not plotted or not cols:
        parts.append("<p>Nothing to plot: no record with measured image shares.</p>")
    else:
        parts.append("<h2>Image share of attention per LLM layer</h2>" + _bands(plotted, cols))
        if group_by is None and any("label" in r for r in plotted):
            group_by = "label"
        if group_by:
            groups = _groups(plotted, group_by)
            if groups:
                parts.append(f"<h2>By {esc(group_by)}</h2>" + _group_plot(groups, cols, plotted))
            else:
                parts.append(f"<p>No record has a value in the column {esc(group_by)!s}.</p>")
        else:
            groups = {"all": plotted}
        parts.append("<h2>Mean answer heatmap" + (f" by {esc(group_by)}" if group_by else "") + "</h2>"
                     + _heatmap_plot(SummaryTable(plotted, table.columns, table.heatmaps), groups or {"all": plotted}))
        parts.append("<h2>Outliers</h2>" + _outliers(plotted, pages))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>minicpmv-attn: {esc(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}} img{{max-width:100%}}
table{{border-collapse:collapse;font-size:90%}} td,th{{border:1px solid #ddd;padding:2px 6px}}
.warn{{background:#fff3cd;padding:.6em}} .dim{{color:#777}} code{{background:#f4f4f4}}</style></head><body>
<h1>Attention over the dataset: {esc(title)}</h1>
{''.join(parts)}
</body></html>
"""


def build_report(out: str, group_by: Optional[str] = None, warn: Optional[Callable[[str], None]] = None,
                 say: Optional[Callable[[str], None]] = None, quiet: bool = True) -> BuiltReport:
    """Rebuild ``out/summary.parquet`` (or ``.csv``) and ``out/report.html`` from the records in the
    extraction folder ``out`` (no model). ``group_by``: the column that splits the groups."""
    if not os.path.isdir(out):
        raise ToolError(f"report {out}: no such folder; expected an extraction folder (--out of a run)")
    if not os.path.isfile(os.path.join(out, "results.jsonl")) and not any(
            n.startswith("results.rank") for n in os.listdir(out)):
        raise ToolError(f"report {out}: has no results.jsonl; expected the --out folder of an extraction run")
    table = summarise(out, warn=warn, quiet=quiet, max_plot_rows=MAX_PLOT_ROWS)
    if group_by and table.rows and group_by not in table.columns:
        raise ToolError(f"--group-by {group_by}: no such column; the summary has {', '.join(table.columns)}")
    summary_path = write_summary(out, table, say=say or warn)
    pages = None
    plotted = [r for r in table.rows if "summary_error" not in r
               and (table.sampled is None or r["key"] in table.sampled)]
    low, high = outlier_rows(plotted)
    if low:
        pages = write_outlier_pages(out, low + high, warn=warn)
    page = render_report(table, group_by, title=os.path.basename(os.path.abspath(out)),
                         summary_name=os.path.basename(summary_path), pages=pages)
    report_path = os.path.join(out, "report.html")
    atomic_write_text(report_path, page)
    return BuiltReport(summary_path, report_path, len(table.rows))
