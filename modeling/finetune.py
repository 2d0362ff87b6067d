"""Fine-tuning with attention losses: data, examples, losses, and a resumable training loop.

What ``scripts/finetune_attention.py`` runs, importable for notebooks and tests.

Data: a JSONL file, one example per line::

    {"image": "photo.jpg", "prompt": "Where is the face?", "answer": "Here.", "box": [170, 130, 370, 340]}

``image`` (path, relative to the JSONL file's folder), ``prompt`` and ``answer`` are
required; ``box`` (x0, y0, x1, y1 in original-image pixels) and ``id`` (names the
teacher record) are optional. The image goes before the prompt unless the prompt
places it with the ``(<image>./</image>)`` tag. Bad lines are reported with their line
number and skipped.

Training sequence: the chat prompt (user turn, assistant header) then the answer and
``<|im_end|>``; the LM loss covers the answer tokens only. The *answer rows* are the
LLM positions that predict them (the last prompt position up to the second-to-last
answer token), captured in the chosen layers with ``rows=[answer rows]``,
``reduce="mean"`` (head mean), stages ``llm`` (+ ``resampler`` when the example has a box).

Attention losses (``attn_loss``):

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
  ``.safetensors``, as :func:`write_teacher_records` writes them). Per-head teacher
  maps are head-averaged; a teacher holding a subset of key columns compares the
  student on those columns (both renormalised).

Checkpoints (``out`` folder): ``checkpoint-<step>/`` with ``state.json`` (step,
settings), ``adapter/`` (peft LoRA, loadable with ``PeftModel.from_pretrained``) or
``model/`` (a full checkpoint folder), ``optimizer.pt``, ``rng.pt`` and
``metrics.jsonl``; each is written into a temporary folder and renamed into place,
then ``latest`` (a one-line file) is replaced to point at it. ``metrics.jsonl`` in
``out`` is the live log. Resuming restores weights, optimizer, RNG and the data order
(a function of the seed and the step), so a resumed run continues the same run.

peft, tqdm and matplotlib are imported only where used.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .analysis import attention_map as am
from .attention_record import (AttentionRecord, TokenLayout, atomic_write_bytes, atomic_write_text, layout_for_sample,
                               records_from_capture)
from .capture import CaptureSpec

ATTN_LOSSES = ("none", "box", "teacher")
IMAGE_TAG = "(<image>./</image>)"
STATE_FORMAT = "minicpmv-attn.finetune/1"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# The built-in data set: questions about regions of the demo photo (Grace Hopper,
# 512 x 600); boxes are (x0, y0, x1, y1) in its pixels.
FACE_BOX = (170.0, 130.0, 370.0, 340.0)
DEMO_QA = [
    ("Where is the face?", "The face is in the middle."),
    ("Look at her face. What do you see?", "Glasses and a smile."),
    ("Describe the face.", "An old face with glasses."),
    ("What is she wearing on her eyes?", "Round glasses."),
    ("Who is in the photo?", "A woman in uniform."),
    ("Is she smiling?", "Yes, a little."),
]


class DataError(ValueError):
    """A data set that cannot be used (no valid examples, missing teacher records, ...)."""


@dataclass
class Example:
    """One training example as read from the data set."""

    id: str
    image: str
    prompt: str
    answer: str
    box: Optional[Tuple[float, float, float, float]] = None
    line: int = 0  # 1-based line in the JSONL file (0: built in)


@dataclass
class Encoded:
    """An example turned into model inputs, with what the losses need."""

    example: Example
    data: Dict[str, Any]  # the model's ``data`` (input_ids [1, L], pixel_values, tgt_sizes, image_bound)
    attention_mask: torch.Tensor  # [1, L]
    labels: torch.Tensor  # [1, L]; -100 outside the answer
    rows: List[int]  # answer rows: positions predicting the answer tokens
    n_prompt: int
    layout: TokenLayout
    slice_layouts: Any  # the processor's slice layouts of this sample
    box_frac: Optional[torch.Tensor] = None  # [S, P] overlap of each slice patch with the box
    box_cols: Optional[torch.Tensor] = None  # [S, Q] LLM positions of each slice's image tokens


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def _check_box(box, where: str) -> Tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: 'box' must be [x0, y0, x1, y1] (4 finite numbers, pixels), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: 'box' {box!r} is empty (need x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def parse_example(obj: Any, line: int, base_dir: str) -> Example:
    """Validate one JSONL object; raises ValueError naming the line and the problem."""
    where = f"line {line}"
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("image", "prompt", "answer"):
        if key not in obj:
            raise ValueError(f"{where}: missing field {key!r} (need image, prompt, answer; optional box, id)")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    image = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(base_dir, obj["image"])
    if not os.path.isfile(image):
        raise ValueError(f"{where}: image file not found: {image}")
    box = _check_box(obj["box"], where) if obj.get("box") is not None else None
    if obj["prompt"].count(IMAGE_TAG) > 1:
        raise ValueError(f"{where}: the prompt has more than one {IMAGE_TAG} tag; one image per example")
    ex_id = obj.get("id", f"line{line:05d}")
    if not isinstance(ex_id, (str, int)) or not re.fullmatch(r"[\w.\-]+", str(ex_id)):
        raise ValueError(f"{where}: 'id' must be a string of letters, digits, '_', '-', '.', got {ex_id!r}")
    return Example(id=str(ex_id), image=image, prompt=obj["prompt"], answer=obj["answer"], box=box, line=line)


def read_jsonl(path: str, report: Callable[[str], None] = print) -> List[Example]:
    """Read a JSONL data set; bad lines are reported (with their number) and skipped."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    examples, seen = [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                report(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno}); skipped")
                continue
            try:
                ex = parse_example(obj, n, base)
            except ValueError as e:
                report(f"{path}: {e}; skipped")
                continue
            if ex.id in seen:
                report(f"{path}: line {n}: duplicate id {ex.id!r}; skipped")
                continue
            seen.add(ex.id)
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no valid examples")
    return examples


