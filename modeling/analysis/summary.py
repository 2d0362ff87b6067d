"""One row per extracted record: the dataset table behind ``summary.parquet`` / ``summary.csv``.

:func:`summarise` reads an extraction folder (``results.jsonl`` + ``records/``) and, for the last
successful attempt of every job (content key), loads its record and measures, over the captured
LLM query rows (the generated tokens by default, left padding aside):

* ``img_share_L<nn>``: share of the attention that lands on image tokens, per captured LLM layer,
  and ``image_share`` / ``text_share`` / ``special_share``: the shares averaged over those layers
  (:func:`~.attention_map.role_shares`);
* ``entropy``: attention entropy in nats of each row over the keys, averaged over rows and layers
  (of the head-mean rows when heads were reduced at capture);
* ``sink_share``: share on the first (non-padding) token, the usual attention sink
  (:func:`~.attention_map.sink_shares` with that sink);
* ``top_x0, top_y0, top_x1, top_y1``: the cell (original-image pixels) with the most mass in the
  mean LLM->image heatmap of the answer (:func:`~.attention_map.image_heatmap` at a
  :data:`REGION_GRID`-cell grid on the long side, averaged over the captured rows and layers);
  empty when the record has no resampler attention to map tokens to pixels.

Plus ``id``, the line's other JSONL fields (``label``, ...), ``answer``, ``n_prompt``,
``n_generated``, ``n_image_tokens``, the image size and where the record is. A record that cannot
be measured keeps its row with the reason in ``summary_error``.
"""
import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..attention_record import AttentionRecord, atomic_write_bytes, atomic_write_text
from . import pipeline
from .results_folder import record_problem, results_files

__all__ = ["REGION_GRID", "SummaryTable", "answer_entropy", "first_token_share", "record_stats", "summarise",
           "write_summary"]

REGION_GRID = 32  # cells on the long side of the heatmap grid (the top region's resolution)
MAX_HEATMAP_ROWS = 64  # answer rows averaged for a record's heatmap (evenly spaced when more)
BASE_COLUMNS = ["id", "key", "record", "input", "line", "image"]
STAT_COLUMNS = ["answer", "n_prompt", "n_generated", "n_image_tokens", "image_w", "image_h", "image_share",
                "text_share", "special_share", "entropy", "sink_share", "top_x0", "top_y0", "top_x1", "top_y1"]


@dataclass
class SummaryTable:
    """The rows (dicts, one per record), their column order, and per record key its heatmap
    (``[gh, gw]`` float32 grid summing to 1, or absent)."""

    rows: List[Dict[str, Any]]
    columns: List[str]
    heatmaps: Dict[str, np.ndarray] = field(default_factory=dict)
    failed_lines: int = 0  # jobs whose last attempt failed (no record)
    sampled: Optional[set] = None  # keys kept for plots (and heatmaps) when there were too many; None: all


def _captured_rows(record: AttentionRecord, layer: int) -> List[int]:
    from ..attention import hook_name
    from .attention_map import _idx, _positions

    name = hook_name("llm", layer)
    t = record.tensors[name]
    pad = int(record.layout.padding) if record.layout is not None else 0
    return [p for p in _positions(_idx(record, name), "rows", t.shape[-2]) if p >= pad]


def answer_entropy(record: AttentionRecord, chunk: int = 256) -> float:
    """Mean entropy (nats) of the captured LLM rows over their keys, over rows and layers (of the
    head-mean rows)."""
    from .attention_map import llm_attention_rows

    ent, n = 0.0, 0
    for layer in record.layers("llm"):
        rows = _captured_rows(record, layer)
        for c in range(0, len(rows), chunk):
            w, _, _ = llm_attention_rows(record, layer, rows[c:c + chunk], None, "mean")
            ent += float(-(w * np.log(np.clip(w, 1e-30, None))).sum())
            n += w.shape[0]
    if not n:
        raise ValueError("no captured LLM rows to measure")
    return ent / n


def first_token_share(record: AttentionRecord) -> float:
    """Mean share of attention on the first non-padding token (the usual sink) over the captured
    LLM rows and layers (:func:`~.attention_map.sink_shares` with that one sink)."""
    from .attention_map import sink_shares

    first = int(record.layout.padding) if record.layout is not None else 0
    return float(np.mean(sink_shares(record, sinks=[first], per_head=False).shares))


