"""The model being fine-tuned: loading, the LLM layer selection, activation checkpointing and
peft LoRA adapters (peft is imported only where used)."""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

import transformers

from ..modeling_qwen2 import _release

#: transformers 5.23 added ``activation_checkpointing_enable`` and deprecated
#: ``gradient_checkpointing_enable`` (it warns, to be removed in v6): the name to call.
ACTIVATION_CHECKPOINTING_API = _release(transformers.__version__) >= (5, 23)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_layers(text: Optional[str], n_layers: int) -> List[int]:
    """``"2:4"`` (Python slice), ``"1,3"``, ``"-1"``, ``"all"``/None -> sorted layer ids.

    Not ``capture.parse_index_list``: slices here may be open (``"-2:"``), negative ids
    count from the end, ids are range-checked against ``n_layers``, and the result is
    sorted without repeats.
    """
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


def load_model(model_path: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
               progress: bool = True):
    """(model, processor, folder): a checkpoint folder or hub id; None builds the demo checkpoint
    (``pipeline.load_model_and_processor``). ``folder`` is where processor files come from; ``progress=False``
    hides transformers' loading bar."""
    from ..analysis.pipeline import load_model_and_processor
    from ..demo import default_demo_folder

    model, processor, is_demo = load_model_and_processor(model_path, device=device, dtype=dtype, progress=progress)
    return model, processor, (default_demo_folder() if is_demo else model_path)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing of the LLM and vision layers."""
    kwargs = {"use_reentrant": False}
    if ACTIVATION_CHECKPOINTING_API:
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