def builtin_examples() -> List[Example]:
    """The default data set: questions about the demo photo, the box around the face."""
    from .demo import demo_image_path

    image = demo_image_path()
    return [Example(id=f"demo{i}", image=image, prompt=p, answer=a, box=FACE_BOX) for i, (p, a) in enumerate(DEMO_QA)]


def write_jsonl(examples: Sequence[Example], path: str) -> str:
    """Write examples as a JSONL data set (atomically)."""
    lines = [json.dumps({k: v for k, v in (("id", e.id), ("image", e.image), ("prompt", e.prompt),
                                           ("answer", e.answer), ("box", list(e.box) if e.box else None))
                         if v is not None}) for e in examples]
    write_text(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# examples -> model inputs
# --------------------------------------------------------------------------------------
def _load_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def patch_box_overlap(sl, box: Sequence[float]) -> np.ndarray:
    """[h*w] fraction of each patch's pixel box (row-major) that lies inside ``box``."""
    pb = am.patch_boxes(sl).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in box)
    ix = np.clip(np.minimum(pb[:, 2], x1) - np.maximum(pb[:, 0], x0), 0.0, None)
    iy = np.clip(np.minimum(pb[:, 3], y1) - np.maximum(pb[:, 1], y0), 0.0, None)
    area = (pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1])
    return ix * iy / np.where(area > 0, area, 1.0)


