"""Run the fork's compatibility tests on transformers and torch releases, one venv each.

Examples::

    python scripts/sweep_transformers.py                       # 4.40.0, the last 4.x, every 5.x minor
    python scripts/sweep_transformers.py --versions 5.25.0 4.40.0 --jobs 2
    python scripts/sweep_transformers.py --versions 5.25.0 --torch 2.6.0 2.15.0   # each with each
    python scripts/sweep_transformers.py --versions 5.25.0 --torch all   # every torch minor from TORCH_MIN
    python scripts/sweep_transformers.py --versions 5.25.0 --json docs/compatibility.json \\
        --doc docs/compatibility.md --pin patches/UPSTREAM.json           # record it
    python scripts/sweep_transformers.py --table docs/compatibility.json --doc docs/compatibility.md
    python scripts/sweep_transformers.py --canary              # CI: try a transformers / torch above its cap

Each (transformers, torch) pair gets its own venv under --workdir (reused on the next run, or
deleted once its tests are done with --drop-venvs; ~1.3 GB with the CPU build torch 2.13.0, ~6 GB
with a CUDA build, which is what the package index serves for the other releases and which runs
on the CPU): torch==T, transformers==VERSION, the fork installed editable without dependencies
(so a release above setup.py's caps can be tried). In each, the tests marked ``compat`` run
(golden logits, attention and greedy generate, capture during generate, chat, the main command,
the generation guard), then ``diff_upstream.py --transformers-only``. --json adds the runs to a
record (a run of the same pair is replaced); docs/compatibility.md is rendered from that record.

Exit status: 0 every release passed (canary: nothing new, or the new releases pass),
1 a release failed (canary: one line per library says which release broke what), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# minicpmv_attn.upstream.transformers_sweep.DEFAULT_TORCH, kept here so that --help answers without loading
# the library (tests/test_cli_help.py holds them equal)
DEFAULT_TORCH = "2.13.0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-sweep-transformers",
        description="Run the compatibility subset of the tests on transformers and torch releases, one venv "
                    "each, and print the compatibility table (or, with --canary, try the newest release of each "
                    "library above its cap).",
        epilog="Exit status: 0 all passed, 1 a release failed, 2 usage error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--versions", nargs="+", metavar="V", default=None,
                   help="releases to test (default: 4.40.0, the newest 4.x, the newest patch of every 5.x minor "
                        "on the package index)")
    p.add_argument("--torch", nargs="+", metavar="T", default=[DEFAULT_TORCH],
                   help="torch releases to test each transformers release with ('all': the newest patch of every "
                        "torch minor from TORCH_MIN on the package index)")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "minicpmv-attn" / "sweep",
                   help="where the venvs, logs and junit reports go")
    p.add_argument("--jobs", type=int, default=1, help="releases tested at once (each uses one thread)")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the checkout to test (default: the one this script is in); e.g. a git worktree of a "
                        "commit, so that editing the working tree during a long sweep changes nothing")
    p.add_argument("--doc", type=Path, default=None,
                   help="write the table of the --json record (or, without --json, of this sweep) into this "
                        "document between the compat-table markers (docs/compatibility.md)")
    p.add_argument("--table", type=Path, default=None, metavar="JSON",
                   help="run nothing: print (and with --doc write) the table of this sweep record")
    p.add_argument("--pin", type=Path, default=None,
                   help="add each passing release's transformers snapshot to this pin (patches/UPSTREAM.json)")
    p.add_argument("--drop-venvs", action="store_true",
                   help="delete each release's venv (~1.3 GB) once its tests are done, so the sweep needs "
                        "the disk of one venv, not one per release (CI); the next run rebuilds them")
    p.add_argument("--one-venv-per-torch", action="store_true",
                   help="install each transformers release in turn into one venv per torch release instead of "
                        "a fresh venv per pair (a CUDA build of torch takes minutes and ~6 GB to install)")
    p.add_argument("--json", type=Path, default=None,
                   help="add the runs to this sweep record (docs/compatibility.json); a run of the same "
                        "transformers and torch is replaced")
    p.add_argument("--canary", action="store_true",
                   help="CI: if the package index has a transformers release at or above TRANSFORMERS_CAP (a "
                        "torch at or above TORCH_CAP), run the compatibility tests on it and fail with one line "
                        "naming it and what broke")
    p.add_argument("--canary-version", default=None, metavar="V",
                   help="with --canary: try this transformers release instead of asking the package index")
    p.add_argument("--canary-torch", default=None, metavar="T",
                   help="with --canary: try this torch release instead of asking the package index")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from minicpmv_attn.upstream import transformers_sweep as ts  # here, so that --help answers at once

    if args.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.pin and (args.drop_venvs or args.one_venv_per_torch):
        print("error: --pin reads each release's snapshot from its own venv: it cannot be used with --drop-venvs "
              "or --one-venv-per-torch", file=sys.stderr)
        return 2
    if args.table:
        try:
            table = ts.markdown_table(ts.load_record(args.table))
            if args.doc:
                ts.update_doc(args.doc, table)
        except (OSError, ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(table)
        return 0
    if args.canary:
        rc = 0
        for package, version in (("transformers", args.canary_version), ("torch", args.canary_torch)):
            code, line = ts.canary(args.workdir, args.repo, version=version, drop_venv=args.drop_venvs,
                                   package=package)
            print(line, flush=True)
            rc = max(rc, code)
        return rc
    source = args.repo / "modeling" / "modeling_qwen2.py"
    versions, torches = args.versions, args.torch
    try:
        if versions is None:
            versions = ts.sweep_versions(ts.index_versions(), ts.verified_range(source)["min"])
        if torches == ["all"]:
            torches = ts.torch_sweep_versions(ts.index_versions(package="torch"),
                                              ts.verified_range(source, "torch")["min"])
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for flag, given in (("--versions", versions), ("--torch", torches)):
        bad = [v for v in given if not ts.is_final(v)]
        if bad:
            print(f"error: {flag}: {', '.join(bad)} are not release numbers like 5.25.0", file=sys.stderr)
            return 2
    try:
        record = ts.load_record(args.json) if args.json else []
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweeping transformers {', '.join(versions)} x torch {', '.join(torches)} in {args.workdir}",
          file=sys.stderr)
    outcomes = ts.sweep(versions, args.workdir, args.repo, jobs=args.jobs, drop_venvs=args.drop_venvs,
                        torches=torches, share_torch=args.one_venv_per_torch)
    print(ts.markdown_table(outcomes))
    for o in outcomes:
        if o.status == "error":
            print(f"  transformers {o.version}, torch {o.torch}: {o.detail}")
    if args.json:
        record = ts.merge(record, outcomes)
        ts.save_record(record, args.json)
    if args.doc:
        ts.update_doc(args.doc, ts.markdown_table(record if args.json else outcomes))
    if args.pin:
        pinned = ts.pin_snapshots(outcomes, args.workdir, args.pin, args.repo)
        print(f"snapshots added to {args.pin}: {', '.join(pinned) or 'none'}", file=sys.stderr)
    return 0 if all(o.status == "pass" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
