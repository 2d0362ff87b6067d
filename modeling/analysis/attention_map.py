"""Map captured attention back onto tokens, slices, patches and the original image.

Everything here reads an :class:`~.attention_record.AttentionRecord` (one sample)
and returns numpy arrays; nothing is plotted (see ``plotting.py``).

Paths through the model
-----------------------
* LLM position -> image token: slice ``s`` of ``layout.slices`` owns the positions
  ``token_span = [start, end)``; position ``start + j`` carries resampler query ``j``.
* resampler query -> patches: ``resampler.attn[s, :, j, :h*w]`` (head-mean), the
  patches of slice ``s`` row-major over its ``h x w`` patch grid (``tgt_size``).
* patch -> original image: slice ``s`` covers ``box = (x0, y0, x1, y1)`` of the
  original image; patch ``(r, c)`` covers the ``(r, c)`` cell of that box cut into
  ``h x w`` equal cells.

Image heatmaps (``image_heatmap``)
---------------------------------
For one LLM query row the heatmap is the attention *mass* that reaches each pixel
of the original image::

    map[y, x] = sum over image tokens t of image i:
                    A_llm[row, t] * A_res[slice(t), query(t), patch covering (x, y)]
                    * (share of that patch's area inside the pixel)

Every patch's mass is spread evenly over its cell of the slice's box, so a pixel
holds the attention that landed on it, in the same units whichever slice it came
through. The source (overview) slice and the grid slices cover the same pixels;
their maps are therefore simply **added** (``include_source`` /
``include_slices`` pick the parts; ``source_map`` and ``slices_map`` come back
separately too). ``map.sum()`` equals the row's attention to that image's tokens
(resampler rows sum to 1 over real patches). ``interpolation="bilinear"`` smooths
each slice's map inside its box (mass kept per slice) for display.

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
----------------------------------------
``A~ = 0.5 A + 0.5 I`` with rows renormalised, multiplied from the first selected
layer up: ``R = A~_last @ ... @ A~_first``, over the square of *fed* positions
``0 .. n_fed - 1`` (:func:`fed_length`: the whole sequence of a forward record,
prompt + generated - 1 for a generate / chat record). Each layer used needs every
fed query row and key column; the never-fed last column of a chat record is
checked to hold no attention and dropped. Head reduction happens per layer first.

Attention sinks (:func:`find_sinks`, :func:`sink_shares`)
--------------------------------------------------------
A sink is the first non-padding token, plus every key position whose mean
*attention ratio* exceeds ``SINK_FACTOR`` (5): the ratio of a key ``k`` in a row
``r`` is ``A[r, k] * n_visible(r)`` (1 = the uniform share over the row's
``n_visible = r + 1 - padding`` keys), averaged over the captured rows that see
``k``, the heads and the layers used. ``sinks=[...]`` overrides the rule.

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..attention_record import AttentionRecord, SliceLayout, TokenLayout
from ..capture import ROLES, hook_name
from .describe import describe_heatmap

__all__ = [
    "ImageToken", "ImageHeatmap", "RoleShares",
    "image_token_table", "lookup_image_token", "find_slice", "patch_box", "patch_boxes",
    "place_patch_map", "llm_attention_rows", "rollout", "llm_rollout",
    "resampler_query_maps", "query_patch_map", "image_heatmap", "row_role_shares",
    "role_shares", "vision_attention", "vision_rollout", "vision_patch_map",
    "vision_received_map", "compose_vision_rollout", "prompt_length", "fed_length", "resolve_rows", "SinkShares", "Sink",
    "SINK_FACTOR", "find_sinks", "sink_shares", "record_summary", "format_record_summary",
]

HeadSel = Optional[Union[int, Sequence[int]]]
LayerSel = Optional[Union[int, Sequence[int]]]


# ----------------------------------------------------------------------------------
# Layout lookups: LLM position -> (image, slice, query); patch -> box
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageToken:
    """What an image-token position of the LLM sequence stands for."""

    position: int  # LLM position
    image: int  # image index within the sample
    slice: int  # index into layout.slices (= the S axis of vision/resampler tensors)
    slice_index: int  # SliceLayout.index within its image (0 = source)
    query: int  # resampler query id


def _need_layout(record: AttentionRecord, what: str) -> TokenLayout:
    if record.layout is None:
        raise ValueError(f"{what} needs the record's token layout, but record.layout is None")
    return record.layout


def image_token_table(layout: TokenLayout) -> Dict[int, ImageToken]:
    """``{LLM position: ImageToken}`` for every image token of the sample."""
    table: Dict[int, ImageToken] = {}
    for g, sl in enumerate(layout.slices):
        start, end = (int(v) for v in sl.token_span)
        for j, p in enumerate(range(start, end)):
            table[p] = ImageToken(position=p, image=sl.image, slice=g, slice_index=sl.index, query=j)
    return table


def lookup_image_token(layout: TokenLayout, position: int) -> Optional[ImageToken]:
    """The image/slice/query an LLM position carries, or ``None`` if it is no image token."""
    for g, sl in enumerate(layout.slices):
        start, end = (int(v) for v in sl.token_span)
        if start <= position < end:
            return ImageToken(position, sl.image, g, sl.index, position - start)
    return None


def find_slice(layout: TokenLayout, image: int = 0, slice: int = 0) -> int:
    """Index into ``layout.slices`` of slice ``slice`` (0 = source) of image ``image``."""
    for g, sl in enumerate(layout.slices):
        if sl.image == image and sl.index == slice:
            return g
    have = sorted({(s.image, s.index) for s in layout.slices})
    raise ValueError(f"layout has no slice {slice} of image {image}; (image, slice) pairs: {have}")


def _patch_rc(sl: SliceLayout, patch: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    h, w = (int(v) for v in sl.tgt_size)
    if isinstance(patch, (tuple, list)):
        r, c = (int(v) for v in patch)
    else:
        r, c = divmod(int(patch), w)
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"patch {patch!r} is outside the slice's {h} x {w} patch grid")
    return r, c


def patch_box(sl: SliceLayout, patch: Union[int, Tuple[int, int]]) -> Tuple[float, float, float, float]:
    """Box ``(x0, y0, x1, y1)`` in original-image pixels of one patch (row-major id or (row, col))."""
    r, c = _patch_rc(sl, patch)
    h, w = (int(v) for v in sl.tgt_size)
    x0, y0, x1, y1 = (float(v) for v in sl.box)
    pw, ph = (x1 - x0) / w, (y1 - y0) / h
    return (x0 + c * pw, y0 + r * ph, x0 + (c + 1) * pw, y0 + (r + 1) * ph)


def patch_boxes(sl: SliceLayout) -> np.ndarray:
    """``[h, w, 4]`` boxes (x0, y0, x1, y1) of all patches of a slice."""
    h, w = (int(v) for v in sl.tgt_size)
    return np.array([[patch_box(sl, (r, c)) for c in range(w)] for r in range(h)], dtype=np.float64)


# ----------------------------------------------------------------------------------
# Placing a slice's patch map into the original image
# ----------------------------------------------------------------------------------
def _axis_weights(n_out: int, px: float, lo: float, hi: float, n: int, interpolation: str) -> np.ndarray:
    """[n_out, n]: share of patch cell k's mass that lands in output pixel i along one axis."""
    step = (hi - lo) / n
    cells = lo + np.arange(n + 1) * step
    edges = np.arange(n_out + 1) * px
    if interpolation == "nearest":
        a0 = np.maximum(edges[:-1, None], cells[None, :-1])
        a1 = np.minimum(edges[1:, None], cells[None, 1:])
        return np.clip(a1 - a0, 0.0, None) / step
    if interpolation == "bilinear":
        centres = (np.arange(n_out) + 0.5) * px
        inside = (centres >= lo) & (centres < hi)
        u = np.clip((centres - lo) / step - 0.5, 0.0, n - 1)
        i0 = np.floor(u).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        f = u - i0
        wts = np.zeros((n_out, n))
        rows = np.arange(n_out)
        np.add.at(wts, (rows, i0), 1.0 - f)
        np.add.at(wts, (rows, i1), f)
        wts[~inside] = 0.0
        return wts * (px / step)  # density (per patch length) * pixel length = mass share
    raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")


