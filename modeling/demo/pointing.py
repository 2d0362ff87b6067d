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

Scenes come from a *task* (``scenes.TASKS``): ``"single"`` (one coloured object among gray ones,
what the shipped model was first trained on) or ``"binding"`` (every object coloured: the question
must be read to find the object). Every run also scores the baselines of ``baselines.py`` on the
same scenes (random object, model-free saliency, the model's own maps of the row before the
question, a centre prior); the table reports each kind's hit rate minus the best baseline and
their ratio, and the closing line names them all.

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
from . import baselines as bl
from .scenes import Scene, check_task, make_task_scene

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
    fn.row_based = True  # a map of any row: also scored on the row before the question (a baseline)
    return fn


def _tam_kind() -> MapFn:
    """Token Activation Map (``maps/token_activation.py``) of the first answer token."""
    from ..maps.token_activation import token_activation_map

    return lambda ctx: token_activation_map(ctx.model, ctx.processor, ctx.scene.image, ctx.record, token=0)


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


THROUGH_VISION_KINDS = ("mean+siglip", "rollout+siglip")  # need the SigLIP attention of every layer and slice


def map_kinds(n_layers: int) -> Dict[str, MapFn]:
    """The built-in map kinds for an LLM with ``n_layers`` layers (name -> fn(ctx) -> [H, W])."""
    kinds: Dict[str, MapFn] = {"raw mean": _attention_kind(layer_reduce="mean")}
    for layer in range(n_layers):
        kinds[f"layer {layer}"] = _attention_kind(layers=[layer], layer_reduce="mean")
    kinds["rollout"] = _attention_kind(layer_reduce="rollout")
    # the same two followed back through the SigLIP rollout (tokens -> resampler -> SigLIP -> pixels)
    kinds["mean+siglip"] = _attention_kind(layer_reduce="mean", through_vision=True)  # THROUGH_VISION_KINDS
    kinds["rollout+siglip"] = _attention_kind(layer_reduce="rollout", through_vision=True)
    kinds["token activation"] = _tam_kind()
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


BASELINES = ("random object", "saliency", "before question", "centre")


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


