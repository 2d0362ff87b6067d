"""The pointing game's baselines: what a map scores without following the question.

Every pointing-game run scores these on the same scenes as the model's maps, so a map kind's
hit rate can be read against the best of them, not only against a uniform chance:

* **random object** (``random_object_rate``): the expected hit rate of pointing at one of the
  scene's objects picked at random (``1 / n_objects`` per scene; boxes never overlap);
* **saliency** (``saliency_map``): a model-free map of colourfulness and contrast (chroma plus a
  quarter of the colour distance to the image's median colour, box-blurred over 9 x 9 px so the peak
  is the centre of the most salient blob, not the centroid of scattered maximal pixels);
* **before question** (``before_question_row``): the model's own map of the row that closes the
  image block (``</image>``, or ``</slice>`` on a sliced image), which has seen the whole image
  and none of the question: where the model looks without being asked;
* **centre** (``centre_map``): a centre prior (the map's peak is the image centre).

On the *single* task (one coloured object among gray ones) saliency alone finds the target; on
the *binding* task (every object coloured) a map has to follow the question to beat these.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

BLUR = 4  # box-blur radius of the saliency map, in pixels (window 2 * BLUR + 1)
CONTRAST_WEIGHT = 0.25
IMAGE_END_TOKENS = ("</image>", "</slice>")


def box_blur(m: np.ndarray, radius: int) -> np.ndarray:
    """Mean over the ``(2r+1) x (2r+1)`` window around each pixel (the window cut at the border)."""
    m = np.asarray(m, dtype=np.float64)
    if radius <= 0:
        return m.copy()
    H, W = m.shape
    c = np.zeros((H + 1, W + 1))
    c[1:, 1:] = m.cumsum(0).cumsum(1)
    ys, xs = np.arange(H), np.arange(W)
    y0, y1 = np.clip(ys - radius, 0, H), np.clip(ys + radius + 1, 0, H)
    x0, x1 = np.clip(xs - radius, 0, W), np.clip(xs + radius + 1, 0, W)
    total = c[y1][:, x1] - c[y0][:, x1] - c[y1][:, x0] + c[y0][:, x0]
    return total / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


def saliency_map(image, blur: int = BLUR) -> np.ndarray:
    """``[H, W]`` model-free saliency of an RGB image: chroma (max - min channel) plus
    ``CONTRAST_WEIGHT`` x the distance to the image's median colour, box-blurred (module doc)."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"saliency_map: expected an RGB image [H, W, 3], got shape {a.shape}")
    chroma = a.max(2) - a.min(2)
    contrast = np.linalg.norm(a - np.median(a.reshape(-1, 3), axis=0), axis=2)
    return box_blur(chroma + CONTRAST_WEIGHT * contrast, blur)


def centre_map(width: int, height: int) -> np.ndarray:
    """``[H, W]`` centre prior: minus the distance of each pixel centre to the image centre."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return -np.hypot(xs - width / 2.0, ys - height / 2.0)


def random_object_rate(n_objects: int) -> float:
    """Expected hit rate of pointing at one of ``n_objects`` non-overlapping objects at random."""
    if n_objects < 1:
        raise ValueError(f"a scene needs at least one object, got {n_objects}")
    return 1.0 / n_objects


def before_question_row(tokens: Sequence[str], n_prompt: int) -> int:
    """Position of the last image-block end marker (``</image>`` / ``</slice>``) in the prompt: the
    row that has read the whole image and none of the question."""
    ends = [i for i, t in enumerate(tokens[:n_prompt]) if t in IMAGE_END_TOKENS]
    if not ends:
        raise ValueError(f"the prompt has no {' or '.join(IMAGE_END_TOKENS)} token: no image block to end")
    return ends[-1]
