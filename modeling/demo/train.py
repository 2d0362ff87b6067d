"""Train the tiny demo MiniCPM-V-2.6 on procedural scenes (``scenes.py``), LM loss only.

The model is the real architecture at toy size (SigLIP 2 layers -> resampler with
``query_num`` queries -> Qwen2 2 layers, word-level vocabulary) and is trained through
the real input path: each example is the chat prompt (``chat_prompt``: ChatML, the image
tag expanded by the processor into the overview + slice placeholders) followed by the
answer word and ``<|im_end|>``; the loss is the ordinary next-token cross entropy on the
answer tokens (no attention loss). Batches of fresh scenes are drawn from a seeded
``random.Random``; the model's initial weights from ``torch.manual_seed(seed)``: the same
seed and thread count give the same losses.

``train_demo(out)`` writes a checkpoint folder (fp16 ``model.safetensors``, config,
preprocessor config, word-level tokenizer) plus ``train_log.json`` (settings, the loss
of every step, held-out accuracy, wall time, CPU threads).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import random
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .checkpoint import DEMO_CONFIG, DEMO_PREPROCESSOR
from .scenes import SHAPES, WORDS, Scene, check_task, make_binding_scene, make_scene, scenes, task_words
from .vocab import word_tokenizer, word_vocab, write_tokenizer

TRAIN_SEED = 0
EVAL_SEED = 10_000  # held-out scenes for the accuracy logged during training (pointing-game seeds differ)
QUERY_NUM = 16
TRAINED_CONFIG = dict(
    DEMO_CONFIG,
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=len(word_vocab(WORDS)), max_position_embeddings=512, query_num=QUERY_NUM, image_size=112,
    slice_config={"max_slice_nums": 4, "patch_size": 14, "scale_resolution": 112, "model_type": "minicpmv"},
    vision_config={"model_type": "siglip", "hidden_size": 96, "image_size": 224, "intermediate_size": 192,
                   "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14},
)
TRAINED_PREPROCESSOR = dict(DEMO_PREPROCESSOR, max_slice_nums=4, scale_resolution=112, image_feature_size=QUERY_NUM)
# Training draws 1-object scenes too (about a third): the image path starts learning on them first
# (held-out scenes, all with 2-3 objects, come from scenes.make_scene's own distribution).
TRAIN_OBJECTS = (1, 2, 3)
# Resampler init: query j starts as the 2-D sin-cos position of the centre of cell j of a
# sqrt(Q) x sqrt(Q) grid over an 8 x 8 patch slice, and the query / key projections as a scaled identity,
# so each query starts on its own region (the keys carry the same sin-cos table). With random
# projections every query averages all patches almost uniformly (entropy 4.07 of 4.16 nats), image
# tokens hardly differ, and held-out accuracy stayed at the question-type prior for 1000 steps.
RESAMPLER_QK_SCALE = 2.0  # query entropy 2.06 nats at init (about 8 patches each)
# Share of training scenes asked a shape question ("Which shape is red?"). Colour questions are
# learned within a few hundred steps (the target is the only coloured object); telling circle,
# square and triangle apart is what takes the training time, so it gets most of the batches.
SHAPE_SHARE = 0.75
# The shipped model's run (scripts/train_demo.py with no flags but --out rebuilds it; see docs/demo_model.md):
# binding scenes, a one-object phase, then 2 -> 5 objects; lr 5e-4 (the SigLIP tower does not learn the five
# shapes at 2e-3); the resampler's query and key path frozen at its local-region init (trained freely, the
# queries collapse onto single patches and no image token keeps one object's colour and shape together).
DEFAULTS = {"steps": 16000, "schedule_steps": None, "batch": 16, "lr": 5e-4, "warmup": 100, "seed": TRAIN_SEED,
            "shape_share": 0.6, "task": "binding", "layers": 3, "curriculum": 2000, "single_steps": 1500,
            "vision_lr": None, "freeze_resampler_qk": False, "freeze_resampler_keys": True, "threads": 1}
# the single-task recipe of the earlier demo model (gray distractors): python scripts/train_demo.py --task single
# --lr 2e-3 --steps 8000 --shape-share 0.75 --curriculum 0 --single-steps 0 --no-freeze-resampler-keys
# Binding training (task="binding"): scenes of 1..max objects, every object coloured (1-object scenes teach
# reading an attribute; 2+ need binding). With ``curriculum`` = C > 0 the maximum grows from 2 to 5 objects
# over the first C steps; held-out scenes have 3-5 objects.
BINDING_TRAIN_MAX = 5


def task_config(task: str = "single", layers: int = 2) -> dict:
    """The trained demo's model config for ``task`` (its word vocabulary) with ``layers`` LLM layers."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return dict(TRAINED_CONFIG, vocab_size=len(word_vocab(task_words(task))), num_hidden_layers=int(layers))


