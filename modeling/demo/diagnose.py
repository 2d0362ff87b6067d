"""Why a demo model does or does not bind: two measurements on binding scenes.

* ``accuracy_by_objects``: teacher-forced answer accuracy per number of objects (1-5) and question
  type. One object needs no binding (any colour / shape read from the image answers); from two on,
  the question's attribute must pick the object. A model that reads attributes but does not bind is
  right on one object and near ``1 / n`` on ``n``.
* ``resampler_entropy``: how many patches each resampler query reads (mean entropy of its attention
  over the slice's patches, nats; ``ln 64 = 4.16`` is uniform over an 8 x 8 slice, 0 is one patch).
* ``resampler_probe``: does the resampler keep an object's colour and shape *together*, in the same
  image token? For every object of square one-slice scenes, the image token whose resampler query
  puts the most attention on the object's patches is taken (its resampler output, what the LLM
  reads); linear probes (multinomial logistic regression, trained on 70% of the objects, scored on
  the rest) predict the object's colour, its shape, and both at once from that one token. If both
  are decodable from the object's token, the resampler hands the LLM bound objects and the missing
  step is the LLM's lookup; if not, binding is lost before the LLM.
* ``shape_probe_training``: can the untrained SigLIP tower and resampler *learn* to tell the five shapes
  apart at a given learning rate? A linear classifier on the max over the slice's image tokens is
  trained with them, end to end, on one-object scenes (no LLM, no binding). This is what showed that
  the tower needs a lower learning rate than the 2e-3 of the single-task recipe (``train.py``).
"""
from __future__ import annotations

import random
from typing import Dict, List, Tuple

import numpy as np
import torch

from .scenes import BINDING_COLORS, BINDING_SHAPES, make_binding_scene


def accuracy_by_objects(model, processor, seed: int = 20_000, per: int = 32) -> Dict[Tuple[int, str], float]:
    """``{(n_objects, "color" | "shape"): accuracy}`` on ``per`` fresh binding scenes each."""
    from .train import answer_accuracy

    rng = random.Random(seed)
    out = {}
    for n in range(1, len(BINDING_SHAPES) + 1):
        for q in ("color", "shape"):
            out[(n, q)] = answer_accuracy(model, processor, [make_binding_scene(rng, n_objects=n, question=q)
                                                             for _ in range(per)])
    return out


def resampler_entropy(model, processor, seed: int = 30_000, n_scenes: int = 16) -> float:
    """Mean entropy (nats) of the resampler queries' attention (head mean) on square binding scenes."""
    from ..capture import CaptureSpec
    from .train import encode_batch

    rng = random.Random(seed)
    enc = encode_batch(processor, [make_binding_scene(rng, size=(112, 112), n_objects=4) for _ in range(n_scenes)])
    spec = CaptureSpec(stages=("resampler",), reduce="mean", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        a = model(enc["data"], attention_mask=enc["attention_mask"], use_cache=False,
                  output_attentions=spec).resampler_attentions
    a = (a.mean(1) if a.ndim == 4 else a).double()
    return float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())


def _object_tokens(model, processor, batch) -> Tuple[List[np.ndarray], List[Tuple[int, int]]]:
    """Per object: the resampler output of the query that attends most to its patches, and its
    (colour index, shape index)."""
    from ..capture import CaptureSpec
    from .train import encode_batch

    kept: List[torch.Tensor] = []
    handle = model.resampler.register_forward_hook(lambda mod, args, out: kept.append(out.detach()))
    try:
        enc = encode_batch(processor, batch)
        spec = CaptureSpec(stages=("resampler",), reduce="mean", dtype=torch.float32)
        with torch.no_grad():
            out = model(enc["data"], attention_mask=enc["attention_mask"], use_cache=False, output_attentions=spec)
    finally:
        handle.remove()
    feats, att = kept[0], out.resampler_attentions  # [S, Q, D], [S, Q, P] (one slice per square scene)
    if att.ndim == 4:
        att = att.mean(1)
    if feats.shape[0] != len(batch) or att.shape[0] != len(batch):
        raise RuntimeError(f"resampler probe: expected one slice per scene ({len(batch)}), got {feats.shape[0]}")
    colors, shapes = sorted(BINDING_COLORS), list(BINDING_SHAPES)
    xs, ys = [], []
    for i, scene in enumerate(batch):
        W, H = scene.image.size
        g = int(round(att.shape[-1] ** 0.5))
        cell = W / g
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            ov = np.zeros((g, g))
            for r in range(g):
                for c in range(g):
                    ov[r, c] = (max(0.0, min(x1, (c + 1) * cell) - max(x0, c * cell))
                                * max(0.0, min(y1, (r + 1) * cell) - max(y0, r * cell)))
            mass = att[i].float().numpy() @ ov.reshape(-1)
            xs.append(feats[i, int(np.argmax(mass))].float().numpy())
            ys.append((colors.index(o.color), shapes.index(o.shape)))
    return xs, ys