@dataclass
class PointingResult:
    """Per-kind hit rates, chance, answer accuracy, the baselines and the per-scene rows.

    ``baselines``: name (``BASELINES``) -> hit rate; "before question" is the best of ``before``
    (each row-based kind's hit rate on the row before the question; NaN when no kind is row-based).
    """

    hits: Dict[str, float]
    chance: float
    answer_accuracy: float
    n: int
    seed: int
    rows: List[dict] = field(default_factory=list)
    task: str = "single"
    baselines: Dict[str, float] = field(default_factory=dict)
    before: Dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> Tuple[str, float]:
        name = max(self.hits, key=lambda k: self.hits[k])
        return name, self.hits[name]

    @property
    def best_baseline(self) -> Tuple[str, float]:
        """(name, hit rate) of the strongest baseline (NaN ones skipped)."""
        known = {k: v for k, v in self.baselines.items() if v == v}
        if not known:
            return "none", float("nan")
        name = max(known, key=lambda k: known[k])
        return name, known[name]

    def table(self) -> List[Tuple[str, float, float, float, float]]:
        """Rows ``(kind, hit rate, before-question hit rate (NaN: not row-based), minus best baseline,
        ratio to best baseline)``."""
        b = self.best_baseline[1]
        return [(k, v, self.before.get(k, float("nan")), v - b, v / b if b else float("nan"))
                for k, v in self.hits.items()]

    def closing_line(self) -> str:
        """``pointing game: task T, answer accuracy A; best map KIND H; baselines: random object R,
        saliency S, before question Q, centre C; chance X (n=N, seed=S)``."""
        name, value = self.best
        b = self.baselines
        return (f"pointing game: task {self.task}, answer accuracy {self.answer_accuracy:.2f}; best map {name} "
                f"{value:.2f}; baselines: " + ", ".join(f"{k} {_fmt(b.get(k, float('nan')))}" for k in BASELINES)
                + f"; chance {self.chance:.2f} (n={self.n}, seed={self.seed})")

    def summary(self) -> str:
        """Table (kind, hit rate, before question, minus best baseline, ratio), then the closing line."""
        bname, b = self.best_baseline
        lines = [f"{'map kind':<18} {'hit rate':>8} {'before-q':>8} {'- best bl':>9} {'/ best bl':>9}"]
        for k, v, q, d, r in self.table():
            lines.append(f"{k:<18} {v:8.3f} {_fmt(q) if q == q else '-':>8} {d:+9.3f} {r:9.2f}")
        lines.append(f"best baseline: {bname} {_fmt(b)}")
        lines.append(self.closing_line())
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table in Markdown, then the closing line as code."""
        bname, b = self.best_baseline
        lines = ["| map kind | hit rate | before question | minus best baseline | ratio to best baseline |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        for k, v, q, d, r in self.table():
            lines.append(f"| {k} | {v:.3f} | {_fmt(q) if q == q else '-'} | {d:+.3f} | {r:.2f} |")
        lines += ["", "| baseline | hit rate |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(self.baselines.get(k, float('nan')))} |" for k in BASELINES]
        lines += [f"| chance (target box area) | {self.chance:.3f} |", "",
                  f"Best baseline: {bname} {_fmt(b)}.", "", f"`{self.closing_line()}`"]
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


def _hit(name: str, m, scene: Scene) -> Tuple[Tuple[float, float], bool]:
    m = np.asarray(m)
    W, H = scene.image.size
    if m.shape != (H, W):
        raise ValueError(f"map kind {name!r} returned shape {m.shape}, expected the image's ({H}, {W})")
    p = peak(m)
    return p, inside(p, scene.target_box)


def score_scene(kinds: Dict[str, MapFn], ctx: MapContext) -> dict:
    """One scene's pointing-game entry: the answer, whether it is right, each kind's peak ``[x, y, hit]`` on the
    answer row (``peaks``) and, for row-based kinds, on the row before the question (``before_question``), and
    the baselines (``saliency`` and ``centre``: ``[x, y, hit]``; ``random object``: its expected hit rate)."""
    scene = ctx.scene
    entry = {"question": scene.question, "answer": ctx.answer, "expected": scene.answer,
             "correct": ctx.answer.strip() == scene.answer, "target_box": list(scene.target_box),
             "size": list(scene.image.size), "peaks": {}, "before_question": {}, "baselines": {}}
    for name, fn in kinds.items():
        p, hit = _hit(name, fn(ctx), scene)
        entry["peaks"][name] = [round(p[0], 1), round(p[1], 1), hit]
    row_kinds = [k for k, fn in kinds.items() if getattr(fn, "row_based", False)]
    if row_kinds:
        q_ctx = MapContext(ctx.model, ctx.processor, scene, ctx.record,
                           bl.before_question_row(ctx.record.layout.tokens, int(ctx.record.layout.n_prompt)), ctx.answer)
        for name in row_kinds:
            p, hit = _hit(name, kinds[name](q_ctx), scene)
            entry["before_question"][name] = [round(p[0], 1), round(p[1], 1), hit]
    W, H = scene.image.size
    entry["baselines"]["random object"] = bl.random_object_rate(len(scene.objects))
    for name, m in (("saliency", bl.saliency_map(scene.image)), ("centre", bl.centre_map(W, H))):
        p, hit = _hit(name, m, scene)
        entry["baselines"][name] = [round(p[0], 1), round(p[1], 1), hit]
    return entry


def play(model, processor, seed: int = 1, n: int = 40, kinds: Optional[Dict[str, MapFn]] = None,
         progress: bool = False, task: str = "single") -> PointingResult:
    """The pointing game on ``n`` ``task`` scenes from ``random.Random(seed)``, with its baselines
    (see the module doc)."""
    from tqdm import tqdm

    check_task(task)
    if not 1 <= n <= MAX_SCENES:
        raise ValueError(f"n must be 1..{MAX_SCENES}, got {n}")
    kinds = map_kinds(model.config.num_hidden_layers) if kinds is None else kinds
    if not kinds:
        raise ValueError("no map kinds to score")
    row_kinds = [k for k, fn in kinds.items() if getattr(fn, "row_based", False)]
    rng = random.Random(seed)
    hits = {k: 0 for k in kinds}
    before = {k: 0 for k in row_kinds}
    base = {"random object": 0.0, "saliency": 0, "centre": 0}
    correct, shares, rows = 0, [], []
    model.eval()
    for i in tqdm(range(n), desc="pointing game", disable=not progress):
        scene = make_task_scene(rng, task)
        with torch.no_grad():
            answer, record, row = chat_record(model, processor, scene)
        entry = score_scene(kinds, MapContext(model, processor, scene, record, row, answer))
        correct += entry["correct"]
        shares.append(scene.box_share())
        for name in kinds:
            hits[name] += entry["peaks"][name][2]
        for name in row_kinds:
            before[name] += entry["before_question"][name][2]
        base["random object"] += entry["baselines"]["random object"]
        for name in ("saliency", "centre"):
            base[name] += entry["baselines"][name][2]
        rows.append(entry)
    before_rates = {k: v / n for k, v in before.items()}
    baselines = {"random object": base["random object"] / n, "saliency": base["saliency"] / n,
                 "before question": max(before_rates.values()) if before_rates else float("nan"),
                 "centre": base["centre"] / n}
    return PointingResult(hits={k: v / n for k, v in hits.items()}, chance=float(np.mean(shares)),
                          answer_accuracy=correct / n, n=n, seed=seed, rows=rows, task=task, baselines=baselines,
                          before=before_rates)
