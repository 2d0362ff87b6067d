#!/usr/bin/env python
"""How long each installed ``minicpmv-attn-*`` command takes to answer ``--help`` (target: under 1 s).

Each command is started the way its console script starts it (a fresh interpreter importing the
entry point's module and calling ``main`` with ``--help``), ``--repeat`` times; the best and the
worst wall time are printed per command, next to a bare interpreter's start-up and the time of
``import minicpmv_attn`` (torch + transformers), which the commands must not pay before reading
their arguments::

    python scripts/bench_cli_help.py [--repeat 3] [--only visualize extract]

Exit status 0 when every command answered (whatever its time: this is a measurement), 1 when one
failed to print its help.
"""
import argparse
import subprocess
import sys
import time
from importlib.metadata import entry_points

PREFIX = "minicpmv-attn-"


def commands():
    """``{name: "module:function"}`` of the installed console commands."""
    eps = entry_points()
    group = eps.select(group="console_scripts") if hasattr(eps, "select") else eps.get("console_scripts", [])
    return {ep.name: ep.value for ep in group if ep.name.startswith(PREFIX)}


def timed(code, repeat):
    """(best, worst, returncode, output) of ``python -c code`` over ``repeat`` runs."""
    times, proc = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        times.append(time.perf_counter() - t0)
    return min(times), max(times), proc.returncode, proc.stdout + proc.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minicpmv-attn-bench-cli-help", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per command (default %(default)s)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="only these commands (names without the minicpmv-attn- prefix)")
    args = p.parse_args(argv)
    found = commands()
    if not found:
        print("error: no minicpmv-attn-* console commands are installed (pip install -e .)", file=sys.stderr)
        return 1
    if args.only:
        found = {k: v for k, v in found.items() if k[len(PREFIX):] in args.only}
    rows = [("(python -c pass)", *timed("pass", args.repeat)[:2], "")]
    rows.append(("(import minicpmv_attn)", *timed("import minicpmv_attn", args.repeat)[:2], ""))
    failed = []
    for name, target in sorted(found.items()):
        module, func = target.split(":")
        code = f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {func}; sys.exit({func}())"
        best, worst, rc, out = timed(code, args.repeat)
        ok = rc == 0 and "usage:" in out
        if not ok:
            failed.append(f"{name}: exit {rc}: {out.strip().splitlines()[-1] if out.strip() else 'no output'}")
        if ok and "minicpmv_attn." in module:
            failed.append(f"{name}: starts from {module}, which imports minicpmv_attn before reading its arguments")
        rows.append((name, best, worst, "" if ok else "FAILED"))
    print(f"{'command --help':<36} {'best s':>7} {'worst s':>8}  (x{args.repeat}, {sys.executable})")
    for name, best, worst, note in rows:
        print(f"{name:<36} {best:7.2f} {worst:8.2f}  {note}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
