"""Attention composed onto the original image: resampler maps, LLM heatmaps, SigLIP maps.

Owns the resampler's query -> patch maps, :func:`image_heatmap` (one LLM row's attention
placed on an original image, optionally through the SigLIP rollout) and the vision tower's
own patch maps (:func:`vision_attention`, :func:`vision_rollout`, ...).

Image heatmaps (``image_heatmap``)
----------------------------------
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

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..attention_record import AttentionRecord, TokenLayout
from ..capture import hook_name
from .describe import describe_heatmap
from .image_geometry import _need_layout, _patch_rc, find_slice, place_patch_map
from .rows import (
    HeadSel, LayerSel, _as_list, _f64, _idx, _reduce_heads, _select_heads, _seq_len, _span,
    _squeeze, _stage_layers, _tensor, llm_attention_rows, llm_rollout, resolve_rows, rollout,
)
from .shares import _drop_sinks, row_role_shares


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
# Image heatmap of one LLM query row
# ----------------------------------------------------------------------------------

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
