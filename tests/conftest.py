import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compat: the transformers compatibility subset (golden incl. greedy generate, capture during "
                   "generate, chat, the main command, the generation guard) that the sweep and CI's canary run "
                   "on each transformers release")


@pytest.fixture(autouse=True, scope="session")
def demo_cache(tmp_path_factory):
    """Build the tiny demo checkpoint once per session, in a temporary folder (not ~/.cache)."""
    old = os.environ.get("MINICPMV_ATTN_CACHE")
    os.environ["MINICPMV_ATTN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("MINICPMV_ATTN_CACHE", None)
    else:
        os.environ["MINICPMV_ATTN_CACHE"] = old


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Without the golden fixtures, a test that failed because a golden file is missing is reported as
    skipped with golden.MISSING (how to get them) instead of as an error; with them, nothing changes."""
    outcome = yield
    from golden import GOLDEN_ROOT, MISSING

    report = outcome.get_result()
    if report.failed and call.excinfo is not None and not GOLDEN_ROOT.is_dir() and call.when in ("setup", "call"):
        error = call.excinfo.value
        if isinstance(error, OSError) and str(GOLDEN_ROOT) in str(error):
            report.outcome = "skipped"
            report.longrepr = (str(item.fspath), item.location[1] or 0, f"Skipped: {MISSING}")
