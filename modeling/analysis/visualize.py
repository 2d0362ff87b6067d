"""Chat about one image and write where the attention went: PNG plots, the record and index.html.

What ``scripts/visualize_attention.py`` runs, importable for notebooks. With ``model=None``
it uses the shipped tiny demo model *trained* on coloured-shape scenes (``demo.trained_demo_folder``)
and, with ``image=None`` and ``prompt=None``, a generated scene of the task it was trained on and its
question (``demo.scenes.default_scene(seed, demo.trained_demo_task())``), whose right answer and target
object are known: the page shows the answer, and (``question_steer``) the answer row's map beside the
map of the row before the question with that scene's pointing game, so a newcomer sees the question
steer the attention. ``model="random-demo"`` is the seeded random-weight
model (its maps show the pipeline, not meaning; with ``image=None``, a photo bundled with matplotlib).

Budget (what bounds memory and time beyond the model and its capture, which the capture
checks itself, see ``CaptureTooLarge``): the image is decoded once at full size (at most
``load_image``'s pixel limit) and refused before the model loads when preparing it would
take more than ``IMAGE_BUDGET_BYTES`` (2 GiB; about 12 bytes per pixel for 8-bit RGB, so every
RGB image the loader accepts, 16 for RGBA, 32 for 16-bit images); an image so narrow or wide
that one slice would get more than ``MAX_SLICE_PATCHES_FACTOR`` (4) times the patches of a
square image is refused before the capture runs; the plots draw downsampled copies only (see ``plotting``: at most 1024 px
drawn per image, every PNG at most 4096 px a side and 8 Mpx); ``index.html`` is the interactive viewer (``viewer``: at
most 16 MiB of embedded map data, one self-contained file).

The defaults of the main command (model, image, prompt, token counts, selections, output folder) are kept in one place,
``DEFAULTS``; the command line reads them from there.
"""
import io
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..attention_record import AttentionRecord, atomic_write_bytes, atomic_write_text
from ..capture import CaptureError, parse_index_list
from ..demo import demo_image_path, trained_demo_folder, trained_demo_task
from ..demo.scenes import default_scene
from ..image_processing_minicpmv import DEFAULT_MAX_IMAGE_PIXELS
from . import pipeline
from . import plotting as pl
from .devices import pick as pick_device_dtype
from .pipeline import DEFAULT_PROMPT, ToolError
from .report import render_index
from .viewer import BUDGET as VIEWER_BUDGET
from .viewer import build_viewer

__all__ = ["BUDGET", "DEFAULTS", "IMAGE_BUDGET_BYTES", "RESERVED_MARKERS", "Visualization", "check_prompt",
           "image_cost_bytes", "visualize"]

# the main command's defaults, in one place (the command line shows and uses these): model None = the shipped
# trained demo model (RANDOM_DEMO: the seeded random one), image None = a generated scene for the trained demo (the
# bundled photo otherwise), prompt None = the scene's question (pipeline.DEFAULT_PROMPT otherwise), rows None = all
# for the demo models and generated otherwise, vision_layers None = all for the demo models (the viewer's "through
# SigLIP" maps need every layer) and the last one otherwise
# seed 1: the default scene's typical case (the answer row's map on the target, the row before the question's
# elsewhere: rates 0.63 vs 0.22 over 60 scenes); at seed 0 the row before the question lands on the target too
DEFAULTS = {"model": None, "image": None, "prompt": None, "max_new_tokens": 8, "layers": None, "heads": None,
            "rows": None, "vision_layers": None, "max_plot_tokens": 16, "out": "attention_out", "device": "auto",
            "dtype": None, "seed": 1}

RANDOM_DEMO = "random-demo"  # --model value for the seeded random-weight demo

