"""Image geometry: which LLM position is which image token, and where a patch lies.

Owns the token table (LLM position -> image, slice, resampler query), a slice's patch boxes
on the original image, and placing a slice's patch map into the original image's pixels.
Reads only the record's :class:`~..attention_record.TokenLayout`; no attention tensors.

Paths through the model
-----------------------
* LLM position -> image token: slice ``s`` of ``layout.slices`` owns the positions
  ``token_span = [start, end)``; position ``start + j`` carries resampler query ``j``.
* resampler query -> patches: ``resampler.attn[s, :, j, :h*w]`` (head-mean), the
  patches of slice ``s`` row-major over its ``h x w`` patch grid (``tgt_size``).
* patch -> original image: slice ``s`` covers ``box = (x0, y0, x1, y1)`` of the
  original image; patch ``(r, c)`` covers the ``(r, c)`` cell of that box cut into
  ``h x w`` equal cells.

Conventions for errors: whatever is missing (a stage, a layer, a head, a query row,
key columns, the layout) is named in a ``ValueError``, with how to capture it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ..attention_record import AttentionRecord, SliceLayout, TokenLayout


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
