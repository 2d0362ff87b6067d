"""Train the tiny demo MiniCPM-V-2.6 on procedural coloured-shape scenes (LM loss only).

Writes a checkpoint folder loadable with ``MiniCPMV.from_pretrained`` and
``AutoProcessor.from_pretrained`` (fp16 weights, configs, word-level tokenizer) and its
``train_log.json`` (every step's loss, held-out answer accuracy, wall time). The shipped
model (``modeling/demo/trained/``) is this script's default run::

    python scripts/train_demo.py --out runs/demo_trained   # the shipped folder is this run's output (about 40 min)

Same seed and thread count, same losses (see tests/test_demo_model.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

# minicpmv_attn.demo.train.DEFAULTS, kept here so that --help answers without loading torch (tests/test_cli_help.py
# holds them equal); the library is imported in main()
DEFAULTS = {"steps": 16000, "schedule_steps": None, "batch": 16, "lr": 5e-4, "warmup": 100, "seed": 0,
            "shape_share": 0.6, "task": "binding", "layers": 3, "curriculum": 2000, "single_steps": 1500,
            "vision_lr": None, "freeze_resampler_qk": False, "freeze_resampler_keys": True, "threads": 1}
EVAL_EVERY = 500


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="scenes per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="linear warmup steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="init and scene seed (default %(default)s)")
    p.add_argument("--shape-share", type=float, default=DEFAULTS["shape_share"],
                   help="share of training scenes asked a shape question (default %(default)s)")
    p.add_argument("--schedule-steps", type=int, default=DEFAULTS["schedule_steps"],
                   help="length of the learning-rate schedule (default: --steps); with more than --steps the run "
                        "stops part-way down it, with the weights a longer run has at that step")
    p.add_argument("--task", choices=("single", "binding"), default=DEFAULTS["task"],
                   help="scenes to train on (default %(default)s)")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="LLM layers (default %(default)s)")
    p.add_argument("--curriculum", type=int, default=DEFAULTS["curriculum"],
                   help="binding: steps over which the most objects per scene grows from 2 to 5 (default %(default)s)")
    p.add_argument("--freeze-resampler-qk", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS["freeze_resampler_qk"],
                   help="keep the resampler's queries and query/key projections at their init (local regions)")
    p.add_argument("--freeze-resampler-keys", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS["freeze_resampler_keys"],
                   help="--freeze-resampler-qk and the key path (kv_proj, ln_kv) too (default: on)")
    p.add_argument("--single-steps", type=int, default=DEFAULTS["single_steps"],
                   help="binding: first steps on one-object scenes only, before the curriculum (default %(default)s)")
    p.add_argument("--vision-lr", type=float, default=DEFAULTS["vision_lr"],
                   help="peak learning rate of the SigLIP tower (default: --lr)")
    p.add_argument("--snapshots", action="store_true",
                   help="also write OUT-stepN at every evaluation (what --steps N --schedule-steps STEPS writes)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch CPU threads (default %(default)s; the same seed "
                   "and thread count give the same weights)")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="held-out accuracy every N steps (default %(default)s)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from minicpmv_attn.demo.train import train_demo

    try:
        log = train_demo(args.out, steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                         seed=args.seed, threads=args.threads, eval_every=args.eval_every,
                         shape_share=args.shape_share, schedule_steps=args.schedule_steps, task=args.task,
                         layers=args.layers, curriculum=args.curriculum, snapshots=args.snapshots,
                         freeze_resampler_qk=args.freeze_resampler_qk,
                         freeze_resampler_keys=args.freeze_resampler_keys, single_steps=args.single_steps,
                         vision_lr=args.vision_lr)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = log["evals"][-1]["accuracy"] if log["evals"] else float("nan")
    print(f"trained {log['steps']} steps in {log['train_seconds']:.0f} s ({log['threads']} threads): final loss "
          f"{log['losses'][-1]:.4f}, held-out answer accuracy {acc:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
