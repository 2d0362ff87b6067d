"""Install the fork's remote code into a MiniCPM-V-2.6 checkpoint folder, or undo it.

Examples::

    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6            # install
    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6 --dry-run  # show the plan
    python scripts/install_into_snapshot.py ~/models/MiniCPM-V-2_6 --restore  # put everything back

After installing, ``AutoModel.from_pretrained(FOLDER, trust_remote_code=True)`` loads the
fork. The originals are backed up once, in ``FOLDER/.minicpmv_attn_backup/``; symlinks (as
in a Hugging Face cache snapshot) are replaced by files, never written through, and
restored as the same links.

Exit status: 0 done, 1 refused (not a MiniCPM-V-2.6 checkpoint, nothing to restore, or
installed files were edited), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from minicpmv_attn import upstream_diff as ud


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minicpmv-attn-install",
        description=(
            "Copy the fork's remote-code files (configuration, modeling, vision, resampler, processor, "
            "tokenizer and the fork's own modules they import) into a MiniCPM-V-2.6 checkpoint folder, back up "
            "the originals once, and point auto_map at the fork's classes where needed. --restore puts "
            "everything back byte for byte. Folders that are not MiniCPM-V-2.6 checkpoints are refused."),
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
    log = ud._quiet if args.quiet else ud._stderr
    if args.folder is None and not args.list_files:
        parser.print_usage(sys.stderr)
        print("error: FOLDER is required (unless --list-files)", file=sys.stderr)
        return 2
    if args.list_files:
        try:
            files, warnings = ud.remote_code_files(args.fork)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for w in warnings:
            log(f"warning: {w}")
        print("\n".join(files))
        return 0
    if args.restore:
        if args.dry_run:
            mpath = args.folder / ud.BACKUP_DIRNAME / ud.MANIFEST_NAME
            if not mpath.is_file():
                print(f"error: {args.folder} has no backup: nothing to restore", file=sys.stderr)
                return 1
            for name, entry in ud.read_json(mpath)["files"].items():
                print(f"would {'remove' if entry['state'] == 'absent' else 'restore'} {name}")
            return 0
        try:
            ud.restore(args.folder, force=args.force, log=log)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        ud.install(args.folder, src=args.fork, dry_run=args.dry_run, log=log)
    except ud.NotACheckpoint as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
