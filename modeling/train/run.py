"""One fine-tuning run as ``scripts/finetune_attention.py`` does it: load the data and the model,
write teacher records or train (fresh, resumed or started over), and draw the before/after
pictures.

:class:`FinetuneOptions` mirrors the command-line flags (same names, same defaults) and
refuses unusable combinations with :class:`UsageError` (exit status 2);
:func:`run_finetune` raises :class:`FinetuneError` for a data, model or checkpoint
problem (exit status 1) and returns a :class:`FinetuneOutcome` otherwise.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

from ..analysis.devices import pick as pick_device_dtype
from .checkpoints import find_checkpoint, list_checkpoints, read_state
from .data import DataError, builtin_examples, encode_examples, pick_example, read_jsonl
from .figures import box_heatmap, plot_before_after, plot_token_grid
from .forward import write_teacher_records
from .loop import TrainConfig, TrainResult, train
from .losses import LossConfig, load_teachers
from .model import add_lora, enable_checkpointing, load_model, parse_layers


class UsageError(ValueError):
    """Options that cannot go together (the command line reports it as a usage error)."""


class FinetuneError(Exception):
    """A data, model or checkpoint problem that ends the run (``error: <message>``, exit status 1)."""


@dataclass
class FinetuneOptions:
    """The run's settings; one field per command-line flag (``--max-length`` -> ``max_length``)."""

    model: Optional[str] = None
    data: Optional[str] = None
    max_length: int = 2048
    device: Optional[str] = "auto"  # CUDA, then MPS, then the CPU (analysis.devices)
    dtype: Optional[str] = None  # bfloat16 on CUDA, else float32
    attn_loss: str = "box"
    attn_weight: float = 1.0
    layers: Optional[str] = None
    teacher: Optional[str] = None
    write_teacher: Optional[str] = None
    lora: Optional[List[float]] = None  # [rank] or [rank, alpha]
    lora_dropout: float = 0.0
    freeze_vision: bool = False
    gradient_checkpointing: bool = False
    lr: Optional[float] = None
    steps: int = 30
    batch_size: int = 1
    warmup: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    out: str = "finetune_out"
    save_every: int = 10
    keep: int = 2
    resume: Optional[str] = None  # "": the latest checkpoint in ``out``
    overwrite: bool = False
    plot: Optional[str] = None
    plot_example: Optional[str] = None
    no_eval: bool = False
    quiet: bool = False

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.save_every < 0:
            raise UsageError("--steps must be >= 0, --batch-size >= 1, --save-every >= 0")
        if self.lora is not None and (len(self.lora) > 2 or self.lora[0] < 1 or self.lora[0] != int(self.lora[0])):
            raise UsageError("--lora takes a positive integer rank and optionally alpha, e.g. --lora 8 16")
        for flag, value in (("--warmup", self.warmup), ("--keep", self.keep), ("--attn-weight", self.attn_weight),
                            ("--max-grad-norm", self.max_grad_norm), ("--lora-dropout", self.lora_dropout)):
            if not value >= 0:  # a negative warm-up or weight turns the run into gradient ascent
                raise UsageError(f"{flag} {value}: expected a number >= 0")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: expected a learning rate > 0")
        if self.attn_loss == "teacher" and not self.teacher and not self.write_teacher:
            raise UsageError("--attn-loss teacher needs --teacher DIR (records from --write-teacher)")


@dataclass
class FinetuneOutcome:
    """What a successful run leaves: a line for stdout, the training result, the pictures."""

    message: Optional[str] = None
    result: Optional[TrainResult] = None
    figures: Optional[List[str]] = None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _changed_settings(before: dict, now: dict) -> List[str]:
    """``"name: before there, now here"`` for each setting of ``now`` that ``before`` (a checkpoint's
    settings) holds with another value. Older checkpoints keep the loss and training settings
    under ``loss`` / ``train``; a setting a checkpoint does not record cannot be compared."""
    import json

    older = dict(before.get("loss") or {}, **(before.get("train") or {}))
    out = []
    for key, value in now.items():
        if key in before:
            was = before[key]
        elif key in older:
            was = older[key]
        else:
            continue
        if json.loads(json.dumps(was)) != json.loads(json.dumps(value)):
            out.append(f"{key}: {json.dumps(was)} there, {json.dumps(value)} now")
    return out


