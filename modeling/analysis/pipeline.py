"""Shared plumbing of the command-line tools: load a model + processor, run one capture.

Kept out of the CLI files so notebooks and other scripts can reuse it.
"""
import os
from typing import Any, Dict, Optional, Tuple

from ..capture import resolve_dtype

DEFAULT_PROMPT = "Describe this image."


class ToolError(Exception):
    """A problem the command-line tools report as ``error: <message>`` with exit status 2."""


def load_model_and_processor(model: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                             attn_implementation: str = "sdpa") -> Tuple[Any, Any, bool]:
    """(model, processor, is_demo). ``model`` None -> the embedded tiny demo (built locally, no download)."""
    from transformers import AutoProcessor

    from ..demo import build_demo_checkpoint, default_demo_folder
    from ..modeling_minicpmv import MiniCPMV
    from ..processing_minicpmv import register_processing

    register_processing()
    is_demo = model is None
    if is_demo:
        model = build_demo_checkpoint(default_demo_folder())
    elif not os.path.isdir(model) and os.path.exists(model):
        raise FileNotFoundError(f"--model {model}: is a file, expected a checkpoint folder or a hub id")
    kwargs = {"attn_implementation": attn_implementation}
    if resolve_dtype(dtype, "--dtype") is not None:
        kwargs["dtype"] = resolve_dtype(dtype, "--dtype")
    net = MiniCPMV.from_pretrained(model, **kwargs).eval()
    if device:
        net = net.to(device)
    processor = AutoProcessor.from_pretrained(model)
    net.processor = processor
    return net, processor, is_demo


class TokenProgress:
    """A transformers streamer that advances a tqdm bar per generated token."""

    def __init__(self, total: int, desc: str = "generating", disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=disable, leave=False)
        self.first = True

    def put(self, value):
        if self.first:  # the prompt (or nothing, with inputs_embeds) comes first
            self.first = False
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def capture_chat(model, processor, image, prompt: str, spec: Dict[str, Any], max_new_tokens: int = 8,
                 sampling: bool = False, progress: bool = True, min_new_tokens: int = 0):
    """Run ``chat`` on one image + prompt with ``spec``; returns (answer, AttentionRecord)."""
    msgs = [{"role": "user", "content": [image, prompt]}]
    streamer = TokenProgress(max_new_tokens, disable=not progress)
    try:
        answers, records = model.chat(None, [msgs], processor.tokenizer, processor=processor,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      sampling=sampling, num_beams=1,
                                      output_attentions=spec, streamer=streamer)
    finally:
        streamer.end()
    return answers[0], records[0]
