"""PNG figures of an attention record (matplotlib, Agg canvas, no pyplot state).

Every function draws one figure, writes it atomically (temporary file in the
target folder, then rename) and returns the path written. Figures carry a title
saying what is shown and a colour bar or legend saying what the colours mean.
Pixel size = ``figsize`` (inches) x ``dpi``; pass both to get an exact size.

matplotlib is imported inside the functions: importing this module (or the
package) never needs it.
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

__all__ = [
    "plot_token_heatmaps", "plot_head_image_share", "plot_attention_matrix",
    "plot_role_shares", "plot_resampler_queries", "plot_vision_received",
]

ROLE_COLORS = {"text": "#4C72B0", "image": "#DD8452", "special": "#8C8C8C"}


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------
def _figure(figsize, dpi):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path, dpi) -> str:
    import io

    path = os.fspath(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _label(tok: Optional[str], n: int = 14) -> str:
    """A token string safe and short enough for a title or tick label."""
    if tok is None:
        return "?"
    s = tok.replace("\n", "\\n").replace("\t", "\\t").replace("Ġ", "␣").replace("Ċ", "\\n")
    s = s.replace("$", r"\$")
    return s if len(s) <= n else s[: n - 1] + "…"


def _load_image(image):
    """PIL RGB image from a PIL image, a path or an [H, W(, C)] array; None stays None."""
    if image is None:
        return None
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return to_rgb(load_image(image))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _display_size(size: Tuple[int, int], max_side: Optional[int]) -> Tuple[int, int]:
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return int(w), int(h)
    k = max_side / max(w, h)
    return max(1, round(w * k)), max(1, round(h * k))


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
    shared_scale: bool = False,
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

    ``image`` (PIL image, path or array) is drawn under the maps when given.
    Colours: attention mass per displayed pixel (see ``attention_map.image_heatmap``);
    one colour bar per panel, or one shared one with ``shared_scale``.
    """
    layout = am._need_layout(record, "plot_token_heatmaps")
    L = am._seq_len(record)
    if positions is None:
        n_prompt = int(layout.n_prompt) if layout.n_prompt else L
        positions = list(range(n_prompt - 1, L - 1)) or [L - 1]
    positions = [int(p) + L if int(p) < 0 else int(p) for p in positions][:max_tokens]
    if not positions:
        raise ValueError("plot_token_heatmaps: no token positions to draw")
    im_layout, size, disp = _image_geometry(layout, image_index, max_side)
    pil = _load_image(image)
    if pil is not None:
        pil = pil.resize(disp)

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
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vmax = max(float(m.map.max()) for m in maps) if shared_scale else None
    ext = (0, disp[0], disp[1], 0)
    last = None
    for ax, hm in zip(axes, maps):
        if pil is not None:
            ax.imshow(pil, extent=ext)
        top = vmax if shared_scale else float(hm.map.max())
        last = ax.imshow(hm.map, extent=ext, cmap=cmap, vmin=0.0, vmax=top if top > 0 else 1.0,
                         alpha=alpha if pil is not None else 1.0, interpolation="nearest")
        n_prompt = int(layout.n_prompt) if layout.n_prompt else L
        if n_prompt - 1 <= hm.position < L - 1:  # this row produced the next (generated) token
            title = f"{hm.position} -> '{_label(layout.tokens[hm.position + 1])}'"
        else:
            title = f"{hm.position}: '{_label(hm.token)}'"
        ax.set_title(f"{title}  image {hm.image_share:.0%}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if not shared_scale:
            cb = fig.colorbar(last, ax=ax, shrink=0.85, pad=0.01)
            cb.ax.tick_params(labelsize=6)
            cb.ax.yaxis.get_offset_text().set_fontsize(6)
    for ax in axes[n:]:
        ax.set_axis_off()
    if shared_scale:
        cb = fig.colorbar(last, ax=list(axes[:n]), shrink=0.8)
        cb.set_label("attention mass per pixel")
    parts = [p for p, on in (("source", include_source), ("slices", include_slices)) if on]
    fig.suptitle(
        f"Where each token's attention lands on image {image_index}\n"
        f"{_layers_desc(maps[0].layers, layer_reduce)}, {_heads_desc(heads, head_reduce)}, "
        f"{' + '.join(parts)}; colour = attention mass per pixel, % = share on this image's tokens",
        fontsize=9, wrap=True,
    )
    return _save(fig, path, dpi)


# ----------------------------------------------------------------------------------
# (2) layer x head grid of image-attention share
# ----------------------------------------------------------------------------------
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
    grid = np.asarray(rs[role], dtype=float)  # [n_layers, n_heads]
    nl, nh = grid.shape
    if figsize is None:
        figsize = (min(16.0, 2.2 + 0.45 * nh), min(16.0, 1.6 + 0.32 * nl))
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("LLM layer")
    step_x = max(1, nh // 16)
    step_y = max(1, nl // 24)
    ax.set_xticks(range(0, nh, step_x), [str(h) for h in rs.heads][::step_x], fontsize=7)
    ax.set_yticks(range(0, nl, step_y), [str(l) for l in rs.layers][::step_y], fontsize=7)
    if annotate is None:
        annotate = nl * nh <= 144
    if annotate:
        for i in range(nl):
            for j in range(nh):
                v = grid[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=6, color="white" if not np.isnan(v) and v < 0.5 else "black")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(f"share of attention on {role} tokens")
    ax.set_title(f"{role.capitalize()} attention share per layer and head\n"
                 f"(mean over {len(rs.rows)} query row(s) {_rows_desc(rs.rows)})", fontsize=9)
    return _save(fig, path, dpi)


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
    attention sink does not flatten everything else."""
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

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
    roles = list(layout.roles)

    def role_codes(ps):
        return np.array([ROLE_CODES[roles[p]] if p < len(roles) else ROLE_CODES["text"] for p in ps])

    if figsize is None:
        side = float(np.clip(0.12 * max(len(rows), len(cols)) + 3.0, 5.0, 14.0))
        figsize = (side + 1.2, side)
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot()
    pos = mat[mat > 0]
    top = float(mat.max()) if mat.size else 1.0
    if clip_quantile is not None and pos.size:
        top = min(top, float(np.quantile(pos, clip_quantile)))
    top = max(top, 1e-6)
    clipped = mat.size > 0 and top < float(mat.max())
    if log_scale:
        norm = LogNorm(vmin=min(max(float(pos.min()) if pos.size else 1e-6, 1e-6), top / 10), vmax=top)
        im = ax.imshow(np.where(mat > 0, mat, np.nan), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(mat, cmap=cmap, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
    band_cmap = ListedColormap([ROLE_COLORS[r] for r in ROLES])
    top = ax.inset_axes([0.0, 1.005, 1.0, 0.025])
    top.imshow(role_codes(cols)[None, :], cmap=band_cmap, vmin=0, vmax=len(ROLES) - 1,
               aspect="auto", interpolation="nearest")
    left = ax.inset_axes([-0.025, 0.0, 0.02, 1.0])
    left.imshow(role_codes(rows)[:, None], cmap=band_cmap, vmin=0, vmax=len(ROLES) - 1,
                aspect="auto", interpolation="nearest")
    top.set_xticks([])
    top.set_yticks([])
    left.set_xticks([])
    toks = list(layout.tokens)

    def ticks(ps):
        return [f"{_label(toks[p] if p < len(toks) else None, 10)}" for p in ps]

    def set_ticks(axis, ps, rotation):
        setter = axis.set_xticks if axis is ax else axis.set_yticks
        if len(ps) <= max_labels:
            setter(range(len(ps)), ticks(ps), rotation=rotation, fontsize=6)
        else:
            step = math.ceil(len(ps) / 16)
            setter(range(0, len(ps), step), [str(ps[i]) for i in range(0, len(ps), step)], fontsize=7)

    # y labels sit on the left role band so that they never overlap it
    ax.set_yticks([])
    set_ticks(ax, cols, 90)
    set_ticks(left, rows, 0)
    ax.set_xlabel("key token" + ("" if len(cols) <= max_labels else " position"))
    left.set_ylabel("query token" + ("" if len(rows) <= max_labels else " position"))
    cb = fig.colorbar(im, ax=ax, shrink=0.85, extend="max" if clipped else "neither")
    cb.set_label("attention probability" + (" (log)" if log_scale else "")
                 + (f", clipped at the {clip_quantile:.1%} quantile" if clipped else ""))
    ax.legend(handles=[Patch(color=ROLE_COLORS[r], label=r) for r in ROLES], loc="upper right",
              fontsize=7, title="token role", title_fontsize=7, framealpha=0.8)
    ax.set_title(f"LLM layer {layer} attention ({_heads_desc(heads, head_reduce)}): "
                 f"{len(rows)} query rows x {len(cols)} key columns", fontsize=10, pad=14)
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
    if figsize is None:
        figsize = (float(np.clip(3.5 + 0.3 * n, 5.5, 16.0)), 4.0)
    fig = _figure(figsize, dpi)
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
    drawn over that slice's crop of ``image`` (the original image) when given."""
    layout = am._need_layout(record, "plot_resampler_queries")
    maps = am.resampler_query_maps(record, image_index, slice, heads, "mean")  # [Q, h, w]
    sl = layout.slices[am.find_slice(layout, image_index, slice)]
    Q = maps.shape[0]
    queries = list(range(Q)) if queries is None else [int(q) for q in queries]
    bad = [q for q in queries if not 0 <= q < Q]
    if bad:
        raise ValueError(f"queries {bad} out of range (resampler has {Q} queries)")
    n = len(queries)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = (int(v) for v in sl.tgt_size)
    crop = None
    pil = _load_image(image)
    if pil is not None:
        x0, y0, x1, y1 = sl.box
        crop = pil.crop((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))))
    aspect = h / w
    if figsize is None:
        pw = float(np.clip(9.0 / ncols, 0.8, 2.2))
        figsize = (ncols * pw + 1.0, nrows * (pw * aspect + 0.25) + 0.6)
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vmax = float(maps[queries].max()) or 1.0
    im = None
    for ax, q in zip(axes, queries):
        ext = (0, w, h, 0)
        if crop is not None:
            ax.imshow(crop, extent=ext)
        im = ax.imshow(maps[q], extent=ext, cmap=cmap, vmin=0.0, vmax=vmax,
                       alpha=alpha if crop is not None else 1.0, interpolation="nearest")
        ax.set_title(f"q{q}", fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_axis_off()
    cb = fig.colorbar(im, ax=list(axes), shrink=0.8)
    cb.set_label("resampler attention (heads mean)")
    kind = "source image" if sl.kind == "source" else (
        f"slice {sl.index}" + ("" if sl.grid_pos is None else f" (grid row {sl.grid_pos[0]}, col {sl.grid_pos[1]})"))
    fig.suptitle(f"Resampler queries over image {image_index}, {kind}\n{h} x {w} patches, "
                 f"box {tuple(round(float(v), 1) for v in sl.box)}", fontsize=9)
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
    """
    layout = am._need_layout(record, "plot_vision_received")
    captured = record.layers("vision")
    if not captured:
        raise ValueError("record has no vision.layers.*.attn; capture stage 'vision'")
    if isinstance(layer, int) and layer < 0:
        if -layer > len(captured):
            raise ValueError(f"layer {layer}: only {len(captured)} vision layers captured ({captured})")
        layer = captured[layer]
    im_layout, size, disp = _image_geometry(layout, image_index, max_side)
    pil = _load_image(image)
    if pil is not None:
        pil = pil.resize(disp)
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
    fig = _figure(figsize, dpi)
    axes = np.atleast_1d(fig.subplots(1, len(show), squeeze=False)).ravel()
    vmax = max(float(panels[k].max()) for k in show) or 1.0
    ext = (0, disp[0], disp[1], 0)
    im = None
    for ax, key in zip(axes, show):
        if pil is not None:
            ax.imshow(pil, extent=ext)
        im = ax.imshow(panels[key], extent=ext, cmap=cmap, vmin=0.0, vmax=vmax,
                       alpha=alpha if pil is not None else 1.0, interpolation="nearest")
        ax.set_title(key, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, ax=list(axes), shrink=0.85)
    cb.set_label("attention received / slice mean")
    fig.suptitle(f"SigLIP layer {layer}: attention each patch receives (heads mean) on image {image_index}",
                 fontsize=9)
    return _save(fig, path, dpi)