def build_processor(task: str = "single"):
    """The demo's processor (image processor with the trained config + ``task``'s word-level tokenizer),
    built in memory."""
    from ..image_processing_minicpmv import MiniCPMVImageProcessor
    from ..processing_minicpmv import MiniCPMVProcessor
    from ..tokenization_minicpmv_fast import MiniCPMVTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(word_tokenizer(task_words(task)), tmp)
        tok = MiniCPMVTokenizerFast.from_pretrained(tmp)
    ip_kwargs = {k: v for k, v in TRAINED_PREPROCESSOR.items()
                 if k not in ("image_processor_type", "processor_class", "auto_map")}
    return MiniCPMVProcessor(MiniCPMVImageProcessor(**ip_kwargs), tok)


def grid_queries(n: int, dim: int, patches: int = 8) -> torch.Tensor:
    """[n, dim] sin-cos positions (resampler's table, in patch units) of the cell centres of a
    sqrt(n) x sqrt(n) grid over a ``patches`` x ``patches`` slice, row by row."""
    from ..resampler import sincos_1d

    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"query_num must be a square for the grid init, got {n}")
    centre = (torch.arange(side, dtype=torch.float32) + 0.5) * patches / side - 0.5
    rows, cols = centre[:, None].expand(side, side).reshape(-1), centre[None, :].expand(side, side).reshape(-1)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=-1)


def new_model(seed: int, config: Optional[dict] = None):
    """The untrained demo model, seeded: normal(0, 1/fan_in) matrices, unit norms, zero biases, the
    resampler's grid queries (see ``RESAMPLER_QK_SCALE``), and unit-variance token embeddings: the
    resampler's outputs have unit variance per dimension (``ln_post``, then ``proj`` ~ 1/sqrt(D)), and
    text embeddings ten times smaller vanish in the LLM's first-layer averages, where the answer
    position must pick up the question's word."""
    from ..configuration_minicpm import MiniCPMVConfig
    from ..modeling_minicpmv import MiniCPMV

    torch.manual_seed(seed)
    model = MiniCPMV(MiniCPMVConfig(**(TRAINED_CONFIG if config is None else config)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name or name.startswith("resampler.ln") or "layer_norm" in name:
                p.fill_(1.0)
            elif name == "resampler.query":
                p.copy_(grid_queries(p.shape[0], p.shape[1]))
            elif name == "resampler.attn.in_proj_weight":  # q, k: RESAMPLER_QK_SCALE * identity; v: random
                d = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * d ** -0.5)
                p[: 2 * d] = RESAMPLER_QK_SCALE * torch.eye(d).repeat(2, 1)
            elif name == "llm.model.embed_tokens.weight":  # std 1: text tokens as large as image tokens
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "resampler.proj":
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[0] ** -0.5)
            else:  # matrices and embeddings: std 1/sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
    return model


