"""The resumable training loop: seeded data order, gradient accumulation, evaluation, the live
``metrics.jsonl`` log and checkpoints (:mod:`.checkpoints`).

``metrics.jsonl`` in the ``out`` folder is the live log: one line per step plus the
``before`` / ``after`` evaluations. Resuming restores weights, optimizer, RNG and the
data order (a function of the seed and the step), so a resumed run continues the same
run. tqdm is imported only where used.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..attention_record import atomic_write_text
from .checkpoints import find_checkpoint, load_checkpoint, mark_used, save_checkpoint, update_metrics
from .data import DataError, Encoded
from .forward import example_forward
from .losses import LossConfig


@dataclass
class TrainConfig:
    steps: int = 30
    lr: float = 1e-3
    batch_size: int = 1  # examples per optimizer step (gradient accumulation)
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: int = 0
    save_every: int = 10  # 0: only at the end
    keep: int = 2  # checkpoints kept in the out folder
    out: Optional[str] = None
    progress: bool = True


@dataclass
class TrainResult:
    step: int
    metrics: List[Dict[str, Any]] = field(default_factory=list)  # one per step run in this call
    before: Optional[Dict[str, float]] = None
    after: Optional[Dict[str, float]] = None
    checkpoint: Optional[str] = None


def batch_order(n: int, step: int, batch_size: int, seed: int) -> List[int]:
    """Example indices of one step: epochs of seeded permutations (a function of the step only)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


def evaluate(model, encoded: Sequence[Encoded], loss_cfg: LossConfig, teachers=None) -> Dict[str, float]:
    """Mean LM loss, attention loss and attention-to-box share over the examples (eval mode, no grad)."""
    was = model.training
    model.eval()
    sums: Dict[str, List[float]] = {"lm": [], "attn": [], "share": []}
    try:
        with torch.no_grad():
            for enc in encoded:
                r = example_forward(model, enc, loss_cfg, (teachers or {}).get(enc.example.id))
                for k in sums:
                    if r[k] is not None:
                        sums[k].append(float(r[k]))
    finally:
        model.train(was)
    return {k: (sum(v) / len(v) if v else None) for k, v in sums.items()}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _mean(v: List[float]) -> Optional[float]:
    return sum(v) / len(v) if v else None


def _truncate_metrics(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step and not (rec.get("eval") == "after" and rec.get("step", 0) >= step):
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(keep))


def train(model, encoded: Sequence[Encoded], loss_cfg: LossConfig, cfg: TrainConfig, teachers=None,
          resume: Optional[str] = None, settings: Optional[Dict[str, Any]] = None,
          source_folder: Optional[str] = None, report: Callable[[str], None] = print,
          run_eval: bool = True) -> TrainResult:
    """Train ``model`` (its trainable parameters) for ``cfg.steps`` optimizer steps in total.

    ``resume``: a checkpoint folder or run folder to continue from (weights, optimizer,
    RNG, step). Checkpoints and ``metrics.jsonl`` go to ``cfg.out`` when set.
    """
    if not encoded:
        raise DataError("no examples to train on")
    if loss_cfg.attn_loss == "box" and not any(e.box_frac is not None for e in encoded):
        raise DataError("attn_loss='box' needs examples with a 'box'; none has one")
    if loss_cfg.attn_loss == "teacher" and not teachers:
        raise DataError("attn_loss='teacher' needs teacher records (--teacher DIR)")
    settings = dict(settings or {})
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    metrics_path = os.path.join(cfg.out, "metrics.jsonl") if cfg.out else None
    if resume:
        ckpt = find_checkpoint(resume)
        state = load_checkpoint(ckpt, model, optimizer)
        mark_used(ckpt)
        start = int(state["step"])
        report(f"resumed from {ckpt} at step {start}")
        if metrics_path:
            saved = os.path.join(ckpt, "metrics.jsonl")
            if os.path.isfile(saved) and os.path.abspath(saved) != os.path.abspath(metrics_path):
                os.makedirs(cfg.out, exist_ok=True)
                shutil.copy(saved, metrics_path)
            _truncate_metrics(metrics_path, start)
    elif metrics_path:
        os.makedirs(cfg.out, exist_ok=True)
        atomic_write_text(metrics_path, "")
        for name in os.listdir(cfg.out):  # leftovers of an interrupted save
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)

    def log(rec: Dict[str, Any]):
        if metrics_path:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()

    result = TrainResult(step=start)
    if run_eval and start < cfg.steps:
        result.before = evaluate(model, encoded, loss_cfg, teachers)
        log(dict(eval="before", step=start, resumed=bool(resume), **result.before))
        report(f"step {start}: lm {_fmt(result.before['lm'])}  attn {_fmt(result.before['attn'])}  "
               f"box share {_fmt(result.before['share'])}")
    model.train()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True, file=sys.stderr)
    step = start
    try:
        for step in range(start, cfg.steps):
            t0 = time.time()
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            idx = batch_order(len(encoded), step, cfg.batch_size, cfg.seed)
            parts: Dict[str, List[float]] = {"loss": [], "lm": [], "attn": [], "share": []}
            for i in idx:
                enc = encoded[i]
                r = example_forward(model, enc, loss_cfg, (teachers or {}).get(enc.example.id))
                if not torch.isfinite(r["loss"]):
                    raise FloatingPointError(f"step {step + 1}: loss is {float(r['loss'])} on example {enc.example.id}")
                (r["loss"] / len(idx)).backward()
                for k in parts:
                    if r[k] is not None:
                        parts[k].append(float(r[k].detach()))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            optimizer.step()
            rec = {"step": step + 1, "loss": _mean(parts["loss"]), "lm_loss": _mean(parts["lm"]),
                   "attn_loss": _mean(parts["attn"]), "share": _mean(parts["share"]), "lr": lr,
                   "grad_norm": float(grad_norm), "examples": [encoded[i].example.id for i in idx],
                   "seconds": round(time.time() - t0, 3)}
            result.metrics.append(rec)
            log(rec)
            result.step = step + 1
            if bar is not None:
                post = {"lm": _fmt(rec["lm_loss"]), "attn": _fmt(rec["attn_loss"])}
                if rec["share"] is not None:
                    post["share"] = f"{rec['share']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            last = step + 1 == cfg.steps
            if cfg.out and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
                result.checkpoint = save_checkpoint(cfg.out, step + 1, model, optimizer,
                                                    dict(settings, train=asdict(cfg), loss=asdict(loss_cfg)),
                                                    metrics_path, source_folder, cfg.keep)
    finally:
        if bar is not None:
            bar.close()
    if run_eval and result.metrics:
        result.after = evaluate(model, encoded, loss_cfg, teachers)
        log(dict(eval="after", step=result.step, **result.after))
        report(f"step {result.step}: lm {_fmt(result.after['lm'])}  attn {_fmt(result.after['attn'])}  "
               f"box share {_fmt(result.after['share'])}")
        if cfg.out and result.checkpoint:  # the final checkpoint's log includes the evaluation
            update_metrics(result.checkpoint, metrics_path)
    return result
