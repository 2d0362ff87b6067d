"""One example through the model: the answer-row capture, the LM + attention loss, and
answer-row attention records (for plots and as teacher records)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..attention_record import AttentionRecord, records_from_capture
from ..capture import CaptureSpec
from .data import Encoded
from .losses import LossConfig, box_column_weights, box_loss, teacher_loss
from .model import base_model


def capture_spec(enc: Encoded, cfg: LossConfig, with_resampler: bool) -> CaptureSpec:
    """The answer rows of ``cfg.layers``, head mean, all key columns (+ the resampler)."""
    return CaptureSpec(stages=("llm", "resampler") if with_resampler else ("llm",), layers=cfg.layers,
                       rows=enc.rows, cols="all", reduce="mean", dtype=torch.float32)


def model_inputs(model, enc: Encoded) -> Dict[str, Any]:
    """The example's ``data`` on the model's device."""
    device = next(base_model(model).parameters()).device
    data = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.data.items()}
    data["pixel_values"] = [[p.to(device) for p in ps] for ps in enc.data["pixel_values"]]
    return data


def example_forward(model, enc: Encoded, cfg: LossConfig, teacher: Optional[Tuple[torch.Tensor, Any]] = None,
                    keep_output: bool = False) -> Dict[str, Any]:
    """Forward one example (LM loss + the selected capture).

    Returns tensors: ``loss`` (LM + weight * attention loss), ``lm``, ``attn`` (None without
    an attention loss) and ``share`` (detached attention-to-box share; None without a box);
    ``output`` (the model output) with ``keep_output``.
    """
    wants_box = enc.box_frac is not None  # the share is reported whatever the loss
    wants_attn = wants_box or (cfg.attn_loss == "teacher" and teacher is not None)
    data = model_inputs(model, enc)
    device = data["input_ids"].device
    spec = capture_spec(enc, cfg, wants_box) if wants_attn else None
    out = model(data, attention_mask=enc.attention_mask.to(device), labels=enc.labels.to(device),
                output_attentions=spec, use_cache=False)
    lm = out.loss.float()
    res = {"lm": lm, "attn": None, "share": None}
    if wants_attn:
        attn = torch.stack([a[0, 0].float() for a in out.attentions])  # [n_layers, R, L]
        if wants_box:
            w = box_column_weights(enc, out.resampler_attentions, attn.shape[-1])
            kl, share = box_loss(attn, w, cfg.eps)
            res["share"] = share.detach()
            if cfg.attn_loss == "box":
                res["attn"] = kl
        if cfg.attn_loss == "teacher" and teacher is not None:
            res["attn"] = teacher_loss(attn, teacher[0], teacher[1], cfg.eps)
    res["loss"] = lm + (cfg.attn_weight * res["attn"] if res["attn"] is not None else 0.0)
    if keep_output:
        res["output"] = out
    return res


def example_record(model, enc: Encoded, layers: Optional[Sequence[int]], tokenizer=None,
                   meta: Optional[dict] = None) -> AttentionRecord:
    """One no-grad forward capturing the answer rows (head mean, llm + resampler) as a record."""
    was = model.training
    model.eval()
    cfg = LossConfig(layers=list(layers) if layers is not None else None)
    try:
        with torch.no_grad():
            data = model_inputs(model, enc)
            out = model(data, attention_mask=enc.attention_mask.to(data["input_ids"].device),
                        output_attentions=capture_spec(enc, cfg, True), use_cache=False)
    finally:
        model.train(was)
    ids = enc.data["input_ids"]
    recs = records_from_capture(out.captured, out.capture_index, prompt_ids=ids[:, :enc.n_prompt],
                                new_ids=ids[:, enc.n_prompt:], image_bound=enc.data["image_bound"],
                                tgt_sizes=enc.data["tgt_sizes"], slice_layouts=enc.slice_layouts, tokenizer=tokenizer,
                                meta=dict(meta or {}, id=enc.example.id, prompt=enc.example.prompt,
                                          answer=enc.example.answer, rows="answer rows"))
    rec = recs[0]
    rec.layout = enc.layout  # answer tokens included, none marked as padding
    return rec


def write_teacher_records(model, encoded: Sequence[Encoded], layers: Optional[Sequence[int]], out_dir: str,
                          tokenizer=None) -> List[str]:
    """Save each example's answer-row attention as ``<out_dir>/<id>`` records (for ``attn_loss="teacher"``)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for enc in encoded:
        rec = example_record(model, enc, layers, tokenizer, meta={"role": "teacher"})
        paths.append(rec.save(os.path.join(out_dir, enc.example.id))[1])
    return paths
