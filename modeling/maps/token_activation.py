"""Token Activation Map (TAM): where on the image a generated token's *class* is activated.

Written from the description in Li, Wang, Ding, Wang & Li, "Token Activation Map to Visually
Explain Multimodal LLMs" (ICCV 2025, arXiv 2506.23270); the steps are theirs, the details marked
(ours) are this fork's choices where the description leaves them open.

For generated token ``t`` (class ``c = id(t)``, at sequence position ``p``):

1. **Class activation through the LM head.** Every position's final hidden state ``h_i`` (after the
   LLM's last norm) is projected on the LM head's row of class ``c``: ``a_c[i] = W_c . h_i (+ b_c)``:
   the logit of ``c`` *as if* position ``i`` predicted it. Over the image tokens this is the token's
   raw activation map, min-max normalised over the image tokens (ours) to ``A_c`` in [0, 1].
2. **Estimated causal inference (interference removal).** Earlier context tokens (the prompt's text
   tokens and the answer tokens before ``t``: ``context_positions``) have their own maps ``A_j``
   (their own classes, same projection); where the current class is also active at a context
   position, that token's evidence leaks into ``A_c``. The interference map is the weighted mean
   ``I = sum_j w_j A_j`` with ``w_j`` the current class's activation at context position ``j``,
   as a softmax over the context (ours: logits' offsets cancel, weights sum to 1); its share in ``A_c`` is estimated by
   least squares, ``s = max(0, <A_c, I> / <I, I>)``, and removed: ``E = relu(A_c - s I)``.
3. **Rank Gaussian filter** (denoising): every cell of the map is replaced by a Gaussian-weighted
   mean of the *sorted* values of its ``size x size`` window, the weights a Gaussian over the rank
   centred on the median rank (``sigma = size * size / 4`` ranks by default, ours), so an isolated
   spike (a rank extreme) is dropped while a plateau keeps its level. Here the image tokens are
   resampler queries, not a grid, so ``E`` is first carried onto each slice's patch grid through the
   resampler's query -> patch attention (as ``attention_map.image_heatmap`` does), filtered there,
   then placed on the original image's pixels (``attention_map.place_patch_map``).

Cost: one forward over the fed sequence (prompt + answer but its last token), no gradient; the
final hidden states are taken with a hook on the LLM's last norm and checked against the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["TokenActivation", "rank_gaussian_filter", "estimated_causal_map", "token_activation",
           "place_activation", "final_hidden_states", "token_activation_map", "token_activation_maps", "TAM_KIND"]

TAM_KIND = "token activation"  # the map kind's name (pointing game, viewer)


def rank_gaussian_filter(m, size: int = 3, sigma: Optional[float] = None) -> np.ndarray:
    """Rank Gaussian filter over the last two axes of ``m`` (module doc, step 3); edges replicated."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim < 2 or size < 1 or size % 2 == 0:
        raise ValueError(f"rank_gaussian_filter: needs a [..., h, w] map and an odd size >= 1, got shape {m.shape} "
                         f"and size {size}")
    if size == 1:
        return m.copy()
    r, n = size // 2, size * size
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(r, r), (r, r)], mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(pad, (size, size), axis=(-2, -1))
    ranked = np.sort(win.reshape(win.shape[:-2] + (n,)), axis=-1)
    s = n / 4.0 if sigma is None else float(sigma)
    if s <= 0:
        raise ValueError(f"rank_gaussian_filter: sigma must be > 0, got {sigma}")
    w = np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2.0) / s) ** 2)
    return ranked @ (w / w.sum())


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def estimated_causal_map(acts: np.ndarray, n_context: int) -> Tuple[np.ndarray, dict]:
    """Steps 1-2 on a class-activation table ``acts`` ``[1 + C, V + C]`` (``C = n_context``): row 0
    the current token's class, row ``1 + j`` context token ``j``'s own class; columns ``0..V-1`` the
    image tokens, ``V + j`` context position ``j``.

    Returns ``(E [V], info)``; ``info`` holds ``raw`` (``A_c``), ``interference`` (``I``),
    ``weights`` (``w``) and ``scale`` (``s``).
    """
    acts = np.asarray(acts, dtype=np.float64)
    C = int(n_context)
    if acts.ndim != 2 or acts.shape[0] != 1 + C or acts.shape[1] <= C:
        raise ValueError(f"estimated_causal_map: expected acts [1 + C, V + C] with C = {C} context tokens, "
                         f"got shape {acts.shape}")
    V = acts.shape[1] - C
    raw = _minmax(acts[0, :V])
    info: Dict[str, object] = {"raw": raw, "interference": np.zeros(V), "weights": np.zeros(C), "scale": 0.0}
    if C == 0:
        return raw, info
    z = acts[0, V:] - acts[0, V:].max()
    w = np.exp(z) / np.exp(z).sum()
    maps = np.stack([_minmax(acts[1 + j, :V]) for j in range(C)])
    interference = (w[:, None] * maps).sum(0)
    denom = float(interference @ interference)
    scale = max(0.0, float(raw @ interference) / denom) if denom > 0 else 0.0
    return np.maximum(raw - scale * interference, 0.0), dict(info, interference=interference, weights=w, scale=scale)