def encode_batch(processor, batch: Sequence[Scene]) -> Dict[str, object]:
    """Scenes -> model inputs for teacher forcing: chat prompt + answer + ``<|im_end|>``, left padded;
    ``labels`` hold the answer tokens only."""
    from ..modeling_minicpmv import chat_prompt

    tok = processor.tokenizer
    texts, images, n_answer = [], [], []
    for s in batch:
        prompt, imgs = chat_prompt(tok, s.image, [{"role": "user", "content": s.question}])
        answer = s.answer + "<|im_end|>"
        n_answer.append(len(tok.encode(answer, add_special_tokens=False)))
        texts.append(prompt + answer)
        images.append(imgs)
    inputs = processor(texts, images, return_tensors="pt")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(n_answer):
        labels[i, -n:] = ids[i, -n:]
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    data = {"input_ids": ids, "pixel_values": inputs["pixel_values"], "tgt_sizes": inputs["tgt_sizes"],
            "image_bound": inputs["image_bound"], "position_ids": position_ids}
    return {"data": data, "attention_mask": mask, "labels": labels}


def answer_accuracy(model, processor, batch: Sequence[Scene]) -> float:
    """Share of scenes whose answer token is the argmax after the prompt (teacher forced, one forward)."""
    enc = encode_batch(processor, batch)
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(enc["data"], attention_mask=enc["attention_mask"], use_cache=False).logits
    model.train(was)
    labels = enc["labels"]
    first = (labels != -100).float().argmax(1)  # first answer position per row
    pred = logits[torch.arange(len(batch)), first - 1].argmax(-1)
    return float((pred == labels[torch.arange(len(batch)), first]).float().mean())


def train_scene(rng: random.Random, shape_share: Optional[float] = SHAPE_SHARE, task: str = "single",
                max_objects: int = BINDING_TRAIN_MAX) -> Scene:
    """One training scene: single task: 1-3 objects (``TRAIN_OBJECTS``), a shape question with probability
    ``shape_share`` (scenes are redrawn until the question type matches; None: as drawn); binding task:
    1..``max_objects`` objects, a shape question with probability ``shape_share`` (None: 0.5)."""
    if check_task(task) == "binding":
        n = rng.randint(1, max_objects)
        share = 0.5 if shape_share is None else shape_share
        return make_binding_scene(rng, n_objects=n, question="shape" if rng.random() < share else "color")
    n = rng.choice(TRAIN_OBJECTS)
    if shape_share is None:
        return make_scene(rng, n_objects=n)
    want_shape = rng.random() < shape_share
    while True:
        scene = make_scene(rng, n_objects=n)
        if (scene.answer in SHAPES) == want_shape:
            return scene


def max_objects_at(step: int, single_steps: int = 0, curriculum: int = 0) -> int:
    """Binding training's most objects per scene at ``step``: 1 for the first ``single_steps``, then growing
    from 2 to ``BINDING_TRAIN_MAX`` over ``curriculum`` steps (straight to the maximum when 0)."""
    grown = step - single_steps
    if grown < 0:
        return 1
    if grown >= curriculum:
        return BINDING_TRAIN_MAX
    return 2 + (BINDING_TRAIN_MAX - 2) * grown // curriculum


def _frozen_resampler(model, qk: bool, keys: bool) -> List[tuple]:
    """``[(parameter view, initial copy)]`` that ``train_steps`` restores after every step."""
    if not (qk or keys):
        return []
    r = model.resampler
    d = r.attn.in_proj_weight.shape[1]
    views = [r.query, r.attn.in_proj_weight[: 2 * d], r.attn.in_proj_bias[: 2 * d]] + list(r.ln_q.parameters())
    if keys:
        views += list(r.kv_proj.parameters()) + list(r.ln_kv.parameters())
    return [(v, v.detach().clone()) for v in views]