def place_patch_map(
    patch_map,
    box: Sequence[float],
    image_size: Tuple[int, int],
    out_size: Optional[Tuple[int, int]] = None,
    interpolation: str = "nearest",
) -> np.ndarray:
    """Spread a slice's patch masses ``[..., h, w]`` over its ``box`` of the original image.

    ``image_size`` and ``out_size`` are ``(width, height)``; the result is
    ``[..., H_out, W_out]`` holding the mass per output pixel. ``"nearest"`` spreads
    each patch evenly over its cell (exact, partial pixels get their share);
    ``"bilinear"`` interpolates the density smoothly inside the box and rescales so
    the slice's total mass is kept.
    """
    m = np.asarray(patch_map, dtype=np.float64)
    if m.ndim < 2:
        raise ValueError(f"patch map must be [..., h, w], got shape {m.shape}")
    W, H = (int(v) for v in image_size)
    Wo, Ho = (W, H) if out_size is None else (int(out_size[0]), int(out_size[1]))
    if min(W, H, Wo, Ho) <= 0:
        raise ValueError(f"image and output sizes must be positive, got {image_size} and {out_size}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"empty box {tuple(box)}")
    h, w = m.shape[-2:]
    wy = _axis_weights(Ho, H / Ho, y0, y1, h, interpolation)
    wx = _axis_weights(Wo, W / Wo, x0, x1, w, interpolation)
    out = np.einsum("yh,...hw,xw->...yx", wy, m, wx, optimize=True)
    if interpolation == "bilinear":
        tot = out.sum(axis=(-2, -1), keepdims=True)
        want = m.sum(axis=(-2, -1), keepdims=True)
        out = np.where(tot > 0, out * (want / np.where(tot > 0, tot, 1.0)), out)
    return out


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


# ----------------------------------------------------------------------------------
# Resampler
# ----------------------------------------------------------------------------------
def _slice_axis(record: AttentionRecord, name: str, t: torch.Tensor, layout: TokenLayout) -> List[int]:
    """Which ``layout.slices`` entry each index of the tensor's S axis is."""
    idx = _idx(record, name)
    if idx.get("slices") is not None:
        return [int(s) for s in idx["slices"]]
    if t.shape[0] != len(layout.slices):
        raise ValueError(
            f"{name} holds {t.shape[0]} slices but the layout lists {len(layout.slices)}"
        )
    return list(range(t.shape[0]))


def _resampler(record: AttentionRecord, heads: HeadSel, head_reduce: Optional[str]):
    name = hook_name("resampler")
    t = _tensor(record, name, "capture stage 'resampler'")
    if t.ndim != 4:
        raise ValueError(f"{name} must be [slices, heads, queries, patches], got shape {tuple(t.shape)}")
    t, labels = _select_heads(t, _idx(record, name), name, heads, 1)
    return _reduce_heads(t, head_reduce, 1), labels, name


def _slice_pos(axis: List[int], g: int, name: str) -> int:
    if g not in axis:
        raise ValueError(f"{name} does not hold slice {g} of the layout (holds {axis})")
    return axis.index(g)


def resampler_query_maps(
    record: AttentionRecord,
    image: int = 0,
    slice: int = 0,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
) -> np.ndarray:
    """``[Q, h, w]`` resampler attention of every query over one slice's patch grid
    (``[n_heads, Q, h, w]`` with ``head_reduce=None``)."""
    layout = _need_layout(record, "resampler maps")
    t, _, name = _resampler(record, heads, head_reduce)
    g = find_slice(layout, image, slice)
    s = _slice_pos(_slice_axis(record, name, t, layout), g, name)
    h, w = (int(v) for v in layout.slices[g].tgt_size)
    a = t[s]
    if a.shape[-1] < h * w:
        raise ValueError(f"{name} has {a.shape[-1]} patch columns, slice needs {h}x{w}")
    return a[..., : h * w].reshape(*a.shape[:-1], h, w).numpy()


def query_patch_map(record: AttentionRecord, query: int, image: int = 0, slice: int = 0,
                    heads: HeadSel = None, head_reduce: Optional[str] = "mean") -> np.ndarray:
    """``[h, w]`` patches one resampler query (= one image token) attends to."""
    m = resampler_query_maps(record, image, slice, heads, head_reduce)
    if not 0 <= query < m.shape[-3]:
        raise ValueError(f"query {query} out of range (resampler has {m.shape[-3]} queries)")
    return m[..., query, :, :]


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


# ----------------------------------------------------------------------------------
# Image heatmap of one LLM query row
# ----------------------------------------------------------------------------------
def _squeeze(x):
    x = np.asarray(x, dtype=np.float64)
    return float(x) if x.ndim == 0 else x


@dataclass
class ImageHeatmap:
    """Where one LLM query row's attention lands on an original image (see module doc).

    Maps are ``[..., H, W]`` attention mass per output pixel, with leading axes
    ``[n_layers]`` if ``layer_reduce`` is None, then ``[n_heads]`` if ``head_reduce``
    is None.
    """

    map: np.ndarray  # included parts added
    source_map: Optional[np.ndarray]  # through the source (overview) slice; None if excluded
    slices_map: Optional[np.ndarray]  # through the grid slices; None if excluded or unsliced
    shares: Dict[str, Union[float, np.ndarray]]  # role -> share of the row's attention (NaN = not captured)
    image_share: Union[float, np.ndarray]  # share of the row's attention on this image's tokens
    position: int
    token: Optional[str]
    image: int
    image_size: Tuple[int, int]  # original (width, height)
    layers: List[int]
    heads: list
    layer_reduce: Optional[str]
    head_reduce: Optional[str]
    extra: Dict[str, object] = field(default_factory=dict)

    def __repr__(self) -> str:  # shapes and the numbers worth reading, never the arrays (describe.py)
        return describe_heatmap(self)


def place_token_weights(layout: TokenLayout, res: np.ndarray, axis: List[int], wts: np.ndarray, image: int = 0,
                        out_size: Optional[Tuple[int, int]] = None, include_source: bool = True,
                        include_slices: bool = True, interpolation: str = "nearest", name: str = "resampler.attn"):
    """Put per-position weights ``wts [*lead, L]`` of image ``image``'s tokens onto its pixels.

    ``res`` ``[S, Q, P]``: the query -> patch maps (rows sum to 1 over real patches) whose S
    axis holds ``layout.slices[axis[i]]``. Returns ``(source_map, slices_map, image_share,
    (W, H))``: the maps ``[*lead, H_out, W_out]`` (None where excluded or unsliced) and the
    weights' sum over the image's tokens. Used by :func:`image_heatmap` and relevancy maps.
    """
    images = {im.index: im for im in layout.images}
    if image not in images:
        raise ValueError(f"layout has no image {image}; images: {sorted(images)}")
    im = images[image]
    W, H = (int(v) for v in im.size)
    Wo, Ho = (W, H) if out_size is None else (int(out_size[0]), int(out_size[1]))
    lead = wts.shape[:-1]
    src = np.zeros(lead + (Ho, Wo)) if include_source else None
    grid = np.zeros(lead + (Ho, Wo)) if include_slices and any(s.kind != "source" for s in im.slices) else None
    img_share = np.zeros(lead)
    for g, sl in enumerate(layout.slices):
        if sl.image != image:
            continue
        start, end = (int(v) for v in sl.token_span)
        if end > wts.shape[-1]:
            raise ValueError(f"image {image} slice {sl.index} has tokens {start}..{end - 1} but the weights cover "
                             f"{wts.shape[-1]} positions")
        w_tok = wts[..., start:end]  # [*lead, Q]
        img_share = img_share + w_tok.sum(-1)
        target = src if sl.kind == "source" else grid
        if target is None:
            continue
        s = _slice_pos(axis, g, name)
        h, w = (int(v) for v in sl.tgt_size)
        if res.shape[1] < end - start or res.shape[2] < h * w:
            raise ValueError(f"{name} is [{', '.join(map(str, res.shape))}]; slice {g} needs {end - start} queries "
                             f"x {h * w} patches")
        a = np.asarray(res[s, : end - start, : h * w], dtype=np.float64)  # [Q, h*w]
        m = (w_tok @ a).reshape(lead + (h, w))
        target += place_patch_map(m, sl.box, (W, H), (Wo, Ho), interpolation)
    return src, grid, img_share, (W, H)


def image_heatmap(
    record: AttentionRecord,
    row_position: int,
    *,
    layers: LayerSel = None,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
    layer_reduce: Optional[str] = "mean",
    image: int = 0,
    out_size: Optional[Tuple[int, int]] = None,
    include_source: bool = True,
    include_slices: bool = True,
    resampler_heads: HeadSel = None,
    interpolation: str = "nearest",
    exclude_sinks: bool = False,
    sinks: Optional[Sequence[int]] = None,
    through_vision: bool = False,
) -> ImageHeatmap:
    """Heatmap over original image ``image`` of LLM query row ``row_position``.

    ``through_vision``: also compose each slice's query -> patch map with the SigLIP rollout
    of that slice (:func:`vision_rollout`, all captured vision layers, head mean, residual
    0.5), so the map runs tokens -> resampler -> SigLIP -> pixels. Without it the map stops
    at the patches the resampler read; a trained tower can relay an object's content into
    other patches (background "register" patches, Darcet et al. 2023), which the resampler
    then reads instead of the object: the plain map points at the relay, this one follows
    it back. Needs capture stage ``"vision"`` for every slice of the image (whole patch
    square, any heads).

    ``row_position``: one row (:func:`resolve_rows`: absolute, negative from the end of the
    prompt, or ``"last"``).
    ``exclude_sinks``: zero the attention-sink columns (:func:`find_sinks` over the same
    layers, or ``sinks``) of the row and rescale the rest so the row keeps its total: the
    map, ``image_share`` and ``shares`` become shares of the *non-sink* attention (every
    image token's mass is multiplied by ``1 / (1 - sink share)``; an image-token sink drops
    out of the map). With ``layer_reduce="rollout"`` this acts on the rolled-out row, not
    inside each layer. ``extra`` gets ``sinks`` and ``sink_share`` (of the row's total).

    ``layers``: LLM layers (default all captured); ``layer_reduce``: ``"mean"`` of
    the layers' rows, ``"rollout"`` (row of the rollout over the layers; needs every fed
    row and column, see :func:`llm_rollout`) or None (one map per layer). ``heads`` / ``head_reduce`` select and
    reduce LLM heads; the resampler is head-averaged (over ``resampler_heads``).
    ``out_size`` = (width, height), default the original image size.
    """
    layout = _need_layout(record, "image_heatmap")
    images = {im.index: im for im in layout.images}
    if image not in images:
        raise ValueError(f"layout has no image {image}; images: {sorted(images)}")
    im = images[image]
    if not include_source and not include_slices:
        raise ValueError("include_source and include_slices are both False: nothing to draw")
    L = _seq_len(record)
    sel = resolve_rows(record, row_position)
    if len(sel) != 1:
        raise ValueError(f"image_heatmap draws one query row; {row_position!r} selects {len(sel)} rows")
    pos = sel[0]
    layers = _stage_layers(record, "llm", layers)

    # LLM weights of the row over all key positions: [*lead, L]
    if layer_reduce == "rollout":
        R = llm_rollout(record, layers, heads, head_reduce)
        if pos >= R.shape[0]:
            raise ValueError(f"rollout covers the fed positions 0..{R.shape[0] - 1}; position {pos} was never fed")
        wts, covered, labels = np.zeros(L), np.ones(L, dtype=bool), (
            [head_reduce] if heads is None else _as_list(heads))
        wts[: R.shape[1]] = R[pos]
        layers = sorted(layers)
    elif layer_reduce in ("mean", None):
        per, covered, labels = [], np.ones(L, dtype=bool), None
        for l in layers:
            w_l, cov, lab = llm_attention_rows(record, l, [pos], heads, head_reduce)
            if labels is not None and head_reduce is None and list(lab) != list(labels):
                raise ValueError(f"head_reduce=None needs the same heads in every layer; "
                                 f"{hook_name('llm', l)} has {lab}, earlier layers {labels}")
            labels = lab if head_reduce is None else ([head_reduce] if heads is None else _as_list(heads))
            per.append(w_l[..., 0, :])
            covered &= cov
        stack = np.stack(per)
        wts = stack.mean(0) if layer_reduce == "mean" else stack
    else:
        raise ValueError(f"layer_reduce must be 'mean', 'rollout' or None, got {layer_reduce!r}")

    extra: Dict[str, object] = {}
    if exclude_sinks:
        wts, extra = _drop_sinks(record, wts, covered, pos, layers, sinks, head_reduce, layer_reduce)
    shares = {r: _squeeze(v[..., 0])
              for r, v in row_role_shares(wts[..., None, :], covered, layout, [pos]).items()}

    for sl in im.slices:
        toks = np.arange(*(int(v) for v in sl.token_span))
        miss = toks[(toks <= pos) & ~covered[np.clip(toks, 0, L - 1)]]
        if miss.size:
            raise ValueError(
                f"the record lacks the key columns of image {image}'s tokens (positions {_span(miss.tolist())}); "
                f"capture cols including image tokens"
            )
    res, _, rname = _resampler(record, resampler_heads, "mean")  # [S, Q, P]
    axis = _slice_axis(record, rname, res, layout)
    res = res.numpy()
    if through_vision:
        res = compose_vision_rollout(record, res, axis, image)
    src, grid, img_share, (W, H) = place_token_weights(layout, res, axis, wts, image, out_size,
                                                       include_source, include_slices, interpolation, rname)
    total = sum(x for x in (src, grid) if x is not None)
    tok = layout.tokens[pos] if pos < len(layout.tokens) else None
    return ImageHeatmap(
        map=np.asarray(total, dtype=np.float32),
        source_map=None if src is None else src.astype(np.float32),
        slices_map=None if grid is None else grid.astype(np.float32),
        shares=shares, image_share=_squeeze(img_share), position=pos, token=tok, image=image,
        image_size=(W, H), layers=list(layers), heads=list(labels),
        layer_reduce=layer_reduce, head_reduce=head_reduce, extra=dict(extra, through_vision=bool(through_vision)),
    )


def compose_vision_rollout(record: AttentionRecord, res: np.ndarray, axis: List[int], image: int = 0,
                           residual: float = 0.5) -> np.ndarray:
    """``res [S, Q, P]`` query -> patch maps (S axis = ``layout.slices[axis[i]]``) with every slice of
    image ``image`` replaced by ``res[s, :, :n] @ vision_rollout(slice)``: where the patches the
    resampler read drew their content from. Other images' slices are left as they are. The
    rollout runs over the captured vision layers, which must be ``0..k-1`` (capture them all
    for the tower's whole rollout: a record does not know the tower's depth)."""
    layout = _need_layout(record, "through_vision")
    have = record.layers("vision")
    if have and have != list(range(len(have))):
        raise ValueError(f"through_vision rolls out the SigLIP layers from the first one up; the record holds vision "
                         f"layers {have} (missing {sorted(set(range(max(have) + 1)) - set(have))})")
    out = np.array(res, dtype=np.float64, copy=True)
    for g, sl in enumerate(layout.slices):
        if sl.image != image:
            continue
        try:
            R = vision_rollout(record, sl.image, sl.index, residual=residual)
        except (KeyError, ValueError) as e:
            raise ValueError(f"through_vision needs the SigLIP attention of every slice of image {image} "
                             f"(capture stage 'vision'); slice {sl.index}: {e}") from None
        h, w = (int(v) for v in sl.tgt_size)
        n = h * w
        if R.shape != (n, n):
            raise ValueError(f"slice {sl.index} of image {image} has {h}x{w} patches but its SigLIP rollout is "
                             f"{R.shape[0]}x{R.shape[1]}")
        s = _slice_pos(axis, g, "resampler.attn")
        out[s, :, :n] = out[s, :, :n] @ R
    return out


# ----------------------------------------------------------------------------------
# Vision tower (SigLIP) maps
# ----------------------------------------------------------------------------------
def vision_attention(
    record: AttentionRecord,
    layer: int,
    image: int = 0,
    slice: int = 0,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
) -> np.ndarray:
    """``[n, n]`` SigLIP attention among one slice's n = h*w real patches (query rows,
    key cols; ``[n_heads, n, n]`` with ``head_reduce=None``)."""
    layout = _need_layout(record, "vision maps")
    name = hook_name("vision", layer)
    if name not in record.tensors:
        _stage_layers(record, "vision", [int(layer)])  # names what is missing
    t = _tensor(record, name, "capture stage 'vision'", convert=False)
    if t.ndim != 4:
        raise ValueError(f"{name} must be [slices, heads, patches, patches], got shape {tuple(t.shape)}")
    g = find_slice(layout, image, slice)
    s = _slice_pos(_slice_axis(record, name, t, layout), g, name)
    h, w = (int(v) for v in layout.slices[g].tgt_size)
    n = h * w
    if t.shape[-1] < n:
        raise ValueError(f"{name} has {t.shape[-1]} patches per slice, slice needs {h}x{w}")
    a, _ = _select_heads(_f64(t[s]), _idx(record, name), name, heads, 0)
    return _reduce_heads(a[:, :n, :n], head_reduce, 0).numpy()


def vision_rollout(
    record: AttentionRecord,
    image: int = 0,
    slice: int = 0,
    layers: LayerSel = None,
    heads: HeadSel = None,
    head_reduce: str = "mean",
    residual: float = 0.5,
) -> np.ndarray:
    """``[n, n]`` rollout over the selected (default all captured) vision layers of one slice."""
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"rollout needs one map per layer: head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    layers = sorted(_stage_layers(record, "vision", layers))
    return rollout([vision_attention(record, l, image, slice, heads, head_reduce) for l in layers], residual)


def _vision_map(record, layer, image, slice, heads, head_reduce) -> np.ndarray:
    if layer == "rollout":
        return vision_rollout(record, image, slice, None, heads, head_reduce or "mean")
    return vision_attention(record, int(layer), image, slice, heads, head_reduce)


def vision_patch_map(
    record: AttentionRecord,
    patch: Union[int, Tuple[int, int]],
    layer: Union[int, str],
    image: int = 0,
    slice: int = 0,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
) -> np.ndarray:
    """``[h, w]`` attention of one query patch (row-major id or (row, col)) over its
    slice; ``layer="rollout"`` uses the rollout over all captured vision layers."""
    layout = _need_layout(record, "vision maps")
    sl = layout.slices[find_slice(layout, image, slice)]
    r, c = _patch_rc(sl, patch)
    h, w = (int(v) for v in sl.tgt_size)
    a = _vision_map(record, layer, image, slice, heads, head_reduce)
    return a[..., r * w + c, :].reshape(*a.shape[:-2], h, w)


def vision_received_map(
    record: AttentionRecord,
    layer: Union[int, str],
    image: int = 0,
    slice: int = 0,
    heads: HeadSel = None,
    head_reduce: Optional[str] = "mean",
) -> np.ndarray:
    """``[h, w]`` mean attention each patch receives (mean over the slice's real query patches)."""
    layout = _need_layout(record, "vision maps")
    h, w = (int(v) for v in layout.slices[find_slice(layout, image, slice)].tgt_size)
    a = _vision_map(record, layer, image, slice, heads, head_reduce)
    return a.mean(-2).reshape(*a.shape[:-2], h, w)


_TAM_NAMES = ("token_activation_map", "token_activation_maps", "token_activation", "rank_gaussian_filter", "TAM_KIND")


def __getattr__(name):  # the Token Activation Map lives in token_activation.py; re-exported lazily here
    if name in _TAM_NAMES:
        from . import token_activation
        return getattr(token_activation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
