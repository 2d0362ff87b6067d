"""The installed transformers vs the pin: the Qwen2 / SigLIP / SDPA attention code the fork
mirrors and the generation interface it plugs into.

The pin keeps one snapshot per verified transformers release (tracked symbols' signatures and
body hashes); :func:`compare_transformers` compares the installed release with the snapshot of
the same release (or, flagged as not verified, with the newest older one) and writes the
attention function's diff against the fork's; :func:`transformers_snapshot` adds the installed
release's snapshot to a pin's ``transformers`` section.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..attention_record import atomic_write_text
from .common import Log, log_stderr, sha256_file
from .inventory import class_names, function_source, signature_change, symbol_inventory
from .report import Finding

DEFAULT_TRANSFORMERS_TRACK = {
    "models/qwen2/modeling_qwen2.py": {
        "track": ["*"],
        "ignore": ["Qwen2ForSequenceClassification*", "Qwen2ForTokenClassification*", "Qwen2ForQuestionAnswering*"],
        "fork_counterpart": None,  # auto: the fork module defining Qwen2Attention
        "fork_counterpart_class": "Qwen2Attention",
        "attention_function": "eager_attention_forward",
    },
    "models/siglip/modeling_siglip.py": {
        "track": ["eager_attention_forward", "SiglipAttention*", "SiglipMLP*", "SiglipEncoderLayer*",
                  "SiglipEncoder", "SiglipEncoder.*", "SiglipVisionEmbeddings*"],
        "ignore": [],
        "fork_counterpart": "modeling_navit_siglip.py",
        "fork_counterpart_class": "SiglipAttention",
        "attention_function": "eager_attention_forward",
    },
    "integrations/sdpa_attention.py": {
        "track": ["*"],
        "ignore": [],
        "fork_counterpart": None,
        "fork_counterpart_class": None,
        "attention_function": "sdpa_attention_forward",
    },
    # the generation interface the fork's Qwen2ForCausalLM plugs into: how the loop hands the
    # KV cache and inputs to prepare_inputs_for_generation / forward and reads them back
    # (5.24 renamed past_key_values -> cache here, which silently broke generation)
    "generation/utils.py": {
        "track": ["GenerationMixin.prepare_inputs_for_generation", "GenerationMixin._update_model_kwargs_for_generation",
                  "GenerationMixin._prepare_cache_for_generation", "GenerationMixin._extract_past_from_model_output",
                  "GenerationMixin._cache_dependant_input_preparation"],
        "ignore": [],
        "fork_counterpart": None,
        "fork_counterpart_class": None,
    },
    "modeling_outputs.py": {
        "track": ["BaseModelOutputWithPast", "CausalLMOutputWithPast"],
        "ignore": [],
        "fork_counterpart": None,
        "fork_counterpart_class": None,
    },
}


def transformers_dir() -> Path:
    import transformers

    return Path(transformers.__file__).resolve().parent


def _tracked(qualname: str, spec: Dict[str, Any]) -> bool:
    if any(fnmatch.fnmatchcase(qualname, p) for p in spec.get("ignore", [])):
        return False
    return any(fnmatch.fnmatchcase(qualname, p) for p in spec.get("track", ["*"]))


def _version_key(version: str) -> Tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


#: The fork's counterpart of each transformers attention function (``{fn}``: its name): the
#: pure kernels in attention.py are named like transformers' own.
FORK_ATTENTION_FUNCTIONS = ["attention.py::{fn}"]


def transformers_snapshots(tpin: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{version: {"files": ...}}`` of a pin's transformers section (old one-version pins too)."""
    snaps = dict(tpin.get("snapshots") or {})
    if tpin.get("files") and tpin.get("version"):  # pin format 1: one snapshot
        snaps.setdefault(tpin["version"], {"files": tpin["files"]})
    return snaps


