"""Run the fork's compatibility tests on many transformers releases, one venv each.

Examples::

    python scripts/sweep_transformers.py                       # 4.40.0, the last 4.x, every 5.x minor
    python scripts/sweep_transformers.py --versions 5.24.0 4.40.0 --jobs 2
    python scripts/sweep_transformers.py --readme README.md --pin patches/UPSTREAM.json   # record it
    python scripts/sweep_transformers.py --canary              # CI: try a release above the cap, if any

Each release gets its own venv under --workdir (reused on the next run, or deleted once its
tests are done with --drop-venvs, ~1.3 GB each): torch 2.13.0 CPU,
transformers==VERSION, the fork installed editable without dependencies (so a release above
setup.py's cap can be tried). In each, the tests marked ``compat`` run (golden logits,
attention and greedy generate, capture during generate, chat, the main command, the
generation guard), then ``diff_upstream.py --transformers-only``.

Exit status: 0 every release passed (canary: nothing new, or the new release passes),
1 a release failed (canary: one line says which release broke what), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-sweep-transformers",
        description="Run the compatibility subset of the tests on transformers releases, one venv each, and "
                    "print the compatibility table (or, with --canary, try the newest release above the cap).",
        epilog="Exit status: 0 all passed, 1 a release failed, 2 usage error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--versions", nargs="+", metavar="V", default=None,
                   help="releases to test (default: 4.40.0, the newest 4.x, the newest patch of every 5.x minor "
                        "on the package index)")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "minicpmv-attn" / "sweep",
                   help="where the venvs, logs and junit reports go")
    p.add_argument("--jobs", type=int, default=1, help="releases tested at once (each uses one thread)")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout to test (default: the one this script is in); e.g. a git worktree of a "
                        "commit, so that editing the working tree during a long sweep changes nothing")
    p.add_argument("--readme", type=Path, default=None,
                   help="write the table into this README between the compat-table markers")
    p.add_argument("--pin", type=Path, default=None,
                   help="add each passing release's transformers snapshot to this pin (patches/UPSTREAM.json)")
    p.add_argument("--drop-venvs", action="store_true",
                   help="delete each release's venv (~1.3 GB) once its tests are done, so the sweep needs "
                        "the disk of one venv, not one per release (CI); the next run rebuilds them")
    p.add_argument("--json", type=Path, default=None, help="also write the outcomes as JSON")
    p.add_argument("--canary", action="store_true",
                   help="CI: if the package index has a release at or above TRANSFORMERS_CAP, run the "
                        "compatibility tests on it and fail with one line when it breaks something")
    p.add_argument("--canary-version", default=None, metavar="V",
                   help="with --canary: try this release instead of asking the package index")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from minicpmv_attn.upstream import transformers_sweep as ts  # here, so that --help answers at once

    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.pin and args.drop_venvs:
        print("error: --pin reads each release's snapshot from its venv: it cannot be used with --drop-venvs",
              file=sys.stderr)
        return 2
    if args.canary:
        rc, line = ts.canary(args.workdir, args.repo, version=args.canary_version, drop_venv=args.drop_venvs)
        print(line)
        return rc
    versions = args.versions
    if versions is None:
        try:
            versions = ts.sweep_versions(ts.index_versions(),
                                         ts.verified_range(args.repo / "modeling" / "modeling_qwen2.py")["min"])
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    bad = [v for v in versions if not ts.is_final(v)]
    if bad:
        print(f"error: --versions: {', '.join(bad)} are not release numbers like 5.24.0", file=sys.stderr)
        return 2
    print(f"sweeping transformers {', '.join(versions)} in {args.workdir}", file=sys.stderr)
    outcomes = ts.sweep(versions, args.workdir, args.repo, jobs=args.jobs, drop_venvs=args.drop_venvs)
    table = ts.markdown_table(outcomes, commit=ts.commit_of(args.repo))
    print(table)
    for o in outcomes:
        for failure in o.failures:
            print(f"  {o.version}: {failure}")
        if o.status == "error":
            print(f"  {o.version}: {o.detail}")
    if args.json:
        ts.save_json(outcomes, args.json)
    if args.readme:
        ts.update_readme(args.readme, table)
    if args.pin:
        pinned = ts.pin_snapshots(outcomes, args.workdir, args.pin, args.repo)
        print(f"snapshots added to {args.pin}: {', '.join(pinned) or 'none'}", file=sys.stderr)
    return 0 if all(o.status == "pass" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
