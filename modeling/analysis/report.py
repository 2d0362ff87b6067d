"""The ``index.html`` page of a visualisation: the question, the answer and every plot with its caption."""
import html
import os
from typing import Optional, Sequence, Tuple

from ..attention_record import AttentionRecord

__all__ = ["render_index"]


def render_index(prompt: str, answer: str, image_path: str, plots: Sequence[Tuple[str, str]], is_demo: bool,
                 model_name: Optional[str], record: AttentionRecord) -> str:
    """The page as a string; ``plots`` are (path, caption) pairs, shown by file name (same folder)."""
    esc = html.escape
    note = ("<p class=warn><b>Demo model with random weights:</b> these maps show the pipeline "
            "(tokens &rarr; slices &rarr; patches &rarr; pixels), not meaning. Pass <code>--model</code> "
            "with a real MiniCPM-V-2.6 checkpoint for meaningful maps.</p>" if is_demo else "")
    items = "\n".join(f"<figure><img src='{esc(os.path.basename(p))}' alt='{esc(c)}'><figcaption>{esc(c)}"
                      f"</figcaption></figure>" for p, c in plots)
    names = ", ".join(record.names())
    size = ""
    images = getattr(record.layout, "images", None) or []
    if images:
        from .plotting import MAX_ASPECT, MAX_DRAW_SIDE

        w, h = (int(v) for v in images[0].size)
        stretched = max(w, h) > MAX_ASPECT * max(1, min(w, h))
        size = (f" ({w} x {h} px; the plots draw a copy at most {MAX_DRAW_SIDE} px on the long side"
                + (f", stretched to {MAX_ASPECT:g}:1" if stretched else "") + ")")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>minicpmv-attn: attention maps</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
img{{max-width:100%;border:1px solid #ddd}} figure{{margin:2em 0}} .warn{{background:#fff3cd;padding:.6em}}
code{{background:#f4f4f4;padding:0 .2em}}</style></head><body>
<h1>Attention maps</h1>{note}
<p><b>Model:</b> {esc(model_name or 'tiny demo (seeded, random weights)')}<br>
<b>Image:</b> {esc(image_path)}{esc(size)}<br><b>Prompt:</b> {esc(prompt)}<br><b>Answer:</b> {esc(answer)}</p>
<p>Record: <code>record.safetensors</code> + <code>record.json</code> (load with
<code>minicpmv_attn.AttentionRecord.load('record')</code>); captured: {esc(names)}</p>
{items}
</body></html>
"""