def run_finetune(opts: FinetuneOptions, report: Optional[Callable[[str], None]] = None,
                 warn: Callable[[str], None] = _warning) -> FinetuneOutcome:
    """Run what ``opts`` asks for. ``report`` gets progress lines (default: stderr, silent with
    ``quiet``), ``warn`` the skipped data lines."""
    import torch

    if report is None:
        report = (lambda m: None) if opts.quiet else _stderr
    try:
        device, dtype = pick_device_dtype(opts.device, opts.dtype, "float32")
        examples = read_jsonl(opts.data, warn) if opts.data else builtin_examples()
        model, processor, folder = load_model(opts.model, device=device, dtype=dtype, progress=not opts.quiet)
        layers = parse_layers(opts.layers, model.config.num_hidden_layers)
        encoded = encode_examples(processor, examples, opts.max_length, warn)
    except (DataError, ValueError, OSError) as e:
        raise FinetuneError(str(e)) from e
    loss_cfg = LossConfig(attn_loss=opts.attn_loss, attn_weight=opts.attn_weight, layers=layers)

    if opts.write_teacher:
        paths = write_teacher_records(model, encoded, layers, opts.write_teacher, processor.tokenizer)
        return FinetuneOutcome(message=f"wrote {len(paths)} teacher records to {opts.write_teacher}")

    lora = None
    if opts.lora is not None:
        r = int(opts.lora[0])
        lora = {"r": r, "alpha": float(opts.lora[1]) if len(opts.lora) > 1 else 2.0 * r, "dropout": opts.lora_dropout}
    lr = opts.lr if opts.lr is not None else (1e-3 if lora is not None else 2e-4)
    # every setting that changes what the run computes (not --steps, --save-every, --keep, --out)
    settings = {"model": opts.model or "demo", "data": opts.data or "builtin", "lora": lora,
                "layers": layers, "attn_loss": opts.attn_loss, "attn_weight": opts.attn_weight, "seed": opts.seed,
                "lr": lr, "batch_size": opts.batch_size, "warmup": opts.warmup, "max_grad_norm": opts.max_grad_norm,
                "max_length": opts.max_length, "dtype": opts.dtype, "freeze_vision": opts.freeze_vision,
                "teacher": os.path.abspath(opts.teacher) if opts.teacher else None}

    # the run folder: resume, refuse to mix runs, or start over
    resume = None
    if opts.resume is not None:
        resume = opts.resume or opts.out
        try:
            ckpt = find_checkpoint(resume)
            state = read_state(ckpt)
        except (FileNotFoundError, ValueError) as e:
            raise FinetuneError(str(e)) from e
        if state["settings"].get("lora") != lora:
            raise FinetuneError(f"{ckpt} was trained with lora={state['settings'].get('lora')}; this run has "
                                f"lora={lora}; pass the same --lora settings to resume")
        changed = _changed_settings(state.get("settings") or {}, settings)
        if changed:
            raise FinetuneError(f"{ckpt} was trained with other settings ({'; '.join(changed)}); resume with the "
                                f"same ones, or start a new run in another --out")
        if state["step"] >= opts.steps:
            return FinetuneOutcome(message=f"{ckpt} is at step {state['step']} >= --steps {opts.steps}: nothing to do")
    elif list_checkpoints(opts.out):
        if not opts.overwrite:
            raise FinetuneError(f"{opts.out} already holds checkpoints (latest step "
                                f"{list_checkpoints(opts.out)[-1][0]}); pass --resume to continue or --overwrite "
                                f"to start over")
        for _, path in list_checkpoints(opts.out):
            shutil.rmtree(path)

    teachers = None
    if opts.attn_loss == "teacher":
        try:
            teachers = load_teachers(opts.teacher, encoded, layers)
        except DataError as e:
            raise FinetuneError(str(e)) from e

    torch.manual_seed(opts.seed)  # LoRA initialisation
    if opts.gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        try:
            model = add_lora(model, lora["r"], lora["alpha"], lora["dropout"])
        except ImportError as e:
            raise FinetuneError(str(e)) from e
    elif opts.freeze_vision:
        for mod in (model.vpm, model.resampler):
            mod.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report(f"{len(encoded)} examples, {n_train:,} trainable parameters, attn loss {opts.attn_loss} "
           f"(weight {opts.attn_weight}) on LLM layers {layers}, lr {lr}")

    plot_enc = before = None
    if opts.plot:
        try:
            plot_enc = pick_example(encoded, opts.plot_example)
        except ValueError as e:
            raise FinetuneError(str(e)) from e
        before = box_heatmap(model, plot_enc, layers, processor.tokenizer)
    cfg = TrainConfig(steps=opts.steps, lr=lr, batch_size=opts.batch_size, seed=opts.seed,
                      max_grad_norm=opts.max_grad_norm, warmup=opts.warmup, save_every=opts.save_every,
                      keep=opts.keep, out=opts.out, progress=not opts.quiet)
    try:
        result = train(model, encoded, loss_cfg, cfg, teachers=teachers, resume=resume, settings=settings,
                       source_folder=folder, report=report, run_eval=not opts.no_eval)
    except (DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
        raise FinetuneError(str(e)) from e
    figures = None
    if plot_enc is not None:
        after = box_heatmap(model, plot_enc, layers, processor.tokenizer)
        path = plot_before_after(plot_enc.example.image, plot_enc.example.box, before[1], after[1],
                                 os.path.join(opts.plot, "attention_before_after.png"), (before[2], after[2]),
                                 title=f"'{plot_enc.example.prompt}' -> '{plot_enc.example.answer}'\n"
                                       f"answer rows, LLM layers {layers} (mean), steps {result.step}")
        tokens = [plot_token_grid(rec, plot_enc, os.path.join(opts.plot, f"tokens_{when}.png"), layers)
                  for rec, when in ((before[0], "before"), (after[0], "after"))]
        report(f"wrote {path}, {tokens[0]}, {tokens[1]}")
        figures = [path] + tokens
    return FinetuneOutcome(message=f"saved {result.checkpoint}" if result.checkpoint else None, result=result,
                           figures=figures)
