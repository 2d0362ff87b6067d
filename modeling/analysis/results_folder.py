"""The files of an extraction folder, which extraction writes and the summary reads.

Owns the names of the results files (``results.jsonl`` and the per-rank ``results.rank<r>.jsonl``
of a data-parallel run not merged yet), :func:`results_files` (which of them exist to read) and
:func:`record_problem` (whether a results row's record is a record of that folder). It sits below
``extract``, ``summary`` and ``dataset_report`` so that they import in one direction.
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional

__all__ = ["RANK_RESULTS", "RESULTS", "record_problem", "results_files"]

RESULTS = "results.jsonl"
RANK_RESULTS = "results.rank{rank}.jsonl"


def results_files(out: str) -> List[str]:
    """``results.jsonl`` and the per-rank files of runs not merged yet (``results.rank<r>.jsonl``)."""
    ranks = sorted(glob.glob(os.path.join(glob.escape(out), "results.rank*.jsonl")))
    return [os.path.join(out, RESULTS)] + [p for p in ranks if os.path.basename(p)[12:-6].isdigit()]


def record_problem(out: str, record) -> Optional[str]:
    """Why the results row's ``record`` (a path relative to the extraction folder ``out``) is not
    a record of this run, or None: it must be relative, stay inside ``out`` (links too) and have
    both files."""
    if not isinstance(record, str) or not record:
        return "has no record path"
    norm = os.path.normpath(record)
    if os.path.isabs(record) or norm == ".." or norm.startswith(".." + os.sep):
        return f"the record path {record!r} is outside the run folder (expected a path relative to it)"
    root = os.path.realpath(out)
    for ext in (".json", ".safetensors"):
        path = os.path.join(out, record + ext)
        if not os.path.isfile(path):
            return f"its record file {record + ext} is missing (lost after extraction)"
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            return f"its record file {record + ext} links outside the run folder"
    return None
