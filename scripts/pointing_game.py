"""The pointing game on the trained demo model: answer accuracy and how often each attention
map's peak lands inside the object the answer depends on, next to chance.

    python scripts/pointing_game.py [--seed S] [--n N] [--model FOLDER] [--json OUT]

Fresh scenes from ``--seed`` (the training scenes come from seed 0's stream; the default
seed 1 draws others), answered with ``model.chat``; see ``minicpmv_attn.demo.pointing``.
Exit code 0 when the game ran (the numbers are the result, not a pass/fail), 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="scene seed (default %(default)s)")
    p.add_argument("--n", type=int, default=100, help="number of scenes (default %(default)s)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped trained demo model)")
    p.add_argument("--json", default=None, help="also write per-scene results to this JSON file")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, else float32)")
    args = p.parse_args(argv)

    import torch

    from minicpmv_attn.analysis.devices import DeviceError, pick
    from minicpmv_attn.capture import resolve_dtype
    from minicpmv_attn.demo import load_trained_demo
    from minicpmv_attn.demo.pointing import MAX_SCENES, play

    try:
        device, dtype = pick(args.device, args.dtype, "float32")
        torch_dtype = resolve_dtype(dtype, "--dtype", allow_auto=False)
    except (DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not 1 <= args.n <= MAX_SCENES:
        print(f"error: --n must be 1..{MAX_SCENES}, got {args.n}", file=sys.stderr)
        return 2
    if args.model is not None and not os.path.isdir(args.model):
        print(f"error: --model {args.model}: not a folder", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        model, processor = load_trained_demo(args.model, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = model.to(device)
    result = play(model, processor, seed=args.seed, n=args.n, progress=True)
    if args.json:
        from minicpmv_attn.attention_record import atomic_write_json

        atomic_write_json(args.json, {"hits": result.hits, "chance": result.chance,
                                      "answer_accuracy": result.answer_accuracy, "n": result.n,
                                      "seed": result.seed, "scenes": result.rows})
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
