"""Does the question steer the model's attention? The main command's section for a generated demo scene.

For the default scene (a binding scene: every object coloured, so the model must read the question to
find the object; its target is known) the page shows, for one map kind, the map of the row that
predicts the answer beside the map of the row before the question (``</image>``, or the last
``</slice>`` on a sliced image), which has seen the whole image but none of the question. Below them,
that scene's pointing-game numbers (``demo.pointing.score_scene``): for every map kind, whether its
peak lies in the target's box on the answer row and on the row before the question, and the model-free
baselines on the same scene (saliency, centre prior, and the expected hit of a randomly picked object).
One scene is an anecdote; ``scripts/pointing_game.py`` gives the rates over many.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Dict, Optional

import numpy as np

__all__ = ["SHOWN_KIND", "scene_entry", "steer_html", "steer_png"]

SHOWN_KIND = "raw mean"  # the kind drawn side by side (LLM -> image attention, mean over layers and heads)


def scene_entry(model, processor, scene, record, answer: str, vision: bool = True) -> dict:
    """``demo.pointing.score_scene`` for ``scene`` and a chat ``record`` of it (every row, column, layer and
    head of the LLM, the resampler and SigLIP), with every built-in map kind (gradient relevancy included:
    one more forward and a backward, cheap on the demo model this runs on). ``vision=False`` (a record
    without SigLIP attention, ``--vision-layers none``) leaves out the kinds that follow the map back through
    SigLIP (``THROUGH_VISION_KINDS``); ``steer_html`` says so."""
    from ..demo.pointing import THROUGH_VISION_KINDS, MapContext, map_kinds, score_scene

    kinds = {k: fn for k, fn in map_kinds(model.config.num_hidden_layers).items()
             if vision or k not in THROUGH_VISION_KINDS}
    row = int(record.layout.n_prompt) - 1
    return score_scene(kinds, MapContext(model, processor, scene, record, row, answer))


def steer_png(scene, record) -> bytes:
    """PNG: the scene with the target's box, then the ``SHOWN_KIND`` map of the answer row, then of the row
    before the question (each scaled to its own maximum)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from ..demo import baselines as bl
    from ..demo.pointing import peak
    from ..maps.heatmap import image_heatmap
    from .heat_overlay import overlay_rgb

    lay = record.layout
    answer_row = int(lay.n_prompt) - 1
    q_row = bl.before_question_row(lay.tokens, int(lay.n_prompt))

    def raw_mean(row: int) -> np.ndarray:
        return image_heatmap(record, row, layer_reduce="mean").map

    image = np.asarray(scene.image.convert("RGB"))
    W, H = scene.image.size
    x0, y0, x1, y1 = scene.target_box
    panels = [("the scene (target boxed)", None, None),
              (f"answer row {answer_row}: after the question", raw_mean(answer_row), answer_row),
              (f"row {q_row} ({lay.tokens[q_row]}): before the question", raw_mean(q_row), q_row)]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.5 * H / W + 0.5))
    for ax, (title, m, _) in zip(axes, panels):
        if m is None:
            ax.imshow(image)
        else:
            m = np.asarray(m, dtype=np.float64)
            ax.imshow(overlay_rgb(image, m, vmax=float(m.max()) or 1.0, a_max=0.75))
            px, py = peak(m)
            ax.plot([px], [py], marker="x", color="white", markersize=9, mew=2.5)
            ax.plot([px], [py], marker="x", color="black", markersize=7, mew=1.2)
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _mark(hit: Optional[bool]) -> str:
    return "-" if hit is None else ("hit" if hit else "miss")


def steer_html(entry: dict, png: bytes, kind: str = SHOWN_KIND, before_row: Optional[int] = None) -> str:
    """The section as HTML: the figure (embedded, nothing loaded), then the scene's per-kind table."""
    esc = html.escape
    rows = []
    for name, (_, _, hit) in entry["peaks"].items():
        before = entry["before_question"].get(name)
        rows.append(f"<tr><td>{esc(name)}</td><td>{_mark(hit)}</td><td>{_mark(before[2] if before else None)}</td></tr>")
    b: Dict = entry["baselines"]
    base = (f"saliency (no model) {_mark(b['saliency'][2])}, centre prior {_mark(b['centre'][2])}, "
            f"a random object {b['random object']:.2f} (expected)")
    where = f" (row {before_row} in the viewer)" if before_row is not None else ""
    return (f"<h2>Does the question steer the attention?</h2>"
            f"<p>{esc(kind)} map of the row that predicts the answer, beside the row before the question{esc(where)}, "
            f"which has seen the image but not the question. Every object is coloured, so only the question "
            f"tells which one matters (green box). &times; marks each map's peak.</p>"
            f"<img alt='answer row vs before-question row' style='max-width:100%' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<p>This scene's pointing game (hit = the map's peak lies in the target's box): baselines {esc(base)}. "
            f"Rates over many scenes: <code>python scripts/pointing_game.py --task {esc(entry.get('task', 'binding'))}"
            f"</code>.</p><table><tr><th>map kind</th><th>answer row</th><th>before the question</th></tr>"
            + "".join(rows) + "</table>"
            + ("" if any(k.endswith("+siglip") for k in entry["peaks"]) else
               "<p class=dim>The kinds that follow the map back through SigLIP need its attention "
               "(<code>--vision-layers all</code>, the demo's default).</p>"))