IMAGE_BUDGET_BYTES = 2 * 2**30
# peak bytes per pixel of preparing an image and chatting about it (decoded image, the copies chat
# and the processor make, RGB conversion, 16-bit scaling), measured on the main command with margin
# (RGB 11, RGBA 11.5, L 5, P 6, I;16 27); other modes count as 16
BYTES_PER_PIXEL = {"1": 8, "L": 8, "P": 8, "RGB": 12, "YCbCr": 12, "LA": 16, "PA": 16, "RGBA": 16, "RGBX": 16,
                   "RGBa": 16, "CMYK": 16, "I;16": 32, "I;16L": 32, "I;16B": 32, "I;16N": 32, "I": 40, "F": 40}
MAX_SLICE_PATCHES_FACTOR = 4
# markers the processor reserves for image placeholders: typed by the user they break the prompt
RESERVED_MARKERS = ("<image>", "</image>", "<slice>", "</slice>")
BUDGET = (f"Budget: the image is decoded at full size (at most {DEFAULT_MAX_IMAGE_PIXELS:,} pixels) and refused "
          f"before the model loads if preparing it needs more than {IMAGE_BUDGET_BYTES / 2**30:g} GiB (about 12 bytes "
          f"per pixel for 8-bit RGB, 32 for 16-bit); an image so narrow or wide that a slice would get more than "
          f"{MAX_SLICE_PATCHES_FACTOR}x the patches of a square image is refused; " + pl.BUDGET + "; "
          + VIEWER_BUDGET + ".")


def image_cost_bytes(size: Tuple[int, int], mode: str) -> int:
    """Estimated peak bytes of preparing an image of ``size`` = (w, h) and PIL ``mode``."""
    return int(size[0]) * int(size[1]) * BYTES_PER_PIXEL.get(mode, 16)


def check_prompt(prompt: Optional[str], markers: Sequence[str] = RESERVED_MARKERS) -> str:
    """The prompt to use: None -> the default; refuse (ToolError) an empty one or one with a
    marker the processor reserves for image placeholders."""
    if prompt is None:
        return DEFAULT_PROMPT
    if not prompt.strip():
        raise ToolError(f"--prompt: expected a question about the image, found an empty prompt {prompt!r}")
    found = [m for m in markers if m in prompt]
    if found:
        raise ToolError(f"--prompt: expected plain text without image markers, found {', '.join(found)} (reserved "
                        f"for the image placeholder; the tool inserts the image itself): remove them")
    return prompt


def _check_image_budget(picture, image_path: str) -> None:
    need = image_cost_bytes(picture.size, picture.mode)
    if need > IMAGE_BUDGET_BYTES:
        w, h = picture.size
        per = BYTES_PER_PIXEL.get(picture.mode, 16)
        raise ToolError(
            f"--image {image_path}: expected an image that takes at most {IMAGE_BUDGET_BYTES / 2**30:g} GiB to "
            f"prepare (at most {IMAGE_BUDGET_BYTES // per:,} pixels in mode {picture.mode}), found {w} x {h} = "
            f"{w * h:,} pixels in mode {picture.mode}: about {need / 2**30:.1f} GiB ({per} bytes per pixel); "
            f"downscale it or convert it to 8-bit RGB")