def _probe(x: np.ndarray, y: np.ndarray, n_classes: int, n_train: int, steps: int = 400) -> float:
    gen = torch.Generator().manual_seed(0)
    X = torch.tensor(x, dtype=torch.float32)
    X = (X - X[:n_train].mean(0)) / X[:n_train].std(0).clamp_min(1e-6)
    Y = torch.tensor(y, dtype=torch.long)
    lin = torch.nn.Linear(X.shape[1], n_classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(X[:n_train]), Y[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(X[n_train:]).argmax(1) == Y[n_train:]).float().mean())


def resampler_probe(model, processor, seed: int = 30_000, n_scenes: int = 160, n_objects: int = 4,
                    batch: int = 16) -> Dict[str, float]:
    """Held-out probe accuracy of colour, shape and (colour, shape) from each object's own image token
    (module doc), with the chance levels (the majority class of the held-out objects)."""
    rng = random.Random(seed)
    model.eval()
    xs, ys = [], []
    for start in range(0, n_scenes, batch):
        scenes = [make_binding_scene(rng, size=(112, 112), n_objects=n_objects)
                  for _ in range(min(batch, n_scenes - start))]
        x, y = _object_tokens(model, processor, scenes)
        xs += x
        ys += y
    x, y = np.stack(xs), np.array(ys)
    n_train = int(0.7 * len(x))
    nc, ns = len(BINDING_COLORS), len(BINDING_SHAPES)
    joint = y[:, 0] * ns + y[:, 1]
    test = y[n_train:]
    return {"objects": float(len(x)), "color": _probe(x, y[:, 0], nc, n_train),
            "shape": _probe(x, y[:, 1], ns, n_train), "color+shape": _probe(x, joint, nc * ns, n_train),
            "chance color": float(np.bincount(test[:, 0]).max() / len(test)),
            "chance shape": float(np.bincount(test[:, 1]).max() / len(test))}


def shape_probe_training(lr: float, steps: int = 600, batch: int = 32, seed: int = 0,
                         report_every: int = 100) -> List[Tuple[int, float, float]]:
    """Train the seeded binding model's SigLIP tower + resampler + a linear shape classifier (max over the
    image tokens) on square one-object binding scenes at ``lr`` (AdamW) for ``steps`` steps of ``batch``;
    returns ``[(step, mean loss, mean accuracy)]`` every ``report_every`` steps and at the end, the means
    over the batches since the previous report, each scored before its own update (fresh scenes, so on
    scenes the model had not seen); step 0 is the untrained model's first batch."""
    from .train import build_processor, encode_batch, new_model, task_config

    model, processor = new_model(seed, task_config("binding", 1)), build_processor("binding")
    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.hidden_size, len(BINDING_SHAPES))
    params = list(model.vpm.parameters()) + list(model.resampler.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    out, losses, accs = [], [], []
    for step in range(steps + 1):
        scenes = [make_binding_scene(rng, size=(112, 112), n_objects=1, question="shape") for _ in range(batch)]
        pixels = torch.stack([p[0] for p in encode_batch(processor, scenes)["data"]["pixel_values"]])
        y = torch.tensor([BINDING_SHAPES.index(s.answer) for s in scenes])
        n, side = len(scenes), 112 // 14
        tgt = torch.tensor([[side, side]] * n, dtype=torch.int32)
        mask = torch.ones(n, 1, side * side, dtype=torch.bool)
        feats = model.vpm(pixels, patch_attention_mask=mask, tgt_sizes=tgt).last_hidden_state
        logits = head(model.resampler(feats, tgt).max(1).values)
        loss = torch.nn.functional.cross_entropy(logits, y)
        losses.append(float(loss.detach()))
        accs.append(float((logits.argmax(1) == y).float().mean()))
        if step % report_every == 0 or step == steps:
            out.append((step, float(np.mean(losses)), float(np.mean(accs))))
            losses, accs = [], []
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out
