"""Install the fork's remote code into a MiniCPM-V-2.6 checkpoint folder, and undo it.

Which files: by the layout rule, every ``*.py`` directly in the package folder except
``__init__.py`` is Hugging Face remote code and ships; the subpackages (``upstream/``,
``analysis/``, ...) are tools and never do. Originals are backed up once, in
``FOLDER/.minicpmv_attn_backup/`` (a second install keeps the first backup); symlinks (as in
a Hugging Face cache snapshot) are replaced by files, never written through, and restored as
the same links; :func:`restore` puts every file back byte for byte. ``auto_map`` entries are
pointed at the fork's classes only where they name a class the fork does not define.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..attention_record import atomic_write_bytes, atomic_write_json
from .common import Log, fork_dir, log_stderr, read_json, sha256_file
from .inventory import class_names

INSTALL_FORMAT = "minicpmv-attn.install/1"
BACKUP_DIRNAME = ".minicpmv_attn_backup"
MANIFEST_NAME = "manifest.json"
# the remote code a checkpoint cannot load without (config.json auto_map targets)
REQUIRED_REMOTE_CODE = ("configuration_minicpm.py", "modeling_minicpmv.py")

# auto_map targets the fork provides, per json file of a checkpoint and Auto class.
AUTO_MAP_TARGETS = {
    "config.json": {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    },
    "preprocessor_config.json": {
        "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
    },
    "processor_config.json": {
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
    },
    "tokenizer_config.json": {
        "AutoTokenizer": "tokenization_minicpmv_fast.MiniCPMVTokenizerFast",
        "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
    },
}
# auto_map entries config.json must have for AutoModel/AutoConfig to load the fork.
REQUIRED_CONFIG_AUTO_MAP = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")


def remote_code_files(src_dir=None) -> List[str]:
    """The files a checkpoint folder gets: every ``*.py`` directly in ``src_dir`` (default: the
    installed package folder) except ``__init__.py``. Subpackage files never ship."""
    src_dir = Path(src_dir) if src_dir is not None else fork_dir()
    for name in REQUIRED_REMOTE_CODE:
        if not (src_dir / name).is_file():
            raise FileNotFoundError(f"{src_dir / name} does not exist: the fork is incomplete")
    return sorted(p.name for p in src_dir.glob("*.py") if p.name != "__init__.py" and p.is_file())


def atomic_copy(src, dst) -> None:
    """Copy the bytes of ``src`` (following links) to ``dst`` atomically, then its mode bits.

    A symlink at ``dst`` is replaced by a regular file; its target is never written through.
    """
    atomic_write_bytes(dst, Path(src).read_bytes())
    with contextlib.suppress(OSError):
        shutil.copymode(src, dst)


def _write_json_keeping_mode(path: Path, obj: Any) -> None:
    """Replace the JSON file ``path`` atomically; the new file keeps the old one's mode bits."""
    mode = path.stat().st_mode & 0o7777  # follows a link: the mode the user sees
    atomic_write_json(path, obj)
    os.chmod(path, mode)


class NotACheckpoint(ValueError):
    """The folder is not a MiniCPM-V-2.6 checkpoint (the message says why)."""