def train_steps(model, processor, steps: int, batch: int, lr: float, warmup: int, seed: int,
                on_step: Optional[Callable[[int, float], None]] = None,
                total_steps: Optional[int] = None, shape_share: Optional[float] = SHAPE_SHARE,
                task: str = "single", curriculum: int = 0, freeze_resampler_qk: bool = False,
                freeze_resampler_keys: bool = False, single_steps: int = 0,
                vision_lr: Optional[float] = None) -> List[float]:
    """Run ``steps`` AdamW steps on fresh ``task`` scenes (``train_scene``) from ``random.Random(seed)``;
    returns every step's loss. ``single_steps`` (binding): the first steps draw one-object scenes only
    (reading an attribute, no binding yet). ``curriculum`` (binding): the steps after those over which the
    most objects per scene grows from 2 to ``BINDING_TRAIN_MAX`` (0: all the way from the start). ``freeze_resampler_qk``: keep
    the resampler's queries, query norm and query / key projections at their initial values (restored
    after every step). Trained freely, the resampler's attention collapses onto single patches within
    250 steps on binding scenes (entropy 2.08 -> 0.02-0.2 nats) and an object's colour stops being
    decodable from its own token; frozen, the collapse is slower (0.52 nats at step 250, 0.39 at 500)
    but still happens through the keys' content path (``kv_proj``, ``ln_kv``); see docs/pointing_game.md.
    ``freeze_resampler_keys``: that and the key path's ``kv_proj`` and ``ln_kv`` as well (the values then
    read SigLIP through a fixed random projection; only SigLIP's own features can still sharpen it).

    The learning rate warms up linearly over ``warmup`` steps, then decays linearly to 5% at
    ``total_steps`` (default ``steps``; pass the full run's length to replay its first steps).
    ``vision_lr``: the SigLIP tower's peak learning rate (default ``lr``). At 2e-3 the tiny tower does not
    learn to tell the five binding shapes apart (a shape classifier on its pooled tokens stays at 0.3-0.45
    after 600 steps); at 5e-4 the same classifier reaches 0.97-1.00 (docs/pointing_game.md).
    """
    if shape_share is not None and not 0.0 < shape_share < 1.0:
        raise ValueError(f"shape_share must be in (0, 1) (or None), got {shape_share}")
    if vision_lr is not None and not vision_lr > 0:
        raise ValueError(f"vision_lr must be > 0 (or None), got {vision_lr}")
    total = steps if total_steps is None else int(total_steps)
    rng = random.Random(seed)
    vision = [p for n, p in model.named_parameters() if n.startswith("vpm.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("vpm.")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": vision, "lr": lr if vision_lr is None else vision_lr}],
                            lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * max(0.05, 1.0 - s / max(1, total)))
    model.train()
    losses = []
    frozen = _frozen_resampler(model, freeze_resampler_qk, freeze_resampler_keys)
    check_task(task)
    if curriculum < 0 or single_steps < 0:
        raise ValueError(f"curriculum and single_steps must be >= 0 steps, got {curriculum} and {single_steps}")
    for step in range(steps):
        top = max_objects_at(step, single_steps, curriculum)
        enc = encode_batch(processor, [train_scene(rng, shape_share, task, top) for _ in range(batch)])
        out = model(enc["data"], attention_mask=enc["attention_mask"], labels=enc["labels"], use_cache=False)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"step {step}: the loss is {float(out.loss)}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if frozen:
            with torch.no_grad():
                for t, v in frozen:
                    t.copy_(v)
        losses.append(float(out.loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def save_folder(model, out: str, log: dict, task: str = "single") -> str:
    """Write the checkpoint folder (fp16 weights, configs, tokenizer, train_log.json) atomically."""
    from ..attention_record import atomic_write_json
    from .checkpoint import atomic_folder

    with atomic_folder(out) as tmp:
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        model.to(torch.float32)
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["auto_map"] = TRAINED_CONFIG["auto_map"]
        cfg["torch_dtype"] = "float16"
        atomic_write_json(cfg_path, cfg)
        atomic_write_json(os.path.join(tmp, "preprocessor_config.json"), TRAINED_PREPROCESSOR)
        write_tokenizer(word_tokenizer(task_words(task)), tmp)
        atomic_write_json(os.path.join(tmp, "train_log.json"), log)
    return out


def train_demo(out: str, steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"],
               warmup: int = DEFAULTS["warmup"], seed: int = DEFAULTS["seed"], threads: int = DEFAULTS["threads"],
               eval_every: int = 250, n_eval: int = 64, progress: bool = True,
               shape_share: Optional[float] = DEFAULTS["shape_share"],
               schedule_steps: Optional[int] = DEFAULTS["schedule_steps"],
               task: str = DEFAULTS["task"], layers: int = DEFAULTS["layers"],
               curriculum: int = DEFAULTS["curriculum"], snapshots: bool = False,
               freeze_resampler_qk: bool = DEFAULTS["freeze_resampler_qk"],
               freeze_resampler_keys: bool = DEFAULTS["freeze_resampler_keys"],
               single_steps: int = DEFAULTS["single_steps"],
               vision_lr: Optional[float] = DEFAULTS["vision_lr"]) -> dict:
    """Train from ``seed`` and write the checkpoint folder ``out``; returns the training log.

    ``schedule_steps``: length of the learning-rate schedule (default ``steps``); a run with
    ``steps < schedule_steps`` stops part-way down the same schedule, and gives exactly the weights
    that a longer run with the same seed and threads had at that step. ``snapshots``: also write the
    checkpoint folder ``{out}-step{N}`` at every evaluation (from an fp16 copy; the run is unchanged), the
    folder that ``steps=N, schedule_steps=<this run's>`` would write.
    """
    from tqdm import tqdm

    schedule = steps if schedule_steps is None else int(schedule_steps)
    if steps < 1 or batch < 1 or lr <= 0 or schedule < steps:
        raise ValueError(f"steps and batch must be >= 1, lr > 0 and schedule_steps >= steps, got steps={steps}, "
                         f"batch={batch}, lr={lr}, schedule_steps={schedule}")
    torch.set_num_threads(threads)
    model, processor = new_model(seed, task_config(task, layers)), build_processor(task)
    held_out = scenes(EVAL_SEED, n_eval, task)
    evals = []
    settings = {"task": task, "layers": layers, "curriculum": curriculum, "freeze_resampler_qk": freeze_resampler_qk,
                "freeze_resampler_keys": freeze_resampler_keys, "single_steps": single_steps,
                "vision_lr": vision_lr, "seed": seed, "schedule_steps": schedule,
                "shape_share": shape_share, "batch": batch, "lr": lr, "warmup": warmup, "threads": threads}
    bar = tqdm(total=steps, desc="train demo", disable=not progress)
    t0, c0 = time.time(), time.process_time()

    def on_step(step, loss):
        bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = answer_accuracy(model, processor, held_out)
            evals.append({"step": step + 1, "accuracy": acc, "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
            bar.write(f"step {step + 1}: loss {loss:.4f}, held-out answer accuracy {acc:.3f}")
            if snapshots:
                snap = copy.deepcopy(model)
                save_folder(snap, f"{out}-step{step + 1}", dict(settings, steps=step + 1, evals=list(evals),
                            train_seconds=round(time.time() - t0, 1)), task)

    losses = train_steps(model, processor, steps, batch, lr, warmup, seed, on_step, total_steps=schedule,
                         shape_share=shape_share, task=task, curriculum=curriculum,
                         freeze_resampler_qk=freeze_resampler_qk,
                         freeze_resampler_keys=freeze_resampler_keys, single_steps=single_steps,
                         vision_lr=vision_lr)
    bar.close()
    seconds = time.time() - t0
    log = {"task": task, "layers": layers, "curriculum": curriculum, "freeze_resampler_qk": freeze_resampler_qk,
           "freeze_resampler_keys": freeze_resampler_keys, "single_steps": single_steps, "vision_lr": vision_lr,
           "seed": seed, "steps": steps,
           "cpu_seconds": round(time.process_time() - c0, 1), "schedule_steps": schedule,
           "shape_share": shape_share, "batch": batch,
           "lr": lr, "warmup": warmup, "threads": threads,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "train_seconds": round(seconds, 1), "losses": [round(x, 6) for x in losses], "evals": evals}
    save_folder(model, out, log, task)
    return log