def _heatmap(record: AttentionRecord) -> Optional[Tuple[np.ndarray, Tuple[int, int]]]:
    """The mean answer heatmap on a REGION_GRID grid (sums to 1), and the image size; None
    without resampler attention or an image."""
    from .attention_map import image_heatmap

    layout = record.layout
    if "resampler.attn" not in record.tensors or not layout.images:
        return None
    W, H = (int(v) for v in layout.images[0].size)
    scale = REGION_GRID / max(W, H)
    gw, gh = max(1, round(W * scale)), max(1, round(H * scale))
    rows = _captured_rows(record, record.layers("llm")[0])
    if len(rows) > MAX_HEATMAP_ROWS:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, MAX_HEATMAP_ROWS).round().astype(int)]
    total = np.zeros((gh, gw))
    for r in rows:
        total += image_heatmap(record, r, out_size=(gw, gh), layer_reduce="mean").map
    s = total.sum()
    return (total / s if s > 0 else total).astype(np.float32), (W, H)


def _measured(v) -> Optional[float]:
    """A share as a float, or None where the record lacks the columns to measure it (NaN)."""
    v = float(v)
    return v if math.isfinite(v) else None


def _all_key_columns(record: AttentionRecord) -> bool:
    """Whether every captured LLM layer kept all key columns (``cols="all"``)."""
    from ..attention import hook_name
    from .attention_map import _idx

    return all(_idx(record, hook_name("llm", l)).get("cols") is None for l in record.layers("llm"))


def _has_column(record: AttentionRecord, position: int) -> bool:
    """Whether every captured LLM layer kept the key column ``position``."""
    from ..attention import hook_name
    from .attention_map import _idx, _positions

    for l in record.layers("llm"):
        name = hook_name("llm", l)
        if position not in _positions(_idx(record, name), "cols", record.tensors[name].shape[-1]):
            return False
    return True


def record_stats(record: AttentionRecord) -> Tuple[Dict[str, Any], Optional[np.ndarray]]:
    """The measured columns of one record (see the module doc) and its heatmap grid (or None)."""
    from .attention_map import role_shares

    layout = record.layout
    if layout is None:
        raise ValueError("the record has no token layout")
    if not record.layers("llm"):
        raise ValueError("the record has no LLM attention (capture stage 'llm')")
    out: Dict[str, Any] = {"n_prompt": int(layout.n_prompt), "n_generated": len(layout.input_ids) - int(layout.n_prompt),
                           "n_image_tokens": sum(1 for r in layout.roles if r == "image")}
    shares = role_shares(record)
    for layer, v in zip(shares.layers, shares["image"]):
        out[f"img_share_L{layer:02d}"] = _measured(v)
    for role in ("image", "text", "special"):
        out[f"{role}_share"] = _measured(np.mean(shares[role]))
    # a record with a subset of the key columns (e.g. cols="image") cannot give a row's entropy, nor a
    # sink share when the sink's column was not kept: those cells stay empty (not measured), never 0
    full = _all_key_columns(record)
    out["entropy"] = answer_entropy(record) if full else None
    first = int(layout.padding)
    out["sink_share"] = first_token_share(record) if full or _has_column(record, first) else None
    grid = None
    if layout.images:
        out["image_w"], out["image_h"] = (int(v) for v in layout.images[0].size)
        made = _heatmap(record)
        if made is not None:
            grid, (W, H) = made
            gh, gw = grid.shape
            r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
            out.update(top_x0=int(math.floor(c * W / gw)), top_y0=int(math.floor(r * H / gh)),
                       top_x1=int(math.ceil((c + 1) * W / gw)), top_y1=int(math.ceil((r + 1) * H / gh)))
    return out, grid


def latest_ok_rows(out: str, warn: Optional[Callable[[str], None]] = None) -> Tuple[List[dict], int]:
    """(the last ok row of every key whose record files are in the folder, in input/line order; how
    many keys ended failed). An ok row whose record is missing or outside ``out`` counts as
    failed, with a warning."""
    warn = warn or (lambda msg: None)
    last: Dict[str, dict] = {}
    for path in results_files(out):
        for row in pipeline.read_jsonl_rows(path, warn=warn):
            key = row.get("key")
            if not isinstance(key, str):
                continue
            if row.get("status") == "ok" and isinstance(row.get("record"), str):
                last[key] = row
            elif key not in last or last[key].get("status") != "ok":
                last[key] = row
    ok, failed = [], 0
    for r in last.values():
        problem = record_problem(out, r.get("record")) if r.get("status") == "ok" else "failed"
        if problem is None:
            ok.append(r)
            continue
        failed += 1
        if problem != "failed":
            warn(f"{out}: {r.get('input')} line {r.get('line')} (id {r.get('id')!r}): {problem}; counted as failed")
    ok.sort(key=lambda r: (str(r.get("input")), int(r.get("line") or 0)))
    return ok, failed


def _reserved(name: str) -> bool:
    return name in BASE_COLUMNS or name in STAT_COLUMNS or name == "summary_error" or name.startswith("img_share_L")


