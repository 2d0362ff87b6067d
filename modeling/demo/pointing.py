"""The pointing game: does the model's attention point at the object its answer depends on?

For each fresh scene (``scenes.make_scene``) the model answers through the real chat path
(``model.chat``, beam search, which replays the chosen answer through one forward pass
capturing every LLM row and column plus the resampler and SigLIP, so full-square maps
such as the rollout are available). For each *map kind* the heatmap of the row that predicts the
answer word (the last prompt position) is computed over the original image; its **peak**
(the centroid of the pixels holding the maximum, so a flat maximal patch counts by its
centre) is a *hit* when it lies inside the target object's box. The score of a kind is
its hit rate over all scenes; **chance** is the mean share of the image the target box
covers (the hit rate of a uniformly random peak).

Map kinds are pluggable: ``map_kinds(record)`` gives the built-in ones (LLM -> image
attention averaged over layers and heads, each layer alone, the rollout over layers, the
mean and the rollout followed on through the SigLIP rollout (``through_vision``), and
gradient relevancy when ``minicpmv_attn.analysis.relevancy`` provides it);
``play(..., kinds=...)`` takes any ``{name: fn(ctx) -> [H, W] map}``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..maps import heatmap as am
from ..capture import CaptureSpec
from .scenes import Scene, make_scene

MAX_SCENES = 10_000


@dataclass
class MapContext:
    """What a map kind gets: the model, processor, scene, chat record and the answer row."""

    model: object
    processor: object
    scene: Scene
    record: object  # AttentionRecord from chat (full square, all layers and heads, resampler)
    row: int  # LLM position that predicts the answer's first token
    answer: str


MapFn = Callable[[MapContext], np.ndarray]


def _attention_kind(**kwargs) -> MapFn:
    def fn(ctx: MapContext) -> np.ndarray:
        return am.image_heatmap(ctx.record, ctx.row, **kwargs).map
    return fn


def _relevancy_kinds() -> Dict[str, MapFn]:
    """Gradient relevancy (``analysis/relevancy.py``, when present) of the first answer token, through the
    resampler's attention ("relevancy") or its own gradient rule ("relevancy grad")."""
    try:
        from ..maps.relevancy import relevancy_maps
    except ImportError:
        return {}

    def kind(mode: str) -> MapFn:
        return lambda ctx: relevancy_maps(ctx.model, ctx.processor, ctx.scene.image, record=ctx.record, tokens=[0],
                                          resampler=mode)[0]
    return {"relevancy": kind("attention"), "relevancy grad": kind("grad")}


def map_kinds(n_layers: int) -> Dict[str, MapFn]:
    """The built-in map kinds for an LLM with ``n_layers`` layers (name -> fn(ctx) -> [H, W])."""
    kinds: Dict[str, MapFn] = {"raw mean": _attention_kind(layer_reduce="mean")}
    for layer in range(n_layers):
        kinds[f"layer {layer}"] = _attention_kind(layers=[layer], layer_reduce="mean")
    kinds["rollout"] = _attention_kind(layer_reduce="rollout")
    # the same two followed back through the SigLIP rollout (tokens -> resampler -> SigLIP -> pixels)
    kinds["mean+siglip"] = _attention_kind(layer_reduce="mean", through_vision=True)
    kinds["rollout+siglip"] = _attention_kind(layer_reduce="rollout", through_vision=True)
    kinds.update(_relevancy_kinds())
    return kinds


