"""The pointing game on the trained demo model: answer accuracy and how often each map's peak
lands inside the object the answer depends on, next to baselines that ignore the question.

    python scripts/pointing_game.py [--task binding|single] [--seed S] [--n N] [--model FOLDER]
                                    [--json OUT] [--markdown OUT]

Fresh scenes of ``--task`` from ``--seed`` (the training scenes come from seed 0's stream; the
default seed 1 draws others), answered with ``model.chat``; see ``minicpmv_attn.demo.pointing``.
Prints a table (kind, hit rate, hit rate on the row before the question, minus the best
baseline, ratio to it) and one closing line::

    pointing game: task T, answer accuracy A; best map KIND H; baselines: random object R,
    saliency S, before question Q, centre C; chance X (n=N, seed=S)

``--markdown OUT`` also writes the table as Markdown with the command, commit and date.
Exit code 0 when the game ran (the numbers are the result, not a pass/fail), 2 on bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _markdown_header(args, argv) -> str:
    import datetime
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cmd = "python scripts/pointing_game.py " + " ".join(sys.argv[1:] if argv is None else argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = args.model or "the shipped demo model (modeling/demo/trained)"
    return (f"### task {args.task}, seed {args.seed}, n {args.n}\n\n`{cmd}`; model: {model}; commit {commit}; "
            f"{date}\n\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("binding", "single"), default="binding",
                   help="binding: every object coloured; single: one coloured object among gray ones (default "
                        "%(default)s)")
    p.add_argument("--seed", type=int, default=1, help="scene seed (default %(default)s)")
    p.add_argument("--n", type=int, default=100, help="number of scenes (default %(default)s)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped trained demo model)")
    p.add_argument("--json", default=None, help="also write per-scene results to this JSON file")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown (with command, commit, date)")
    p.add_argument("--no-relevancy", action="store_true", help="skip the gradient relevancy kinds (a backward each)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, else float32)")
    args = p.parse_args(argv)

    import torch

    from minicpmv_attn.analysis.devices import DeviceError, pick
    from minicpmv_attn.capture import resolve_dtype
    from minicpmv_attn.demo import load_trained_demo
    from minicpmv_attn.demo.pointing import MAX_SCENES, map_kinds, play

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
    kinds = map_kinds(model.config.num_hidden_layers)
    if args.no_relevancy:
        kinds = {k: v for k, v in kinds.items() if not k.startswith("relevancy")}
    result = play(model, processor, seed=args.seed, n=args.n, kinds=kinds, progress=True, task=args.task)
    if args.json:
        from minicpmv_attn.attention_record import atomic_write_json

        atomic_write_json(args.json, {"task": result.task, "hits": result.hits, "chance": result.chance,
                                      "baselines": result.baselines, "before_question": result.before,
                                      "answer_accuracy": result.answer_accuracy, "n": result.n,
                                      "seed": result.seed, "scenes": result.rows})
    if args.markdown:
        from minicpmv_attn.attention_record import atomic_write_text

        atomic_write_text(args.markdown, _markdown_header(args, argv) + result.markdown() + "\n")
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