def _check_slices(processor, picture, image_path: str) -> None:
    ip = getattr(processor, "image_processor", None)
    if ip is None or not hasattr(ip, "get_slice_layout"):
        return
    square = (int(ip.scale_resolution) // int(ip.patch_size)) ** 2
    limit = MAX_SLICE_PATCHES_FACTOR * square
    lay = ip.get_slice_layout(picture.size)
    worst = max(lay.slices, key=lambda sl: int(sl.tgt_size[0]) * int(sl.tgt_size[1]))
    ph, pw = (int(v) for v in worst.tgt_size)
    if ph * pw > limit:
        w, h = picture.size
        raise ToolError(
            f"--image {image_path}: expected at most {limit:,} patches per slice ({MAX_SLICE_PATCHES_FACTOR}x a square "
            f"image's {square:,}), found {ph} x {pw} = {ph * pw:,} in slice {worst.index} of this {w} x {h} image "
            f"(aspect {max(w, h) / min(w, h):.0f}:1; vision attention grows with the square: about "
            f"{(ph * pw / square) ** 2:,.0f}x a square image's work); crop it or pad it to a less extreme shape")


def _token_maps(kind: str, net, processor, picture, record, max_tokens: int, log) -> Dict[int, Any]:
    """{generated-token index: map} of the first ``max_tokens`` answer tokens, at most
    ``viewer.EXTRA_SIDE`` px on the long side: ``kind`` ``"relevancy"`` (gradient relevancy, one
    backward per token) or ``"token activation"`` (``token_activation.py``, one forward)."""
    from .relevancy import relevancy_maps
    from .token_activation import token_activation_maps
    from .viewer import EXTRA_SIDE

    fn, what, flag = ((relevancy_maps, "gradient relevancy", "--relevancy") if kind == "relevancy" else
                      (token_activation_maps, "token activation maps", "token activation"))
    lay = record.layout
    n = min(len(lay.input_ids) - lay.n_prompt, max_tokens)
    w, h = (int(v) for v in lay.images[0].size)
    k = EXTRA_SIDE / max(w, h)
    log(f"{what} of {n} tokens ...")
    try:
        maps = fn(net, processor, picture, record, list(range(n)),
                  out_size=(max(1, round(w * k)), max(1, round(h * k))))
    except (CaptureError, ValueError) as e:
        raise ToolError(f"{flag}: {e}") from e
    return dict(enumerate(maps))


@dataclass
class Visualization:
    """What :func:`visualize` wrote."""

    answer: str
    out: str  # the output folder (absolute)
    plots: List[Tuple[str, str]]  # (path written, caption), in page order
    record: AttentionRecord
    is_demo: bool
    seconds: float  # from loading the model to the last file


def visualize(model: Optional[str] = DEFAULTS["model"], image: Optional[str] = DEFAULTS["image"],
              prompt: Optional[str] = DEFAULTS["prompt"], max_new_tokens: int = DEFAULTS["max_new_tokens"],
              layers: Optional[str] = DEFAULTS["layers"], heads: Optional[str] = DEFAULTS["heads"],
              rows: Optional[str] = DEFAULTS["rows"], vision_layers: Optional[str] = DEFAULTS["vision_layers"],
              max_plot_tokens: int = DEFAULTS["max_plot_tokens"], out: str = DEFAULTS["out"],
              device: Optional[str] = DEFAULTS["device"], dtype: Optional[str] = DEFAULTS["dtype"],
              sampling: bool = False, seed: int = DEFAULTS["seed"], quiet: bool = False,
              log: Optional[Callable[..., None]] = None,
              extra_kinds: Optional[Dict[str, Dict[int, Any]]] = None, relevancy: bool = False) -> Visualization:
    """Answer ``prompt`` about ``image`` with attention captured and write the plots, the record
    (``record.safetensors`` + ``record.json``) and ``index.html`` to ``out``.

    ``layers`` / ``heads`` (LLM) and ``vision_layers`` (SigLIP; also ``"none"``; default all for the
    demo models, the last layer otherwise) are selections as on the command line (``"0,3"``,
    ``"2:6"``, ``"all"``); ``rows`` is ``"all"`` or
    ``"generated"`` (default: all for the demo model, generated otherwise). Bad selections, an
    unreadable image, a model that does not load or a capture that is refused raise
    :class:`~.pipeline.ToolError`, and so do an empty prompt, one with image markers
    (``RESERVED_MARKERS``) and an image beyond the budget (module doc); the selections, the
    prompt and the image are checked before the model loads.
    ``log`` receives progress lines (default: stderr, nothing with ``quiet``). ``extra_kinds``:
    more precomputed maps for the viewer, ``{kind: {generated-token index: [H, W] map}}`` (e.g.
    gradient relevancy; see ``viewer.build_viewer``). ``relevancy``: also compute gradient
    relevancy maps (``relevancy.relevancy_maps``: one more forward, one backward per token) of the
    first ``max_plot_tokens`` generated tokens for the viewer (its capture refuses what cannot fit).
    """
    import torch
    from tqdm.auto import tqdm

    scene = default_scene(seed, trained_demo_task()) if image is None and model is None else None
    example = None if scene is None else (scene.image, scene.question, scene.answer, scene.target_box)
    if example is not None and prompt is None:
        prompt = example[1]
    prompt = check_prompt(prompt)
    if max_new_tokens < 1:
        raise ToolError(f"--max-new-tokens: expected at least 1, found {max_new_tokens}")
    if not 1 <= max_plot_tokens <= pl.MAX_PANELS:
        raise ToolError(f"--max-plot-tokens: expected 1 to {pl.MAX_PANELS} panels, found {max_plot_tokens}")
    try:
        device, dtype = pick_device_dtype(device, dtype, "auto")  # CUDA, MPS, CPU; bf16 on CUDA; else the checkpoint's
        layer_list = parse_index_list(layers, "layers")
        head_list = parse_index_list(heads, "heads")
        if vision_layers is None:
            vision_layers = "all" if model in (None, RANDOM_DEMO) else "-1"
        no_vision = str(vision_layers).lower() == "none"
        vision_list = None if no_vision else parse_index_list(vision_layers, "vision-layers")
        if example is not None:  # the generated scene, written next to the page
            os.makedirs(out, exist_ok=True)
            image_path = os.path.join(out, "scene.png")
            buf = io.BytesIO()
            example[0].save(buf, format="PNG")
            atomic_write_bytes(image_path, buf.getvalue())
        else:
            image_path = image or demo_image_path()
        picture = pipeline.open_image(image_path)  # extraction's loader: a regular file, bounded, never a FIFO
    except (ValueError, FileNotFoundError) as e:
        raise ToolError(str(e)) from e
    _check_image_budget(picture, image_path)
    torch.manual_seed(seed)
    t0 = time.time()
    if log is None:
        log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    trained_demo = model is None
    log("loading model ..." if model not in (None, RANDOM_DEMO) else
        "loading the tiny trained demo model ..." if trained_demo else "building the tiny demo model (random weights) ...")
    try:
        net, processor, is_demo = pipeline.load_model_and_processor(
            trained_demo_folder() if trained_demo else None if model == RANDOM_DEMO else model, device, dtype,
            progress=not quiet)
        is_demo = is_demo or trained_demo
    except (OSError, ValueError) as e:
        raise ToolError(str(e)) from e
    _check_slices(processor, picture, image_path)
    # a custom checkpoint may name its markers differently
    ip = getattr(processor, "image_processor", None)
    check_prompt(prompt, tuple(RESERVED_MARKERS) + tuple(
        str(getattr(ip, a)) for a in ("im_start_token", "im_end_token", "slice_start_token", "slice_end_token")
        if isinstance(getattr(ip, a, None), str) and getattr(ip, a)))
    if rows is None:
        rows = "all" if is_demo else "generated"
    stages = ["llm", "resampler"]
    layer_sel = {"llm": layer_list}
    if not no_vision:
        stages.append("vision")
        layer_sel["vision"] = vision_list
    spec = {"stages": stages, "rows": rows, "dtype": "float32", "device": "cpu", "layers": layer_sel,
            "heads": {"llm": head_list} if head_list is not None else None}
    display = pl.display_image(picture)  # what the plots draw (at most 1024 px); the model gets the original
    try:
        # the random demo model would often stop after a token or two: make it say max_new_tokens
        answer, record = pipeline.capture_chat(net, processor, picture, prompt, spec, max_new_tokens,
                                               sampling=sampling, progress=not quiet,
                                               min_new_tokens=max_new_tokens if model == RANDOM_DEMO else 0)
    except CaptureError as e:
        raise ToolError(str(e)) from e
    extra_kinds = dict(extra_kinds or {})
    from .token_activation import TAM_KIND
    if TAM_KIND not in extra_kinds:  # cheap (one forward): always offered in the viewer's map kinds
        extra_kinds[TAM_KIND] = _token_maps(TAM_KIND, net, processor, picture, record, max_plot_tokens, log)
    if relevancy:
        extra_kinds["relevancy"] = _token_maps("relevancy", net, processor, picture, record, max_plot_tokens, log)
    steer = ""
    if example is not None and prompt == example[1]:  # the generated scene and its own question: the target is known
        from .question_steer import scene_entry, steer_html, steer_png
        from ..demo.baselines import before_question_row

        log("scoring this scene's pointing game (answer row vs the row before the question) ...")
        whole_tower = sorted(record.layers("vision")) == list(range(net.config.vision_config.num_hidden_layers))
        entry = dict(scene_entry(net, processor, scene, record, answer, vision=whole_tower), task=trained_demo_task())
        q_row = before_question_row(record.layout.tokens, int(record.layout.n_prompt))
        steer = steer_html(entry, steer_png(scene, record), before_row=q_row)
        record.meta["pointing"] = {k: entry[k] for k in ("peaks", "before_question", "baselines")}
    del picture  # the full-size image is not needed any more
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    record.meta.update(image=os.path.abspath(image_path), demo=is_demo)
    if example is not None:
        record.meta.update(expected_answer=example[2], target_box=[float(v) for v in example[3]])
    record.save(os.path.join(out, "record"))
    lay = record.layout
    n_gen = len(lay.input_ids) - lay.n_prompt
    gen_rows = list(range(lay.n_prompt - 1, lay.n_prompt - 1 + min(n_gen, max_plot_tokens)))
    llm_layers = record.layers("llm")
    plots = [
        ("token_heatmaps.png", "Where each generated token looked in the image (LLM attention to image tokens x "
                               "resampler attention, mean over layers and heads)",
         lambda p: pl.plot_token_heatmaps(record, p, image=display, positions=gen_rows,
                                          max_tokens=max_plot_tokens)),
        ("head_image_share.png", "Share of attention on image tokens per layer and head (generated rows)",
         lambda p: pl.plot_head_image_share(record, p, rows="generated")),
        ("role_shares.png", "Text vs image vs special attention share per layer (generated rows)",
         lambda p: pl.plot_role_shares(record, p, rows="generated")),
        ("resampler_queries.png", "Resampler query maps over the overview slice",
         lambda p: pl.plot_resampler_queries(record, p, image=display, slice=0)),
    ]
    if not no_vision:
        plots.append(("vision_received.png", "SigLIP: attention each patch receives (last captured layer), "
                                              "overview and grid slices",
                      lambda p: pl.plot_vision_received(record, p, image=display)))
    if rows == "all":
        plots.insert(2, (f"attention_matrix_layer{llm_layers[-1]}.png",
                         f"LLM attention matrix, layer {llm_layers[-1]}, mean over heads, with token roles",
                         lambda p: pl.plot_attention_matrix(record, p, layer=llm_layers[-1])))
    written = []
    for name, caption, fn in tqdm(plots, desc="plotting", disable=quiet, leave=False):
        written.append((fn(os.path.join(out, name)), caption))
    log("building the interactive viewer (index.html) ...")
    try:
        viewer = build_viewer(record, display, prompt=prompt, answer=answer, extra_kinds=extra_kinds,
                              progress=not quiet)
    except ValueError as e:
        raise ToolError(f"viewer: {e}") from e
    page = render_index(prompt, answer, image_path, written, "trained" if trained_demo else is_demo,
                        None if model == RANDOM_DEMO else model, record,
                        viewer=viewer, expected=example[2] if example is not None else None, extra_html=steer)
    atomic_write_text(os.path.join(out, "index.html"), page)
    return Visualization(answer=answer, out=out, plots=written, record=record, is_demo=is_demo,
                         seconds=time.time() - t0)
