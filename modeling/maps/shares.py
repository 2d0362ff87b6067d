"""Where the LLM's attention goes by kind of token: role shares, attention sinks, summaries.

Owns the shares of attention per token role (:func:`role_shares`), attention sinks
(:func:`find_sinks`, :func:`sink_shares`) and a record at a glance (:func:`record_summary`).

Attention sinks (:func:`find_sinks`, :func:`sink_shares`)
---------------------------------------------------------
A sink is the first non-padding token, plus every key position whose mean
*attention ratio* exceeds ``SINK_FACTOR`` (5): the ratio of a key ``k`` in a row
``r`` is ``A[r, k] * n_visible(r)`` (1 = the uniform share over the row's
``n_visible = r + 1 - padding`` keys), averaged over the captured rows that see
``k``, the heads and the layers used. ``sinks=[...]`` overrides the rule.

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..attention_record import AttentionRecord, TokenLayout
from ..capture import ROLES, hook_name
from .image_geometry import _need_layout
from .rows import (
    HeadSel, LayerSel, _idx, _positions, _seq_len, _span, _squeeze, _stage_layers, fed_length,
    llm_attention_rows, prompt_length, resolve_rows,
)


# ----------------------------------------------------------------------------------
# Role shares
# ----------------------------------------------------------------------------------
def _role_masks(layout: TokenLayout, L: int) -> Dict[str, np.ndarray]:
    roles = list(layout.roles) + ["text"] * max(0, L - len(layout.roles))
    arr = np.array(roles[:L])
    return {r: arr == r for r in ROLES}


def row_role_shares(weights: np.ndarray, covered: np.ndarray, layout: TokenLayout,
                    positions: Sequence[int]) -> Dict[str, np.ndarray]:
    """Per role, the mass of each row (``weights [..., n_pos, L]``) on that role's keys.

    A role's share is NaN for a row where some key of that role at or before the
    row's position (padding aside) was not captured.
    """
    L = weights.shape[-1]
    masks = _role_masks(layout, L)
    pos_ok = np.arange(L) >= int(layout.padding)
    out = {}
    for r in ROLES:
        s = (weights * masks[r]).sum(-1)
        missing = np.nonzero(masks[r] & ~covered & pos_ok)[0]
        if missing.size:
            bad = np.asarray(positions) >= missing[0]
            s = np.where(bad, np.nan, s)
        out[r] = s
    return out


@dataclass
class RoleShares:
    """Mean share of attention (over the chosen query rows) going to each token role."""

    layers: List[int]
    rows: List[int]
    heads: Optional[list]  # head labels when per_head, else None
    shares: Dict[str, np.ndarray]  # role -> [n_layers] or [n_layers, n_heads]; NaN = not captured

    def __getitem__(self, role: str) -> np.ndarray:
        return self.shares[role]


def role_shares(
    record: AttentionRecord,
    rows=None,
    layers: LayerSel = None,
    heads: HeadSel = None,
    per_head: bool = False,
    head_reduce: str = "mean",
    chunk: int = 256,
) -> RoleShares:
    """Text / image / special share of attention per LLM layer (and per head).

    ``rows``: None (every captured row but left padding), ``"generated"``,
    ``"prompt"``, ``"last"`` (last prompt token), a position or a list of positions
    (negative count from the end of the prompt; see :func:`resolve_rows`). Shares are raw
    attention mass averaged over the rows; a row's roles sum to 1 when its heads are kept or
    mean-reduced.
    """
    layout = _need_layout(record, "role shares")
    layers = _stage_layers(record, "llm", layers)
    res: Dict[str, list] = {r: [] for r in ROLES}
    labels = None
    sel_rows = None
    for l in layers:
        name, sel = _layer_rows(record, l, rows)
        sums = {r: 0.0 for r in ROLES}
        for c in range(0, len(sel), chunk):  # bounded memory: [heads, chunk, L] at a time
            part = sel[c: c + chunk]
            wts, cov, lab = llm_attention_rows(record, l, part, heads, None if per_head else head_reduce)
            if per_head:
                if labels is not None and list(lab) != list(labels):
                    raise ValueError(f"per-head shares need the same heads in every layer; "
                                     f"{name} has {lab}, earlier {labels}")
                labels = lab
            sh = row_role_shares(wts, cov, layout, part)
            for r in ROLES:
                sums[r] = sums[r] + sh[r].sum(-1)
        for r in ROLES:
            res[r].append(sums[r] / len(sel))
        sel_rows = sel
    return RoleShares(layers=layers, rows=sel_rows, heads=labels if per_head else None,
                      shares={r: np.stack(v) for r, v in res.items()})


# ----------------------------------------------------------------------------------
# Attention sinks
# ----------------------------------------------------------------------------------
SINK_FACTOR = 5.0  # a key is a sink when its mean attention ratio exceeds 5x the uniform share


@dataclass(frozen=True)
class Sink:
    """One sink position with its share (mean over the layers, heads and rows used)."""

    position: int
    token: Optional[str]
    share: float


@dataclass
class SinkShares:
    """Share of attention on the attention sinks per LLM layer (and head); see the module doc.

    ``shares`` is ``[n_layers, n_heads]`` (``per_head``) or ``[n_layers]``: mean over ``rows``
    of the mass on all ``sinks``; ``per_sink`` adds a leading ``[n_sinks]`` axis. Iterating
    gives one :class:`Sink` per sink position.
    """

    layers: List[int]
    heads: Optional[list]
    sinks: List[int]
    shares: np.ndarray
    per_sink: np.ndarray
    rows: List[int]
    tokens: List[Optional[str]]
    factor: Optional[float]  # the rule's factor; None when ``sinks`` were given

    def __iter__(self):
        for i, p in enumerate(self.sinks):
            yield Sink(p, self.tokens[i], float(np.nanmean(self.per_sink[i])))

    def __len__(self) -> int:
        return len(self.sinks)


def _layer_rows(record: AttentionRecord, layer: int, rows) -> Tuple[str, List[int]]:
    name = hook_name("llm", layer)
    t = record.tensors[name]
    captured = _positions(_idx(record, name), "rows", t.shape[-2])
    sel = resolve_rows(record, rows, captured)
    if not sel:
        raise ValueError(f"{name}: no query rows to use (captured rows: {_span(captured)})")
    return name, sel


def find_sinks(record: AttentionRecord, rows=None, layers: LayerSel = None, factor: float = SINK_FACTOR,
               chunk: int = 256) -> List[int]:
    """Sink positions by the module doc's rule: the first non-padding token, plus every captured
    key whose mean attention ratio (``A[r, k] * n_visible(r)``, over the rows that see ``k``,
    heads mean, layers mean) exceeds ``factor``."""
    pad = int(record.layout.padding) if record.layout is not None else 0
    layers = _stage_layers(record, "llm", layers)
    L = _seq_len(record)
    ratio, count, covered = np.zeros(L), np.zeros(L), np.ones(L, dtype=bool)
    for l in layers:
        _, sel = _layer_rows(record, l, rows)
        for c in range(0, len(sel), chunk):
            part = np.asarray(sel[c: c + chunk])
            w, cov, _ = llm_attention_rows(record, l, part.tolist(), None, "mean")  # [n, L]
            covered &= cov
            sees = np.arange(L)[None, :] <= part[:, None]
            ratio += (w * np.maximum(part + 1 - pad, 1)[:, None] * sees).sum(0)
            count += sees.sum(0)
    mean = np.divide(ratio, count, out=np.zeros(L), where=count > 0)
    extra = [int(k) for k in np.nonzero((mean > factor) & covered & (np.arange(L) >= pad))[0] if k != pad]
    return [pad] + extra


def sink_shares(record: AttentionRecord, rows=None, layers: LayerSel = None, sinks: Optional[Sequence[int]] = None,
                per_head: bool = True, factor: float = SINK_FACTOR, chunk: int = 256) -> SinkShares:
    """Share of attention on the attention sinks per LLM layer (and per head).

    ``sinks``: positions to use (default :func:`find_sinks` with ``rows``, ``layers`` and
    ``factor``); ``rows``: query rows (:func:`resolve_rows`; default every captured row past
    the padding). A sink whose key column was not captured is refused.
    """
    layers = _stage_layers(record, "llm", layers)
    rule = sinks is None
    sinks = find_sinks(record, rows, layers, factor, chunk) if rule else resolve_rows(record, sinks)
    L = _seq_len(record)
    bad = [p for p in sinks if not 0 <= p < L]
    if bad:
        raise ValueError(f"sinks {bad} are outside the {L} positions")
    per_layer, labels, used = [], None, None
    for l in layers:
        name, sel = _layer_rows(record, l, rows)
        acc = 0.0
        for c in range(0, len(sel), chunk):
            w, cov, lab = llm_attention_rows(record, l, sel[c: c + chunk], None, None if per_head else "mean")
            lost = [p for p in sinks if not cov[p]]
            if lost:
                raise ValueError(f"{name} lacks the key columns of sink position(s) {lost}; capture cols 'all'")
            if per_head:
                if labels is not None and list(lab) != list(labels):
                    raise ValueError(f"per-head sink shares need the same heads in every layer; {name} has {lab}, "
                                     f"earlier {labels}")
                labels = lab
            acc = acc + w[..., sinks].sum(-2)  # [(H,) n_sinks]
        per_layer.append(np.moveaxis(np.asarray(acc) / len(sel), -1, 0))  # [n_sinks, (H)]
        used = sel
    per_sink = np.stack(per_layer, 1)  # [n_sinks, n_layers, (H)]
    toks = [record.layout.tokens[p] if record.layout is not None and p < len(record.layout.tokens) else None
            for p in sinks]
    return SinkShares(layers=list(layers), heads=labels if per_head else None, sinks=list(sinks),
                      shares=per_sink.sum(0), per_sink=per_sink, rows=used, tokens=toks,
                      factor=factor if rule else None)


def _drop_sinks(record, wts, covered, pos, layers, sinks, head_reduce, layer_reduce):
    """``wts [*lead, L]`` with the sink columns zeroed and the rest rescaled to the row's total."""
    sinks = find_sinks(record, None, layers) if sinks is None else resolve_rows(record, sinks)
    lost = [p for p in sinks if not covered[p]]
    if lost:
        raise ValueError(f"exclude_sinks: the record lacks the key columns of sink position(s) {lost}")
    pad = int(record.layout.padding) if record.layout is not None else 0
    if covered[pad: pos + 1].all():
        total = wts.sum(-1, keepdims=True)
    elif head_reduce == "max":
        raise ValueError("exclude_sinks with head_reduce='max' needs every key column of the row (its total is "
                         "not 1); capture cols 'all'")
    else:
        total = np.ones(wts.shape[:-1] + (1,))  # softmax rows (and their means) sum to 1
    sink_mass = wts[..., sinks].sum(-1, keepdims=True)
    out = wts.copy()
    out[..., sinks] = 0.0
    rest = total - sink_mass
    out = np.where(rest > 1e-12, out * total / np.where(rest > 1e-12, rest, 1.0), 0.0)
    share = np.divide(sink_mass, total, out=np.zeros_like(total), where=total > 0)[..., 0]
    return out, {"sinks": list(sinks), "sink_share": _squeeze(share)}