def snapshot_installed_transformers(base_files: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``{"files": ...}``: the tracked symbols of the installed transformers."""
    tdir = transformers_dir()
    files = {}
    for rel, default_spec in DEFAULT_TRANSFORMERS_TRACK.items():
        spec = dict(default_spec)
        spec.update({k: v for k, v in (base_files or {}).get(rel, {}).items() if k not in ("sha256", "symbols")})
        path = tdir / rel
        if not path.is_file():
            continue
        inv = symbol_inventory(path.read_text(encoding="utf-8"), str(path))
        spec["sha256"] = sha256_file(path)
        spec["symbols"] = {q: {"signature": s.signature, "body": s.body_hash}
                           for q, s in sorted(inv.items()) if _tracked(q, spec)}
        files[rel] = spec
    return {"files": files}


def transformers_snapshot(base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The pin's ``transformers`` section with the installed release's snapshot added (after review).

    One snapshot per verified release: the check compares the installed transformers with the
    snapshot of the same release, so it runs (and must be silent) on every release CI tests.
    """
    import transformers

    base = base or {}
    snaps = transformers_snapshots(base)
    newest = max(snaps, key=_version_key) if snaps else None
    snaps[transformers.__version__] = snapshot_installed_transformers(snaps[newest]["files"] if newest else None)
    return {"snapshots": {v: snaps[v] for v in sorted(snaps, key=_version_key)},
            "fork_attention_functions": base.get("fork_attention_functions", FORK_ATTENTION_FUNCTIONS)}


def _fork_module_with_class(fork: Path, cls: str) -> Optional[str]:
    for path in sorted(fork.glob("*.py")):
        with contextlib.suppress(SyntaxError, UnicodeDecodeError):
            if cls in class_names(path):
                return path.name
    return None


def compare_transformers(pin: Dict[str, Any], fork: Path, out_dir: Optional[Path], log: Log = log_stderr
                         ) -> Tuple[List[Finding], Dict[str, Any]]:
    """Installed transformers vs the pinned snapshot of the same release (its attention code and
    the generation interface the fork relies on); the fork's counterparts informational.

    A release without a snapshot is compared with the newest snapshot older than it and
    flagged: it is not verified.
    """
    import transformers

    fork = Path(fork)
    out_dir = Path(out_dir) if out_dir is not None else None
    installed = transformers.__version__
    findings: List[Finding] = []
    details: Dict[str, Any] = {"installed_version": installed}
    tpin = pin.get("transformers") or {}
    snaps = transformers_snapshots(tpin)
    tdir = transformers_dir()
    if not snaps:
        findings.append(Finding("transformers", "pin", "missing",
                                "no transformers snapshot in the pin; run with --write-pin after review",
                                attention=True))
        return findings, details
    if installed in snaps:
        ref = installed
        findings.append(Finding("transformers", "version", "ok", f"{installed} (a pinned, verified release)"))
    else:
        older = [v for v in snaps if _version_key(v) <= _version_key(installed)]
        ref = max(older or snaps, key=_version_key)
        findings.append(Finding("transformers", "version", "not verified",
                                f"{installed} has no snapshot; compared with {ref} (pinned: {', '.join(snaps)})",
                                attention=True))
    details["compared_with"] = ref
    snap_files = snaps[ref].get("files", {})
    fork_attn_fns = list(tpin.get("fork_attention_functions", FORK_ATTENTION_FUNCTIONS))
    for rel, default_spec in DEFAULT_TRANSFORMERS_TRACK.items():
        spec = dict(default_spec)
        spec.update(snap_files.get(rel, {}))
        path = tdir / rel
        pinned_syms = snap_files[rel].get("symbols") if rel in snap_files else None
        if not path.is_file():
            if rel in snap_files:
                findings.append(Finding("transformers", rel, "missing", f"not in transformers {installed}",
                                        attention=True))
            continue
        inv = symbol_inventory(path.read_text(encoding="utf-8"), str(path))
        tracked_now = {q: s for q, s in inv.items() if _tracked(q, spec)}
        if pinned_syms is None:
            findings.append(Finding("transformers", rel, "added since pin",
                                    f"{len(tracked_now)} tracked symbols not in the {ref} snapshot", attention=True))
        else:
            changed = []
            for q in sorted(set(tracked_now) | set(pinned_syms)):
                now, then = tracked_now.get(q), pinned_syms.get(q)
                if now is None:
                    changed.append((q, "removed since pin", ""))
                elif then is None:
                    changed.append((q, "added since pin", ""))
                elif now.signature != then["signature"]:
                    changed.append((q, "signature changed", signature_change(then["signature"], now.signature)))
                elif now.body_hash != then["body"]:
                    changed.append((q, "body changed since pin", ""))
            for q, what, detail in changed:
                findings.append(Finding("transformers", f"{rel}::{q}", what, detail or "review the fork's use of it",
                                        attention=True))
            if not changed:
                same_file = spec.get("sha256") == sha256_file(path)
                findings.append(Finding("transformers", rel, "ok",
                                        f"{len(tracked_now)} tracked symbols as pinned"
                                        + ("" if same_file else " (file changed elsewhere)")))
        # informational: fork counterpart symbols of the same name
        counterpart = spec.get("fork_counterpart")
        if (not counterpart or not (fork / counterpart).is_file()) and spec.get("fork_counterpart_class"):
            counterpart = _fork_module_with_class(fork, spec["fork_counterpart_class"])
        if counterpart and (fork / counterpart).is_file():
            fork_inv = symbol_inventory((fork / counterpart).read_text(encoding="utf-8"))
            common = sorted(set(fork_inv) & set(tracked_now))
            for q in common:
                if fork_inv[q].signature != tracked_now[q].signature:
                    findings.append(Finding("transformers", f"{counterpart}::{q}", "signature differs (fork)",
                                            "fork vs transformers: " + signature_change(
                                                tracked_now[q].signature, fork_inv[q].signature)))
            details[rel] = {"fork_counterpart": counterpart, "common_symbols": common,
                            "transformers_only": sorted(set(tracked_now) - set(fork_inv)),
                            "fork_only": sorted(set(fork_inv) - set(tracked_now))}
        # the attention function vs the fork's
        fn = spec.get("attention_function")
        if fn and out_dir is not None:
            theirs = function_source(path, fn)
            for fref in (f.format(fn=fn) for f in fork_attn_fns):
                fname, _, qual = fref.partition("::")
                mine = function_source(fork / fname, qual) if (fork / fname).is_file() else None
                if theirs is None and fn not in (pinned_syms or {}):
                    continue  # e.g. transformers 4.4x has no such function: nothing to compare
                if theirs is None or mine is None:
                    findings.append(Finding("transformers", f"{rel}::{fn} vs {fref}", "not found",
                                            "attention function missing on one side", attention=True))
                    continue
                text = "".join(difflib.unified_diff(
                    theirs.splitlines(True), mine.splitlines(True),
                    fromfile=f"transformers/{rel}::{fn}", tofile=f"fork/{fref}"))
                target = out_dir / "transformers" / f"{rel.replace('/', '__')}__{fn}__vs__{fname}__{qual}.diff"
                atomic_write_text(target, text)
    return findings, details