def peak(heatmap: np.ndarray) -> Tuple[float, float]:
    """(x, y) pixel-centre coordinates of the map's maximum (centroid of the pixels that hold it)."""
    m = np.asarray(heatmap, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"a heatmap must be a non-empty [H, W] array, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("the heatmap holds NaN or infinite values")
    top = m.max()
    ys, xs = np.nonzero(m >= top - 1e-9 * max(abs(top), 1e-30))
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def inside(point: Tuple[float, float], box: Sequence[float]) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


@dataclass
class PointingResult:
    """Per-kind hit rates, chance, answer accuracy and the per-scene rows."""

    hits: Dict[str, float]
    chance: float
    answer_accuracy: float
    n: int
    seed: int
    rows: List[dict] = field(default_factory=list)

    @property
    def best(self) -> Tuple[str, float]:
        name = max(self.hits, key=lambda k: self.hits[k])
        return name, self.hits[name]

    def summary(self) -> str:
        """Table of kinds then the one-line verdict (``pointing game: accuracy ...``)."""
        lines = [f"{'map kind':<15} {'hit rate':>8} {'x chance':>8}"]
        for k, v in self.hits.items():
            lines.append(f"{k:<15} {v:8.3f} {v / self.chance if self.chance else float('nan'):8.1f}")
        name, value = self.best
        lines.append(f"pointing game: accuracy {value:.2f} ({name}), "
                     + ", ".join(f"{k} {v:.2f}" for k, v in self.hits.items() if k != name)
                     + f"; chance {self.chance:.2f}, answer accuracy {self.answer_accuracy:.2f} "
                     f"(n={self.n}, seed={self.seed})")
        return "\n".join(lines)


def chat_record(model, processor, scene: Scene, max_new_tokens: int = 4):
    """(answer, record, row): ``model.chat`` with a full capture (all LLM rows/cols/heads, resampler, SigLIP)."""
    spec = CaptureSpec(stages=("llm", "resampler", "vision"), rows="all", cols="all", reduce="none", dtype=torch.float32)
    answer, record = model.chat(scene.image, [{"role": "user", "content": scene.question}], processor.tokenizer,
                                processor=processor, sampling=False, max_new_tokens=max_new_tokens,
                                output_attentions=spec)
    n_prompt = int(record.layout.n_prompt)
    if n_prompt < 1 or n_prompt > len(record.layout.tokens):
        raise ValueError(f"the chat record's layout has n_prompt={n_prompt} of {len(record.layout.tokens)} tokens")
    return answer, record, n_prompt - 1


def play(model, processor, seed: int = 1, n: int = 40, kinds: Optional[Dict[str, MapFn]] = None,
         progress: bool = False) -> PointingResult:
    """The pointing game on ``n`` scenes from ``random.Random(seed)`` (see the module doc)."""
    from tqdm import tqdm

    if not 1 <= n <= MAX_SCENES:
        raise ValueError(f"n must be 1..{MAX_SCENES}, got {n}")
    kinds = map_kinds(model.config.num_hidden_layers) if kinds is None else kinds
    if not kinds:
        raise ValueError("no map kinds to score")
    rng = random.Random(seed)
    hits = {k: 0 for k in kinds}
    correct, shares, rows = 0, [], []
    model.eval()
    for i in tqdm(range(n), desc="pointing game", disable=not progress):
        scene = make_scene(rng)
        with torch.no_grad():
            answer, record, row = chat_record(model, processor, scene)
        ctx = MapContext(model, processor, scene, record, row, answer)
        ok = answer.strip() == scene.answer
        correct += ok
        shares.append(scene.box_share())
        entry = {"question": scene.question, "answer": answer, "expected": scene.answer, "correct": ok,
                 "target_box": list(scene.target_box), "size": list(scene.image.size), "peaks": {}}
        for name, fn in kinds.items():
            m = np.asarray(fn(ctx))
            W, H = scene.image.size
            if m.shape != (H, W):
                raise ValueError(f"map kind {name!r} returned shape {m.shape}, expected the image's ({H}, {W})")
            p = peak(m)
            hit = inside(p, scene.target_box)
            hits[name] += hit
            entry["peaks"][name] = [round(p[0], 1), round(p[1], 1), hit]
        rows.append(entry)
    return PointingResult(hits={k: v / n for k, v in hits.items()}, chance=float(np.mean(shares)),
                          answer_accuracy=correct / n, n=n, seed=seed, rows=rows)
