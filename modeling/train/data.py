"""Fine-tuning data: the JSONL data set, the built-in examples, and examples -> model inputs.

A JSONL file, one example per line::

    {"image": "photo.jpg", "prompt": "Where is the face?", "answer": "Here.", "box": [170, 130, 370, 340]}

``image`` (path, relative to the JSONL file's folder), ``prompt`` and ``answer`` are
required; ``box`` (x0, y0, x1, y1 in original-image pixels) and ``id`` (names the
teacher record) are optional. The image goes before the prompt unless the prompt
places it with the ``(<image>./</image>)`` tag. Bad lines are reported with their line
number and skipped.

Training sequence: the chat prompt (user turn, assistant header) then the answer and
``<|im_end|>``; the LM loss covers the answer tokens only. The *answer rows* are the
LLM positions that predict them (the last prompt position up to the second-to-last
answer token). For an example with a box, :class:`Encoded` also holds each slice
patch's overlap with the box and the LLM positions of each slice's image tokens (what
the box loss needs).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..analysis import attention_map as am
from ..attention_record import TokenLayout, atomic_write_text, layout_for_sample
from ..capture import special_token_ids
from ..image_processing_minicpmv import to_rgb

IMAGE_TAG = "(<image>./</image>)"

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
# the data set
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
    from ..demo import demo_image_path

    image = demo_image_path()
    return [Example(id=f"demo{i}", image=image, prompt=p, answer=a, box=FACE_BOX) for i, (p, a) in enumerate(DEMO_QA)]


def write_jsonl(examples: Sequence[Example], path: str) -> str:
    """Write examples as a JSONL data set (atomically)."""
    lines = [json.dumps({k: v for k, v in (("id", e.id), ("image", e.image), ("prompt", e.prompt),
                                           ("answer", e.answer), ("box", list(e.box) if e.box else None))
                         if v is not None}) for e in examples]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# examples -> model inputs
# --------------------------------------------------------------------------------------
def load_rgb(path: str):
    """A user's image file as an RGB PIL image, loaded as the other tools load images
    (``pipeline.open_image``: a bounded regular file, never a FIFO or a device, then ``to_rgb``)."""
    from ..analysis.pipeline import open_image

    return to_rgb(open_image(path))


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
    from ..modeling_minicpmv import chat_prompt

    tok = processor.tokenizer
    image = load_rgb(example.image) if image is None else image
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
    special = special_token_ids(tok)
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
                images[ex.image] = load_rgb(ex.image)
            out.append(encode_example(processor, ex, images[ex.image], max_length))
        except (OSError, ValueError) as e:
            report(f"{where} ({ex.image}): {e}; skipped")
    if not out:
        raise DataError("no example could be encoded")
    return out


def pick_example(encoded: Sequence[Encoded], example_id: Optional[str] = None) -> Encoded:
    """The example with id ``example_id``, or the first with a box (else the first)."""
    if example_id is not None:
        for e in encoded:
            if e.example.id == str(example_id):
                return e
        raise ValueError(f"no example with id {example_id!r}; ids: {[e.example.id for e in encoded][:10]}")
    return next((e for e in encoded if e.box_frac is not None), encoded[0])