@dataclass
class TokenActivation:
    """TAM of one generated token before placement: ``activation`` ``[V]`` (after interference
    removal) over ``image_positions``; ``raw``, ``interference``, ``weights``, ``scale`` from step 2."""

    token: int
    position: int
    token_id: int
    image_positions: List[int]
    context_positions: List[int]
    activation: np.ndarray
    raw: np.ndarray
    interference: np.ndarray
    weights: np.ndarray
    scale: float


def token_activation(hidden: torch.Tensor, lm_weight: torch.Tensor, layout, token: int = 0,
                     lm_bias: Optional[torch.Tensor] = None) -> TokenActivation:
    """Steps 1-2 for generated token ``token`` (index among the generated tokens, negative from
    the last) from the final hidden states ``hidden`` ``[n_fed, D]`` of the fed sequence and the LM
    head ``lm_weight`` ``[vocab, D]``; ``layout``: the record's ``TokenLayout``."""
    P = int(layout.n_prompt)
    n_gen = len(layout.input_ids) - P
    if n_gen <= 0 or not -n_gen <= token < n_gen:
        raise ValueError(f"token_activation: token {token} out of range; the answer has {n_gen} tokens")
    t = token % n_gen
    pos = P + t
    n_fed = int(hidden.shape[0])
    if n_fed < pos:
        raise ValueError(f"token_activation: {n_fed} hidden states, but token {t} sits at position {pos} (needs the "
                         f"rows up to {pos - 1})")
    image_pos = [p for p, r in enumerate(layout.roles[:pos]) if r == "image"]
    if not image_pos:
        raise ValueError("token_activation: the sequence holds no image tokens before the token (nothing to map)")
    context = [p for p, r in enumerate(layout.roles[:pos]) if r == "text"]
    ids = [int(layout.input_ids[pos])] + [int(layout.input_ids[p]) for p in context]
    cols = image_pos + context
    with torch.no_grad():
        h = hidden[cols].float()
        W = lm_weight[ids].float().to(h.device)
        acts = W @ h.T  # [1 + C, V + C]
        if lm_bias is not None:
            acts = acts + lm_bias[ids].float().to(h.device)[:, None]
    E, info = estimated_causal_map(acts.cpu().numpy(), len(context))
    return TokenActivation(token=t, position=pos, token_id=ids[0], image_positions=image_pos,
                           context_positions=context, activation=E, raw=info["raw"],
                           interference=info["interference"], weights=info["weights"], scale=float(info["scale"]))


