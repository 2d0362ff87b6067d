"""Fine-tuning checkpoints: save, find, read and restore (weights, optimizer, RNG state).

A run folder (``out``) holds ``checkpoint-<step>/`` folders with ``state.json`` (step,
settings), ``adapter/`` (peft LoRA, loadable with ``PeftModel.from_pretrained``) or
``model/`` (a full checkpoint folder), ``optimizer.pt``, ``rng.pt`` and
``metrics.jsonl``; each is written into a temporary folder and renamed into place,
then ``latest`` (a one-line file) is replaced to point at it. Restoring the RNG states
(torch, CUDA, numpy, Python) and the step lets a resumed run continue the same run.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..attention_record import atomic_write_bytes, atomic_write_json, atomic_write_text
from .model import base_model, is_peft

STATE_FORMAT = "minicpmv-attn.finetune/1"


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64),
                        "gauss": py[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------
def _copy_processor_files(src: str, dst: str) -> None:
    """Copy the tokenizer / processor files of a checkpoint folder (so ``model/`` loads on its own)."""
    if not src or not os.path.isdir(src):
        return
    for name in os.listdir(src):
        if name.endswith((".json", ".txt", ".model", ".py", ".tiktoken")) and name not in (
                "config.json", "model.safetensors.index.json", "generation_config.json") and not name.startswith("."):
            path = os.path.join(src, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(dst, name)):
                shutil.copy(path, os.path.join(dst, name))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _quiet_transformers:
    """Silence transformers' progress bars while saving (they would cut through ours)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def save_checkpoint(out_dir: str, step: int, model, optimizer, settings: Dict[str, Any], metrics_path: str,
                    source_folder: Optional[str] = None, keep: int = 2) -> str:
    """Write ``<out_dir>/checkpoint-<step>`` through a temporary folder + rename, then ``latest``."""
    os.makedirs(out_dir, exist_ok=True)
    if source_folder is None:
        source_folder = getattr(base_model(model).config, "_name_or_path", None)
    final = os.path.join(out_dir, checkpoint_name(step))
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-checkpoint-")
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _quiet_transformers():
            if is_peft(model):
                model.save_pretrained(os.path.join(tmp, "adapter"))
            else:
                model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
                _copy_processor_files(source_folder, os.path.join(tmp, "model"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(_rng_state(), os.path.join(tmp, "rng.pt"))
        if os.path.isfile(metrics_path):
            shutil.copy(metrics_path, os.path.join(tmp, "metrics.jsonl"))
        state = {"format": STATE_FORMAT, "step": int(step), "settings": settings, "time": time.time(),
                 "weights": "adapter" if is_peft(model) else "model"}
        atomic_write_json(os.path.join(tmp, "state.json"), state)
        if os.path.isdir(final):  # re-saving a step: move the old one aside first
            old = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-old-")
            os.replace(final, os.path.join(old, "x"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(out_dir, "latest"), checkpoint_name(step) + "\n")
    if keep and keep > 0:  # by recency (saved or resumed from), not by step: see mark_used
        by_recency = sorted(list_checkpoints(out_dir), key=lambda sp: (_last_used(sp[1]), sp[0]))
        for old_step, path in by_recency[:-keep]:
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
    return final


def _last_used(path: str) -> int:
    """When a checkpoint was last saved or resumed from (its state.json's mtime, ns)."""
    try:
        return os.stat(os.path.join(path, "state.json")).st_mtime_ns
    except OSError:
        return 0


def mark_used(path: str) -> None:
    """Record that a run resumed from the checkpoint ``path``: rotation (``keep``) then counts it as
    recent, so the checkpoint a run went back to outlives the later ones it abandoned."""
    try:
        os.utime(os.path.join(path, "state.json"))
    except OSError:
        pass


def update_metrics(checkpoint: str, metrics_path: str) -> None:
    """Replace a checkpoint's ``metrics.jsonl`` with the run's log (atomically)."""
    with open(metrics_path, "rb") as f:
        atomic_write_bytes(os.path.join(checkpoint, "metrics.jsonl"), f.read())


# --------------------------------------------------------------------------------------
# finding and restoring
# --------------------------------------------------------------------------------------
def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints (those with state.json) of a run folder, by step."""
    found = []
    if not os.path.isdir(out_dir):
        return found
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(out_dir, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder's latest checkpoint."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            cand = os.path.join(path, f.read().strip())
        if os.path.isfile(os.path.join(cand, "state.json")):
            return cand
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume from in {path} (expected checkpoint-*/state.json)")
    return found[-1][1]


def read_state(path: str) -> Dict[str, Any]:
    """A checkpoint's ``state.json`` (step, settings, weights kind)."""
    file = os.path.join(path, "state.json")
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointDamaged(f"{file}: not valid JSON ({type(e).__name__}: {e}){_earlier(path)}") from None
    except OSError as e:
        raise CheckpointDamaged(f"{file}: cannot be read ({e.strerror or e}){_earlier(path)}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{file}: not a fine-tuning checkpoint state (format {STATE_FORMAT!r})")
    step, settings, weights = state.get("step"), state.get("settings"), state.get("weights")
    for ok, field, expected, got in ((type(step) is int and step >= 0, "step", "a step number", step),
                                     (isinstance(settings, dict), "settings", "an object", settings),
                                     (weights in ("adapter", "model"), "weights", "'adapter' or 'model'", weights)):
        if not ok:
            raise CheckpointDamaged(f"{file}: field {field!r}: expected {expected}, got {json.dumps(got)[:80]}"
                                    f"{_earlier(path)}")
    return state


class CheckpointDamaged(ValueError):
    """A checkpoint folder whose files cannot be read back (truncated, corrupt, missing); the
    message (one line) names the file and the earlier checkpoint to resume from, if any."""


def _earlier(path: str) -> str:
    """'; resume from the earlier <folder> instead' when the run folder holds one."""
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    if not m:
        return ""
    earlier = [p for step, p in list_checkpoints(os.path.dirname(os.path.normpath(path))) if step < int(m.group(1))]
    return f"; resume from the earlier checkpoint with --resume {earlier[-1]}" if earlier else ""


def _read_part(path: str, what: str, read):
    """``read()``, with any failure to read the checkpoint file ``what`` as one :class:`CheckpointDamaged` line."""
    try:
        return read()
    except CheckpointDamaged:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, zip, pickle and torch raise many types
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise CheckpointDamaged(f"{os.path.join(path, what)}: the checkpoint is damaged, cannot read it back "
                                f"({type(e).__name__}: {why}){_earlier(path)}") from None


def load_checkpoint(path: str, model, optimizer=None) -> Dict[str, Any]:
    """Restore weights (adapter or model), optimizer and RNG; returns the state (step, settings).
    A file that cannot be read back is one :class:`CheckpointDamaged` line naming it and the
    earlier checkpoint of the run, if any."""
    from safetensors.torch import load_file

    state = read_state(path)
    if state["weights"] == "adapter":
        if not is_peft(model):
            raise ValueError(f"{path} holds LoRA adapters; resume with the same --lora settings")
        from peft import set_peft_model_state_dict

        weights = _read_part(path, os.path.join("adapter", "adapter_model.safetensors"),
                             lambda: load_file(os.path.join(path, "adapter", "adapter_model.safetensors")))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(f"{path}: adapter weights do not fit the model: {unexpected[:5]}")
    else:
        if is_peft(model):
            raise ValueError(f"{path} holds full model weights, not LoRA adapters; resume without --lora")
        folder = os.path.join(path, "model")
        weights = {}
        for name in _read_part(path, "model", lambda: sorted(os.listdir(folder))):
            if name.endswith(".safetensors"):
                weights.update(_read_part(path, os.path.join("model", name),
                                          lambda name=name: load_file(os.path.join(folder, name))))
        if not weights:
            raise CheckpointDamaged(f"{folder}: the checkpoint is damaged, it holds no weights file{_earlier(path)}")
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shapes of another model
            raise ValueError(f"{path}: model weights do not fit: {str(e).splitlines()[-1].strip()[:200]}") from None
        if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
            raise ValueError(f"{path}: model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        saved = _read_part(path, "optimizer.pt", lambda: torch.load(os.path.join(path, "optimizer.pt"),
                                                                     map_location="cpu", weights_only=True))
        _read_part(path, "optimizer.pt", lambda: optimizer.load_state_dict(saved))
    rng = _read_part(path, "rng.pt", lambda: torch.load(os.path.join(path, "rng.pt"), weights_only=True))
    _read_part(path, "rng.pt", lambda: _set_rng_state(rng))
    return state
