"""Numbers in the docs come from a command beside them, and a rerun gives the same numbers.

docs/pointing_game.md holds, between ``pointing-check`` markers, a small pointing-game table pasted
whole from ``scripts/pointing_game.py --markdown``. This reruns the command written there and compares
every table row and the closing line (the header line's commit and date are the only lines allowed
to differ)."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "pointing_game.md"


def _section(text: str) -> str:
    m = re.search(r"<!-- pointing-check:start -->\n(.*?)<!-- pointing-check:end -->", text, re.S)
    assert m, f"{DOC}: no pointing-check section"
    return m.group(1)


def _numbers(markdown: str):
    """The table rows and the closing line: what a rerun must reproduce."""
    lines = [ln.strip() for ln in markdown.splitlines()]
    rows = [ln for ln in lines if ln.startswith("|")]
    closing = [ln for ln in lines if ln.startswith("`pointing game:")]
    return rows, closing


def test_pointing_game_table_in_the_docs_is_what_the_command_prints(tmp_path):
    section = _section(DOC.read_text(encoding="utf-8"))
    command = re.search(r"^`(python scripts/pointing_game\.py [^`]*)`", section, re.M)
    assert command, "the pasted table names no command"
    argv = shlex.split(command.group(1))
    at = argv.index("--markdown")
    argv[at + 1] = str(tmp_path / "rerun.md")  # the same command, written elsewhere
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    want_rows, want_closing = _numbers(section)
    got_rows, got_closing = _numbers((tmp_path / "rerun.md").read_text(encoding="utf-8"))
    assert len(want_rows) >= 10 and len(want_closing) == 1
    assert got_rows == want_rows
    assert got_closing == want_closing


def test_a_changed_number_is_seen():
    """The comparison is not vacuous: one digit changed in the pasted section changes what is compared."""
    section = _section(DOC.read_text(encoding="utf-8"))
    rows, closing = _numbers(section)
    edited = section.replace(rows[2], rows[2].replace("0.", "9.", 1), 1)
    assert _numbers(edited)[0] != rows