def field_columns(all_fields) -> Dict[str, str]:
    """{JSONL field name: its summary column}, in first-seen order: a field named like one of the
    table's own columns gets ``field_`` in front, as many times as needed to be unique among the
    table's columns and every other field (``record`` and ``field_record`` both stay)."""
    keys: List[str] = []
    for fields in all_fields:
        for k in (fields if isinstance(fields, dict) else {}):
            if k not in keys:
                keys.append(k)
    taken = {k for k in keys if not _reserved(k)}
    out: Dict[str, str] = {}
    for k in keys:
        name = k
        if _reserved(k):
            name = "field_" + k
            while _reserved(name) or name in taken:
                name = "field_" + name
            taken.add(name)
        out[k] = name
    return out


def summarise(out: str, warn: Optional[Callable[[str], None]] = None, quiet: bool = True,
              max_plot_rows: Optional[int] = None, seed: int = 0) -> SummaryTable:
    """Measure every record of the extraction folder ``out`` (see the module doc). Heatmaps are
    kept for at most ``max_plot_rows`` records (a seeded random sample, ``sampled``) so memory
    stays bounded whatever the dataset's size."""
    import sys

    from tqdm.auto import tqdm

    ok, failed = latest_ok_rows(out, warn)
    sampled = None
    if max_plot_rows is not None and len(ok) > max_plot_rows:
        pick = np.random.default_rng(seed).choice(len(ok), max_plot_rows, replace=False)
        sampled = {ok[i]["key"] for i in pick}
    rows, heatmaps, layers = [], {}, set()
    names = field_columns(r.get("fields") for r in ok)
    extra = list(names.values())
    for r in tqdm(ok, desc="summarising", unit="record", disable=quiet or not sys.stderr.isatty()):
        row = {"id": r.get("id"), "key": r["key"], "record": r["record"], "input": r.get("input"),
               "line": r.get("line"), "image": r.get("image")}
        fields = r.get("fields") if isinstance(r.get("fields"), dict) else {}
        for k, v in fields.items():
            row[names[k]] = v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        row["answer"] = r.get("answer")
        try:
            rec = AttentionRecord.load(os.path.join(out, r["record"]))
            stats, grid = record_stats(rec)
            row.update(stats)
            layers.update(k for k in stats if k.startswith("img_share_L"))
            if grid is not None and (sampled is None or r["key"] in sampled):
                heatmaps[r["key"]] = grid
        except Exception as e:  # noqa: BLE001 - a record that cannot be measured keeps its row, with why
            row["summary_error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        rows.append(row)
    columns = BASE_COLUMNS + extra + STAT_COLUMNS[:6] + sorted(layers) + STAT_COLUMNS[6:]
    if any("summary_error" in r for r in rows):
        columns.append("summary_error")
    return SummaryTable(rows=rows, columns=columns, heatmaps=heatmaps, failed_lines=failed, sampled=sampled)


def _import_pyarrow():
    """pyarrow's (module, parquet module), or ImportError (an optional extra)."""
    import pyarrow
    import pyarrow.parquet as pq

    return pyarrow, pq


def write_summary(out: str, table: SummaryTable, say: Optional[Callable[[str], None]] = None) -> str:
    """Write ``out/summary.parquet`` (with pyarrow) or else ``out/summary.csv`` atomically, removing
    the other one so no stale table stays; returns the path."""
    say = say or (lambda msg: None)
    parquet, csv_path = os.path.join(out, "summary.parquet"), os.path.join(out, "summary.csv")
    cols = table.columns
    try:
        pa, pq = _import_pyarrow()
    except ImportError:
        pa = None
    if pa is not None:
        arrays = {}
        for c in cols:
            values = [r.get(c) for r in table.rows]
            kinds = {type(v) for v in values if v is not None}
            if kinds and not kinds <= {int, float} and not kinds <= {str} and not kinds <= {bool}:
                values = [None if v is None else str(v) for v in values]  # mixed types: text
            elif kinds == {int, float}:
                values = [None if v is None else float(v) for v in values]
            arrays[c] = pa.array(values, type=None if kinds else pa.null())
        buf = io.BytesIO()
        pq.write_table(pa.table(arrays), buf)
        atomic_write_bytes(parquet, buf.getvalue())
        path, other = parquet, csv_path
    else:
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in table.rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
        atomic_write_text(csv_path, text.getvalue())
        say(f"note: pyarrow is not installed, so the summary is {csv_path} (pip install 'minicpmv-attn[parquet]' "
            f"for summary.parquet)")
        path, other = csv_path, parquet
    if os.path.exists(other):
        os.unlink(other)
    return path
