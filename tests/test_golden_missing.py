"""Without ../shared/golden, the tests that need it skip and say how to get it; the rest still run."""
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_without_golden(*targets):
    env = dict(os.environ, MINICPMV_ATTN_GOLDEN=str(TESTS / "no-such-golden-folder"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *targets],
                          cwd=str(TESTS), env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def test_golden_tests_skip_with_the_way_to_get_the_fixtures():
    code, out = run_without_golden(
        "test_golden.py",  # parametrized over the golden cases, inputs through golden.load_inputs
        "test_install_snapshot.py::test_install_copies_the_top_level_modules_and_no_subpackage_file",  # copies a case
        "test_layout.py")  # one test of several needs a golden model
    summary = out.strip().splitlines()[-1]
    assert code == 0 and "failed" not in summary and "error" not in summary, out[-3000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("golden fixtures not found" in s and "MINICPMV_ATTN_GOLDEN" in s for s in skips), skips
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 4  # test_layout's other tests still ran
