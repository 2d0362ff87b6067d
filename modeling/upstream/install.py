"""Install the fork's remote code into a MiniCPM-V-2.6 checkpoint folder, and undo it.

Which files: by the layout rule, every ``*.py`` directly in the package folder except
``__init__.py`` is Hugging Face remote code and ships; the subpackages (``upstream/``,
``analysis/``, ...) are tools and never do. Originals are backed up once, in
``FOLDER/.minicpmv_attn_backup/`` (a second install keeps the first backup); symlinks (as in
a Hugging Face cache snapshot) are replaced by files, never written through, and restored as
the same links; :func:`restore` puts every file back byte for byte. ``auto_map`` entries are
pointed at the fork's classes only where they name a class the fork does not define.

Promises (tests/test_install_snapshot.py, tests/test_install_faults.py):

* Confinement: only ``FOLDER/NAME`` for a plain file name install writes (:func:`valid_name`)
  and ``FOLDER/.minicpmv_attn_backup/`` are written or removed, never through a link. A
  manifest naming anything else, or a backup folder that is a link or holds what install never
  writes, is refused as a whole.
* A refusal (:class:`Refused`: not a checkpoint, a corrupt manifest, an edited file) is one
  line and changes nothing; every check runs before the first change.
* Edits: a file whose bytes are neither the original, nor what install wrote (the manifest's
  ``installed`` hashes), nor what an interrupted install was writing (``pending``) is the
  user's: install and restore refuse to overwrite it unless ``force``.
* Crashes: every change is one atomic step (a temporary file and a rename, a link and a rename,
  an unlink) and they come in an order that a rerun completes and :func:`restore` undoes after
  a ``kill -9`` anywhere. Install: back up the originals and stage the new files (both inside
  the backup folder) -> manifest with ``pending`` hashes -> rename the staged files into place
  -> manifest with ``installed`` hashes. Restore: put the originals back (staged, renamed) ->
  remove the manifest -> remove the backup folder. So a backup folder without a manifest goes
  with an unchanged folder; it is removed if its backups equal the folder's files.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import attention_record  # the canonical atomic writers (looked up at call time)
from .common import Log, fork_dir, log_stderr, read_json, sha256_bytes, sha256_file
from .inventory import class_names

INSTALL_FORMAT = "minicpmv-attn.install/1"
BACKUP_DIRNAME = ".minicpmv_attn_backup"
MANIFEST_NAME = "manifest.json"
FILES_DIRNAME = "files"  # in the backup folder: the originals' bytes
STAGE_DIRNAME = "stage"  # in the backup folder: new files before their rename into place
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

_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# the permission bits a backup may record and restore may set: no setuid/setgid/sticky, no world-write
SAFE_MODE_BITS = 0o775
_TEMP_PREFIX = ".tmp-"  # attention_record.atomic_write_bytes's temporary file: .tmp-<random><name>
NAME_RULE = ("a plain file name install writes (a top-level module such as modeling_minicpmv.py, or one of "
             + ", ".join(AUTO_MAP_TARGETS) + ")")


def valid_name(name: Any) -> bool:
    """True for the names install writes: a module file name (``[A-Za-z_][A-Za-z0-9_]*.py`` but
    ``__init__.py``) or a JSON file of :data:`AUTO_MAP_TARGETS`; never a path, a link, ``..``."""
    return isinstance(name, str) and (name in AUTO_MAP_TARGETS or
                                      (name != "__init__.py" and _MODULE_RE.fullmatch(name) is not None))


class Refused(ValueError):
    """Install or restore refused; nothing was changed. The message (one line) says why."""


class NotACheckpoint(Refused):
    """The folder is not a MiniCPM-V-2.6 checkpoint (the message says why)."""


class ManifestError(Refused):
    """The backup manifest is not one install writes: not JSON, a wrong type, a missing field, a bad name."""


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
    attention_record.atomic_write_bytes(str(dst), Path(src).read_bytes())
    with contextlib.suppress(OSError):
        shutil.copymode(src, dst)


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
    try:
        keys = checkpoint_weight_keys(folder)
    except (OSError, ValueError, AttributeError, TypeError) as e:  # JSON/Unicode errors are ValueErrors
        raise NotACheckpoint(f"{folder}: its weight names cannot be read ({type(e).__name__}: {e})") from e
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
    bad = [n for n in copies if not valid_name(n)]
    if bad:
        raise Refused(f"{src}: module file(s) {bad} cannot be installed: expected {NAME_RULE}")
    edits, warnings = _auto_map_edits(folder, src)
    return InstallPlan(folder, copies, edits, warnings)


# ----------------------------------------------------------------------------------------
# the backup folder and its manifest
# ----------------------------------------------------------------------------------------
_MISSING = object()


def _manifest_path(folder: Path) -> Path:
    return folder / BACKUP_DIRNAME / MANIFEST_NAME


def _stage_path(folder: Path, name: str) -> Path:
    return folder / BACKUP_DIRNAME / STAGE_DIRNAME / name


def _is_file(path: Path) -> bool:
    return not path.is_symlink() and path.is_file()


def _is_dir(path: Path) -> bool:
    return not path.is_symlink() and path.is_dir()


def _kind(path: Path) -> str:
    if path.is_symlink():
        return f"a symlink to {os.readlink(path)!r}"
    if path.is_dir() or path.is_file():
        return "a folder" if path.is_dir() else "a file"
    return "a special file" if path.exists() else "nothing"


def _is_temp(entry: str, ok) -> bool:
    """``entry`` is the temporary file of an atomic write of a name ``ok`` accepts (left by a kill)."""
    rest = entry[len(_TEMP_PREFIX):] if entry.startswith(_TEMP_PREFIX) else ""
    return any(ok(rest[i:]) for i in range(1, len(rest)))


def _got(value: Any) -> str:
    text = "nothing (the field is missing)" if value is _MISSING else json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 100 else text[:97] + "..."


def _check_manifest(m: Any, mpath: Path) -> Dict[str, Any]:
    """``m`` if it has the types and names install writes, else :class:`ManifestError` naming the field."""
    def need(ok: Any, field: str, expected: str, value: Any) -> None:
        if not ok:
            raise ManifestError(f"{mpath}: {field}: expected {expected}, got {_got(value)}; nothing was changed")

    need(isinstance(m, dict), "the top level", "a JSON object", m)
    need(m.get("format", _MISSING) == INSTALL_FORMAT, "format", json.dumps(INSTALL_FORMAT), m.get("format", _MISSING))
    need(isinstance(m.get("source", ""), str), "source", "a string", m.get("source"))
    files = m.get("files", _MISSING)
    need(isinstance(files, dict), "files", "an object of file name -> entry", files)
    for name, entry in files.items():
        field = f"files[{json.dumps(name, ensure_ascii=True)}]"
        need(valid_name(name), f"the entry name of {field}", NAME_RULE, name)
        need(isinstance(entry, dict), field, "an object with a state", entry)
        state = entry.get("state", _MISSING)
        need(state in ("file", "symlink", "absent"), f"{field}.state", '"file", "symlink" or "absent"', state)
        if state == "file":
            sha, mode = entry.get("sha256", _MISSING), entry.get("mode", _MISSING)
            need(isinstance(sha, str) and _SHA256_RE.fullmatch(sha), f"{field}.sha256", "64 hex digits", sha)
            need(type(mode) is int and 0 <= mode <= 0o7777, f"{field}.mode", "permission bits 0..4095", mode)
            need(not mode & ~SAFE_MODE_BITS, f"{field}.mode",
                 "permission bits without setuid, setgid, sticky or world-write (within 0o775, e.g. 420 = 0o644)",
                 mode)
        elif state == "absent":
            need(name.endswith(".py"), f"{field}.state", '"file" or "symlink" (install only adds modules; a JSON '
                 'file it edits existed before, so restore never removes one)', state)
        elif state == "symlink":
            target = entry.get("target", _MISSING)
            need(isinstance(target, str) and target and "\0" not in target, f"{field}.target",
                 "a link target (a non-empty string)", target)
    for key in ("installed", "pending"):
        hashes = m.get(key, {})
        need(isinstance(hashes, dict), key, "an object of file name -> sha256", hashes)
        for name, sha in hashes.items():
            field = f"{key}[{json.dumps(name, ensure_ascii=True)}]"
            need(name in files, f"the entry name of {field}", "a name recorded in files", name)
            need(isinstance(sha, str) and _SHA256_RE.fullmatch(sha), field, "64 hex digits", sha)
    return m


def _read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    """The checked manifest; None when there is none. Call :func:`_check_backup_dir` first."""
    mpath = _manifest_path(folder)
    if not os.path.lexists(mpath):
        return None
    if not _is_file(mpath):
        raise ManifestError(f"{mpath}: expected a regular file written by install, got {_kind(mpath)}; "
                            "nothing was changed")
    try:
        m = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{mpath}: expected the JSON object install writes, got text that is not JSON "
                            f"({type(e).__name__}: {e}); nothing was changed") from None
    return _check_manifest(m, mpath)


def _write_manifest(folder: Path, m: Dict[str, Any]) -> None:
    out = {k: m[k] for k in ("format", "source") if k in m}
    for key in ("files", "installed", "pending"):
        if key == "files" or m.get(key):
            out[key] = dict(sorted(m[key].items()))
    attention_record.atomic_write_json(str(_manifest_path(folder)), out)


def _check_backup_dir(folder: Path) -> List[Path]:
    """Refuse unless ``FOLDER/.minicpmv_attn_backup`` (if any) is a real folder holding only what
    install writes; return what an interrupted run left there (temporary and staged files)."""
    bdir, leftovers = folder / BACKUP_DIRNAME, []

    def refuse(path: Path, expected: str) -> None:
        raise Refused(f"{path}: expected {expected}, got {_kind(path)}; install never writes this, "
                      "so nothing was changed")

    if not os.path.lexists(bdir):
        return leftovers
    if not _is_dir(bdir):
        refuse(bdir, "the backup folder (a folder, not a link)")
    for entry in sorted(os.listdir(bdir)):
        path = bdir / entry
        if entry in (FILES_DIRNAME, STAGE_DIRNAME):
            if not _is_dir(path):
                refuse(path, "a folder (not a link)")
            for sub in sorted(os.listdir(path)):
                q = path / sub
                if _is_temp(sub, valid_name) or (entry == STAGE_DIRNAME and valid_name(sub)):
                    if stat.S_ISDIR(os.lstat(q).st_mode):
                        refuse(q, "a temporary or staged file")
                    leftovers.append(q)
                elif not (valid_name(sub) and _is_file(q)):
                    refuse(q, f"a backup (a regular file named as {NAME_RULE})")
        elif entry != MANIFEST_NAME:
            if not _is_temp(entry, MANIFEST_NAME.__eq__) or stat.S_ISDIR(os.lstat(path).st_mode):
                refuse(path, f"only {MANIFEST_NAME}, {FILES_DIRNAME}/ and {STAGE_DIRNAME}/ in the backup folder")
            leftovers.append(path)
    return leftovers


def _check_unrecorded_backups(folder: Path, recorded: Dict[str, Any]) -> List[Path]:
    """Backups no manifest records (an interrupted run's): each must equal the folder's file, or
    it may be the only copy of an original; returns them."""
    fdir, out = folder / BACKUP_DIRNAME / FILES_DIRNAME, []
    for sub in sorted(os.listdir(fdir)) if fdir.is_dir() else []:
        if not valid_name(sub) or recorded.get(sub, {}).get("state") == "file":
            continue
        if not (_is_file(folder / sub) and sha256_file(folder / sub) == sha256_file(fdir / sub)):
            raise Refused(f"{fdir / sub} is a backup no {MANIFEST_NAME} records and it differs from {folder / sub}: "
                          "cannot tell which is the original; nothing was changed (move one away by hand)")
        out.append(fdir / sub)
    return out


def _check_targets(folder: Path, names) -> None:
    for name in names:
        path = folder / name
        if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
            raise Refused(f"{path}: expected a file or a symlink, got {_kind(path)}; nothing was changed")


def _edited(folder: Path, name: str, manifest: Dict[str, Any]) -> bool:
    """``FOLDER/name`` holds what install did not put there: not the original, not an installed or
    pending copy. A missing file is no edit (nothing would be lost)."""
    path, entry = folder / name, manifest["files"].get(name)
    if not os.path.lexists(path):
        return False
    if path.is_symlink():
        return not (entry and entry["state"] == "symlink" and os.readlink(path) == entry["target"])
    known = {manifest.get("installed", {}).get(name), manifest.get("pending", {}).get(name)}
    if entry and entry["state"] == "file":
        known.add(entry["sha256"])
    return not path.is_file() or sha256_file(path) not in known


def _is_original(path: Path, entry: Dict[str, Any]) -> bool:
    """``path`` already is what the backup ``entry`` records (bytes and mode, the same link, or absent)."""
    if entry["state"] == "absent":
        return not os.path.lexists(path)
    if entry["state"] == "symlink":
        return path.is_symlink() and os.readlink(path) == entry["target"]
    return (_is_file(path) and stat.S_IMODE(path.stat().st_mode) == entry["mode"]
            and sha256_file(path) == entry["sha256"])


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive ``flock`` on the checkpoint folder itself (no file is written) while
    install or restore changes it: a second one at the same time is :class:`Refused` in one line.
    The lock dies with its process; without ``fcntl`` (not POSIX) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(str(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Refused(f"{folder}: another install or restore is running on this folder (it holds the folder's "
                          f"lock); nothing was changed; run again when it is done") from None
        yield
    finally:
        os.close(fd)


def _back_up(folder: Path, name: str, files: Dict[str, Any]) -> None:
    """Record the original ``FOLDER/name`` (its bytes go to ``files/``) for the manifest."""
    path = folder / name
    if path.is_symlink():
        files[name] = {"state": "symlink", "target": os.readlink(path)}
    elif path.is_file():
        data = path.read_bytes()
        backup = folder / BACKUP_DIRNAME / FILES_DIRNAME / name
        attention_record.atomic_write_bytes(str(backup), data)
        if sha256_file(backup) != sha256_bytes(data):
            raise OSError(f"the backup of {path} does not match the original")
        files[name] = {"state": "file", "sha256": sha256_bytes(data),
                       "mode": stat.S_IMODE(path.stat().st_mode) & SAFE_MODE_BITS}
    else:
        files[name] = {"state": "absent"}


# ----------------------------------------------------------------------------------------
# install and restore
# ----------------------------------------------------------------------------------------
class InstallStopped(OSError):
    """A file could not be put in place part-way through an install; the message (one line) says
    which, and whether the originals were put back or ``--restore`` must do it."""


@contextlib.contextmanager
def _locked(folder: Path):
    if Path(folder).is_dir() and not Path(folder).is_symlink():
        with folder_lock(Path(folder)):
            yield
    else:
        yield  # not a folder: the checks refuse it


def install(folder, src=None, dry_run: bool = False, force: bool = False, log: Log = log_stderr) -> InstallPlan:
    """Copy the fork's remote code into ``folder``, back originals up once, fix ``auto_map``.

    Refuses (:class:`Refused`, nothing changed) other folders, an unsafe or corrupt backup, files
    edited since the last install unless ``force`` (then they are overwritten), and a second
    install or restore running on the folder (:func:`folder_lock`). A file that cannot be put in
    place stops the run (:class:`InstallStopped`): a first install then puts the originals back."""
    with _locked(Path(folder)):
        return _install(Path(folder), src, dry_run, force, log)


def _install(folder: Path, src, dry_run: bool, force: bool, log: Log) -> InstallPlan:
    src = Path(src) if src is not None else fork_dir()
    plan = plan_install(folder, src)
    writes = list(plan.copies) + list(plan.json_edits)
    leftovers = _check_backup_dir(folder)
    manifest = _read_manifest(folder)
    _check_targets(folder, writes)
    recorded = manifest["files"] if manifest else {}
    unrecorded = _check_unrecorded_backups(folder, recorded)
    if manifest and not force:
        edited = [n for n in writes if n in recorded and _edited(folder, n, manifest)]
        if edited:
            raise Refused(f"installed file(s) {edited} in {folder} were modified after install; installing again "
                          "would overwrite those edits (use --force to overwrite them); nothing was changed")
    for w in plan.warnings:
        log(f"warning: {w}")
    if dry_run:
        for name in plan.copies:
            log(f"would copy {name}")
        for name in plan.json_edits:
            log(f"would update auto_map in {name}")
        return plan
    bdir = folder / BACKUP_DIRNAME
    first = manifest is None
    if manifest is None:
        if os.path.lexists(bdir):  # an interrupted run's: no file of the folder was changed
            shutil.rmtree(bdir)
            log(f"removed the {BACKUP_DIRNAME} an interrupted run left")
        manifest = {"format": INSTALL_FORMAT, "source": str(src), "files": {}}
    else:
        log(f"a backup exists ({BACKUP_DIRNAME}); keeping the originals recorded there")
        for path in leftovers + unrecorded:
            os.unlink(path)
    for name in writes:
        if name not in manifest["files"]:
            _back_up(folder, name, manifest["files"])
    pending = dict(manifest.get("pending", {}))
    for name in writes:
        staged = _stage_path(folder, name)
        if name in plan.json_edits:
            mode = stat.S_IMODE((folder / name).stat().st_mode)  # follows a link: the mode the user sees
            attention_record.atomic_write_json(str(staged), plan.json_edits[name])
        else:
            mode = stat.S_IMODE((src / name).stat().st_mode)
            attention_record.atomic_write_bytes(str(staged), (src / name).read_bytes())
        os.chmod(staged, mode)
        pending[name] = sha256_file(staged)
    manifest["pending"] = pending
    _write_manifest(folder, manifest)  # from here a rerun completes the install and restore undoes it
    for i, name in enumerate(writes):
        try:
            os.replace(_stage_path(folder, name), folder / name)
        except OSError as e:
            _stopped(folder, name, e, i, len(writes), first)
        log(f"copied {name}" if name in plan.copies else f"updated auto_map in {name}")
    installed = dict(manifest.get("installed", {}))
    for name, sha in manifest.pop("pending").items():
        if _is_file(folder / name) and sha256_file(folder / name) == sha:
            installed[name] = sha
    manifest["installed"] = installed
    _write_manifest(folder, manifest)
    for sub in (STAGE_DIRNAME, FILES_DIRNAME):
        if (bdir / sub).is_dir() and not os.listdir(bdir / sub):
            os.rmdir(bdir / sub)
    log(f"installed {len(plan.copies)} files into {folder}; undo with --restore")
    return plan


def _stopped(folder: Path, name: str, error: OSError, done: int, total: int, first: bool) -> None:
    """Raise :class:`InstallStopped` for ``name``; a first install is undone before (nothing else
    was there to keep), a later one leaves it to ``--restore`` or a rerun."""
    why = f"install stopped: cannot put {folder / name} in place ({error.strerror or error}); {done} of {total} files " \
          f"were already installed"
    if first:
        try:
            _restore(folder, False, lambda msg: None)
        except (OSError, Refused) as e:
            raise InstallStopped(f"{why}; putting the originals back failed too ({e}): run --restore") from None
        raise InstallStopped(f"{why}; the originals were put back, the folder is as it was") from None
    raise InstallStopped(f"{why}; run --restore to put the originals back, or fix it and rerun the install") from None


def _check_restore(folder: Path, force: bool) -> Optional[Dict[str, Any]]:
    """Every check of :func:`restore`; the manifest, or None for a backup folder without one."""
    _check_backup_dir(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        if not os.path.lexists(folder / BACKUP_DIRNAME):
            raise Refused(f"{folder} has no {BACKUP_DIRNAME}/{MANIFEST_NAME}: nothing to restore")
        _check_unrecorded_backups(folder, {})
        return None
    _check_targets(folder, manifest["files"])
    for name, entry in manifest["files"].items():
        backup = folder / BACKUP_DIRNAME / FILES_DIRNAME / name
        if entry["state"] == "file" and not _is_file(backup):
            raise Refused(f"{backup}: expected the backup of {name} (a regular file), got {_kind(backup)}; "
                          "nothing was changed")
        if entry["state"] == "file" and sha256_file(backup) != entry["sha256"]:
            raise Refused(f"{backup}: the backup of {name} is corrupt (its sha256 is not the manifest's); "
                          "nothing was changed")
    _check_unrecorded_backups(folder, manifest["files"])
    if not force:
        edited = [n for n in manifest["files"] if _edited(folder, n, manifest)]
        if edited:
            raise Refused(f"installed file(s) {edited} in {folder} were modified after install; restore would "
                          "lose those edits (use --force to restore anyway); nothing was changed")
    return manifest


def restore_plan(folder, force: bool = False) -> List[Tuple[str, str]]:
    """``[(file, "restore" | "remove")]``: what :func:`restore` would do (refusals included); changes nothing."""
    manifest = _check_restore(Path(folder), force)
    if manifest is None:
        return [(BACKUP_DIRNAME, "remove")]
    return [(name, "remove" if entry["state"] == "absent" else "restore") for name, entry in manifest["files"].items()]


def restore(folder, force: bool = False, log: Log = log_stderr) -> List[str]:
    """Put every file recorded in the backup back byte for byte (contents, modes, links); remove
    the backup. Refuses (nothing changed) an unsafe or corrupt backup, edited files unless
    ``force``, and a second install or restore running on the folder (:func:`folder_lock`). A file
    that already is its original (one an install could not replace) is left alone."""
    with _locked(Path(folder)):
        return _restore(Path(folder), force, log)


def _restore(folder: Path, force: bool, log: Log) -> List[str]:
    manifest = _check_restore(folder, force)
    bdir = folder / BACKUP_DIRNAME
    if manifest is None:
        shutil.rmtree(bdir)
        log(f"removed the {BACKUP_DIRNAME} an interrupted run left without a manifest; its backups equal "
            f"the files of {folder}, which are the originals")
        return []
    done = []
    for name, entry in manifest["files"].items():
        path, staged = folder / name, _stage_path(folder, name)
        if _is_original(path, entry):  # never replaced (e.g. the file an install could not replace)
            done.append(name)
            continue
        if entry["state"] == "file":
            attention_record.atomic_write_bytes(str(staged), (bdir / FILES_DIRNAME / name).read_bytes())
            os.chmod(staged, entry["mode"] & SAFE_MODE_BITS)
            os.replace(staged, path)
        elif entry["state"] == "symlink":
            if os.path.lexists(staged):
                os.unlink(staged)
            os.makedirs(staged.parent, exist_ok=True)
            os.symlink(entry["target"], staged)
            os.replace(staged, path)
        elif os.path.lexists(path):
            os.unlink(path)
        done.append(name)
        log(f"restored {name}" if entry["state"] != "absent" else f"removed {name}")
    os.unlink(_manifest_path(folder))  # the folder is restored: a rerun only removes the backup folder
    shutil.rmtree(bdir)
    log(f"restored {len(done)} files in {folder}")
    return done