# ----------------------------------------------------------------------------------
# A record at a glance
# ----------------------------------------------------------------------------------
def _json_num(x):
    x = np.asarray(x, dtype=float)
    return [None if not np.isfinite(v) else round(float(v), 4) for v in x.ravel()] if x.ndim else (
        None if not np.isfinite(x) else round(float(x), 4))


def record_summary(record: AttentionRecord, rows=None) -> Dict[str, object]:
    """A JSON-ready dict: tokens (prompt / generated / fed / padding / roles), images and slices,
    what was captured, and per LLM layer (heads mean, over ``rows``, default every captured
    row) the role shares and the sink shares. Parts that cannot be computed from the record
    say why (``"unavailable": reason``) instead of failing the whole summary."""
    lay = record.layout
    out: Dict[str, object] = {}
    if lay is not None:
        L = len(lay.tokens)
        out["tokens"] = {"total": L, "prompt": prompt_length(record), "generated": L - prompt_length(record),
                         "fed": fed_length(record), "padding": int(lay.padding),
                         "roles": {r: int(sum(1 for x in lay.roles if x == r)) for r in ROLES}}
        out["images"] = [{"index": im.index, "size": list(im.size), "grid": list(im.grid) if im.grid else None,
                          "slices": len(im.slices)} for im in lay.images]
    cap: Dict[str, object] = {}
    for stage in ("llm", "vision", "resampler"):
        names = record.names(stage)
        if not names:
            continue
        info = _idx(record, names[0])
        t = record.tensors[names[0]]
        entry = {"layers": record.layers(stage), "reduce": info.get("reduce") or "none",
                 "heads": info.get("heads") if info.get("heads") is not None else t.shape[-3]}
        if stage == "llm":
            entry["rows"] = _span(_positions(info, "rows", t.shape[-2]))
            entry["cols"] = _span(_positions(info, "cols", t.shape[-1]))
        cap[stage] = entry
    out["captured"] = cap
    if "llm" in cap and lay is not None:
        try:
            rs = role_shares(record, rows=rows)
            out["role_shares"] = {"layers": rs.layers, "rows": _span(rs.rows),
                                  **{r: _json_num(rs[r]) for r in ROLES}}
        except ValueError as e:
            out["role_shares"] = {"unavailable": str(e)}
        try:
            ss = sink_shares(record, rows=rows, per_head=False)
            out["sinks"] = {"positions": ss.sinks, "tokens": ss.tokens, "factor": ss.factor, "layers": ss.layers,
                            "rows": _span(ss.rows), "share": _json_num(ss.shares)}
        except ValueError as e:
            out["sinks"] = {"unavailable": str(e)}
    return out


