"""Reading LLM attention by query row: the row convention, LLM rows and rollout.

Owns how ``rows`` are read everywhere (:func:`resolve_rows`), the helpers that read a captured
tensor's layers, heads, rows and columns, :func:`llm_attention_rows`, and attention rollout
(:func:`rollout`, :func:`llm_rollout`).

Rows: one convention everywhere (the capture spec's)
----------------------------------------------------
Every function that takes query ``rows`` / ``positions`` reads them like
``CaptureSpec.rows`` does (:func:`resolve_rows`): a position is an absolute
sequence position; ``"last"`` is the last *prompt* token (the row that predicts
the first answer token); negative positions count from the end of the prompt
(``-1`` = ``"last"``; ``layout.n_prompt``, which for a forward record is the whole
sequence); ``"generated"`` = the rows that produced each generated token
(``n_prompt - 1 .. L - 2``); ``"prompt"`` = the prompt rows after left padding;
None / ``"all"`` = every captured row after left padding. A generate / chat record
holds rows ``0 .. L - 2`` only: its last generated token is never fed.

Attention rollout (Abnar & Zuidema, 2020)
-----------------------------------------
``A~ = 0.5 A + 0.5 I`` with rows renormalised, multiplied from the first selected
layer up: ``R = A~_last @ ... @ A~_first``, over the square of *fed* positions
``0 .. n_fed - 1`` (:func:`fed_length`: the whole sequence of a forward record,
prompt + generated - 1 for a generate / chat record). Each layer used needs every
fed query row and key column; the never-fed last column of a chat record is
checked to hold no attention and dropped. Head reduction happens per layer first.

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..attention_record import AttentionRecord
from ..capture import hook_name


HeadSel = Optional[Union[int, Sequence[int]]]
LayerSel = Optional[Union[int, Sequence[int]]]


# ----------------------------------------------------------------------------------
# Reading tensors: layers, heads, rows, columns
# ----------------------------------------------------------------------------------
def _idx(record: AttentionRecord, name: str) -> dict:
    return record.index.get(name) or {}


def _positions(idx: dict, key: str, n: int) -> List[int]:
    v = idx.get(key)
    return list(range(n)) if v is None else [int(x) for x in v]


def _as_list(x) -> Optional[List[int]]:
    if x is None:
        return None
    if isinstance(x, (int, np.integer)):
        return [int(x)]
    return [int(v) for v in x]


def _stage_layers(record: AttentionRecord, stage: str, layers: LayerSel) -> List[int]:
    have = record.layers(stage)
    if not have:
        raise ValueError(
            f"record has no {stage} attention ({stage}.layers.*.attn); capture stage {stage!r}"
        )
    if layers is None:
        return have
    want = [have[l] if -len(have) <= l < 0 else l for l in _as_list(layers)]  # -1 = last captured
    missing = [l for l in want if l not in have]
    if missing:
        raise ValueError(
            f"record has no {', '.join(hook_name(stage, l) for l in missing)}; "
            f"captured {stage} layers: {have}"
        )
    return want


def _select_heads(t: torch.Tensor, idx: dict, name: str, heads: HeadSel, axis: int):
    """Pick heads along ``axis`` by their model head id; returns (tensor, head labels)."""
    reduce = idx.get("reduce") or "none"
    if reduce != "none":
        if heads is not None:
            raise ValueError(
                f"{name} was captured with heads reduced by {reduce!r}; cannot select heads "
                f"{_as_list(heads)}; capture with reduce='none' to study single heads"
            )
        return t, [reduce]
    kept = _positions(idx, "heads", t.shape[axis])
    if heads is None:
        return t, kept
    want = _as_list(heads)
    missing = [h for h in want if h not in kept]
    if missing:
        raise ValueError(f"{name} has no head(s) {missing}; captured heads: {kept}")
    sel = torch.tensor([kept.index(h) for h in want])
    return t.index_select(axis, sel), want


def _reduce_heads(t: torch.Tensor, how: Optional[str], axis: int) -> torch.Tensor:
    if how is None or how == "none":
        return t
    if how == "mean":
        return t.mean(axis)
    if how == "max":
        return t.amax(axis)
    raise ValueError(f"head_reduce must be 'mean', 'max' or None, got {how!r}")


def _tensor(record: AttentionRecord, name: str, hint: str, convert: bool = True) -> torch.Tensor:
    if name not in record.tensors:
        raise ValueError(f"record has no {name}; {hint}")
    t = record.tensors[name].detach()
    return _f64(t) if convert else t


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", torch.float64)


def _seq_len(record: AttentionRecord) -> int:
    n = len(record.layout.input_ids) if record.layout is not None else 0
    for name in record.names("llm"):
        t, idx = record.tensors[name], _idx(record, name)
        n = max(n, max(_positions(idx, "rows", t.shape[-2]), default=-1) + 1,
                max(_positions(idx, "cols", t.shape[-1]), default=-1) + 1)
    return n


def prompt_length(record: AttentionRecord) -> int:
    """Prompt positions (``layout.n_prompt``); the whole sequence for a forward record."""
    lay = record.layout
    return int(lay.n_prompt) if lay is not None and lay.n_prompt else _seq_len(record)


def fed_length(record: AttentionRecord) -> int:
    """Positions that were fed to the model (rows that can exist): the whole sequence of a
    forward record; prompt + generated - 1 for a generate / chat record (the last generated
    token is never fed), unless the record holds rows past that (a replayed full sequence)."""
    L, P = _seq_len(record), prompt_length(record)
    n = L - 1 if L > P else L
    for name in record.names("llm"):
        t = record.tensors[name]
        n = max(n, max(_positions(_idx(record, name), "rows", t.shape[-2]), default=-1) + 1)
    return n


def resolve_rows(record: AttentionRecord, rows=None, captured: Optional[Sequence[int]] = None) -> List[int]:
    """Absolute query positions of a row selection, with the capture spec's convention (module doc).

    ``rows``: None / ``"all"`` (``captured``, default every fed row, left padding dropped),
    ``"last"``, ``"generated"``, ``"prompt"``, a position or a list of positions (negative
    count from the end of the prompt).
    """
    L, P = _seq_len(record), prompt_length(record)
    pad = int(record.layout.padding) if record.layout is not None else 0
    if rows is None or (isinstance(rows, str) and rows == "all"):
        return [p for p in (range(fed_length(record)) if captured is None else captured) if p >= pad]
    if isinstance(rows, str):
        if rows == "last":
            return [P - 1]
        if rows == "generated":
            sel = list(range(P - 1, L - 1))
            if not sel:
                raise ValueError("rows='generated': the record has no generated tokens (its prompt is the whole "
                                 f"sequence of {L} positions)")
            return sel
        if rows == "prompt":
            return list(range(pad, P))
        raise ValueError(f"rows must be None, 'all', 'generated', 'prompt', 'last', a position or positions; "
                         f"got {rows!r}")
    out = []
    for p in _as_list(rows):
        q = p + P if p < 0 else p
        if not 0 <= q < L:
            raise ValueError(f"row {p} is outside the sequence: valid are {-P}..{L - 1} (negative rows count "
                             f"from the end of the {P}-token prompt)")
        out.append(q)
    return out


def _span(ps: List[int]) -> str:
    """Positions as runs: ``"0..49, 51, 60..63"`` (at most 6 runs shown)."""
    if not ps:
        return "none"
    runs, start = [], ps[0]
    for a, b in zip(ps, list(ps[1:]) + [None]):
        if b != a + 1:
            runs.append(f"{start}..{a}" if a != start else str(a))
            start = b
    return ", ".join(runs) if len(runs) <= 6 else ", ".join(runs[:4] + ["...", runs[-1]]) + f" ({len(ps)} in all)"


def llm_attention_rows(
    record: AttentionRecord,
    layer: int,
    positions,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
) -> Tuple[np.ndarray, np.ndarray, list]:
    """Query rows of one LLM layer spread over all key positions.

    ``positions``: a row selection read by :func:`resolve_rows` (absolute positions,
    negative from the end of the prompt, ``"last"``, ``"generated"``, ...).

    Returns ``(weights, covered, head_labels)``: ``weights`` is ``[n_pos, L]``
    (``[n_heads, n_pos, L]`` if ``head_reduce`` is None) with zeros at key positions
    the record did not capture; ``covered`` ``[L]`` marks captured key positions.
    """
    name = hook_name("llm", layer)
    t = _tensor(record, name, "capture stage 'llm' with this layer", convert=False)
    if t.ndim != 3:
        raise ValueError(f"{name} must be [heads, rows, cols], got shape {tuple(t.shape)}")
    idx = _idx(record, name)
    rows = _positions(idx, "rows", t.shape[1])
    cols = _positions(idx, "cols", t.shape[2])
    L = _seq_len(record)
    want = resolve_rows(record, positions, rows)
    row_set = set(rows)
    missing = [p for p in want if p not in row_set]
    if missing:
        never = [p for p in missing if p >= fed_length(record)]
        raise ValueError(
            f"{name} has no query row for position(s) {missing} (captured rows: {_span(rows)}); "
            + (f"position(s) {never} were never fed (the last generated token has no row)" if never else
               "capture rows that include them")
        )
    if len(cols) > t.shape[2]:
        raise ValueError(f"{name}: index lists {len(cols)} key columns but the tensor has {t.shape[2]}")
    where = {p: i for i, p in enumerate(rows)}
    # columns past len(cols) are batch padding (a sample with fewer selected keys)
    t = _f64(t[:, torch.tensor([where[p] for p in want], dtype=torch.long).to(t.device), : len(cols)])
    t, labels = _select_heads(t, idx, name, heads, 0)
    t = _reduce_heads(t, head_reduce, 0)
    full = torch.zeros(t.shape[:-1] + (L,), dtype=torch.float64)
    full[..., cols] = t
    covered = np.zeros(L, dtype=bool)
    covered[cols] = True
    return full.numpy(), covered, labels


# ----------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------
def rollout(mats: Sequence, residual: float = 0.5) -> np.ndarray:
    """Attention rollout of square maps given first layer first: ``prod (r I + (1-r) A)``,
    rows renormalised before multiplying (Abnar & Zuidema, 2020)."""
    if len(mats) == 0:
        raise ValueError("rollout needs at least one attention map")
    out = None
    for a in mats:
        a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"rollout needs square [n, n] maps, got shape {tuple(a.shape)}")
        a = (1.0 - residual) * a + residual * torch.eye(a.shape[0], dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
        out = a if out is None else a @ out
    return out.numpy()


def _fed_square(record: AttentionRecord, name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """``[H', n, n]`` of ``t`` over the fed positions ``0 .. n-1``, or a ValueError naming the
    missing rows / columns; columns past ``n`` (never fed) must hold no attention."""
    idx = _idx(record, name)
    rows = _positions(idx, "rows", t.shape[-2])
    cols = _positions(idx, "cols", t.shape[-1])
    need = set(range(n))
    miss_r, miss_c = sorted(need - set(rows)), sorted(need - set(cols))
    if miss_r or miss_c:
        what = "; ".join(x for x in (f"query rows {_span(miss_r)}" if miss_r else "",
                                     f"key columns {_span(miss_c)}" if miss_c else "") if x)
        raise ValueError(
            f"attention rollout needs every fed query row and key column (positions 0..{n - 1}), but {name} "
            f"lacks {what} (holds rows {_span(rows)}, cols {_span(cols)}); capture rows='all' and cols='all'"
        )
    r_at = {p: i for i, p in enumerate(rows)}
    c_at = {p: i for i, p in enumerate(cols)}
    t = t[:, [r_at[p] for p in range(n)]]
    extra = [c_at[p] for p in cols if p >= n]
    if extra:
        leak = float(t[:, :, extra].abs().max())
        if leak > 1e-6:
            raise ValueError(f"{name}: fed rows put {leak:.3g} attention on never-fed columns "
                             f"{_span([p for p in cols if p >= n])}; the record is not causal")
    return t[:, :, [c_at[p] for p in range(n)]]


def llm_rollout(
    record: AttentionRecord,
    layers: LayerSel = None,
    heads: HeadSel = None,
    head_reduce: str = "mean",
    residual: float = 0.5,
) -> np.ndarray:
    """Rollout ``[n_fed, n_fed]`` over the selected (default: all captured) LLM layers, in order,
    over the fed positions (:func:`fed_length`; a chat record's never-fed last token is left out).

    Skipping layers makes the rollout an approximation; with every layer captured
    from 0 it is the standard one.
    """
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"rollout needs one map per layer: head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    layers = sorted(_stage_layers(record, "llm", layers))
    n = fed_length(record)
    mats = []
    for l in layers:
        name = hook_name("llm", l)
        t = _fed_square(record, name, _tensor(record, name, "capture stage 'llm'"), n)
        t, _ = _select_heads(t, _idx(record, name), name, heads, 0)
        mats.append(_reduce_heads(t, head_reduce, 0))
    return rollout(mats, residual)


def _squeeze(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x
