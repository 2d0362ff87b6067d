"""The mutation-pass engine (modeling/bench/mutation.py) and its command: mutants are the
intended small edits, the sample is deterministic, and the file is always restored."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_mutation_engine_t", REPO / "modeling" / "bench" / "mutation.py")
eng = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = eng
_spec.loader.exec_module(eng)

SOURCE = '''def f(t, mask, n):
    if n < 1 and not t:
        raise ValueError(f"bad {n - 1}")
    x = t.mean(1) * mask
    return g(t, mask)[n - 1]


def untouched(a):
    return a + 1
'''


def test_mutants_are_the_intended_edits():
    ms = eng.mutants_of("m.py", SOURCE, ["f"])
    got = {(m.line, m.what): m.apply(SOURCE).splitlines()[m.line - 1].strip() for m in ms}
    assert got[(2, "< -> <=")] == "if n <= 1 and not t:"
    assert got[(2, "and -> or")] == "if n < 1 or not t:"
    assert got[(2, "drop 'not'")] == "if n < 1 and (t):"
    assert got[(2, "negate condition")] == "if not (n < 1 and not t):"
    assert got[(4, "mean() -> amax()")] == "x = t.mean(1) * mask".replace("mean", "amax")
    assert got[(4, "drop '* mask'")] == "x = t.mean(1)"
    assert got[(5, "swap args t, mask")] == "return g(mask, t)[n - 1]"
    assert got[(5, "1 -> 2 in '(t, mask)[n - 1'")] == "return g(t, mask)[n - 2]"  # names which 1 of the line
    assert got[(5, "- -> +")] == "return g(t, mask)[n + 1]"
    assert all(m.line < 8 for m in ms)  # only the named function
    assert not [m for m in ms if m.line == 3]  # error messages (raise, f-strings) are not mutated
    for m in ms:
        compile(m.apply(SOURCE), "m.py", "exec")


def test_sample_is_deterministic_and_keeps_focus_lines():
    ms = eng.mutants_of("m.py", SOURCE, None)
    a = eng.pick(ms, 4, seed=1, focus=["x = t.mean"], source=SOURCE)
    assert a == eng.pick(ms, 4, seed=1, focus=["x = t.mean"], source=SOURCE)
    assert len(a) == 4 and {m.line for m in a} >= {4}
    assert len([m for m in a if m.line == 4]) == len([m for m in ms if m.line == 4])
    assert eng.pick(ms, None) == list(ms)


def test_file_is_restored_after_each_mutant_and_on_interrupt(tmp_path, monkeypatch):
    target = tmp_path / "m.py"
    target.write_text(SOURCE)
    ms = eng.mutants_of("m.py", SOURCE, ["f"])[:3]
    seen = []

    def fake(tests, timeout, fork, extra=()):
        seen.append(target.read_text())
        return (1 if len(seen) == 1 else 0), "FAILED tests/x.py::test_a - boom\n", False

    monkeypatch.setattr(eng, "run_tests", fake)
    out = eng.run_pass({"m.py": {"mutants": ms, "tests": ["t"]}}, tmp_path)
    assert [o.verdict for o in out] == ["killed", "SURVIVED", "SURVIVED"] and out[0].by == "tests/x.py::test_a"
    assert seen == [m.apply(SOURCE) for m in ms] and target.read_text() == SOURCE
    assert "| m.py:2 |" in eng.table(out) and "SURVIVED" in eng.table(out)

    def interrupted(*a, **k):
        assert target.read_text() != SOURCE
        raise KeyboardInterrupt

    monkeypatch.setattr(eng, "run_tests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.run_pass({"m.py": {"mutants": ms, "tests": ["t"]}}, tmp_path)
    assert target.read_text() == SOURCE


def test_command_help_and_bad_input():
    script = str(REPO / "scripts" / "mutation_pass.py")
    ok = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "--max-per-file" in ok.stdout
    bad = subprocess.run([sys.executable, script, "--file", "nowhere.py", "--list"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "not in the plan" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    listed = subprocess.run([sys.executable, script, "--file", "pointing.py", "--list", "--max-per-file", "5"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and len([x for x in listed.stdout.splitlines() if x.startswith("pointing.py:")]) == 5