def _safetensors_keys(path: Path) -> List[str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{path.name}: not a safetensors file")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def checkpoint_weight_keys(folder: Path) -> Optional[List[str]]:
    """State-dict key names from the weight files' headers/indexes (no tensors read); None if no weights."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            return list(read_json(folder / index).get("weight_map", {}))
    files = sorted(folder.glob("*.safetensors"))
    if files:
        keys: List[str] = []
        for p in files:
            keys += _safetensors_keys(p)
        return keys
    return None


def check_checkpoint(folder) -> Dict[str, Any]:
    """Raise :class:`NotACheckpoint` with a reason unless ``folder`` is a MiniCPM-V-2.6 checkpoint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotACheckpoint(f"{folder} is not a folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise NotACheckpoint(f"{folder} has no config.json")
    try:
        cfg = read_json(cfg_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NotACheckpoint(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise NotACheckpoint(f"{cfg_path} is not a JSON object")
    mt = cfg.get("model_type")
    if mt != "minicpmv":
        raise NotACheckpoint(f"config.json model_type is {mt!r}, not 'minicpmv' (MiniCPM-V)")
    missing = [k for k in ("query_num", "vision_config", "slice_config") if k not in cfg]
    if missing:
        raise NotACheckpoint(f"config.json lacks MiniCPM-V field(s) {missing}")
    if "scale_emb" in cfg:
        raise NotACheckpoint("config.json has 'scale_emb': a MiniCPM-V 2.0 (MiniCPM LLM) checkpoint, not 2.6")
    for name in ("config.json", "preprocessor_config.json"):
        p = folder / name
        if p.is_file():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                v = read_json(p)
                version = v.get("version") if isinstance(v, dict) else None
                if version is not None and str(version) != "2.6":
                    raise NotACheckpoint(f"{name} says version {version}, not 2.6")
    arch = cfg.get("architectures") or []
    if arch and "MiniCPMV" not in arch:
        raise NotACheckpoint(f"config.json architectures {arch} do not include 'MiniCPMV'")
    keys = checkpoint_weight_keys(folder)
    if keys is None:
        raise NotACheckpoint(f"{folder} has no weights (model.safetensors or an index file)")
    key_set = set(keys)
    prefixes = {k.split(".")[0] for k in keys}
    if not {"llm", "vpm", "resampler"} <= prefixes:
        raise NotACheckpoint(f"weights have top-level modules {sorted(prefixes)}; MiniCPM-V needs llm, vpm, resampler")
    if "llm.model.layers.0.self_attn.q_proj.bias" not in key_set:
        raise NotACheckpoint("weights have no llm.model.layers.0.self_attn.q_proj.bias: the LLM is not Qwen2 "
                             "(MiniCPM-V 2.5 uses Llama 3), so this is not a MiniCPM-V-2.6 checkpoint")
    return cfg


@dataclass
class InstallPlan:
    folder: Path
    copies: List[str]  # fork files to copy
    json_edits: Dict[str, Dict[str, Any]]  # json name -> new object
    warnings: List[str]


def class_in_fork(target, src: Path) -> bool:
    """True when ``target`` (an auto_map value: ``"module.Class"`` or a list of them) names
    classes defined in the fork folder ``src``."""
    if isinstance(target, (list, tuple)):
        return all(t is None or class_in_fork(t, src) for t in target)
    if not isinstance(target, str) or "." not in target:
        return False
    if "--" in target:  # "repo--module.Class": code from another repo
        return False
    mod, _, cls = target.rpartition(".")
    path = src / (mod + ".py")
    return path.is_file() and cls in class_names(path)


def _auto_map_edits(folder: Path, src: Path) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """auto_map changes per json file so every entry points at a class the fork defines."""
    edits, warnings = {}, []
    for name, targets in AUTO_MAP_TARGETS.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            obj = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.append(f"{name}: not valid JSON, auto_map not checked")
            continue
        if not isinstance(obj, dict):
            continue
        auto_map = obj.get("auto_map")
        if name != "config.json" and not isinstance(auto_map, dict):
            continue  # nothing points at remote code from this file
        new_map = dict(auto_map) if isinstance(auto_map, dict) else {}
        for key in (REQUIRED_CONFIG_AUTO_MAP if name == "config.json" else ()):
            new_map.setdefault(key, targets[key])
        for key, value in list(new_map.items()):
            if class_in_fork(value, src):
                continue
            wanted = targets.get(key)
            if wanted is None:
                warnings.append(f"{name}: auto_map[{key!r}] = {value!r} is not a class of the fork; left as is")
                continue
            if not class_in_fork(wanted, src):
                warnings.append(f"{name}: the fork has no {wanted}; auto_map[{key!r}] left as {value!r}")
                continue
            if key == "AutoTokenizer" and isinstance(value, list):
                new_map[key] = [None, wanted]  # [slow, fast]
            else:
                new_map[key] = wanted
        if new_map != auto_map:
            new_obj = dict(obj)
            new_obj["auto_map"] = new_map
            edits[name] = new_obj
    return edits, warnings


def plan_install(folder, src=None) -> InstallPlan:
    """What :func:`install` would do (raises :class:`NotACheckpoint` for other folders)."""
    folder = Path(folder)
    src = Path(src) if src is not None else fork_dir()
    check_checkpoint(folder)
    copies = remote_code_files(src)
    edits, warnings = _auto_map_edits(folder, src)
    return InstallPlan(folder, copies, edits, warnings)


def _manifest_path(folder: Path) -> Path:
    return folder / BACKUP_DIRNAME / MANIFEST_NAME


def _record_original(folder: Path, name: str, manifest: Dict[str, Any]) -> None:
    """Back up ``folder/name`` once (first install); later installs keep the first backup."""
    files = manifest["files"]
    if name in files:
        return
    path = folder / name
    entry: Dict[str, Any]
    if path.is_symlink():
        entry = {"state": "symlink", "target": os.readlink(path)}
    elif path.is_file():
        backup = folder / BACKUP_DIRNAME / "files" / name
        atomic_copy(path, backup)
        if sha256_file(backup) != sha256_file(path):
            raise OSError(f"backup of {path} does not match the original")
        entry = {"state": "file", "sha256": sha256_file(path), "mode": path.stat().st_mode & 0o7777}
    elif path.exists():
        raise OSError(f"{path} exists and is not a regular file; refusing to replace it")
    else:
        entry = {"state": "absent"}
    files[name] = entry


def install(folder, src=None, dry_run: bool = False, log: Log = log_stderr) -> InstallPlan:
    """Copy the fork's remote code into ``folder``, back originals up once, fix ``auto_map``."""
    folder = Path(folder)
    src = Path(src) if src is not None else fork_dir()
    plan = plan_install(folder, src)
    for w in plan.warnings:
        log(f"warning: {w}")
    if dry_run:
        for name in plan.copies:
            log(f"would copy {name}")
        for name in plan.json_edits:
            log(f"would update auto_map in {name}")
        return plan
    mpath = _manifest_path(folder)
    if mpath.is_file():
        manifest = read_json(mpath)
        log(f"a backup exists ({mpath.parent.name}); keeping the originals recorded there")
    else:
        manifest = {"format": INSTALL_FORMAT, "source": str(src), "files": {}}
    try:
        for name in list(plan.copies) + list(plan.json_edits):
            _record_original(folder, name, manifest)
    finally:
        atomic_write_json(mpath, manifest)  # what was backed up so far is always recorded
    installed = {}
    for name in plan.copies:
        atomic_copy(src / name, folder / name)
        installed[name] = sha256_file(folder / name)
        log(f"copied {name}")
    for name, obj in plan.json_edits.items():
        _write_json_keeping_mode(folder / name, obj)
        installed[name] = sha256_file(folder / name)
        log(f"updated auto_map in {name}")
    manifest.setdefault("installed", {}).update(installed)
    atomic_write_json(mpath, manifest)
    log(f"installed {len(plan.copies)} files into {folder}; undo with --restore")
    return plan


def _read_manifest(folder: Path) -> Dict[str, Any]:
    mpath = _manifest_path(folder)
    if not mpath.is_file():
        raise FileNotFoundError(f"{folder} has no {BACKUP_DIRNAME}/{MANIFEST_NAME}: nothing to restore")
    return read_json(mpath)


def restore_plan(folder) -> List[Tuple[str, str]]:
    """``[(file, "restore" | "remove")]``: what :func:`restore` would do; changes nothing."""
    manifest = _read_manifest(Path(folder))
    return [(name, "remove" if entry["state"] == "absent" else "restore") for name, entry in manifest["files"].items()]


def restore(folder, force: bool = False, log: Log = log_stderr) -> List[str]:
    """Put every file recorded in the backup back byte for byte; remove the backup."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    installed = manifest.get("installed", {})
    if not force:
        modified = [n for n, h in installed.items() if (folder / n).is_file() and not (folder / n).is_symlink()
                    and sha256_file(folder / n) != h]
        if modified:
            raise RuntimeError(f"installed file(s) {modified} were modified after install; "
                               "restore would lose those edits (use --force)")
    backup_dir = folder / BACKUP_DIRNAME / "files"
    done = []
    for name, entry in manifest["files"].items():
        path = folder / name
        state = entry["state"]
        if state == "file":
            b = backup_dir / name
            if sha256_file(b) != entry["sha256"]:
                raise OSError(f"backup of {name} is corrupt (sha256 mismatch); nothing more restored")
            atomic_copy(b, path)
            with contextlib.suppress(OSError):
                os.chmod(path, entry.get("mode", 0o644))
        elif state == "symlink":
            tmp = folder / f".{name}.link.tmp"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(entry["target"], tmp)
            os.replace(tmp, path)
        elif state == "absent":
            if path.is_symlink() or path.is_file():
                path.unlink()
        done.append(name)
        log(f"restored {name}" if state != "absent" else f"removed {name}")
    shutil.rmtree(folder / BACKUP_DIRNAME)
    log(f"restored {len(done)} files in {folder}")
    return done
