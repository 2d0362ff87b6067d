"""Before / after pictures of fine-tuning: the answer rows' attention heatmap on the image with
the target box, and per answer token heatmaps (``analysis.plotting``). PNGs are written
atomically with a palette (small files). matplotlib is imported only where used."""
from __future__ import annotations

import io
from typing import Optional, Sequence, Tuple

import numpy as np

from ..analysis import attention_map as am
from ..attention_record import AttentionRecord, atomic_write_bytes
from .data import Encoded, load_rgb
from .forward import example_record


def box_heatmap(model, enc: Encoded, layers: Optional[Sequence[int]], tokenizer=None):
    """(record, map [H, W], share): the answer rows' mean attention over the original image
    (``attention_map.image_heatmap``, layers and rows averaged) and its mass inside the box
    (equal to the box loss's attention-to-box share)."""
    rec = example_record(model, enc, layers, tokenizer)
    m = np.mean(np.stack([am.image_heatmap(rec, r, layers=layers).map for r in enc.rows]), 0)
    share = None
    if enc.example.box is not None:
        share = float((m * _box_mask(rec.layout.images[0].size, enc.example.box)).sum())
    return rec, m, share


def _box_mask(size: Tuple[int, int], box) -> np.ndarray:
    """[H, W] fraction of each pixel inside ``box``."""
    W, H = size
    x0, y0, x1, y1 = (float(v) for v in box)
    fx = np.clip(np.minimum(np.arange(1, W + 1), x1) - np.maximum(np.arange(W), x0), 0, 1)
    fy = np.clip(np.minimum(np.arange(1, H + 1), y1) - np.maximum(np.arange(H), y0), 0, 1)
    return fy[:, None] * fx[None, :]


def plot_before_after(image, box, before: np.ndarray, after: np.ndarray, path: str,
                      shares: Tuple[Optional[float], Optional[float]] = (None, None), title: str = "",
                      dpi: int = 80) -> str:
    """Two panels (before | after training): the image, the answer rows' attention heatmap
    on it (one shared colour scale) and the target box outlined. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if isinstance(image, str):
        image = load_rgb(image)
    W, H = image.size
    h, w = before.shape
    disp = image.resize((w, h))
    kx, ky = w / W, h / H
    vmax = max(float(before.max()), float(after.max()), 1e-12)
    fig = Figure(figsize=(7.0, 3.0 * h / w + 1.0), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    im = None
    for ax, m, label, share in zip(axes, (before, after), ("before", "after"), shares):
        ax.imshow(disp, extent=(0, w, h, 0))
        im = ax.imshow(m, extent=(0, w, h, 0), cmap="inferno", vmin=0, vmax=vmax, alpha=0.65,
                       interpolation="nearest")
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0 * kx, y0 * ky), (x1 - x0) * kx, (y1 - y0) * ky, fill=False,
                                   edgecolor="#00e5ff", linewidth=2))
        ax.set_title(f"{label}" + ("" if share is None else f": box share {share:.1%}"), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, ax=list(axes), shrink=0.8)
    cb.set_label("attention mass per pixel", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title or "Answer tokens' attention on the image (box outlined)", fontsize=10)
    return save_png(fig, path, dpi)


def plot_token_grid(record: AttentionRecord, enc: Encoded, path: str, layers: Optional[Sequence[int]] = None,
                    max_tokens: int = 8) -> str:
    """Per answer token heatmaps (``plotting.plot_token_heatmaps``: one panel per answer row,
    shared colour scale), for the first ``max_tokens`` answer rows."""
    from ..analysis import plotting

    plotting.plot_token_heatmaps(record, path, enc.example.image, positions=enc.rows[:max_tokens], layers=layers,
                                 shared_scale=True, max_tokens=max_tokens, ncols=4, max_side=150, dpi=60)
    return shrink_png(path)


def save_png(fig, path: str, dpi: int = 80) -> str:
    """Save a figure as a small (palette) PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, _quantized_png(buf.getvalue()))
    return path


def shrink_png(path: str, colors: int = 256) -> str:
    """Re-save a PNG with a palette of ``colors`` (a fraction of the size), atomically."""
    with open(path, "rb") as f:
        atomic_write_bytes(path, _quantized_png(f.read(), colors))
    return path


def _quantized_png(data: bytes, colors: int = 256) -> bytes:
    """PNG bytes (a figure just drawn, not a user's image) re-encoded with a palette of ``colors``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()