def encode_example(processor, example: Example, image=None, max_length: Optional[int] = None) -> Encoded:
    """Prompt (chat template) + answer + ``<|im_end|>`` -> model inputs, labels, rows, layout."""
    from .modeling_minicpmv import chat_prompt

    tok = processor.tokenizer
    image = _load_rgb(example.image) if image is None else image
    msgs = [{"role": "user", "content": example.prompt}]
    if IMAGE_TAG in example.prompt:
        text, _ = chat_prompt(tok, None, msgs)
    else:
        text, _ = chat_prompt(tok, image, msgs)
    inputs = processor([text], [[image]], return_tensors="pt", max_length=max_length)
    prompt_ids = inputs["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tok.encode(example.answer, add_special_tokens=False) + [int(end)]
    n_prompt = prompt_ids.shape[1]
    if max_length is not None and n_prompt + len(answer_ids) > max_length:
        raise ValueError(f"prompt ({n_prompt} tokens) + answer ({len(answer_ids)}) exceed max_length={max_length}")
    ids = torch.cat([prompt_ids, torch.tensor([answer_ids], dtype=prompt_ids.dtype)], 1)
    L = ids.shape[1]
    labels = torch.full_like(ids, -100)
    labels[0, n_prompt:] = ids[0, n_prompt:]
    mask = torch.ones_like(ids)
    data = {"input_ids": ids, "pixel_values": inputs["pixel_values"], "tgt_sizes": inputs["tgt_sizes"],
            "image_bound": inputs["image_bound"], "position_ids": torch.arange(L)[None]}
    special = set(getattr(tok, "all_special_ids", []) or [])
    layout = layout_for_sample(ids[0].tolist(), tok.convert_ids_to_tokens(ids[0].tolist()), n_prompt, 0,
                               inputs["image_bound"][0].tolist(), inputs["slice_layouts"][0], special)
    enc = Encoded(example=example, data=data, attention_mask=mask, labels=labels,
                  rows=list(range(n_prompt - 1, L - 1)), n_prompt=n_prompt, layout=layout,
                  slice_layouts=inputs["slice_layouts"])
    if example.box is not None:
        W, H = image.size
        x0, y0, x1, y1 = example.box
        if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
            raise ValueError(f"box {example.box} lies outside the {W} x {H} image")
        slices = layout.slices
        P = max(int(s.tgt_size[0]) * int(s.tgt_size[1]) for s in slices)
        frac = torch.zeros(len(slices), P)
        cols = []
        for g, sl in enumerate(slices):
            f = patch_box_overlap(sl, example.box)
            frac[g, : f.size] = torch.from_numpy(f).float()
            cols.append(torch.arange(int(sl.token_span[0]), int(sl.token_span[1])))
        enc.box_frac, enc.box_cols = frac, torch.stack(cols)
    return enc


def encode_examples(processor, examples: Sequence[Example], max_length: Optional[int] = None,
                    report: Callable[[str], None] = print) -> List[Encoded]:
    """Encode all examples; ones that fail are reported (with their line) and skipped."""
    images, out = {}, []
    for ex in examples:
        where = f"line {ex.line}" if ex.line else f"example {ex.id}"
        try:
            if ex.image not in images:
                images[ex.image] = _load_rgb(ex.image)
            out.append(encode_example(processor, ex, images[ex.image], max_length))
        except (OSError, ValueError) as e:
            report(f"{where} ({ex.image}): {e}; skipped")
    if not out:
        raise DataError("no example could be encoded")
    return out


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------
def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``KL(p || q)`` over the last axis (``p`` a target distribution, ``q`` attention), per row."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q + eps)).sum(-1)


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


def teacher_maps(record: AttentionRecord, layers: Sequence[int], rows: Sequence[int], length: int,
                 input_ids: Optional[Sequence[int]] = None, where: str = "teacher") -> Tuple[torch.Tensor, Optional[List[int]]]:
    """Teacher attention ``[n_layers, R, C]`` for the student's rows (head-averaged), and its
    key columns (None = all ``length`` positions)."""
    if input_ids is not None and record.layout is not None and list(record.layout.input_ids) != list(input_ids):
        raise DataError(f"{where}: the record's tokens differ from the example's; teacher records must be made "
                        f"from the same image, prompt and answer with the same processor")
    maps, cols_all = [], None
    for l in layers:
        name = f"llm.layers.{l}.attn"
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


# --------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------
def parse_layers(text: Optional[str], n_layers: int) -> List[int]:
    """``"2:4"`` (Python slice), ``"1,3"``, ``"-1"``, ``"all"``/None -> sorted layer ids."""
    if text is None or str(text).strip().lower() in ("", "all", ":"):
        return list(range(n_layers))
    text = str(text).strip()
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                out += list(range(n_layers))[slice(int(a) if a.strip() else None, int(b) if b.strip() else None)]
            else:
                i = int(part)
                if not -n_layers <= i < n_layers:
                    raise ValueError(f"layer {i} is out of range (the LLM has layers 0..{n_layers - 1})")
                out.append(i % n_layers)
        except ValueError as e:
            if "out of range" in str(e):
                raise
            raise ValueError(f"layers {text!r}: expected 'a:b', 'i,j', 'i' or 'all'") from None
    if not out:
        raise ValueError(f"layers {text!r} selects no layer (the LLM has layers 0..{n_layers - 1})")
    return sorted(set(out))


def load_model(model_path: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None):
    """(model, processor, folder): a checkpoint folder or hub id; None builds the demo checkpoint
    (``pipeline.load_model_and_processor``). ``folder`` is where processor files come from."""
    from .demo import default_demo_folder
    from .analysis.pipeline import load_model_and_processor

    model, processor, is_demo = load_model_and_processor(model_path, device=device, dtype=dtype)
    return model, processor, (default_demo_folder() if is_demo else model_path)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing of the LLM and vision layers."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def add_lora(model, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = LORA_TARGETS):
    """Wrap ``model`` with peft LoRA adapters on the LLM's attention projections only."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft: pip install peft (or pip install minicpmv-attn[peft])") from None
    pattern = r"llm\.model\.layers\.\d+\.self_attn\.(" + "|".join(re.escape(t) for t in targets) + r")"
    config = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=pattern,
                        bias="none")
    import warnings

    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def base_model(model):
    """The MiniCPMV under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# --------------------------------------------------------------------------------------
# one example: forward and losses
# --------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    attn_loss: str = "none"  # none | box | teacher
    attn_weight: float = 1.0
    layers: Optional[List[int]] = None  # LLM layers (None: all)
    eps: float = 1e-6

    def __post_init__(self):
        if self.attn_loss not in ATTN_LOSSES:
            raise ValueError(f"attn_loss {self.attn_loss!r}: valid are {list(ATTN_LOSSES)}")


def capture_spec(enc: Encoded, cfg: LossConfig, with_resampler: bool) -> CaptureSpec:
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


def pick_example(encoded: Sequence[Encoded], example_id: Optional[str] = None) -> Encoded:
    """The example with id ``example_id``, or the first with a box (else the first)."""
    if example_id is not None:
        for e in encoded:
            if e.example.id == str(example_id):
                return e
        raise ValueError(f"no example with id {example_id!r}; ids: {[e.example.id for e in encoded][:10]}")
    return next((e for e in encoded if e.box_frac is not None), encoded[0])


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


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64),
                        "gauss": py[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_processor_files(src: str, dst: str) -> None:
    """Copy the tokenizer / processor files of a checkpoint folder (so ``model/`` loads on its own)."""
    if not src or not os.path.isdir(src):
        return
    for name in os.listdir(src):
        if name.endswith((".json", ".txt", ".model", ".py", ".tiktoken")) and name not in (
                "config.json", "model.safetensors.index.json", "generation_config.json") and not name.startswith("."):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(dst, name)):
                shutil.copy(path, os.path.join(dst, name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


write_text = atomic_write_text  # temporary file + rename, usual permissions


class _quiet_transformers:
    """Silence transformers' progress bars while saving (they would cut through ours)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def save_checkpoint(out_dir: str, step: int, model, optimizer, settings: Dict[str, Any], metrics_path: str,
                    source_folder: Optional[str] = None, keep: int = 2) -> str:
    """Write ``<out_dir>/checkpoint-<step>`` through a temporary folder + rename, then ``latest``."""
    os.makedirs(out_dir, exist_ok=True)
    if source_folder is None:
        source_folder = getattr(base_model(model).config, "_name_or_path", None)
    final = os.path.join(out_dir, checkpoint_name(step))
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-checkpoint-")
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _quiet_transformers():
            if is_peft(model):
                model.save_pretrained(os.path.join(tmp, "adapter"))
            else:
                model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
                _copy_processor_files(source_folder, os.path.join(tmp, "model"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
        if os.path.isfile(metrics_path):
            shutil.copy(metrics_path, os.path.join(tmp, "metrics.jsonl"))
        state = {"format": STATE_FORMAT, "step": int(step), "settings": settings, "time": time.time(),
                 "weights": "adapter" if is_peft(model) else "model"}
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
        if os.path.isdir(final):  # re-saving a step: move the old one aside first
            old = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-old-")
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(os.path.join(out_dir, "latest"), checkpoint_name(step) + "\n")
    if keep and keep > 0:
        for old_step, path in list_checkpoints(out_dir)[:-keep]:
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints (those with state.json) of a run folder, by step."""
    found = []
    if not os.path.isdir(out_dir):
        return found
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            cand = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {path} (expected checkpoint-*/state.json)")
    return found[-1][1]


def read_state(path: str) -> Dict[str, Any]:
    """A checkpoint's ``state.json`` (step, settings, weights kind)."""
    file = os.path.join(path, "state.json")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{file}: not a fine-tuning checkpoint state (format {STATE_FORMAT!r})")
    return state


def load_checkpoint(path: str, model, optimizer=None) -> Dict[str, Any]:
    """Restore weights (adapter or model), optimizer and RNG; returns the state (step, settings)."""
    from safetensors.torch import load_file

    state = read_state(path)
    if state["weights"] == "adapter":
        if not is_peft(model):
            raise ValueError(f"{path} holds LoRA adapters; resume with the same --lora settings")
        from peft import set_peft_model_state_dict

        weights = load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"{path}: adapter weights do not fit the model: {unexpected[:5]}")
    else:
        if is_peft(model):
            raise ValueError(f"{path} holds full model weights, not LoRA adapters; resume without --lora")
        folder = os.path.join(path, "model")
        weights = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(folder, name)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
            raise ValueError(f"{path}: model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                             weights_only=True))
    _set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=True))
    return state


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 30
    lr: float = 1e-3
    batch_size: int = 1  # examples per optimizer step (gradient accumulation)
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: int = 0
    save_every: int = 10  # 0: only at the end
    keep: int = 2  # checkpoints kept in the out folder
    out: Optional[str] = None
    progress: bool = True