def format_record_summary(summary: Dict[str, object]) -> str:
    """:func:`record_summary`'s dict as a few lines of text."""
    lines = []
    t = summary.get("tokens")
    if t:
        lines.append(f"tokens: {t['total']} ({t['prompt']} prompt incl. {t['padding']} padding, {t['generated']} "
                     f"generated, {t['fed']} fed); roles " + ", ".join(f"{k} {v}" for k, v in t["roles"].items()))
    for im in summary.get("images", []):
        lines.append(f"image {im['index']}: {im['size'][0]} x {im['size'][1]} px, grid {im['grid']}, "
                     f"{im['slices']} slices")
    for stage, c in summary.get("captured", {}).items():
        extra = f", rows {c['rows']}, cols {c['cols']}" if stage == "llm" else ""
        lines.append(f"captured {stage}: layers {c['layers']}, heads {c['heads']} ({c['reduce']}){extra}")

    def per_layer(values):
        return " ".join("n/a" if v is None else f"{v:.2f}" for v in values)

    rs = summary.get("role_shares")
    if rs:
        if "unavailable" in rs:
            lines.append(f"role shares: unavailable ({rs['unavailable']})")
        else:
            lines.append(f"role shares per layer {rs['layers']} (rows {rs['rows']}, heads mean):")
            lines += [f"  {r:8s} {per_layer(rs[r])}" for r in ROLES]
    sk = summary.get("sinks")
    if sk:
        if "unavailable" in sk:
            lines.append(f"sinks: unavailable ({sk['unavailable']})")
        else:
            named = ", ".join(f"{p} {tok!r}" for p, tok in zip(sk["positions"], sk["tokens"]))
            lines.append(f"sinks: {named}; share per layer {per_layer(sk['share'])} (rows {sk['rows']})")
    return "\n".join(lines)
