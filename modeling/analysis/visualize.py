"""Chat about one image and write where the attention went: PNG plots, the record and index.html.

What ``scripts/visualize_attention.py`` runs, importable for notebooks. With ``model=None``
it uses the embedded tiny demo model (seeded RANDOM weights, built locally) and, with
``image=None``, a real photo bundled with matplotlib: the maps then show the pipeline, not
meaning.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..attention_record import AttentionRecord, atomic_write_text
from ..capture import CaptureError, parse_index_list
from ..demo import demo_image_path
from ..image_processing_minicpmv import load_image
from . import pipeline
from . import plotting as pl
from .pipeline import DEFAULT_PROMPT, ToolError
from .report import render_index

__all__ = ["Visualization", "visualize"]


@dataclass
class Visualization:
    """What :func:`visualize` wrote."""

    answer: str
    out: str  # the output folder (absolute)
    plots: List[Tuple[str, str]]  # (path written, caption), in page order
    record: AttentionRecord
    is_demo: bool
    seconds: float  # from loading the model to the last file


def visualize(model: Optional[str] = None, image: Optional[str] = None, prompt: Optional[str] = None,
              max_new_tokens: int = 8, layers: Optional[str] = None, heads: Optional[str] = None,
              rows: Optional[str] = None, vision_layers: Optional[str] = "-1", max_plot_tokens: int = 16,
              out: str = "attention_out", device: Optional[str] = None, dtype: Optional[str] = "auto",
              sampling: bool = False, seed: int = 0, quiet: bool = False,
              log: Optional[Callable[..., None]] = None) -> Visualization:
    """Answer ``prompt`` about ``image`` with attention captured and write the plots, the record
    (``record.safetensors`` + ``record.json``) and ``index.html`` to ``out``.

    ``layers`` / ``heads`` (LLM) and ``vision_layers`` (SigLIP; also ``"none"``) are selections as
    on the command line (``"0,3"``, ``"2:6"``, ``"all"``); ``rows`` is ``"all"`` or
    ``"generated"`` (default: all for the demo model, generated otherwise). Bad selections, an
    unreadable image, a model that does not load or a capture that is refused raise
    :class:`~.pipeline.ToolError` (selections and the image are checked before the model loads).
    ``log`` receives progress lines (default: stderr, nothing with ``quiet``).
    """
    import torch
    from tqdm.auto import tqdm

    try:
        layer_list = parse_index_list(layers, "layers")
        head_list = parse_index_list(heads, "heads")
        no_vision = str(vision_layers).lower() == "none"
        vision_list = None if no_vision else parse_index_list(vision_layers, "vision-layers")
        image_path = image or demo_image_path()
        picture = load_image(image_path)
    except (ValueError, FileNotFoundError) as e:
        raise ToolError(str(e)) from e
    if max_new_tokens < 1:
        raise ToolError("--max-new-tokens must be at least 1")
    torch.manual_seed(seed)
    t0 = time.time()
    if log is None:
        log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    log("loading model ..." if model else "building the tiny demo model (random weights) ...")
    try:
        net, processor, is_demo = pipeline.load_model_and_processor(model, device, dtype)
    except (OSError, ValueError) as e:
        raise ToolError(str(e)) from e
    if rows is None:
        rows = "all" if is_demo else "generated"
    stages = ["llm", "resampler"]
    layer_sel = {"llm": layer_list}
    if not no_vision:
        stages.append("vision")
        layer_sel["vision"] = vision_list
    spec = {"stages": stages, "rows": rows, "dtype": "float32", "device": "cpu", "layers": layer_sel,
            "heads": {"llm": head_list} if head_list is not None else None}
    prompt = prompt or DEFAULT_PROMPT
    try:
        # the random demo model would often stop after a token or two: make it say max_new_tokens
        answer, record = pipeline.capture_chat(net, processor, picture, prompt, spec, max_new_tokens,
                                               sampling=sampling, progress=not quiet,
                                               min_new_tokens=max_new_tokens if is_demo else 0)
    except CaptureError as e:
        raise ToolError(str(e)) from e
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    record.meta.update(image=os.path.abspath(image_path), demo=is_demo)
    record.save(os.path.join(out, "record"))
    lay = record.layout
    n_gen = len(lay.input_ids) - lay.n_prompt
    gen_rows = list(range(lay.n_prompt - 1, lay.n_prompt - 1 + min(n_gen, max_plot_tokens)))
    llm_layers = record.layers("llm")
    plots = [
        ("token_heatmaps.png", "Where each generated token looked in the image (LLM attention to image tokens x "
                               "resampler attention, mean over layers and heads)",
         lambda p: pl.plot_token_heatmaps(record, p, image=picture, positions=gen_rows)),
        ("head_image_share.png", "Share of attention on image tokens per layer and head (generated rows)",
         lambda p: pl.plot_head_image_share(record, p, rows="generated")),
        ("role_shares.png", "Text vs image vs special attention share per layer (generated rows)",
         lambda p: pl.plot_role_shares(record, p, rows="generated")),
        ("resampler_queries.png", "Resampler query maps over the overview slice",
         lambda p: pl.plot_resampler_queries(record, p, image=picture, slice=0)),
    ]
    if not no_vision:
        plots.append(("vision_received.png", "SigLIP: attention each patch receives (last captured layer), "
                                              "overview and grid slices",
                      lambda p: pl.plot_vision_received(record, p, image=picture)))
    if rows == "all":
        plots.insert(2, (f"attention_matrix_layer{llm_layers[-1]}.png",
                         f"LLM attention matrix, layer {llm_layers[-1]}, mean over heads, with token roles",
                         lambda p: pl.plot_attention_matrix(record, p, layer=llm_layers[-1])))
    written = []
    for name, caption, fn in tqdm(plots, desc="plotting", disable=quiet, leave=False):
        written.append((fn(os.path.join(out, name)), caption))
    page = render_index(prompt, answer, image_path, written, is_demo, model, record)
    atomic_write_text(os.path.join(out, "index.html"), page)
    return Visualization(answer=answer, out=out, plots=written, record=record, is_demo=is_demo,
                         seconds=time.time() - t0)
