"""Attention losses of fine-tuning (``LossConfig.attn_loss``) and the teacher maps they read.

The answer rows (:mod:`.data`) are captured in the chosen LLM layers with
``rows=[answer rows]``, ``reduce="mean"`` (head mean), stages ``llm`` (+ ``resampler``
when the example has a box); see :mod:`.forward`.

* ``"box"``: each image-token column ``c`` gets the in-box weight
  ``w[c] = sum_p R[c, p] * overlap(p, box)``: the share of its resampler query's
  (head-mean) attention that falls on patches inside the box, a patch's pixel box
  being its cell of the slice's box (fractional overlap). The target ``t = w / sum(w)``
  is the same for every answer row; the loss is ``KL(t || a)`` with ``a`` the row's
  captured attention (``log(a + eps)``), averaged over rows and layers. ``w`` is
  computed from the current resampler attention without gradient (a target).
  The reported *attention-to-box share* is ``sum_c a[c] * w[c]`` (row mean): the
  attention mass reaching the box through the resampler, which equals the mass of
  ``attention_map.image_heatmap`` inside the box.
* ``"teacher"``: ``KL(teacher || student)`` over the same rows and layers, the teacher
  maps read from :class:`AttentionRecord` files (``<teacher dir>/<id>.json`` +
  ``.safetensors``, as :func:`.forward.write_teacher_records` writes them). Per-head
  teacher maps are head-averaged; a teacher holding a subset of key columns compares the
  student on those columns (both renormalised).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..attention_record import AttentionRecord
from ..capture import hook_name
from .data import DataError, Encoded

ATTN_LOSSES = ("none", "box", "teacher")


@dataclass
class LossConfig:
    attn_loss: str = "none"  # none | box | teacher
    attn_weight: float = 1.0
    layers: Optional[List[int]] = None  # LLM layers (None: all)
    eps: float = 1e-6

    def __post_init__(self):
        if self.attn_loss not in ATTN_LOSSES:
            raise ValueError(f"attn_loss {self.attn_loss!r}: valid are {list(ATTN_LOSSES)}")


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``KL(p || q)`` over the last axis (``p`` a target distribution, ``q`` attention), per row."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q + eps)).sum(-1)


# --------------------------------------------------------------------------------------
# box grounding
# --------------------------------------------------------------------------------------
def box_column_weights(enc: Encoded, resampler: torch.Tensor, length: int) -> torch.Tensor:
    """[L] in-box weight of each LLM column (0 for non-image columns), from the resampler
    attention ``[S, H', Q, P]`` (heads averaged here if kept), without gradient."""
    res = resampler.detach().float()
    res = res.mean(1) if res.shape[1] > 1 else res[:, 0]  # [S, Q, P]
    frac = enc.box_frac.to(res.device)
    P = min(res.shape[-1], frac.shape[-1])
    w_tok = (res[..., :P] * frac[:, None, :P]).sum(-1)  # [S, Q]
    Q = enc.box_cols.shape[1]
    w = torch.zeros(length, device=res.device)
    w[enc.box_cols.to(res.device).flatten()] = w_tok[:, :Q].flatten()
    return w


def box_loss(attn: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(KL(t || a) mean, attention-to-box share mean)``; ``attn`` [..., R, L], ``w`` [L]."""
    t = w / w.sum().clamp_min(1e-12)
    kl = kl_divergence(t.expand_as(attn), attn, eps)
    share = (attn * w).sum(-1)
    return kl.mean(), share.mean()


# --------------------------------------------------------------------------------------
# teacher distillation
# --------------------------------------------------------------------------------------
def teacher_maps(record: AttentionRecord, layers: Sequence[int], rows: Sequence[int], length: int,
                 input_ids: Optional[Sequence[int]] = None, where: str = "teacher") -> Tuple[torch.Tensor, Optional[List[int]]]:
    """Teacher attention ``[n_layers, R, C]`` for the student's rows (head-averaged), and its
    key columns (None = all ``length`` positions)."""
    if input_ids is not None and record.layout is not None and list(record.layout.input_ids) != list(input_ids):
        raise DataError(f"{where}: the record's tokens differ from the example's; teacher records must be made "
                        f"from the same image, prompt and answer with the same processor")
    maps, cols_all = [], None
    for l in layers:
        name = hook_name("llm", l)
        if name not in record.tensors:
            raise DataError(f"{where}: no {name}; the record has {record.names('llm')}; capture the same layers")
        t = record.tensors[name].detach().float()
        if t.dim() == 4:  # a batch record
            t = t[0]
        info = record.index.get(name, {})
        reduce = info.get("reduce") or "none"
        if reduce == "max":
            raise DataError(f"{where}: {name} was reduced with 'max' over heads; not a distribution")
        t = t.mean(0)  # [R_t, C_t]
        have = info.get("rows")
        have = list(range(t.shape[0])) if have is None else [int(r) for r in have]
        missing = [r for r in rows if r not in have]
        if missing:
            raise DataError(f"{where}: {name} lacks query rows {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                            f"(has {len(have)} rows); capture rows = the answer rows")
        t = t[[have.index(r) for r in rows]]
        cols = info.get("cols")
        if cols is None:
            if t.shape[-1] < length:
                raise DataError(f"{where}: {name} has {t.shape[-1]} key columns, the example {length}")
            t = t[:, :length]
        else:
            cols = [int(c) for c in cols]
            if cols_all is not None and cols != cols_all:
                raise DataError(f"{where}: layers hold different key columns")
        cols_all = cols
        mass = t.sum(-1)
        if not bool((mass > 1e-6).all()):  # a row with no mass is no distribution: KL 0 would teach nothing
            r = rows[int(torch.nonzero(mass <= 1e-6)[0])]
            raise DataError(f"{where}: {name} has no attention mass on row {r}" + (" over its key columns" if cols
                            is not None else "") + "; teacher rows must be attention distributions")
        maps.append(t)
    return torch.stack(maps), cols_all


def teacher_loss(attn: torch.Tensor, teacher: torch.Tensor, cols: Optional[List[int]] = None,
                 eps: float = 1e-6) -> torch.Tensor:
    """``KL(teacher || student)`` averaged over layers and rows; ``attn`` [n_l, R, L]."""
    teacher = teacher.to(attn.device, attn.dtype)
    if cols is not None:
        attn = attn[..., cols]
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
        teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(1e-12)
    return kl_divergence(teacher, attn, eps).mean()


def load_teachers(teacher_dir: str, encoded: Sequence[Encoded], layers: Sequence[int]):
    """{example id: (maps [n_l, R, C], cols)} from ``<teacher_dir>/<id>.json``; names what is missing."""
    if not os.path.isdir(teacher_dir):
        raise DataError(f"teacher folder not found: {teacher_dir}")
    missing = [e.example.id for e in encoded if not os.path.isfile(os.path.join(teacher_dir, e.example.id + ".json"))]
    if missing:
        raise DataError(f"teacher records missing for {len(missing)} example(s): "
                        + ", ".join(os.path.join(teacher_dir, m + ".json") for m in missing[:5])
                        + (" ..." if len(missing) > 5 else ""))
    out = {}
    for e in encoded:
        path = os.path.join(teacher_dir, e.example.id)
        try:
            rec = AttentionRecord.load(path)
        except (OSError, ValueError) as err:
            raise DataError(f"teacher record {path}: {err}") from None
        out[e.example.id] = teacher_maps(rec, layers, e.rows, e.data["input_ids"].shape[1],
                                         e.data["input_ids"][0].tolist(), where=f"teacher record {path}")
    return out
