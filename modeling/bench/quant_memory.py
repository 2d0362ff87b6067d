"""Estimated GPU memory of a one-image chat per checkpoint format (bf16, bitsandbytes int8 / nf4).

Nothing is loaded or run: the model is built on the meta device from a config (MiniCPM-V-2.6's
real numbers by default), its parameters are counted per format, and the capture's own
estimate (:func:`minicpmv_attn.capture.estimate_bytes`) sizes the captured maps. Counted:
weights (quantised ``nn.Linear`` weights at their packed size plus their statistics, the rest
in bf16), the KV cache, and the capture (stored maps plus the recompute workspace). Not
counted: the CUDA context and activations (about 1 GiB on top, more for many slices).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..capture import CaptureSpec, estimate_bytes
from ..checkpoint import _kept_float

#: openbmb/MiniCPM-V-2_6-int4's llm_int8_skip_modules (the resampler's kv_proj and
#: attn.out_proj and the LM head stay bf16)
UPSTREAM_SKIP = ["out_proj", "kv_proj", "lm_head"]
FORMATS = ("bf16", "int8", "nf4")
GPU_SIZES_GIB = (8, 12, 16, 24, 40, 48, 80)


@dataclass
class ChatShape:
    """One image's slices and the prompt / answer lengths of the chat."""

    name: str
    n_slices: int  # source image + grid slices
    patches: int  # patches of the largest slice (32 x 32 at 448 px)
    prompt_len: int
    new_tokens: int


SHAPES = (ChatShape("448x448 image (1 slice)", 1, 1024, 100, 128),
          ChatShape("1344x1344 image (source + 3x3 slices)", 10, 1024, 720, 128))
SPECS = {"no capture": None,
         "capture: generated rows, head mean": CaptureSpec(rows="generated", reduce="mean"),
         "capture: everything": CaptureSpec()}


def weight_bytes(model: torch.nn.Module, fmt: str, skip: List[str] = UPSTREAM_SKIP,
                 blocksize: int = 64) -> int:
    """Bytes of ``model``'s weights in ``fmt``: ``bf16`` (2 bytes each), ``int8`` (bitsandbytes:
    1 byte + a float32 scale per output row) or ``nf4`` (bitsandbytes, double quantisation:
    half a byte + a uint8 absmax per block + float32 second-level statistics per 256 blocks)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    total = 0
    quantised = set()
    if fmt != "bf16":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not _kept_float(name, skip):
                n, rows = module.weight.numel(), module.weight.shape[0]
                quantised.add(id(module.weight))
                if fmt == "int8":
                    total += n + 4 * rows
                else:
                    blocks = -(-n // blocksize)
                    total += (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 * (16 + 256)
    total += sum(2 * p.numel() for p in model.parameters() if id(p) not in quantised)
    return total


def kv_cache_bytes(config, tokens: int) -> int:
    """bf16 keys and values of every LLM layer for ``tokens`` positions."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 2


def memory_table(config_path: str, shapes=SHAPES, specs: Optional[Dict[str, Optional[CaptureSpec]]] = None
                 ) -> List[Dict[str, object]]:
    """One row per (format, chat shape, capture spec): bytes of weights, KV cache, capture and total."""
    from ..configuration_minicpm import MiniCPMVConfig
    from ..modeling_minicpmv import MiniCPMV

    config = MiniCPMVConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = MiniCPMV(config)
    dims = model.capture_dims()
    weights = {fmt: weight_bytes(model, fmt) for fmt in FORMATS}
    rows = []
    for fmt in FORMATS:
        for shape in shapes:
            for label, spec in (specs or SPECS).items():
                capture = 0
                if spec is not None:
                    est = estimate_bytes(spec, dims, 1, shape.prompt_len, shape.new_tokens, shape.n_slices,
                                         shape.patches, shape.n_slices * config.query_num,
                                         compute_dtype=torch.bfloat16, device="cuda")
                    capture = sum(est.values())
                kv = kv_cache_bytes(config, shape.prompt_len + shape.new_tokens)
                total = weights[fmt] + kv + capture
                rows.append({"format": fmt, "chat": shape.name, "capture": label, "weights": weights[fmt],
                             "kv_cache": kv, "capture_bytes": capture, "total": total,
                             "gpu": smallest_gpu(total)})
    return rows


def smallest_gpu(total: int, overhead: int = 2 ** 30) -> str:
    """The smallest common GPU size holding ``total`` bytes plus ``overhead`` (context,
    activations) with 10% to spare."""
    need = (total + overhead) * 1.1 / 2 ** 30
    for size in GPU_SIZES_GIB:
        if need <= size:
            return f"{size} GB"
    return f"> {GPU_SIZES_GIB[-1]} GB"


def format_table(rows: List[Dict[str, object]]) -> str:
    """A Markdown table of :func:`memory_table`'s rows (GiB, estimated)."""
    gib = lambda b: f"{b / 2 ** 30:.2f}"  # noqa: E731
    lines = ["| checkpoint | chat | capture | weights GiB | KV cache GiB | capture GiB | total GiB (est.) "
             "| GPU (est.) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['chat']} | {r['capture']} | {gib(r['weights'])} | {gib(r['kv_cache'])} | "
                     f"{gib(r['capture_bytes'])} | {gib(r['total'])} | {r['gpu']} |")
    return "\n".join(lines)