@dataclass
class TrainResult:
    step: int
    metrics: List[Dict[str, Any]] = field(default_factory=list)  # one per step run in this call
    before: Optional[Dict[str, float]] = None
    after: Optional[Dict[str, float]] = None
    checkpoint: Optional[str] = None


def batch_order(n: int, step: int, batch_size: int, seed: int) -> List[int]:
    """Example indices of one step: epochs of seeded permutations (a function of the step only)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


def evaluate(model, encoded: Sequence[Encoded], loss_cfg: LossConfig, teachers=None) -> Dict[str, float]:
    """Mean LM loss, attention loss and attention-to-box share over the examples (eval mode, no grad)."""
    was = model.training
    model.eval()
    sums: Dict[str, List[float]] = {"lm": [], "attn": [], "share": []}
    try:
        with torch.no_grad():
            for enc in encoded:
                r = example_forward(model, enc, loss_cfg, (teachers or {}).get(enc.example.id))
                for k in sums:
                    if r[k] is not None:
                        sums[k].append(float(r[k]))
    finally:
        model.train(was)
    return {k: (sum(v) / len(v) if v else None) for k, v in sums.items()}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step and not (rec.get("eval") == "after" and rec.get("step", 0) >= step):
                keep.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(keep))


def train(model, encoded: Sequence[Encoded], loss_cfg: LossConfig, cfg: TrainConfig, teachers=None,
          resume: Optional[str] = None, settings: Optional[Dict[str, Any]] = None,
          source_folder: Optional[str] = None, report: Callable[[str], None] = print,
          run_eval: bool = True) -> TrainResult:
    """Train ``model`` (its trainable parameters) for ``cfg.steps`` optimizer steps in total.

    ``resume``: a checkpoint folder or run folder to continue from (weights, optimizer,
    RNG, step). Checkpoints and ``metrics.jsonl`` go to ``cfg.out`` when set.
    """
    if not encoded:
        raise DataError("no examples to train on")
    if loss_cfg.attn_loss == "box" and not any(e.box_frac is not None for e in encoded):
        raise DataError("attn_loss='box' needs examples with a 'box'; none has one")
    if loss_cfg.attn_loss == "teacher" and not teachers:
        raise DataError("attn_loss='teacher' needs teacher records (--teacher DIR)")
    settings = dict(settings or {})
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    metrics_path = os.path.join(cfg.out, "metrics.jsonl") if cfg.out else None
    if resume:
        ckpt = find_checkpoint(resume)
        state = load_checkpoint(ckpt, model, optimizer)
        start = int(state["step"])
        report(f"resumed from {ckpt} at step {start}")
        if metrics_path:
            saved = os.path.join(ckpt, "metrics.jsonl")
            if os.path.isfile(saved) and os.path.abspath(saved) != os.path.abspath(metrics_path):
                os.makedirs(cfg.out, exist_ok=True)
                shutil.copy(saved, metrics_path)
            _truncate_metrics(metrics_path, start)
    elif metrics_path:
        os.makedirs(cfg.out, exist_ok=True)
        write_text(metrics_path, "")
        for name in os.listdir(cfg.out):  # leftovers of an interrupted save
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)

    def log(rec: Dict[str, Any]):
        if metrics_path:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    result = TrainResult(step=start)
    if run_eval and start < cfg.steps:
        result.before = evaluate(model, encoded, loss_cfg, teachers)
        log(dict(eval="before", step=start, resumed=bool(resume), **result.before))
        report(f"step {start}: lm {_fmt(result.before['lm'])}  attn {_fmt(result.before['attn'])}  "
               f"box share {_fmt(result.before['share'])}")
    model.train()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True, file=sys.stderr)
    step = start
    try:
        for step in range(start, cfg.steps):
            t0 = time.time()
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            idx = batch_order(len(encoded), step, cfg.batch_size, cfg.seed)
            parts: Dict[str, List[float]] = {"loss": [], "lm": [], "attn": [], "share": []}
            for i in idx:
                enc = encoded[i]
                r = example_forward(model, enc, loss_cfg, (teachers or {}).get(enc.example.id))
                if not torch.isfinite(r["loss"]):
                    raise FloatingPointError(f"step {step + 1}: loss is {float(r['loss'])} on example {enc.example.id}")
                (r["loss"] / len(idx)).backward()
                for k in parts:
                    if r[k] is not None:
                        parts[k].append(float(r[k].detach()))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            optimizer.step()
            rec = {"step": step + 1, "loss": _mean(parts["loss"]), "lm_loss": _mean(parts["lm"]),
                   "attn_loss": _mean(parts["attn"]), "share": _mean(parts["share"]), "lr": lr,
                   "grad_norm": float(grad_norm), "examples": [encoded[i].example.id for i in idx],
                   "seconds": round(time.time() - t0, 3)}
            result.metrics.append(rec)
            log(rec)
            result.step = step + 1
            if bar is not None:
                post = {"lm": _fmt(rec["lm_loss"]), "attn": _fmt(rec["attn_loss"])}
                if rec["share"] is not None:
                    post["share"] = f"{rec['share']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            last = step + 1 == cfg.steps
            if cfg.out and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                result.checkpoint = save_checkpoint(cfg.out, step + 1, model, optimizer,
                                                    dict(settings, train=asdict(cfg), loss=asdict(loss_cfg)),
                                                    metrics_path, source_folder, cfg.keep)
    finally:
        if bar is not None:
            bar.close()
    if run_eval and result.metrics:
        result.after = evaluate(model, encoded, loss_cfg, teachers)
        log(dict(eval="after", step=result.step, **result.after))
        report(f"step {result.step}: lm {_fmt(result.after['lm'])}  attn {_fmt(result.after['attn'])}  "
               f"box share {_fmt(result.after['share'])}")
        if cfg.out and result.checkpoint:  # the final checkpoint's log includes the evaluation
            shutil.copy(metrics_path, os.path.join(result.checkpoint, ".metrics.tmp"))
            os.replace(os.path.join(result.checkpoint, ".metrics.tmp"), os.path.join(result.checkpoint, "metrics.jsonl"))
    return result


def _mean(v: List[float]) -> Optional[float]:
    return sum(v) / len(v) if v else None


# --------------------------------------------------------------------------------------
# before / after pictures
# --------------------------------------------------------------------------------------
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
        image = _load_rgb(image)
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


def save_png(fig, path: str, dpi: int = 80) -> str:
    """Save a figure as a small (palette) PNG, atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, _quantized_png(buf.getvalue()))
    return path


def plot_token_grid(record: AttentionRecord, enc: Encoded, path: str, layers: Optional[Sequence[int]] = None,
                    max_tokens: int = 8) -> str:
    """Per answer token heatmaps (``plotting.plot_token_heatmaps``: one panel per answer row,
    shared colour scale), for the first ``max_tokens`` answer rows."""
    from .analysis import plotting

    plotting.plot_token_heatmaps(record, path, enc.example.image, positions=enc.rows[:max_tokens], layers=layers,
                                 shared_scale=True, max_tokens=max_tokens, ncols=4, max_side=150, dpi=60)
    return shrink_png(path)


def _quantized_png(data: bytes, colors: int = 256) -> bytes:
    """PNG bytes re-encoded with a palette of ``colors`` (a fraction of the size)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def shrink_png(path: str, colors: int = 256) -> str:
    """Re-save a PNG with a palette of ``colors`` (a fraction of the size), atomically."""
    with open(path, "rb") as f:
        atomic_write_bytes(path, _quantized_png(f.read(), colors))
    return path
