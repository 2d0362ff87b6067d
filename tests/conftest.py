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
