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
the same links. The promises are in ``--help`` (and :mod:`minicpmv_attn.upstream.install`).

Exit status: 0 done, 1 refused or failed (one line on stderr says why), 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

# the library is imported in main(), so that --help answers without loading torch
BACKUP_DIRNAME = ".minicpmv_attn_backup"  # upstream.install.BACKUP_DIRNAME (tests/test_cli_help.py holds them equal)

PROMISES = f"""\
promises:
  confined    only FOLDER's remote-code files (top-level *.py modules), the auto_map of its
              config/processor/tokenizer JSON files and FOLDER/{BACKUP_DIRNAME}/ are ever
              written or removed, never through a symlink; a backup manifest that names
              anything else, or a backup folder that is a link, is refused as a whole
  undoable    the originals are backed up once (the first install); --restore puts every
              file, mode and symlink back byte for byte and removes the backup
  your edits  an installed file edited since the install is never overwritten silently:
              install and --restore refuse, naming it, unless --force
  atomic      every write is a temporary file and a rename; after an interrupted run (even
              kill -9) rerunning the install completes it and --restore undoes it
  refusals    change nothing and are one line on stderr

exit status: 0 done, 1 refused or failed (one line on stderr says why), 2 usage error"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, from main()
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="minicpmv-attn-install",
        description=(
            "Copy the fork's remote-code files (every module at the top of the minicpmv_attn package: "
            "configuration, modeling, vision, resampler, processor, tokenizer and the fork's own modules; never "
            "its tool subpackages) into a MiniCPM-V-2.6 checkpoint folder, back up the originals once, and point "
            "auto_map at the fork's classes where needed. --restore puts everything back byte for byte. Folders "
            "that are not MiniCPM-V-2.6 checkpoints are refused."),
        epilog=PROMISES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, nargs="?", help="the checkpoint folder (config.json + weights)")
    p.add_argument("--restore", action="store_true", help="undo a previous install from its backup")
    p.add_argument("--dry-run", action="store_true", help="show what would be done (or refused), change nothing")
    p.add_argument("--force", action="store_true",
                   help="overwrite installed files that were edited since the install (install and --restore)")
    p.add_argument("--fork", metavar="DIR", type=Path, default=None,
                   help="the fork's package folder to install from (default: the installed minicpmv_attn)")
    p.add_argument("--list-files", action="store_true", help="print the files that would be installed and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split("\n")) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.folder is None and not args.list_files:
            raise _UsageError("FOLDER is required (unless --list-files)")
        if args.restore and args.fork is not None:
            raise _UsageError("--fork has no meaning with --restore (the backup says what to put back)")
    except _UsageError as e:
        print(f"usage error: {e} (see --help)", file=sys.stderr)
        return 2
    from minicpmv_attn.upstream.common import log_quiet, log_stderr
    from minicpmv_attn.upstream.install import Refused, install, remote_code_files, restore, restore_plan

    log = log_quiet if args.quiet else log_stderr
    try:
        if args.list_files:
            print("\n".join(remote_code_files(args.fork)))
        elif args.restore and args.dry_run:
            for name, action in restore_plan(args.folder, force=args.force):
                print(f"would {action} {name}")
        elif args.restore:
            restore(args.folder, force=args.force, log=log)
        else:
            install(args.folder, src=args.fork, dry_run=args.dry_run, force=args.force, log=log)
    except Refused as e:
        print(f"refused: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to complete it, or --restore to undo it", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a user-facing error is one line, never a traceback
        print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
