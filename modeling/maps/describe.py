"""Short, readable one-line descriptions of analysis results (their ``__repr__``): shapes, ranges
and the few numbers worth reading, never a whole array."""
from typing import Any

import numpy as np


def _num(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        return "nan" if np.isnan(x) else f"{float(x):.3g}"
    if isinstance(x, np.ndarray):
        return f"array{list(x.shape)} mean {np.nanmean(x):.3g}" if x.size else "array[]"
    return repr(x)


def _reduced(ids, how) -> str:
    ids = list(ids)
    if how is None:
        return f"{len(ids)} each"
    if all(isinstance(i, str) for i in ids):  # already reduced when captured (e.g. ["mean"])
        return how if ids == [how] else f"{how} of {', '.join(ids)}"
    return f"{how} of {ids if len(ids) <= 4 else len(ids)}"


def describe_heatmap(h) -> str:
    """``ImageHeatmap(position 73 'red' -> image 0 (224x112): map [112, 224] float32, ...)``."""
    m = np.asarray(h.map)
    w, hh = h.image_size
    head = f"ImageHeatmap(position {h.position}" + (f" {h.token!r}" if h.token is not None else "")
    head += f" -> image {h.image} ({w}x{hh}): map {list(m.shape)} {m.dtype}"
    if m.size and m.ndim == 2 and np.isfinite(m).any():
        y, x = np.unravel_index(int(np.nanargmax(m)), m.shape)
        head += f", sum {np.nansum(m):.3g}, peak {np.nanmax(m):.3g} at (x={x}, y={y})"
    elif m.size:
        head += f", sum {np.nansum(m):.3g}"
    shares = ", ".join(f"{k} {_num(v)}" for k, v in h.shares.items())
    return (f"{head}; image share {_num(h.image_share)}; shares: {shares}; layers: {_reduced(h.layers, h.layer_reduce)}"
            f"; heads: {_reduced(h.heads, h.head_reduce)})")


__all__ = ["describe_heatmap"]
