"""PNG figures of an attention record (matplotlib, Agg canvas, no pyplot state).

Every function draws one figure, writes it atomically (temporary file in the
target folder, then rename) and returns the path written. Figures carry a title
saying what is shown and a colour bar or legend saying what the colours mean.
Heatmaps over an image are blended pixel by pixel (``heat_overlay``): the image shows
unchanged where the map is 0 and is tinted up to ``alpha`` where the map peaks.
Pixel size = ``figsize`` (inches) x ``dpi``; pass both to get an exact size.

matplotlib is imported inside the functions: importing this module (or the
package) never needs it.

Drawing budget (memory and time do not grow with the image)
-----------------------------------------------------------
* Every image and map handed to matplotlib is downsampled first: its long side is at
  most ``MAX_DRAW_SIDE`` (1024) px, and the panels of one figure together draw at most
  ``MAX_DRAW_PIXELS`` (8 Mpx): a grid of n panels (one per token or resampler query)
  draws each at most ``sqrt(8 Mpx / n)`` px on a side. A given image is reduced to that
  size once, before any per-panel drawing; attention matrices larger than 1024 rows or
  columns are drawn as block means.
* Panels are drawn at an aspect ratio of at most ``MAX_ASPECT`` (4:1); a narrower or
  wider image is drawn stretched to 4:1 and the title says so.
* Every PNG is at most ``MAX_PNG_SIDE`` (4096) px on a side and ``MAX_PNG_PIXELS``
  (8 Mpx) in all: automatic figure sizes are scaled down to fit, and an explicit
  ``figsize`` x ``dpi`` above it is refused with a ``ValueError``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from ..attention_record import AttentionRecord, atomic_write_bytes
from ..capture import ROLE_CODES, ROLES, hook_name
from ..image_processing_minicpmv import load_image, to_rgb
from . import attention_map as am
from .heat_overlay import draw_heat

__all__ = [
    "display_image", "plot_token_heatmaps", "plot_head_image_share", "plot_attention_matrix",
    "plot_role_shares", "plot_resampler_queries", "plot_vision_received", "plot_sink_shares",
]

ROLE_COLORS = {"text": "#4C72B0", "image": "#DD8452", "special": "#8C8C8C"}
MASKED_STYLE = {"facecolor": "#d4d4d4", "hatch": "///", "edgecolor": "#8a8a8a"}  # masked / never-attended cells

# the drawing budget (see the module doc)
MAX_DRAW_SIDE = 1024  # px, long side of any image or map drawn
MAX_DRAW_PIXELS = 8_000_000  # px, all panels of one figure together
MAX_ASPECT = 4.0  # panels are drawn at most 4:1 (narrower images are stretched)
MAX_PANELS = 128  # panels (tokens, queries) in one figure
MAX_PNG_SIDE = 4096  # px, either side of any PNG written
MAX_PNG_PIXELS = 8_000_000  # px, width x height of any PNG written
BUDGET = (f"plots draw images and maps downsampled to at most {MAX_DRAW_SIDE} px on the long side "
          f"({MAX_DRAW_PIXELS // 1_000_000} Mpx per figure in all), panels at most {MAX_ASPECT:g}:1 (more extreme "
          f"images are drawn stretched), and every PNG is at most {MAX_PNG_SIDE} px a side and "
          f"{MAX_PNG_PIXELS // 1_000_000} Mpx")


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def _png_size(figsize, dpi) -> Tuple[int, int]:
    return round(float(figsize[0]) * dpi), round(float(figsize[1]) * dpi)


def _fit_figsize(figsize, dpi, auto: bool) -> Tuple[float, float]:
    """``figsize`` scaled down (keeping its shape) so the PNG fits the budget when it was
    computed here (``auto``); an explicit one that does not fit is refused."""
    if dpi <= 0 or min(float(figsize[0]), float(figsize[1])) <= 0:
        raise ValueError(f"figsize={tuple(figsize)}, dpi={dpi}: expected positive sizes")
    w, h = _png_size(figsize, dpi)
    k = min(1.0, MAX_PNG_SIDE / w, MAX_PNG_SIDE / h, math.sqrt(MAX_PNG_PIXELS / (w * h)))
    if k >= 1.0:
        return float(figsize[0]), float(figsize[1])
    if not auto:
        raise ValueError(
            f"figsize={tuple(figsize)} at dpi={dpi} makes a {w} x {h} px PNG; expected at most "
            f"{MAX_PNG_SIDE} px a side and {MAX_PNG_PIXELS:,} pixels (smaller figsize or dpi)")
    return max(1, math.floor(w * k)) / dpi, max(1, math.floor(h * k)) / dpi


def _figure(figsize, dpi, auto: bool = True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_fit_figsize(figsize, dpi, auto), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi) -> str:
    import io

    path = os.fspath(path)
    w, h = _png_size(fig.get_size_inches(), dpi)
    if w > MAX_PNG_SIDE or h > MAX_PNG_SIDE or w * h > MAX_PNG_PIXELS:  # _figure keeps this from happening
        raise ValueError(f"{path}: a {w} x {h} px PNG is above the budget ({BUDGET})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _panel_side(n_panels: int, want: int = MAX_DRAW_SIDE) -> int:
    """Largest side (px) each of ``n_panels`` panels may draw at within the budget."""
    return int(max(16, min(want, MAX_DRAW_SIDE, math.isqrt(MAX_DRAW_PIXELS // max(1, n_panels)))))


def _check_max_side(max_side: int) -> int:
    if not 1 <= int(max_side) <= MAX_DRAW_SIDE:
        raise ValueError(f"max_side={max_side}: expected 1 to {MAX_DRAW_SIDE} px (the drawing budget)")
    return int(max_side)


def _fit_aspect(size, side: int) -> Tuple[int, int]:
    """(w, h) with long side ``side`` and the shape of ``size`` = (w, h), stretched to at most
    ``MAX_ASPECT``:1."""
    w, h = float(size[0]), float(size[1])
    side = max(1, int(side))
    if w >= h:
        return side, max(1, min(side, round(max(h * side / w, side / MAX_ASPECT))))
    return max(1, min(side, round(max(w * side / h, side / MAX_ASPECT)))), side


def _display_size(size: Tuple[int, int], max_side: Optional[int]) -> Tuple[int, int]:
    """Drawing size of an image of ``size``: long side at most ``max_side`` (and the budget),
    never enlarged, at most ``MAX_ASPECT``:1 (more extreme shapes are stretched)."""
    w, h = int(size[0]), int(size[1])
    side = min(max(w, h), int(max_side or MAX_DRAW_SIDE), MAX_DRAW_SIDE)
    return _fit_aspect((w, h), side)


def _stretch_note(size) -> str:
    """Title note for an image drawn stretched (aspect above ``MAX_ASPECT``), else ''."""
    w, h = float(size[0]), float(size[1])
    r = max(w, h) / max(min(w, h), 1e-9)
    if r <= MAX_ASPECT:
        return ""
    shape = f"{r:.0f}:1" if w > h else f"1:{r:.0f}"
    return f" [{shape} image drawn stretched to {MAX_ASPECT:g}:1]"


def _block_mean(a, max_rows: int, max_cols: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``a`` [..., R, C] averaged over blocks so that it has at most ``max_rows`` x ``max_cols``
    entries; returns (array, (rows per block, cols per block)). Small arrays come back as they are."""
    a = np.asarray(a)
    R, C = a.shape[-2:]
    fy, fx = max(1, -(-R // max(1, max_rows))), max(1, -(-C // max(1, max_cols)))
    if fy == 1 and fx == 1:
        return a, (1, 1)
    ry, rx = np.arange(0, R, fy), np.arange(0, C, fx)
    valid = np.isfinite(a)  # NaN cells (masked) are left out; an all-NaN block stays NaN
    s = np.add.reduceat(np.where(valid, a, 0.0), ry, axis=-2, dtype=np.float64)
    s = np.add.reduceat(s, rx, axis=-1)
    n = np.add.reduceat(np.add.reduceat(valid.astype(np.float64), ry, axis=-2), rx, axis=-1)
    out = np.divide(s, n, out=np.full(s.shape, np.nan), where=n > 0)
    return out.astype(np.float32), (fy, fx)


def _scale_formatter(vmax: float):
    """(tick formatter, label suffix) with one power of ten for every colour bar of a figure:
    ticks read ``v / 10**e`` with 2 significant digits and the label says ``x 1e{e}``."""
    from matplotlib.ticker import FuncFormatter

    e = int(math.floor(math.log10(vmax))) if vmax > 0 and math.isfinite(vmax) else 0
    e = 0 if -1 <= e <= 1 else e
    k = 10.0 ** e
    return FuncFormatter(lambda v, _: f"{v / k:.2g}"), ("" if e == 0 else f" (x 1e{e})")


def _label(tok: Optional[str], n: int = 14) -> str:
    """A token string safe and short enough for a title or tick label."""
    if tok is None:
        return "?"
    s = tok.replace("\n", "\\n").replace("\t", "\\t").replace("Ġ", "␣").replace("Ċ", "\\n")
    s = s.replace("$", r"\$")
    return s if len(s) <= n else s[: n - 1] + "…"


def _load_image(image, size: Tuple[int, int]) -> Optional[np.ndarray]:
    """RGB uint8 array [h, w, 3] of ``image`` (PIL image, path or [H, W(, C)] array) resized to
    ``size`` = (w, h) (at most ``MAX_DRAW_SIDE`` a side); None stays None. A large RGB or
    grey image is reduced before anything else is done with it."""
    if image is None:
        return None
    from PIL import Image

    size = (max(1, min(int(size[0]), MAX_DRAW_SIDE)), max(1, min(int(size[1]), MAX_DRAW_SIDE)))
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    resample = Image.Resampling.BILINEAR
    if image.mode in ("RGB", "L"):  # shrink first: no full-size copy
        image = image.resize(size, resample, reducing_gap=3.0)
    out = to_rgb(image)
    if out.size != size:
        out = out.resize(size, resample, reducing_gap=3.0)
    return np.asarray(out.convert("RGB"))


def display_image(image, max_side: int = MAX_DRAW_SIDE):
    """A PIL RGB copy of ``image`` (PIL image, path or array) small enough to draw: long side at
    most ``max_side`` (<= ``MAX_DRAW_SIDE``), at most ``MAX_ASPECT``:1. The plot functions take it
    in place of the original (they place everything by fractions of the image), so a caller can
    drop the full-size image before plotting."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    size = image.size if isinstance(image, Image.Image) else np.asarray(image).shape[1::-1]
    return Image.fromarray(_load_image(image, _display_size(size, _check_max_side(max_side))))


def _image_geometry(layout, image_index: int, max_side: Optional[int]):
    """(ImageLayout, original (w, h), display (w, h)) of one image of a layout."""
    ims = {im.index: im for im in layout.images}
    if image_index not in ims:
        raise ValueError(f"layout has no image {image_index}; images: {sorted(ims)}")
    size = tuple(int(v) for v in ims[image_index].size)
    return ims[image_index], size, _display_size(size, max_side)


def _heads_desc(heads, head_reduce) -> str:
    if head_reduce is None:
        return "per head"
    return f"heads {head_reduce}" + ("" if heads is None else f" of {list(np.atleast_1d(heads))}")


def _layers_desc(layers, layer_reduce) -> str:
    ls = list(layers)
    span = f"{ls[0]}..{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 1 else str(ls)
    return f"LLM layers {span}" + ("" if len(ls) == 1 else f" ({layer_reduce})")


# ----------------------------------------------------------------------------------
# (1) heatmap of each generated token over the image
# ----------------------------------------------------------------------------------
def plot_token_heatmaps(
    record: AttentionRecord,
    path,
    image=None,
    positions: Optional[Sequence[int]] = None,
    *,
    image_index: int = 0,
    layers=None,
    heads=None,
    head_reduce: str = "mean",
    layer_reduce: str = "mean",
    include_source: bool = True,
    include_slices: bool = True,
    interpolation: str = "nearest",
    shared_scale: bool = True,
    max_tokens: int = 32,
    ncols: int = 4,
    max_side: int = 320,
    alpha: float = 0.6,
    cmap: str = "inferno",
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """Grid of image heatmaps, one per query row (default: the rows that produced the
    generated tokens, else the last position), each titled with the token it produced
    ("pos -> 'tok'") or its own token, and its image-attention share.

    ``image`` (PIL image, path or array; the original or a smaller copy such as
    :func:`display_image`'s) is drawn under the maps when given; ``alpha`` is the maps' opacity
    where they peak, falling to 0 (the image unchanged) where they are 0.
    ``positions``: rows as :func:`attention_map.resolve_rows` reads them (absolute, negative
    from the end of the prompt, ``"generated"``, ``"last"``).
    Colours: attention mass per displayed pixel (see ``attention_map.image_heatmap``); by
    default one colour scale and bar shared by every panel (so panels compare), or one per
    panel with ``shared_scale=False``; every bar uses the same tick format and power of ten.
    Maps are computed at
    the drawing size (long side ``max_side``, at most 1024, less when many panels share the
    figure's budget: see the module doc).
    """
    _check_max_side(max_side)
    if not 1 <= int(max_tokens) <= MAX_PANELS:
        raise ValueError(f"max_tokens={max_tokens}: expected 1 to {MAX_PANELS} panels")
    auto = figsize is None
    layout = am._need_layout(record, "plot_token_heatmaps")
    L = am._seq_len(record)
    if positions is None:
        positions = "generated" if L > am.prompt_length(record) else "last"
    positions = am.resolve_rows(record, positions)[:max_tokens]
    if not positions:
        raise ValueError("plot_token_heatmaps: no token positions to draw")
    im_layout, size, disp = _image_geometry(layout, image_index, _panel_side(len(positions), max_side))
    pil = _load_image(image, disp)

    maps = [
        am.image_heatmap(record, p, layers=layers, heads=heads, head_reduce=head_reduce,
                         layer_reduce=layer_reduce, image=image_index, out_size=disp,
                         include_source=include_source, include_slices=include_slices,
                         interpolation=interpolation)
        for p in positions
    ]
    n = len(maps)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    aspect = disp[1] / disp[0]
    if figsize is None:
        pw = 3.2
        figsize = (max(6.0, ncols * pw + (0.9 if shared_scale else 0.0)), nrows * (pw * aspect + 0.5) + 0.7)
    fig = _figure(figsize, dpi, auto)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vmax = max(float(m.map.max()) for m in maps)
    fmt, suffix = _scale_formatter(vmax)
    ext = (0, disp[0], disp[1], 0)
    last = None
    for ax, hm in zip(axes, maps):
        top = vmax if shared_scale else float(hm.map.max())
        last = draw_heat(ax, pil, hm.map, top, alpha, cmap, ext)
        n_prompt = int(layout.n_prompt) if layout.n_prompt else L
        if n_prompt - 1 <= hm.position < L - 1:  # this row produced the next (generated) token
            title = f"{hm.position} -> '{_label(layout.tokens[hm.position + 1])}'"
        else:
            title = f"{hm.position}: '{_label(hm.token)}'"
        ax.set_title(f"{title}  image {hm.image_share:.0%}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if not shared_scale:
            cb = fig.colorbar(last, ax=ax, shrink=0.85, pad=0.01, format=fmt)
            cb.ax.tick_params(labelsize=6)
            if suffix:
                cb.set_label(suffix.strip(" ()"), fontsize=6)
    for ax in axes[n:]:
        ax.set_axis_off()
    if shared_scale:
        cb = fig.colorbar(last, ax=list(axes[:n]), shrink=0.8, format=fmt)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("attention mass per pixel" + suffix, fontsize=8)
    parts = [p for p, on in (("source", include_source), ("slices", include_slices)) if on]
    fig.suptitle(
        f"Where each token's attention lands on image {image_index}\n"
        f"{_layers_desc(maps[0].layers, layer_reduce)}, {_heads_desc(heads, head_reduce)}, "
        f"{' + '.join(parts)}; colour = attention mass per pixel "
        f"({'one scale for all panels' if shared_scale else 'own scale per panel'}), % = share on this image's tokens"
        f"{_stretch_note(size)}",
        fontsize=9, wrap=True,
    )
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------------
# (2) layer x head grid of image-attention share
# ----------------------------------------------------------------------------------
def _layer_head_grid(grid, layers, heads, title: str, label: str, cmap: str, annotate: Optional[bool],
                     figsize, dpi, path) -> str:
    """One layer x head heatmap of shares in [0, 1] (NaN = not captured), annotated when small.
    Automatic sizes leave room for the title and the colour-bar label on small grids."""
    grid = np.asarray(grid, dtype=float).reshape(len(layers), -1)
    nl, nh = grid.shape
    auto = figsize is None
    if figsize is None:
        figsize = (min(16.0, max(5.6, 2.8 + 0.45 * nh)), min(16.0, max(3.8, 2.0 + 0.32 * nl)))
    fig = _figure(figsize, dpi, auto)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("LLM layer", fontsize=8)
    step_x = max(1, nh // 16)
    step_y = max(1, nl // 24)
    ax.set_xticks(range(0, nh, step_x), [str(h) for h in heads][::step_x], fontsize=7)
    ax.set_yticks(range(0, nl, step_y), [str(l) for l in layers][::step_y], fontsize=7)
    if annotate is None:
        annotate = nl * nh <= 144
    if annotate:
        for i in range(nl):
            for j in range(nh):
                v = grid[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if not np.isnan(v) and v < 0.5 else "black")
    cb = fig.colorbar(im, ax=ax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(label, fontsize=7)
    fig.suptitle(title, fontsize=8, wrap=True)
    return _save(fig, path, dpi)


def plot_head_image_share(
    record: AttentionRecord,
    path,
    rows=None,
    *,
    layers=None,
    heads=None,
    role: str = "image",
    cmap: str = "viridis",
    annotate: Optional[bool] = None,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """Layer x head heatmap of the share of attention on ``role`` tokens (default
    image), averaged over query ``rows`` (see ``attention_map.role_shares``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    rs = am.role_shares(record, rows=rows, layers=layers, heads=heads, per_head=True)
    return _layer_head_grid(rs[role], rs.layers, rs.heads,
                            f"{role.capitalize()} attention share per layer and head\n"
                            f"mean over {len(rs.rows)} query row(s) {_rows_desc(rs.rows)}",
                            f"share on {role} tokens", cmap, annotate, figsize, dpi, path)


def plot_sink_shares(
    record: AttentionRecord,
    path,
    rows=None,
    *,
    layers=None,
    sinks=None,
    cmap: str = "viridis",
    annotate: Optional[bool] = None,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """Layer x head heatmap of the share of attention on the attention sinks (the first
    non-padding token plus the rule's sinks, or ``sinks``), mean over query ``rows``
    (see ``attention_map.sink_shares``); the title names the sink tokens."""
    ss = am.sink_shares(record, rows=rows, layers=layers, sinks=sinks, per_head=True)
    named = ", ".join(f"{p} '{_label(t, 10)}'" for p, t in zip(ss.sinks[:6], ss.tokens[:6]))
    named += "" if len(ss.sinks) <= 6 else f" and {len(ss.sinks) - 6} more"
    rule = (f"first token + keys over {ss.factor:g}x the uniform share" if ss.factor is not None else "given")
    return _layer_head_grid(ss.shares, ss.layers, ss.heads,
                            f"Attention-sink share per layer and head\nsinks ({rule}): {named}\n"
                            f"mean over {len(ss.rows)} query row(s) {_rows_desc(ss.rows)}",
                            "share on the sink tokens", cmap, annotate, figsize, dpi, path)


def _rows_desc(rows) -> str:
    rows = list(rows)
    if len(rows) > 1 and rows == list(range(rows[0], rows[-1] + 1)):
        return f"at positions {rows[0]}..{rows[-1]}"
    return f"at positions {rows}" if len(rows) <= 6 else f"at {len(rows)} positions"


# ----------------------------------------------------------------------------------
# (3) LLM attention matrix with role bands
# ----------------------------------------------------------------------------------
def plot_attention_matrix(
    record: AttentionRecord,
    path,
    layer: int,
    *,
    heads=None,
    head_reduce: str = "mean",
    log_scale: bool = False,
    clip_quantile: Optional[float] = 0.995,
    max_labels: int = 64,
    cmap: str = "magma",
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """The captured rows x cols of one LLM layer (heads reduced), with coloured bands
    marking text / image / special tokens along both axes and token labels where
    they fit (at most ``max_labels`` per axis). The colour scale tops out at the
    ``clip_quantile`` of the positive entries (None: at the maximum), so that an
    attention sink does not flatten everything else. A matrix with more than 1024 rows
    or columns is drawn as means over blocks of rows x columns (the colour bar says so).

    Cells a query can never attend to (future keys, padding, the never-fed last token) are
    drawn hatched grey, not in the colour of zero attention (legend and title say so). The
    figure takes the matrix's shape: a few rows (e.g. ``rows="generated"``) over many
    columns give a wide, short figure with readable row labels."""
    import matplotlib
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch, Rectangle

    if head_reduce not in ("mean", "max"):
        raise ValueError(f"head_reduce must be 'mean' or 'max' for a single matrix, got {head_reduce!r}")
    layout = am._need_layout(record, "plot_attention_matrix")
    layer = am._stage_layers(record, "llm", [layer])[0]
    name = hook_name("llm", layer)
    t = record.tensors[name]
    idx = am._idx(record, name)
    rows = am._positions(idx, "rows", t.shape[1])
    cols = am._positions(idx, "cols", t.shape[2])
    sel, labels = am._select_heads(t.detach().float().cpu()[:, :, : len(cols)], idx, name, heads, 0)
    mat = am._reduce_heads(sel, head_reduce, 0).numpy()
    # cells no query can attend to: future keys, padding keys / queries, never-fed positions
    pad, n_fed = int(layout.padding), am.fed_length(record)
    r_pos, c_pos = np.asarray(rows)[:, None], np.asarray(cols)[None, :]
    masked = (c_pos > r_pos) | (c_pos < pad) | (r_pos < pad) | (c_pos >= n_fed)
    mat = np.where(masked, np.nan, mat)
    roles = list(layout.roles)

    def role_codes(ps):
        return np.array([ROLE_CODES[roles[p]] if p < len(roles) else ROLE_CODES["text"] for p in ps])

    auto = figsize is None
    if figsize is None:  # the matrix's shape; rows at least a readable label's height when labelled
        width = float(np.clip(0.12 * len(cols) + 3.0, 5.0, 14.0)) + 1.2
        cell = (width - 4.2) / max(len(cols), 1)
        row_h = max(cell, 0.12 if len(rows) <= max_labels else 0.0)
        height = float(np.clip(row_h * len(rows) + 3.0, 3.4, 14.0))
        figsize = (width, height)
    fig = _figure(figsize, dpi, auto)
    ax = fig.add_subplot()
    mat, (fy, fx) = _block_mean(mat, MAX_DRAW_SIDE, MAX_DRAW_SIDE)  # what is drawn
    ext = (-0.5, len(cols) - 0.5, len(rows) - 0.5, -0.5)  # axes stay in row / column units
    ax.add_patch(Rectangle((ext[0], ext[3]), ext[1] - ext[0], ext[2] - ext[3], lw=0, zorder=0, **MASKED_STYLE))
    cmap = matplotlib.colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # NaN: the hatch shows through
    finite = mat[np.isfinite(mat)]
    pos = finite[finite > 0]
    top = float(finite.max()) if finite.size else 1.0
    if clip_quantile is not None and pos.size:
        top = min(top, float(np.quantile(pos, clip_quantile)))
    top = max(top, 1e-6)
    clipped = finite.size > 0 and top < float(finite.max())
    if log_scale:
        low = min(max(float(pos.min()) if pos.size else 1e-6, 1e-6), top / 10)
        norm = LogNorm(vmin=low, vmax=top)
        im = ax.imshow(np.where(np.isnan(mat) | (mat > low), mat, low), cmap=cmap, norm=norm, aspect="auto",
                       interpolation="nearest", extent=ext, zorder=1)
    else:
        im = ax.imshow(mat, cmap=cmap, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest", extent=ext,
                       zorder=1)
    band_cmap = ListedColormap([ROLE_COLORS[r] for r in ROLES])
    top = ax.inset_axes([0.0, 1.005, 1.0, 0.025])
    top.imshow(role_codes(cols[::fx])[None, :], cmap=band_cmap, vmin=0, vmax=len(ROLES) - 1,
               aspect="auto", interpolation="nearest", extent=(ext[0], ext[1], 0.5, -0.5))
    left = ax.inset_axes([-0.025, 0.0, 0.02, 1.0])
    left.imshow(role_codes(rows[::fy])[:, None], cmap=band_cmap, vmin=0, vmax=len(ROLES) - 1,
                aspect="auto", interpolation="nearest", extent=(-0.5, 0.5, ext[2], ext[3]))
    top.set_xticks([])
    top.set_yticks([])
    left.set_xticks([])
    toks = list(layout.tokens)

    def ticks(ps):
        return [f"{_label(toks[p] if p < len(toks) else None, 10)}" for p in ps]

    def compact(ps):  # too many to label each: the text / special tokens by name, each image run once
        at, names, i = [], [], 0
        while i < len(ps):
            if ps[i] < len(roles) and roles[ps[i]] == "image":
                j = i
                while j + 1 < len(ps) and ps[j + 1] < len(roles) and roles[ps[j + 1]] == "image":
                    j += 1
                at.append((i + j) / 2)
                names.append(f"image {ps[i]}..{ps[j]}")
                i = j + 1
            else:
                at.append(i)
                names.append(f"{ps[i]} {_label(toks[ps[i]] if ps[i] < len(toks) else None, 10)}")
                i += 1
        return (at, names) if len(at) <= max_labels else None

    def set_ticks(axis, ps, rotation):
        setter = axis.set_xticks if axis is ax else axis.set_yticks
        if len(ps) <= max_labels:
            setter(range(len(ps)), ticks(ps), rotation=rotation, fontsize=6)
        elif compact(ps) is not None:
            setter(*compact(ps), rotation=rotation, fontsize=6)
        else:
            step = math.ceil(len(ps) / 16)
            setter(range(0, len(ps), step), [str(ps[i]) for i in range(0, len(ps), step)], fontsize=7)

    # y labels sit on the left role band so that they never overlap it
    ax.set_yticks([])
    set_ticks(ax, cols, 90)
    set_ticks(left, rows, 0)
    ax.set_xlabel("key token" + ("" if len(cols) <= max_labels or compact(cols) else " position"))
    left.set_ylabel("query token (row)" + ("" if len(rows) <= max_labels or compact(rows) else " position"))
    cb = fig.colorbar(im, ax=ax, shrink=0.85, extend="max" if clipped else "neither")
    cb.ax.tick_params(labelsize=7)
    cb.set_label("attention probability" + (" (log)" if log_scale else "")
                 + (f"\nclipped at the {clip_quantile:.1%} quantile" if clipped else "")
                 + (f"\nmean over blocks of {fy} x {fx}" if fy * fx > 1 else ""), fontsize=7)
    handles = [Patch(color=ROLE_COLORS[r], label=f"{r} token") for r in ROLES]
    handles.append(Patch(label="masked (future / padding / never fed)", **MASKED_STYLE))
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=7, framealpha=0.8)
    ax.set_title(f"LLM layer {layer} attention ({_heads_desc(heads, head_reduce)}): "
                 f"{len(rows)} query rows x {len(cols)} key columns\nhatched grey = masked cells (no attention "
                 f"possible), not zero attention", fontsize=9, pad=14)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------------
# (4) text / image / special share per layer
# ----------------------------------------------------------------------------------
def plot_role_shares(
    record: AttentionRecord,
    path,
    rows=None,
    *,
    layers=None,
    heads=None,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """Stacked bars per LLM layer: share of attention on text, image and special tokens
    (mean over query ``rows``, heads mean). Roles whose keys were not captured are
    left out and named in the legend."""
    rs = am.role_shares(record, rows=rows, layers=layers, heads=heads)
    n = len(rs.layers)
    auto = figsize is None
    if figsize is None:
        figsize = (float(np.clip(3.5 + 0.3 * n, 5.5, 16.0)), 4.0)
    fig = _figure(figsize, dpi, auto)
    ax = fig.add_subplot()
    x = np.arange(n)
    bottom = np.zeros(n)
    for r in ROLES:
        v = np.asarray(rs[r], dtype=float)
        lost = np.isnan(v).any()
        v = np.nan_to_num(v)
        ax.bar(x, v, bottom=bottom, color=ROLE_COLORS[r], width=0.8,
               label=r + (" (not captured)" if lost else ""))
        bottom += v
    step = max(1, n // 24)
    ax.set_xticks(x[::step], [str(l) for l in rs.layers][::step], fontsize=7)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("share of attention")
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.02))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="key tokens", title_fontsize=8)
    ax.set_title(f"Attention share by token role per layer\n(mean over {len(rs.rows)} query row(s)\n"
                 f"{_rows_desc(rs.rows)}, heads mean)", fontsize=9)
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------------
# (5) resampler query maps over a slice
# ----------------------------------------------------------------------------------
def plot_resampler_queries(
    record: AttentionRecord,
    path,
    image=None,
    *,
    image_index: int = 0,
    slice: int = 0,
    queries: Optional[Sequence[int]] = None,
    heads=None,
    ncols: Optional[int] = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """Grid of the resampler's query maps over one slice's patch grid (heads mean),
    drawn over that slice's crop of ``image`` (the original image or a smaller copy such as
    :func:`display_image`'s) when given (opacity ``alpha`` where a map peaks, 0 where it is 0).

    The image is reduced to at most 1024 px before it is cropped, and each panel draws the
    crop and its map at most ``sqrt(8 Mpx / panels)`` px a side (see the module doc). With
    ``queries=None`` at most ``MAX_PANELS`` (128) queries are drawn, the first ones."""
    auto = figsize is None
    layout = am._need_layout(record, "plot_resampler_queries")
    maps = am.resampler_query_maps(record, image_index, slice, heads, "mean")  # [Q, h, w]
    sl = layout.slices[am.find_slice(layout, image_index, slice)]
    Q = maps.shape[0]
    if queries is None:
        queries = list(range(min(Q, MAX_PANELS)))
    else:
        queries = [int(q) for q in queries]
        if not 1 <= len(queries) <= MAX_PANELS:
            raise ValueError(f"queries: expected 1 to {MAX_PANELS} query ids, got {len(queries)}")
    bad = [q for q in queries if not 0 <= q < Q]
    if bad:
        raise ValueError(f"queries {bad} out of range (resampler has {Q} queries)")
    n = len(queries)
    h, w = (int(v) for v in sl.tgt_size)
    # panel drawing size (px) in the slice's shape (at most MAX_ASPECT:1), within the figure's budget
    pw_px, ph_px = _fit_aspect((w, h), _panel_side(n))
    aspect = ph_px / pw_px
    ncols = ncols or max(1, min(n, math.ceil(math.sqrt(n * aspect) - 1e-9)))  # a roughly square grid
    nrows = math.ceil(n / ncols)
    drawn, _ = _block_mean(maps[queries], ph_px, pw_px)  # [n, <= ph_px, <= pw_px]
    crop = None
    if image is not None:
        _, (W, H), small_size = _image_geometry(layout, image_index, MAX_DRAW_SIDE)
        small = _load_image(image, small_size)  # reduced before cropping
        kx, ky = small.shape[1] / W, small.shape[0] / H
        x0, y0, x1, y1 = (float(v) for v in sl.box)
        c0, r0 = min(int(x0 * kx), small.shape[1] - 1), min(int(y0 * ky), small.shape[0] - 1)
        c1, r1 = max(c0 + 1, math.ceil(x1 * kx)), max(r0 + 1, math.ceil(y1 * ky))
        from PIL import Image

        crop = np.asarray(Image.fromarray(small[r0:r1, c0:c1]).resize((pw_px, ph_px), Image.Resampling.BILINEAR))
    if figsize is None:
        pw = float(np.clip(9.0 / ncols, 0.8, 2.2)) / math.sqrt(aspect)  # panel area as for a square one
        figsize = (max(6.0, ncols * pw + 1.0), max(3.0, nrows * (pw * aspect + 0.25) + 0.8))
    fig = _figure(figsize, dpi, auto)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vmax = float(drawn.max()) or 1.0
    im = None
    ext = (0, pw_px, ph_px, 0)
    for ax, q, m in zip(axes, queries, drawn):
        im = draw_heat(ax, crop, m, vmax, alpha, cmap, ext)
        ax.set_title(f"q{q}", fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_axis_off()
    cb = fig.colorbar(im, ax=list(axes), shrink=0.8)
    cb.set_label("resampler attention (heads mean)")
    kind = "source image" if sl.kind == "source" else (
        f"slice {sl.index}" + ("" if sl.grid_pos is None else f" (grid row {sl.grid_pos[0]}, col {sl.grid_pos[1]})"))
    more = f"; first {n} of {Q} queries" if n < Q and len(queries) == n and queries == list(range(n)) else ""
    fig.suptitle(f"Resampler queries over image {image_index}, {kind}\n{h} x {w} patches, "
                 f"box {tuple(round(float(v), 1) for v in sl.box)}{more}{_stretch_note((w, h))}", fontsize=9,
                 wrap=True)
    return _save(fig, path, dpi)


def plot_vision_received(
    record: AttentionRecord,
    path,
    image=None,
    *,
    image_index: int = 0,
    layer=-1,
    heads=None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    max_side: int = 320,
    figsize: Optional[Tuple[float, float]] = None,
    dpi: int = 100,
) -> str:
    """SigLIP attention each patch receives (mean over the slice's query patches, heads mean),
    for the overview image (left) and the grid slices stitched in place (right).

    ``layer``: a captured vision layer id (negative counts from the last captured one) or
    ``"rollout"``. Each slice's map is normalised to a mean of 1, so 1 = average attention.
    ``image`` may be the original or a smaller copy (:func:`display_image`), drawn under the maps
    (opacity ``alpha`` where they peak, 0 where they are 0); everything is
    drawn at most ``max_side`` (<= 1024) px on the long side.
    """
    _check_max_side(max_side)
    auto = figsize is None
    layout = am._need_layout(record, "plot_vision_received")
    captured = record.layers("vision")
    if not captured:
        raise ValueError("record has no vision.layers.*.attn; capture stage 'vision'")
    if isinstance(layer, int) and layer < 0:
        if -layer > len(captured):
            raise ValueError(f"layer {layer}: only {len(captured)} vision layers captured ({captured})")
        layer = captured[layer]
    im_layout, size, disp = _image_geometry(layout, image_index, max_side)
    pil = _load_image(image, disp)
    panels = {"overview": np.zeros(disp[::-1]), "grid slices": np.zeros(disp[::-1])}
    for sl in im_layout.slices:
        patch_map = am.vision_received_map(record, layer, image_index, sl.index, heads, "mean")
        patch_map = patch_map / max(float(patch_map.mean()), 1e-12)
        h, w = patch_map.shape
        # density per pixel: spread masses then divide by each cell's pixel area
        mass = am.place_patch_map(patch_map, sl.box, size, out_size=disp)
        cell = am.place_patch_map(np.ones((h, w)), sl.box, size, out_size=disp)
        dens = np.divide(mass, cell, out=np.zeros_like(mass), where=cell > 0)
        panels["overview" if sl.kind == "source" else "grid slices"] += dens
    show = [k for k in panels if panels[k].any()]
    if figsize is None:
        figsize = (3.4 * len(show) + 1.0, 3.4 * disp[1] / disp[0] + 0.9)
    fig = _figure(figsize, dpi, auto)
    axes = np.atleast_1d(fig.subplots(1, len(show), squeeze=False)).ravel()
    vmax = max(float(panels[k].max()) for k in show) or 1.0
    ext = (0, disp[0], disp[1], 0)
    im = None
    for ax, key in zip(axes, show):
        im = draw_heat(ax, pil, panels[key], vmax, alpha, cmap, ext)
        ax.set_title(key, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label("attention received / slice mean")
    fig.suptitle(f"SigLIP layer {layer}: attention each patch receives (heads mean) on image {image_index}"
                 f"{_stretch_note(size)}", fontsize=9, wrap=True)
    return _save(fig, path, dpi)
