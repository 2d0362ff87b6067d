"""Heatmaps over an image that let the image show through where the map is low.

A flat-opacity overlay (every pixel tinted at 0.6) hides the object under the heat. Here each pixel's
opacity follows the map instead: ``alpha = a_max * clip((value - lo) / (vmax - lo), 0, 1)``, so a
pixel where the map is at its low end (``lo``, 0 for attention) keeps the image's own colour
exactly, and the tint grows to ``a_max`` where the map peaks. The viewer (``viewer_page/viewer.js``)
draws its overlay by the same rule, with its opacity control as ``a_max``.

:func:`heat_alpha` gives the opacities, :func:`overlay_rgb` the composited RGB image (what the PNG
plots draw) and :func:`draw_heat` draws either that or, without an image, the map in plain colours
on a matplotlib axis and returns what its colour bar reads.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["heat_alpha", "overlay_rgb", "draw_heat"]


def heat_alpha(heat, vmax: float, a_max: float, lo: float = 0.0) -> np.ndarray:
    """Per-pixel opacity of ``heat`` (any shape): ``a_max`` times its value scaled to 0..1 between
    ``lo`` and ``vmax`` (clipped); 0 where the value is at or below ``lo``."""
    if not 0.0 <= float(a_max) <= 1.0:
        raise ValueError(f"alpha: expected an opacity from 0 to 1, found {a_max}")
    h = np.asarray(heat, dtype=np.float64)
    span = float(vmax) - float(lo)
    if not np.isfinite(span) or span <= 0:
        return np.zeros(h.shape)
    return float(a_max) * np.clip((np.nan_to_num(h, nan=lo) - lo) / span, 0.0, 1.0)


def _nearest(a: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """``a`` [h, w] resized to ``shape`` by nearest neighbour (each output pixel takes the cell its
    centre falls in, as ``imshow(..., interpolation="nearest")`` over the same extent)."""
    if a.shape == tuple(shape):
        return a
    ry = np.minimum((np.arange(shape[0]) + 0.5) * a.shape[0] / shape[0], a.shape[0] - 1).astype(int)
    rx = np.minimum((np.arange(shape[1]) + 0.5) * a.shape[1] / shape[1], a.shape[1] - 1).astype(int)
    return a[ry][:, rx]


def overlay_rgb(image, heat, vmax: float, a_max: float, cmap: str = "inferno", lo: float = 0.0) -> np.ndarray:
    """``image`` (RGB uint8 [H, W, 3]) with ``heat`` ([h, w], resized to H x W by nearest neighbour)
    blended in by :func:`heat_alpha`: uint8 [H, W, 3]. Where the map is at ``lo`` the pixels are
    the image's, unchanged."""
    from matplotlib import colormaps

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image: expected RGB uint8 [H, W, 3], found {img.dtype} {list(img.shape)}")
    h = np.asarray(heat, dtype=np.float64)
    if h.ndim != 2:
        raise ValueError(f"heat: expected a 2-D map, found shape {list(h.shape)}")
    h = _nearest(h, img.shape[:2])
    alpha = heat_alpha(h, vmax, a_max, lo)[..., None]
    span = float(vmax) - float(lo)
    norm = np.clip((h - lo) / span, 0.0, 1.0) if np.isfinite(span) and span > 0 else np.zeros(h.shape)
    colour = colormaps[cmap](norm)[..., :3] * 255.0
    out = img.astype(np.float64) * (1.0 - alpha) + colour * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_heat(ax, image: Optional[np.ndarray], heat, vmax: float, a_max: float, cmap: str, extent):
    """Draw ``heat`` on the matplotlib axis ``ax`` over ``image`` (RGB uint8 or None) within
    ``extent``: with an image, :func:`overlay_rgb` (the image shows through where the map is 0);
    without, the map in opaque colours. Returns the colour bar's mappable (0 .. ``vmax``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    vmax = float(vmax) if float(vmax) > 0 else 1.0
    if image is None:
        return ax.imshow(heat, extent=extent, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    shown = ax.imshow(overlay_rgb(image, heat, vmax, a_max, cmap), extent=extent, interpolation="nearest")
    shown.set_clim(0.0, vmax)  # unused for RGB; says which heat scale the panel was blended with
    return ScalarMappable(norm=Normalize(0.0, vmax), cmap=cmap)
