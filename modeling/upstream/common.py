"""Small helpers shared by the upstream tools: progress logs, hashes, JSON reading, the fork folder."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    """The default progress log: one line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def log_quiet(msg: str) -> None:
    """A progress log that says nothing (``-q``)."""


def fork_dir() -> Path:
    """The fork's package folder (``modeling/`` in a checkout): the installed ``minicpmv_attn``."""
    return Path(__file__).resolve().parents[1]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path) -> Any:
    """``path`` (a file path or an ``importlib.resources`` traversable) parsed as JSON."""
    if not isinstance(path, (str, Path)) and hasattr(path, "read_text"):
        return json.loads(path.read_text(encoding="utf-8"))
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)
