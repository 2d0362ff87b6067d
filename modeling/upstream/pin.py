"""The pin (``UPSTREAM.json``): which upstream the fork follows and what it changes.

The pin holds the upstream repo id, the sha256 of each upstream remote-code file the golden
fixtures were made from (the revision itself is unknown: the hashes are the identity of the
pin) with the snapshot of its symbol inventory (per class / function / method / module-level
statements: signature, body and text hashes, lines; no code), so that an edit of upstream is
reported by file *and* symbol; the ``changes`` entries that document what the fork changes
(per upstream symbol or per rewritten file, what and why, with a note under ``notes/``); and
per verified transformers release a snapshot of the attention code the fork mirrors. The default pin is the one installed with the package
(``minicpmv_attn.patches``); a pin anywhere else comes in as a path.
"""
from __future__ import annotations

import copy
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..attention_record import atomic_write_json
from .common import read_json, sha256_file
from .inventory import snapshot, symbol_inventory
from .transformers_check import transformers_snapshot

UPSTREAM_REPO_ID = "openbmb/MiniCPM-V-2_6"
UPSTREAM_FILES = (
    "configuration_minicpm.py",
    "image_processing_minicpmv.py",
    "modeling_minicpmv.py",
    "modeling_navit_siglip.py",
    "processing_minicpmv.py",
    "resampler.py",
    "tokenization_minicpmv_fast.py",
)
PIN_FORMAT = "minicpmv-attn.upstream-pin/1"
PIN_NAME = "UPSTREAM.json"


class PinError(ValueError):
    """The pin cannot be read or is not a pin (the message says which file and why)."""


class UpstreamUnavailable(RuntimeError):
    """The upstream copy could not be obtained (not a folder, or the download failed)."""


def installed_pin():
    """The pin installed with the package: ``UPSTREAM.json`` of ``minicpmv_attn.patches``."""
    from importlib.resources import files

    return files("minicpmv_attn.patches") / PIN_NAME


def load_pin(path=None) -> Dict[str, Any]:
    """The pin at ``path`` (default: :func:`installed_pin`), with its optional sections filled in."""
    source = Path(path) if path is not None else installed_pin()
    try:
        pin = read_json(source)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PinError(f"{source}: {e}") from e
    if not isinstance(pin, dict) or "upstream" not in pin:
        raise PinError(f"{source}: not an upstream pin (no 'upstream' section)")
    pin.setdefault("changes", [])
    pin.setdefault("expected_config_differences", [])
    pin.setdefault("transformers", {})
    return pin


def notes_dir(path=None):
    """The ``notes/`` folder beside the pin at ``path`` (default: the installed one)."""
    if path is None:
        from importlib.resources import files

        return files("minicpmv_attn.patches") / "notes"
    return Path(path).parent / "notes"


def pin_source(path=None) -> str:
    """Where :func:`load_pin` reads ``path`` from, for reports."""
    return str(path if path is not None else installed_pin())


def pinned_files(pin: Dict[str, Any]) -> Dict[str, str]:
    files = pin.get("upstream", {}).get("files", {})
    return {name: (v["sha256"] if isinstance(v, dict) else v) for name, v in files.items()}


