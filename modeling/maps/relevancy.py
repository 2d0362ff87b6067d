"""Gradient-weighted relevancy of image pixels for a generated token (Chefer, Gur & Wolf, 2021,
"Generic attention-model explainability for interpreting bi-modal and encoder-decoder transformers").

For one generated token ``t`` (produced by query row ``p = position(t) - 1``):

1. One forward over the fed sequence (prompt + the answer up to its last token, which is never
   fed) with the fork's capture of every LLM layer (all rows, all cols, per head, float32) and
   the resampler, under autograd.
2. Backward from the target logit ``y = logits[p, id(t)]``. The gradient of ``y`` with respect
   to the attention probabilities *used in the forward* is exact and cheap: a head's output is
   ``O_h = A_h V_h``, so ``dy/dA_h = (dy/dO_h) V_h^T``; ``dy/dO_h`` is taken at the input of
   ``o_proj`` and ``V`` at ``v_proj``'s output. (The captured maps themselves are a side
   recomputation from the same q and k, so their own gradient is not ``dy/dA``.)
3. Per LLM layer ``Abar_l = mean_h clamp(dy/dA_h * A_h, min=0)``; ``R = I`` and
   ``R <- R + Abar_l @ R`` from the first layer up. Row ``p`` of ``R`` is the relevancy of
   every position for the token; this module computes only that row (from the top layer
   down, ``r <- r + r @ Abar_l``; the same product).
4. The image-token entries of that row (slice ``s`` owns positions ``token_span``; position
   ``start + j`` carries resampler query ``j``) are composed through the resampler's
   query -> patch attention (head mean; ``resampler="grad"``: the same gradient rule on the
   resampler's own attention, each query's row renormalised to 1, a query with no positive
   weight gets none) and placed onto pixels with
   :func:`attention_map.place_token_weights`, the code ``image_heatmap`` uses. A map's sum is
   the relevancy on that image's tokens.

Cost: one forward and, per target token, one backward (targets share the forward). Memory
beyond the forward/backward activations: the captured LLM maps,
``n_layers * n_heads * n^2 * 4`` bytes (n = fed positions; 28 x 28 x 1000^2 x 4 B = 3.1 GB for a
Qwen2-7B-shaped LLM at 1000 tokens; up to twice that while the forward runs, as the capture's
chunks are kept by autograd until it ends), plus per layer during the relevancy pass
``2 * n_heads * n^2 * 4`` bytes (the gradient map and its product) and the resampler maps
``slices * heads * queries * patches * 4``. The capture's memory check refuses what cannot fit
before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..attention_record import AttentionRecord, TokenLayout, layout_for_sample
from ..capture import special_token_ids
from .heatmap import place_token_weights

__all__ = ["RelevancyInputs", "RelevancyResult", "relevancy_inputs", "token_relevancy", "tokens_relevancy",
           "relevancy_maps"]

RESAMPLER_MODES = ("attention", "grad")


@dataclass
class RelevancyInputs:
    """What a relevancy pass feeds: the model's ``data`` for the fed positions (prompt + answer
    but its last token), and the layout of the whole sequence (prompt + every answer token)."""

    data: Dict[str, Any]
    layout: TokenLayout

    @property
    def n_generated(self) -> int:
        return len(self.layout.input_ids) - int(self.layout.n_prompt)


def relevancy_inputs(model, processor, image=None, prompt: Optional[str] = None, answer_ids=None,
                     record: Optional[AttentionRecord] = None, system_prompt: str = "") -> RelevancyInputs:
    """Inputs for the answer of a ``chat`` on one image, rebuilt exactly as ``chat`` built them.

    Either ``record`` (a chat record: its ChatML prompt ``meta["prompt"]`` and its answer ids are
    used, and the rebuilt prompt ids are checked against the record's), or ``prompt`` (the user's
    text, as given to ``pipeline.capture_chat``) with ``answer_ids`` (the generated token ids).
    """
    from ..modeling_minicpmv import chat_prompt

    if image is None:
        raise ValueError("relevancy needs the chat's image (image=None)")
    tok = processor.tokenizer
    if record is not None:
        lay = record.layout
        if lay is None or not lay.n_prompt or "prompt" not in record.meta:
            raise ValueError("relevancy_inputs: the record needs a layout with n_prompt and meta['prompt'] "
                             "(a record made by chat)")
        if int(lay.padding):
            raise ValueError(f"relevancy_inputs: the record has {lay.padding} padding positions (batched chat); "
                             f"use one conversation per call")
        text, images = record.meta["prompt"], [image]
        answer = list(lay.input_ids[int(lay.n_prompt):])
    else:
        if prompt is None or answer_ids is None:
            raise ValueError("relevancy_inputs: pass record=..., or prompt=... and answer_ids=...")
        text, images = chat_prompt(tok, None, [{"role": "user", "content": [image, prompt]}], system_prompt)
        answer = [int(t) for t in (answer_ids.reshape(-1).tolist() if torch.is_tensor(answer_ids) else answer_ids)]
    inputs = processor([text], [images], return_tensors="pt").to(model.device)
    ids = inputs["input_ids"][0].tolist()
    if record is not None and ids != list(record.layout.input_ids[: int(record.layout.n_prompt)]):
        raise ValueError("relevancy_inputs: the processor's prompt ids differ from the record's (another image, "
                         "processor or prompt?)")
    full = ids + answer
    layout = record.layout if record is not None else layout_for_sample(
        full, [t or "" for t in tok.convert_ids_to_tokens(full)], len(ids), 0, inputs["image_bound"][0].tolist(),
        inputs["slice_layouts"][0], special_token_ids(tok))
    fed = torch.tensor([full[:-1]], dtype=torch.long) if answer else torch.tensor([ids], dtype=torch.long)
    data = {"input_ids": fed.to(model.device), "pixel_values": inputs["pixel_values"],
            "tgt_sizes": inputs["tgt_sizes"], "image_bound": inputs["image_bound"],
            "position_ids": torch.arange(fed.shape[1], device=model.device)[None]}
    return RelevancyInputs(data=data, layout=layout)


@dataclass
class RelevancyResult:
    """Relevancy of one generated token (module doc). ``llm`` ``[n_fed]``: row ``row`` of the
    LLM relevancy ``R`` over every fed position; ``resampler`` ``[S, Q, P]``: the query -> patch
    weights used to reach the pixels (rows sum to 1 over each slice's real patches)."""

    token: int  # index among the generated tokens
    position: int  # its sequence position
    row: int  # the query row that predicted it (position - 1)
    token_id: int
    token_str: Optional[str]
    logit: float
    llm: np.ndarray
    resampler: np.ndarray
    layout: TokenLayout
    resampler_mode: str
    extra: Dict[str, Any] = field(default_factory=dict)

    def image_tokens(self, image: int = 0) -> Dict[int, float]:
        """``{position: relevancy}`` of image ``image``'s tokens."""
        return {p: float(self.llm[p]) for sl in self.layout.slices if sl.image == image
                for p in range(*(int(v) for v in sl.token_span))}

    def image_map(self, image: int = 0, out_size: Optional[Tuple[int, int]] = None, include_source: bool = True,
                  include_slices: bool = True, interpolation: str = "nearest") -> np.ndarray:
        """``[H, W]`` relevancy per pixel of original image ``image`` (``out_size`` = (width,
        height)), placed exactly like ``attention_map.image_heatmap``'s maps."""
        if not include_source and not include_slices:
            raise ValueError("include_source and include_slices are both False: nothing to draw")
        wts = np.zeros(len(self.layout.input_ids))
        wts[: len(self.llm)] = self.llm
        src, grid, _, _ = place_token_weights(self.layout, self.resampler, list(range(len(self.layout.slices))),
                                              wts, image, out_size, include_source, include_slices, interpolation)
        return np.asarray(sum(x for x in (src, grid) if x is not None), dtype=np.float32)


def _grad_attention(grad_out: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``dy/dA`` [H, q, k] from ``dy/dO`` [q, H*D] and ``V`` [k, Hk*D] (grouped heads repeated)."""
    q_len, k_len = grad_out.shape[0], v.shape[0]
    g = grad_out.float().reshape(q_len, n_heads, -1)
    vv = v.float().reshape(k_len, -1, g.shape[-1])
    vv = vv.repeat_interleave(n_heads // vv.shape[1], dim=1)
    return torch.einsum("qhd,khd->hqk", g, vv)


class _Hooks:
    """Forward hooks that keep what the gradient rule needs: each LLM layer's ``o_proj`` input
    (in the graph) and ``v_proj`` output, the resampler's value input and ``out_proj`` input (a
    leaf, so the vision tower is not differentiated)."""

    def __init__(self, model):
        self.o, self.v, self.handles = {}, {}, []
        self.res_value = self.res_o = None
        self.calls = {"llm": 0, "resampler": 0}
        for i, layer in enumerate(model.llm.model.layers):
            attn = layer.self_attn
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._keep_o(i)))
            self.handles.append(attn.v_proj.register_forward_hook(self._keep_v(i)))
        res = model.resampler.attn
        self.handles.append(res.register_forward_pre_hook(self._keep_res_value))
        self.handles.append(res.out_proj.register_forward_pre_hook(self._res_leaf))
        self.handles.append(model.llm.model.embed_tokens.register_forward_hook(self._embed_leaf))

    def _keep_o(self, i):
        def hook(module, args):
            self.o[i] = args[0]
            self.calls["llm"] += 1
        return hook

    def _keep_v(self, i):
        def hook(module, args, out):
            self.v[i] = out.detach()
        return hook

    def _keep_res_value(self, module, args):
        self.res_value = args[2].detach()
        self.calls["resampler"] += 1

    def _res_leaf(self, module, args):
        x = args[0].detach().requires_grad_(True)
        self.res_o = x
        return (x,) + tuple(args[1:])

    @staticmethod
    def _embed_leaf(module, args, out):
        return out if out.requires_grad else out.detach().requires_grad_(True)

    def remove(self):
        for h in self.handles:
            h.remove()


def tokens_relevancy(model, inputs: RelevancyInputs, tokens: Optional[Sequence[int]] = None,
                     resampler: str = "attention") -> List[RelevancyResult]:
    """Relevancy of each generated token in ``tokens`` (indices among the generated tokens,
    negative from the last; default all): one forward, one backward per token (module doc)."""
    from ..capture import CaptureSpec

    if resampler not in RESAMPLER_MODES:
        raise ValueError(f"resampler must be one of {RESAMPLER_MODES}, got {resampler!r}")
    lay = inputs.layout
    n_gen, P = inputs.n_generated, int(lay.n_prompt)
    if n_gen <= 0:
        raise ValueError("relevancy: the inputs have no generated tokens (answer_ids is empty)")
    tokens = list(range(n_gen)) if tokens is None else [int(t) for t in tokens]
    bad = [t for t in tokens if not -n_gen <= t < n_gen]
    if bad:
        raise ValueError(f"relevancy: token(s) {bad} out of range; the answer has {n_gen} tokens (0..{n_gen - 1}, "
                         f"negative from the last)")
    tokens = [t % n_gen for t in tokens]
    if not lay.slices:
        raise ValueError("relevancy: the inputs hold no image (nothing to map)")
    n = int(inputs.data["input_ids"].shape[1])
    if n != P + n_gen - 1:
        raise ValueError(f"relevancy: {n} fed positions but the layout has {P} prompt + {n_gen} answer tokens "
                         f"(expected {P + n_gen - 1})")
    spec = CaptureSpec(stages=("llm", "resampler"), rows="all", cols="all", reduce="none", dtype=torch.float32)
    hooks, was_training = _Hooks(model), model.training
    model.eval()  # no dropout: the gradients are those of the model as it answers
    try:
        with torch.enable_grad():
            out = model(inputs.data, output_attentions=spec)
    finally:
        hooks.remove()
        model.train(was_training)
    llm_maps = [a[0].detach() for a in out.attentions]  # [H, n, n] per layer
    res_maps = out.resampler_attentions.detach().float().cpu()  # [S, Hr, Q, P]
    out.attentions = out.resampler_attentions = out.captured = None  # frees the capture's own graph
    n_layers, H = len(llm_maps), llm_maps[0].shape[0]
    if hooks.calls != {"llm": n_layers, "resampler": 1} or sorted(hooks.o) != list(range(n_layers)):
        raise RuntimeError(f"relevancy: expected one pass through each of the {n_layers} LLM layers and one "
                           f"resampler call, saw {hooks.calls}")
    if hooks.res_value.shape[0] != res_maps.shape[0] or res_maps.shape[0] != len(lay.slices):
        raise RuntimeError(f"relevancy: the resampler saw {hooks.res_value.shape[0]} slices, captured "
                           f"{res_maps.shape[0]}, the layout has {len(lay.slices)}")
    for a in llm_maps:
        if tuple(a.shape) != (H, n, n):
            raise RuntimeError(f"relevancy: captured LLM map {tuple(a.shape)}, expected {(H, n, n)}")
    results = []
    for k, t in enumerate(tokens):
        pos = P + t
        row, tid = pos - 1, int(lay.input_ids[pos])
        y = out.logits[0, row, tid]
        grads = torch.autograd.grad(y, [hooks.o[i] for i in range(n_layers)] + [hooks.res_o],
                                    retain_graph=k < len(tokens) - 1, allow_unused=True)
        r = torch.zeros(n, dtype=torch.float32, device=llm_maps[0].device)
        r[row] = 1.0
        for i in reversed(range(n_layers)):  # on the maps' device; one [H, n, n] gradient map at a time
            g = grads[i]
            if g is None:
                raise RuntimeError(f"relevancy: no gradient reached LLM layer {i}'s attention output")
            a = llm_maps[i].float()
            cam = (_grad_attention(g[0].to(a.device), hooks.v[i][0].to(a.device), H) * a).clamp(min=0).mean(0)
            r = r + r @ cam
            del cam
        res = _resampler_weights(res_maps, grads[-1], hooks.res_value, model, lay, resampler)
        tok = lay.tokens[pos] if pos < len(lay.tokens) else None
        results.append(RelevancyResult(token=t, position=pos, row=row, token_id=tid, token_str=tok,
                                       logit=float(y.detach()), llm=r.double().cpu().numpy(), resampler=res,
                                       layout=lay, resampler_mode=resampler))
    return results


def _resampler_weights(A, grad_o, value, model, layout, mode) -> np.ndarray:
    """``[S, Q, P]`` query -> patch weights, each query's row summing to 1 over its slice's patches."""
    A = A.double()
    w = A.mean(1)  # [S, Q, P]
    if mode == "grad":
        if grad_o is None:
            raise RuntimeError("relevancy: no gradient reached the resampler")
        attn = model.resampler.attn
        _, _, w_v = attn.in_proj_weight.detach().chunk(3)
        _, _, b_v = attn.in_proj_bias.detach().chunk(3)
        v = torch.nn.functional.linear(value.to(w_v.dtype), w_v, b_v)  # [S, P, D]
        grad_a = torch.stack([_grad_attention(grad_o[s], v[s], attn.num_heads) for s in range(v.shape[0])])
        w = (grad_a.cpu().double() * A).clamp(min=0).mean(1)  # [S, Q, P] (small: resampler maps)
    out = torch.zeros_like(w)
    for s, sl in enumerate(layout.slices):
        h, wd = (int(v) for v in sl.tgt_size)
        part = w[s, :, : h * wd]
        out[s, :, : h * wd] = part / part.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.numpy()


def token_relevancy(model, inputs: RelevancyInputs, token: int = 0, resampler: str = "attention") -> RelevancyResult:
    """Relevancy of one generated token (``token``: index among the generated tokens, 0 = the
    first answer token, negative from the last). One forward + one backward (module doc)."""
    return tokens_relevancy(model, inputs, [token], resampler)[0]


def relevancy_maps(model, processor, image, record: Optional[AttentionRecord] = None, tokens=None, *,
                   prompt: Optional[str] = None, answer_ids=None, image_index: int = 0,
                   out_size: Optional[Tuple[int, int]] = None, resampler: str = "attention",
                   interpolation: str = "nearest") -> List[np.ndarray]:
    """``[H, W]`` relevancy maps of original image ``image_index``, one per generated token in
    ``tokens`` (default all), for the answer of a chat: pass the chat's ``record`` (with the same
    ``image``), or ``prompt`` and ``answer_ids``. One forward, one backward per token."""
    inputs = relevancy_inputs(model, processor, image, prompt, answer_ids, record)
    results = tokens_relevancy(model, inputs, tokens, resampler)
    return [r.image_map(image_index, out_size, interpolation=interpolation) for r in results]
