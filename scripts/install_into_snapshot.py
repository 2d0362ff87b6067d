"""Install the fork's remote code into a MiniCPM-V-2.6 checkpoint folder, or undo it.

Examples::

    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6            # install
    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6 --dry-run  # show the plan
    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6 --restore  # put everything back

After installing, ``AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`` loads the
fork. The files copied are every module at the top of the package (``minicpmv_attn/*.py``
but ``__init__.py``): the remote code; its subpackages are tools and never ship. The
originals are backed up once, in ``FOLDER/.minicpmv_attn_backup/``; symlinks (as in a
Hugging Face cache snapshot) are replaced by files, never written through, and restored as
the same links.

Exit status: 0 done, 1 refused (not a MiniCPM-V-2.6 checkpoint, nothing to restore, or
installed files were edited), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from minicpmv_attn.upstream.common import log_quiet, log_stderr
from minicpmv_attn.upstream.install import NotACheckpoint, install, remote_code_files, restore, restore_plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-install",
        description=(
            "Copy the fork's remote-code files (every module at the top of the minicpmv_attn package: "
            "configuration, modeling, vision, resampler, processor, tokenizer and the fork's own modules; never "
            "its tool subpackages) into a MiniCPM-V-2.6 checkpoint folder, back up the originals once, and point "
            "auto_map at the fork's classes where needed. --restore puts everything back byte for byte. Folders "
            "that are not MiniCPM-V-2.6 checkpoints are refused."),
        epilog="Exit status: 0 done, 1 refused, 2 usage error.",
    )
    p.add_argument("folder", type=Path, nargs="?", help="the checkpoint folder (config.json + weights)")
    p.add_argument("--restore", action="store_true", help="undo a previous install from its backup")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    p.add_argument("--force", action="store_true", help="with --restore: also when installed files were edited")
    p.add_argument("--fork", metavar="DIR", type=Path, default=None,
                   help="the fork's package folder to install from (default: the installed minicpmv_attn)")
    p.add_argument("--list-files", action="store_true", help="print the files that would be installed and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = log_quiet if args.quiet else log_stderr
    if args.folder is None and not args.list_files:
        parser.print_usage(sys.stderr)
        print("error: FOLDER is required (unless --list-files)", file=sys.stderr)
        return 2
    try:
        if args.list_files:
            print("\n".join(remote_code_files(args.fork)))
        elif args.restore and args.dry_run:
            for name, action in restore_plan(args.folder):
                print(f"would {action} {name}")
        elif args.restore:
            restore(args.folder, force=args.force, log=log)
        else:
            install(args.folder, src=args.fork, dry_run=args.dry_run, log=log)
    except NotACheckpoint as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
