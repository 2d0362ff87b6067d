#!/usr/bin/env python
"""Fine-tune MiniCPM-V-2.6 with the LM loss plus an optional attention loss.

With no arguments it trains the embedded tiny demo model (seeded random weights, built
locally) on a small built-in data set about the demo photo whose answers should attend
to the face box, e.g.::

    python scripts/finetune_attention.py --steps 30 --lora 8 16 --layers 2:4 --out runs/box

Data (--data): JSONL, one {"image", "prompt", "answer", optional "box": [x0, y0, x1, y1]
(original pixels), optional "id"} per line; bad lines are reported and skipped.

Attention losses (--attn-loss): "box" pulls the answer rows' attention in --layers onto
the image tokens that see the box (KL(target || attention)); "teacher" matches attention
records written by --write-teacher (KL(teacher || student)); "none" trains the LM loss
only (the attention-to-box share is still reported for examples with a box).

--out holds checkpoint-<step>/ folders (adapter or model, optimizer, RNG, state.json,
metrics.jsonl; each written to a temporary folder and renamed) and the live
metrics.jsonl; --resume continues from the latest one. Exit status: 0 done, 1 error
(data, model, checkpoint), 2 usage.
"""
import argparse
import os
import shutil
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpmv-attn-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the tiny demo model)")
    g.add_argument("--data", default=None, help="JSONL data set (default: built-in examples on the demo photo)")
    g.add_argument("--max-length", type=int, default=2048, help="longest prompt + answer in tokens (default 2048)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default float32)")
    g = p.add_argument_group("losses")
    g.add_argument("--attn-loss", choices=["none", "box", "teacher"], default="box",
                   help="attention loss added to the LM loss (default box)")
    g.add_argument("--attn-weight", type=float, default=1.0, help="weight of the attention loss (default 1)")
    g.add_argument("--layers", default=None, help="LLM layers of the attention loss: '2:4', '1,3', '-1', 'all' "
                                                  "(default all)")
    g.add_argument("--teacher", default=None, help="folder of teacher attention records (<id>.json/.safetensors)")
    g.add_argument("--write-teacher", metavar="DIR", default=None,
                   help="write the model's answer-row attention as teacher records to DIR and exit")
    g = p.add_argument_group("training")
    g.add_argument("--lora", nargs="+", type=float, metavar=("R", "ALPHA"), default=None,
                   help="train peft LoRA adapters on the LLM attention projections: rank, alpha (default 2*rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--freeze-vision", action="store_true", help="full fine-tuning: freeze SigLIP and the resampler")
    g.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint LLM and vision layers")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3 with --lora, else 2e-4)")
    g.add_argument("--steps", type=int, default=30, help="total optimizer steps (default 30)")
    g.add_argument("--batch-size", type=int, default=1, help="examples per step (default 1)")
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="finetune_out", help="run folder for checkpoints and metrics (default "
                                                         "./finetune_out)")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps; 0 = at the end only")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out (or from CHECKPOINT)")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out holds checkpoints")
    g.add_argument("--plot", metavar="DIR", default=None,
                   help="write before/after attention heatmaps of --plot-example to DIR")
    g.add_argument("--plot-example", default=None, help="id of the example to plot (default: first with a box)")
    g.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation over the data set")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.save_every < 0:
        parser.error("--steps must be >= 0, --batch-size >= 1, --save-every >= 0")
    if args.lora is not None and (len(args.lora) > 2 or args.lora[0] < 1 or args.lora[0] != int(args.lora[0])):
        parser.error("--lora takes a positive integer rank and optionally alpha, e.g. --lora 8 16")
    if args.attn_loss == "teacher" and not args.teacher and not args.write_teacher:
        parser.error("--attn-loss teacher needs --teacher DIR (records from --write-teacher)")

    import torch

    from minicpmv_attn import finetune as ft

    report = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr)  # noqa: E731
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        examples = ft.read_jsonl(args.data, warn) if args.data else ft.builtin_examples()
        model, processor, folder = ft.load_model(args.model, device=device, dtype=args.dtype)
        layers = ft.parse_layers(args.layers, model.config.num_hidden_layers)
        encoded = ft.encode_examples(processor, examples, args.max_length, warn)
    except (ft.DataError, ValueError, OSError) as e:
        _err(str(e))
        return 1
    loss_cfg = ft.LossConfig(attn_loss=args.attn_loss, attn_weight=args.attn_weight, layers=layers)

    if args.write_teacher:
        paths = ft.write_teacher_records(model, encoded, layers, args.write_teacher, processor.tokenizer)
        print(f"wrote {len(paths)} teacher records to {args.write_teacher}")
        return 0

    lora = None
    if args.lora is not None:
        r = int(args.lora[0])
        lora = {"r": r, "alpha": float(args.lora[1]) if len(args.lora) > 1 else 2.0 * r, "dropout": args.lora_dropout}
    settings = {"model": args.model or "demo", "data": args.data or "builtin", "lora": lora,
                "layers": layers, "attn_loss": args.attn_loss, "attn_weight": args.attn_weight}

    # the run folder: resume, refuse to mix runs, or start over
    resume = None
    if args.resume is not None:
        resume = args.resume or args.out
        try:
            ckpt = ft.find_checkpoint(resume)
            state = ft.read_state(ckpt)
        except (FileNotFoundError, ValueError) as e:
            _err(str(e))
            return 1
        if state["settings"].get("lora") != lora:
            _err(f"{ckpt} was trained with lora={state['settings'].get('lora')}; this run has lora={lora}; "
                 f"pass the same --lora settings to resume")
            return 1
        if state["step"] >= args.steps:
            print(f"{ckpt} is at step {state['step']} >= --steps {args.steps}: nothing to do")
            return 0
    elif ft.list_checkpoints(args.out):
        if not args.overwrite:
            _err(f"{args.out} already holds checkpoints (latest step {ft.list_checkpoints(args.out)[-1][0]}); "
                 f"pass --resume to continue or --overwrite to start over")
            return 1
        for _, path in ft.list_checkpoints(args.out):
            shutil.rmtree(path)

    teachers = None
    if args.attn_loss == "teacher":
        try:
            teachers = ft.load_teachers(args.teacher, encoded, layers)
        except ft.DataError as e:
            _err(str(e))
            return 1

    torch.manual_seed(args.seed)  # LoRA initialisation
    if args.gradient_checkpointing:
        ft.enable_checkpointing(model)
    if lora is not None:
        try:
            model = ft.add_lora(model, lora["r"], lora["alpha"], lora["dropout"])
        except ImportError as e:
            _err(str(e))
            return 1
    elif args.freeze_vision:
        for mod in (model.vpm, model.resampler):
            mod.requires_grad_(False)
    lr = args.lr if args.lr is not None else (1e-3 if lora is not None else 2e-4)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report(f"{len(encoded)} examples, {n_train:,} trainable parameters, attn loss {args.attn_loss} "
           f"(weight {args.attn_weight}) on LLM layers {layers}, lr {lr}")

    plot_enc = before = None
    if args.plot:
        try:
            plot_enc = ft.pick_example(encoded, args.plot_example)
        except ValueError as e:
            _err(str(e))
            return 1
        before = ft.box_heatmap(model, plot_enc, layers, processor.tokenizer)
    cfg = ft.TrainConfig(steps=args.steps, lr=lr, batch_size=args.batch_size, seed=args.seed,
                         max_grad_norm=args.max_grad_norm, warmup=args.warmup, save_every=args.save_every,
                         keep=args.keep, out=args.out, progress=not args.quiet)
    try:
        result = ft.train(model, encoded, loss_cfg, cfg, teachers=teachers, resume=resume, settings=settings,
                          source_folder=folder, report=report, run_eval=not args.no_eval)
    except (ft.DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
        _err(str(e))
        return 1
    if plot_enc is not None:
        after = ft.box_heatmap(model, plot_enc, layers, processor.tokenizer)
        path = ft.plot_before_after(plot_enc.example.image, plot_enc.example.box, before[1], after[1],
                                    os.path.join(args.plot, "attention_before_after.png"), (before[2], after[2]),
                                    title=f"'{plot_enc.example.prompt}' -> '{plot_enc.example.answer}'\n"
                                          f"answer rows, LLM layers {layers} (mean), steps {result.step}")
        tokens = [ft.plot_token_grid(rec, plot_enc, os.path.join(args.plot, f"tokens_{when}.png"), layers)
                  for rec, when in ((before[0], "before"), (after[0], "after"))]
        report(f"wrote {path}, {tokens[0]}, {tokens[1]}")
    if result.checkpoint:
        print(f"saved {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
