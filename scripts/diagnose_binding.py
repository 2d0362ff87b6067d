"""Why does a demo model bind or not? Answer accuracy per object count and question type, the
resampler's attention entropy, and linear probes of each object's colour / shape from its own image
token (``minicpmv_attn.demo.diagnose``).

    python scripts/diagnose_binding.py [--model FOLDER] [--per N] [--scenes N]
    python scripts/diagnose_binding.py --lr-probe 2e-3 --lr-probe 5e-4   # can SigLIP learn shapes at that lr?

``--model init:LAYERS`` probes the untrained binding model (seed 0) instead of a checkpoint.
Exit code 0 when it ran, 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model), or init:LAYERS")
    p.add_argument("--per", type=int, default=24, help="scenes per (object count, question type) (default %(default)s)")
    p.add_argument("--scenes", type=int, default=96, help="square 4-object scenes for the probes (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.add_argument("--lr-probe", type=float, action="append", default=None, metavar="LR",
                   help="instead: train the untrained SigLIP tower + resampler + a linear shape classifier on "
                        "one-object scenes at LR (repeatable) and print its accuracy every 100 steps")
    p.add_argument("--probe-steps", type=int, default=600, help="--lr-probe steps of 32 scenes (default %(default)s)")
    args = p.parse_args(argv)
    if args.lr_probe is not None:
        if any(not lr > 0 for lr in args.lr_probe) or args.probe_steps < 1:
            print(f"error: --lr-probe must be > 0 and --probe-steps >= 1, got {args.lr_probe} and "
                  f"{args.probe_steps}", file=sys.stderr)
            return 2
        import torch

        from minicpmv_attn.demo.diagnose import shape_probe_training

        torch.set_num_threads(args.threads)
        for lr in args.lr_probe:
            rows = shape_probe_training(lr, steps=args.probe_steps)
            print(f"lr {lr:g}: shape accuracy on fresh scenes, mean over the 100 steps of 32 before each step "
                  + ", ".join(f"{s}: {a:.2f}" for s, _, a in rows))
        return 0
    if args.per < 1 or args.scenes < 16:
        print(f"error: --per must be >= 1 and --scenes >= 16, got {args.per} and {args.scenes}", file=sys.stderr)
        return 2
    init = args.model is not None and args.model.startswith("init:")
    if args.model is not None and not init and not os.path.isdir(args.model):
        print(f"error: --model {args.model}: not a folder", file=sys.stderr)
        return 2
    import torch

    from minicpmv_attn.demo import diagnose, load_trained_demo
    from minicpmv_attn.demo.train import build_processor, new_model, task_config

    torch.set_num_threads(args.threads)
    try:
        if init:
            layers = int(args.model[5:])
            model, processor = new_model(0, task_config("binding", layers)).eval(), build_processor("binding")
        else:
            model, processor = load_trained_demo(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = diagnose.accuracy_by_objects(model, processor, per=args.per)
    print("answer accuracy by objects (colour question / shape question):")
    for n in sorted({k[0] for k in acc}):
        print(f"  {n} objects: {acc[(n, 'color')]:.2f} / {acc[(n, 'shape')]:.2f}")
    print(f"resampler attention entropy: {diagnose.resampler_entropy(model, processor):.3f} nats (uniform 4.16)")
    probe = diagnose.resampler_probe(model, processor, n_scenes=args.scenes)
    print(f"probes from each object's own token ({probe['objects']:.0f} objects, 30% held out): colour "
          f"{probe['color']:.2f} (chance {probe['chance color']:.2f}), shape {probe['shape']:.2f} (chance "
          f"{probe['chance shape']:.2f}), both {probe['color+shape']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
