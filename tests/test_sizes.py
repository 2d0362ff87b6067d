"""The size rules: no .py file in ``modeling/`` (any depth) over 900 lines, none in ``scripts/``
over 250. A file past its limit is split by concept (a public face may re-export the names)."""
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"modeling": 900, "scripts": 250}


def oversized(folder: Path, limit: int) -> List[str]:
    """``path: N lines`` for every .py file under ``folder`` with more than ``limit`` lines."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{path.relative_to(folder.parent)}: {n} lines (limit {limit})")
    return out


def test_modeling_and_scripts_files_are_within_their_size_limits():
    checked = 0
    bad = []
    for name, limit in LIMITS.items():
        folder = ROOT / name
        checked += len(list(folder.rglob("*.py")))
        bad += oversized(folder, limit)
    assert checked > 50, f"only {checked} files found: wrong root {ROOT}?"
    assert not bad, "files over the size rule:\n" + "\n".join(bad)


def test_oversized_names_a_file_one_line_over_and_passes_one_at_the_limit(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "at.py").write_text("x = 1\n" * 900)
    (tmp_path / "pkg" / "over.py").write_text("x = 1\n" * 901)
    assert oversized(tmp_path / "pkg", 900) == ["pkg/over.py: 901 lines (limit 900)"]
