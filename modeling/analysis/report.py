"""The ``index.html`` page of a visualisation: the interactive viewer (``viewer.py``) with the run's
facts above it and the static PNG plots listed below it.

The page names files by their base name only (never a path of the machine that wrote it) and
loads nothing: the PNGs are links next to the page, the viewer is inside it.
"""
import html
import os
from typing import Optional, Sequence, Tuple

from ..attention_record import AttentionRecord

__all__ = ["facts_html", "plots_html", "render_index", "size_note"]


def size_note(record: AttentionRecord) -> str:
    """`` (W x H px; the plots draw a copy at most N px on the long side[, stretched to 4:1])`` of the
    record's first image, or ''."""
    images = getattr(record.layout, "images", None) or []
    if not images:
        return ""
    from .plotting import MAX_ASPECT, MAX_DRAW_SIDE

    w, h = (int(v) for v in images[0].size)
    stretched = max(w, h) > MAX_ASPECT * max(1, min(w, h))
    return (f" ({w} x {h} px; the plots draw a copy at most {MAX_DRAW_SIDE} px on the long side"
            + (f", stretched to {MAX_ASPECT:g}:1" if stretched else "") + ")")


def facts_html(image_path: Optional[str], is_demo, model_name: Optional[str], record: AttentionRecord,
               expected: Optional[str] = None, answer: Optional[str] = None) -> str:
    """The demo note, model, image (base name and size), the known answer when there is one and what
    the record holds, as HTML. ``is_demo``: False, True (the random-weight demo) or ``"trained"``."""
    esc = html.escape
    if is_demo == "trained":
        note = ("<p class=note><b>Demo model:</b> a tiny MiniCPM-V-2.6 trained on coloured-shape scenes (LM loss "
                "only, no attention or box supervision). Every object is coloured and the question names one by "
                "its shape or colour, so the model must read the question to find it: the answer row's map "
                "should light that object up, while the row before the question cannot know which one. Pass "
                "<code>--model</code> with a real MiniCPM-V-2.6 checkpoint and <code>--image</code> for your own.</p>")
    elif is_demo:
        note = ("<p class=warn><b>Demo model with random weights:</b> these maps show the pipeline "
                "(tokens &rarr; slices &rarr; patches &rarr; pixels), not meaning. Pass <code>--model</code> "
                "with a real MiniCPM-V-2.6 checkpoint for meaningful maps.</p>")
    else:
        note = ""
    if expected is not None:
        said = (answer or "").strip()
        verdict = "right" if said.lower().rstrip(".") == expected.lower() else "wrong"
        note += (f"<p><b>Known answer:</b> {esc(expected)} &mdash; the model said <b>{esc(said)}</b> "
                 f"({verdict}).</p>")
    model = ("tiny demo (trained on coloured shapes)" if is_demo == "trained" else
             "tiny demo (seeded, random weights)") if not model_name else (
        os.path.basename(str(model_name).rstrip("/\\")) if os.path.isdir(str(model_name)) else str(model_name))
    image = os.path.basename(str(image_path)) if image_path else "not given"
    return (f"{note}<p><b>Model:</b> {esc(model)}<br><b>Image:</b> {esc(image)}{esc(size_note(record))}</p>"
            f"<p>Record: <code>record.safetensors</code> + <code>record.json</code> (load with "
            f"<code>minicpmv_attn.AttentionRecord.load('record')</code>); captured: {esc(', '.join(record.names()))}</p>")


def plots_html(plots: Sequence[Tuple[str, str]]) -> str:
    """The static plots as links by base name (files next to the page; nothing is loaded)."""
    if not plots:
        return ""
    esc = html.escape
    items = "\n".join(f"<li><a href='{esc(os.path.basename(p))}'>{esc(os.path.basename(p))}</a>: {esc(c)}</li>"
                      for p, c in plots)
    return f"<h2>Static plots</h2><p class=dim>PNG files written next to this page:</p><ul>\n{items}\n</ul>"


def render_index(prompt: str, answer: str, image_path: str, plots: Sequence[Tuple[str, str]], is_demo,
                 model_name: Optional[str], record: AttentionRecord, viewer=None, expected: Optional[str] = None,
                 extra_html: str = "") -> str:
    """The page as a string: the interactive viewer (``viewer``, a :class:`~.viewer.Viewer`; built
    from ``record`` when None, without an image) with the facts above and ``plots`` ((path, caption)
    pairs, listed by base name) below; ``extra_html`` (trusted) goes between the facts and the viewer."""
    from .viewer import build_viewer, render_viewer

    if viewer is None:
        viewer = build_viewer(record, None, prompt=prompt, answer=answer)
    return render_viewer(viewer, title="minicpmv-attn: attention maps",
                         header_html=facts_html(image_path, is_demo, model_name, record, expected, answer) + extra_html,
                         footer_html=plots_html(plots))
