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
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpmv-attn-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the tiny demo model)")
    g.add_argument("--data", default=None, help="JSONL data set (default: built-in examples on the demo photo)")
    g.add_argument("--max-length", type=int, default=2048, help="longest prompt + answer in tokens (default 2048)")
    g.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | auto (default: bfloat16 on CUDA, "
                                                 "else float32)")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minicpmv_attn.analysis.devices import DeviceError, pick_device
    from minicpmv_attn.train.run import FinetuneError, FinetuneOptions, UsageError, run_finetune

    try:
        pick_device(args.device)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        opts = FinetuneOptions(**vars(args))
    except UsageError as e:
        parser.error(str(e))
    try:
        outcome = run_finetune(opts)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if outcome.message:
        print(outcome.message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