def place_activation(record, ta: TokenActivation, image: int = 0, out_size: Optional[Tuple[int, int]] = None,
                     size: int = 3, sigma: Optional[float] = None) -> np.ndarray:
    """Step 3: ``[H, W]`` map of ``ta`` over original image ``image``: each slice's image tokens
    carried onto its patch grid through the resampler's query -> patch attention (head mean),
    rank-Gaussian filtered there, placed on the pixels; the slices' maps added."""
    from .heatmap import resampler_query_maps
    from .image_geometry import place_patch_map

    layout = record.layout
    images = {im.index: im for im in layout.images}
    if image not in images:
        raise ValueError(f"layout has no image {image}; images: {sorted(images)}")
    W, H = (int(v) for v in images[image].size)
    weight = dict(zip(ta.image_positions, ta.activation))
    total = None
    for sl in layout.slices:
        if sl.image != image:
            continue
        start, end = (int(v) for v in sl.token_span)
        w_tok = np.array([weight.get(p, 0.0) for p in range(start, end)])
        q = resampler_query_maps(record, image, sl.index)  # [Q, h, w]
        if q.shape[0] < end - start:
            raise ValueError(f"the resampler map holds {q.shape[0]} queries; slice {sl.index} has {end - start} tokens")
        patch = np.tensordot(w_tok, q[: end - start].astype(np.float64), axes=1)
        part = place_patch_map(rank_gaussian_filter(patch, size, sigma), sl.box, (W, H), out_size)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"the layout has no slice of image {image}")
    return np.asarray(total, dtype=np.float32)


def final_hidden_states(model, data: Dict[str, object]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [n, D], logits [n, V])`` of one sequence: one forward, the LLM's last norm's output
    kept by a hook and checked to give the model's logits through the LM head."""
    llm = model.llm
    kept: List[torch.Tensor] = []
    handle = llm.model.norm.register_forward_hook(lambda mod, args, out: kept.append(out.detach()))
    try:
        with torch.no_grad():
            logits = model(data).logits[0]
    finally:
        handle.remove()
    if len(kept) != 1:
        raise RuntimeError(f"token activation: expected one pass through the LLM's last norm, saw {len(kept)}")
    hidden = kept[0][0]
    head = model.get_output_embeddings()
    with torch.no_grad():
        again = head(hidden[-1:])
    if not torch.allclose(again.float(), logits[-1:].float(), rtol=1e-3, atol=1e-3):
        raise RuntimeError("token activation: the LM head applied to the last norm's output does not give the model's "
                           "logits (the LLM's output path changed?)")
    return hidden, logits


def token_activation_maps(model, processor, image, record, tokens: Optional[Sequence[int]] = None,
                          image_index: int = 0, out_size: Optional[Tuple[int, int]] = None, size: int = 3,
                          sigma: Optional[float] = None) -> List[np.ndarray]:
    """``[H, W]`` Token Activation Maps of the generated tokens ``tokens`` (default all) of a chat
    ``record`` (with the resampler stage captured) on its ``image`` (module doc): one forward for all,
    no gradient."""
    from .relevancy import relevancy_inputs

    inputs = relevancy_inputs(model, processor, image, record=record)
    hidden, _ = final_hidden_states(model, inputs.data)
    head = model.get_output_embeddings()
    n_gen = inputs.n_generated
    tokens = list(range(n_gen)) if tokens is None else list(tokens)
    return [place_activation(record, token_activation(hidden, head.weight, record.layout, t,
                                                      getattr(head, "bias", None)), image_index, out_size, size, sigma)
            for t in tokens]


def token_activation_map(model, processor, image, record, token: int = 0, image_index: int = 0,
                         out_size: Optional[Tuple[int, int]] = None, size: int = 3,
                         sigma: Optional[float] = None) -> np.ndarray:
    """``[H, W]`` Token Activation Map of generated token ``token`` (0 = the first answer token,
    negative from the last) of a chat ``record``; see :func:`token_activation_maps`."""
    return token_activation_maps(model, processor, image, record, [token], image_index, out_size, size, sigma)[0]