def pinned_symbols(pin: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    """The pinned symbol snapshot of upstream file ``name`` (None for a pin without one)."""
    entry = pin.get("upstream", {}).get("files", {}).get(name)
    return entry.get("symbols") if isinstance(entry, dict) else None


def file_entry(path: Path) -> Dict[str, Any]:
    """``{sha256, symbols}`` of one upstream file (``symbols`` only when it parses)."""
    entry: Dict[str, Any] = {"sha256": sha256_file(path)}
    try:
        entry["symbols"] = snapshot(symbol_inventory(path.read_text(encoding="utf-8"), str(path), pseudo=True))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        pass
    return entry


@dataclass
class FileStatus:
    name: str
    status: str  # match | changed | missing | unpinned
    pinned_sha256: Optional[str]
    sha256: Optional[str]


def compare_files_to_pin(upstream_dir, pin: Dict[str, Any]) -> List[FileStatus]:
    """Status of every pinned upstream file (plus unpinned *.py remote code found there)."""
    upstream_dir = Path(upstream_dir)
    pinned = pinned_files(pin)
    out = []
    for name in sorted(pinned):
        path = upstream_dir / name
        if not path.is_file():
            out.append(FileStatus(name, "missing", pinned[name], None))
            continue
        actual = sha256_file(path)
        out.append(FileStatus(name, "match" if actual == pinned[name] else "changed", pinned[name], actual))
    for path in sorted(upstream_dir.glob("*.py")):
        if path.name not in pinned:
            out.append(FileStatus(path.name, "unpinned", None, sha256_file(path)))
    return out


def make_pin(upstream_dir, base_pin: Optional[Dict[str, Any]] = None, repo_id: Optional[str] = None,
             revision: Optional[str] = None, files: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A pin for the files in ``upstream_dir`` (default: every ``*.py`` there), keeping the
    notes of ``base_pin``. The transformers section gets the installed release's snapshot.
    """
    upstream_dir = Path(upstream_dir)
    if files is None:
        files = sorted(p.name for p in upstream_dir.glob("*.py"))
    base = copy.deepcopy(base_pin) if base_pin else {}
    up = dict(base.get("upstream", {}))
    up["repo_id"] = repo_id or up.get("repo_id", UPSTREAM_REPO_ID)
    up["revision"] = revision if revision is not None else up.get("revision")
    up["files"] = {name: file_entry(upstream_dir / name) for name in files if (upstream_dir / name).is_file()}
    return {
        "format": PIN_FORMAT,
        "upstream": up,
        "changes": base.get("changes", []),
        "expected_config_differences": base.get("expected_config_differences", []),
        "transformers": transformers_snapshot(base.get("transformers", {})),
    }


def write_pin(upstream_dir, target, base_pin_path=None, repo_id: Optional[str] = None,
              revision: Optional[str] = None) -> Dict[str, Any]:
    """Re-pin after review: a pin for ``upstream_dir`` keeping the notes of the pin at
    ``base_pin_path`` (default: the installed one), written to ``target``. Returns it."""
    new = make_pin(upstream_dir, base_pin=load_pin(base_pin_path), repo_id=repo_id, revision=revision)
    atomic_write_json(target, new)
    return new


def add_transformers_snapshot(target, base_pin_path=None) -> Dict[str, Any]:
    """The pin at ``base_pin_path`` (default: the installed one) with the installed transformers
    release's snapshot added, written to ``target``. Returns it."""
    pin = load_pin(base_pin_path)
    pin["transformers"] = transformers_snapshot(pin.get("transformers"))
    atomic_write_json(target, pin)
    return pin


def obtain_upstream(folder=None, revision: Optional[str] = None, repo_id: str = UPSTREAM_REPO_ID,
                    cache_dir=None) -> Path:
    """The upstream copy: ``folder`` if given (it must be one), else a download at ``revision``."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise UpstreamUnavailable(f"--upstream {folder} is not a folder")
        check_upstream_files(folder)
        return folder
    if revision is None:
        raise UpstreamUnavailable("no upstream copy: give a folder or a revision")
    return download_upstream(revision, repo_id=repo_id, cache_dir=cache_dir)


MAX_UPSTREAM_FILE_BYTES = 64 * 2 ** 20  # upstream's modules are ~50 KB; its config.json a few KB


def regular_file_problem(path: Path, max_bytes: int = MAX_UPSTREAM_FILE_BYTES) -> Optional[str]:
    """Why ``path`` (links followed) is not a regular file of at most ``max_bytes``, or None
    (also None when it does not exist: the reader names a missing file). Nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device"
                if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return f"expected a regular file, found {kind}"
    if st.st_size > max_bytes:
        return f"is {st.st_size:,} bytes, above the limit of {max_bytes:,} bytes"
    return None


def check_upstream_files(folder: Path) -> None:
    """Refuse (:class:`UpstreamUnavailable`, one line) an upstream folder whose ``*.py`` or
    ``config.json`` entries, the files the diff reads, are not regular files (after following
    links) of at most :data:`MAX_UPSTREAM_FILE_BYTES`: a FIFO would block the diff and a link to
    ``/dev/zero`` would read until memory ends. Nothing is opened."""
    for path in sorted(folder.glob("*.py")) + [folder / "config.json"]:
        problem = regular_file_problem(path)
        if problem:
            raise UpstreamUnavailable(f"--upstream {folder}: {path.name}: {problem}")


def download_upstream(revision: str, repo_id: str = UPSTREAM_REPO_ID, cache_dir=None) -> Path:
    """Download upstream's remote code and config at ``revision``; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a transformers dependency
        raise UpstreamUnavailable("huggingface_hub is not installed; pass --upstream DIR instead") from e
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=["*.py", "*.json"])
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise UpstreamUnavailable(
            f"could not download {repo_id}@{revision} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If this machine is offline (or HF_HUB_OFFLINE is set), download the repository's *.py and "
            "config.json elsewhere and pass --upstream DIR.") from e
    return Path(path)
