"""Keep the fork in step with upstream MiniCPM-V-2.6 and with the installed transformers.

Reusable logic behind ``scripts/diff_upstream.py`` and ``scripts/install_into_snapshot.py``
(those files only parse arguments and print). Imports nothing but the standard library,
torch and transformers, and those two lazily where possible.

Pieces
------
* **Pin** (``patches/UPSTREAM.json``): the upstream repo id, the sha256 of each upstream
  remote-code file the golden fixtures were made from (the revision itself is unknown,
  the hashes are the identity of the pin), one entry per upstream symbol the fork
  changes (what and why, with a note under ``patches/notes/``), and a snapshot of the
  transformers Qwen2/SigLIP/SDPA attention code the fork mirrors.
* **File status**: which upstream files match the pin, changed since, or are missing.
* **Unified diffs** fork vs upstream, one per file.
* **Symbol inventory** from the AST: classes, functions, methods with their signatures
  (parameter names, kinds, defaults, decorators; annotations ignored) and a hash of
  their body (comments, docstrings and formatting ignored).
* **Structural parity**: both ``MiniCPMV`` classes built on the meta device from one
  config; state-dict keys, shapes, dtypes and config fields compared.
* **Numeric parity**: both run on the same random weights and inputs, logits compared.
  Upstream is loaded from its folder with run-time shims for its known breakages (never
  by editing its files): typing names seeded into module globals (``resampler.py``'s
  star import no longer provides ``List`` on torch 2.13), ``AutoProcessor`` stubbed
  while ``MiniCPMV.__init__`` runs (it loads a processor from ``config._name_or_path``),
  and direct construction + ``load_state_dict`` instead of ``from_pretrained`` (which
  fails on transformers 5 with ``all_tied_weights_keys``).
* **Remote-code file list**: the fork files a checkpoint folder needs, found by
  following relative imports from the entry modules.
* **Install into a checkpoint folder** with a one-time backup and a byte-exact restore.

Everything that needs attention becomes a :class:`Finding` with ``attention=True``;
the CLI exits non-zero when any exists.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import fnmatch
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import json
import os
import shutil
import sys
import tempfile
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# --------------------------------------------------------------------------------------
# constants and paths
# --------------------------------------------------------------------------------------
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
# Entry modules of the remote code: the model and config (config.json auto_map) and the
# processor side (preprocessor_config.json / tokenizer_config.json auto_map).
REMOTE_CODE_ROOTS = (
    "configuration_minicpm.py",
    "modeling_minicpmv.py",
    "image_processing_minicpmv.py",
    "processing_minicpmv.py",
    "tokenization_minicpmv_fast.py",
)
MODEL_MODULE, MODEL_CLASS = "modeling_minicpmv", "MiniCPMV"
CONFIG_MODULE, CONFIG_CLASS = "configuration_minicpm", "MiniCPMVConfig"
PIN_FORMAT = "minicpmv-attn.upstream-pin/1"
INSTALL_FORMAT = "minicpmv-attn.install/1"
BACKUP_DIRNAME = ".minicpmv_attn_backup"
MANIFEST_NAME = "manifest.json"

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

# Config fields never compared (bookkeeping, not architecture).
CONFIG_FIELDS_IGNORED = ("transformers_version", "_name_or_path", "_commit_hash", "auto_map")

Log = Callable[[str], None]


def fork_dir() -> Path:
    """The fork's package folder (``modeling/``)."""
    return Path(__file__).resolve().parent


def repo_root() -> Path:
    return fork_dir().parent


def default_pin_path() -> Path:
    return repo_root() / "patches" / "UPSTREAM.json"


def default_out_dir() -> Path:
    return repo_root() / "patches" / "generated"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


# --------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    If ``path`` is a symlink, the link itself is replaced by a regular file (its target,
    e.g. a Hugging Face cache blob, is never written through).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # keep the mode of the file being replaced; new files get the usual 0o666 & ~umask
        mode = path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def atomic_copy(src, dst) -> None:
    """Copy the bytes of ``src`` (following links) to ``dst`` atomically, keeping its mode bits."""
    data = Path(src).read_bytes()
    atomic_write_bytes(dst, data)
    with contextlib.suppress(OSError):
        shutil.copymode(src, dst)  # follows links on both sides: dst is a regular file here


def read_json(path) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------
# findings and the summary table
# --------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One row of the report. ``attention`` marks what a maintainer must look at."""

    section: str  # files | symbols | state_dict | config | numeric | transformers | setup
    item: str
    status: str
    detail: str = ""
    attention: bool = False


def needs_attention(findings: Iterable[Finding]) -> bool:
    return any(f.attention for f in findings)


def format_table(findings: Sequence[Finding], max_detail: int = 70) -> str:
    """A fixed-width table: a ``!!`` in the first column marks rows needing attention."""
    head = ("", "section", "item", "status", "detail")
    rows = []
    for f in findings:
        detail = f.detail.replace("\n", " ")
        if len(detail) > max_detail:
            detail = detail[: max_detail - 3] + "..."
        rows.append(("!!" if f.attention else "", f.section, f.item, f.status, detail))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(4)]
    lines = []
    fmt = "  ".join("{:<%d}" % w for w in widths) + "  {}"
    lines.append(fmt.format(*head).rstrip())
    lines.append(fmt.format(*("-" * w for w in widths), "-" * 6).rstrip())
    for r in rows:
        lines.append(fmt.format(*r).rstrip())
    n_att = sum(f.attention for f in findings)
    lines.append("")
    lines.append(f"{len(findings)} rows, {n_att} need attention" if n_att else f"{len(findings)} rows, nothing needs attention")
    return "\n".join(lines)


def summarize(findings: Sequence[Finding]) -> List[Finding]:
    """Collapse the many per-symbol rows into counts, keeping every attention row."""
    out: List[Finding] = []
    info_counts: Dict[Tuple[str, str], int] = {}
    for f in findings:
        if f.attention or f.section not in ("symbols", "transformers") or f.status in ("ok", "error"):
            out.append(f)
        else:
            key = (f.section, f.status)
            info_counts[key] = info_counts.get(key, 0) + 1
    for (section, status), n in sorted(info_counts.items()):
        out.append(Finding(section, f"({n} symbols)", status, "informational; see report.json"))
    return out


# --------------------------------------------------------------------------------------
# the pin
# --------------------------------------------------------------------------------------
def load_pin(path=None) -> Dict[str, Any]:
    path = Path(path) if path is not None else default_pin_path()
    pin = read_json(path)
    if not isinstance(pin, dict) or "upstream" not in pin:
        raise ValueError(f"{path}: not an upstream pin (no 'upstream' section)")
    pin.setdefault("changes", [])
    pin.setdefault("expected_config_differences", [])
    pin.setdefault("transformers", {})
    return pin


def pinned_files(pin: Dict[str, Any]) -> Dict[str, str]:
    files = pin.get("upstream", {}).get("files", {})
    return {name: (v["sha256"] if isinstance(v, dict) else v) for name, v in files.items()}


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
    notes of ``base_pin``. The transformers section is re-snapshotted from the installed
    transformers.
    """
    upstream_dir = Path(upstream_dir)
    if files is None:
        files = sorted(p.name for p in upstream_dir.glob("*.py"))
    base = copy.deepcopy(base_pin) if base_pin else {}
    up = dict(base.get("upstream", {}))
    up["repo_id"] = repo_id or up.get("repo_id", UPSTREAM_REPO_ID)
    up["revision"] = revision if revision is not None else up.get("revision")
    up["files"] = {
        name: {"sha256": sha256_file(upstream_dir / name)} for name in files if (upstream_dir / name).is_file()
    }
    pin = {
        "format": PIN_FORMAT,
        "upstream": up,
        "changes": base.get("changes", []),
        "expected_config_differences": base.get("expected_config_differences", []),
        "transformers": transformers_snapshot(base.get("transformers", {})),
    }
    return pin


# --------------------------------------------------------------------------------------
# symbol inventory (AST)
# --------------------------------------------------------------------------------------
@dataclass
class Symbol:
    qualname: str
    kind: str  # class | function | method
    signature: str  # compared: parameter names, kinds, defaults, decorators (no annotations)
    display: str  # shown: the parameter list as written (with annotations)
    body_hash: str  # comments, docstrings, formatting ignored
    lineno: int


def _strip_docstring(body: List[ast.stmt]) -> List[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def _signature_of(args: ast.arguments) -> str:
    def names(xs):
        return [a.arg for a in xs]

    pos = names(args.posonlyargs) + names(args.args)
    defaults = [None] * (len(pos) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    parts = []
    n_posonly = len(args.posonlyargs)
    for i, (name, default) in enumerate(zip(pos, defaults)):
        parts.append(name if default is None else f"{name}={default}")
        if n_posonly and i == n_posonly - 1:
            parts.append("/")
    if args.vararg:
        parts.append("*" + args.vararg.arg)
    elif args.kwonlyargs:
        parts.append("*")
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        parts.append(a.arg if d is None else f"{a.arg}={ast.unparse(d)}")
    if args.kwarg:
        parts.append("**" + args.kwarg.arg)
    return ", ".join(parts)


def _hash_nodes(nodes: Sequence[ast.AST]) -> str:
    dumped = "\n".join(ast.dump(n, annotate_fields=True, include_attributes=False) for n in nodes)
    return sha256_bytes(dumped.encode("utf-8"))[:16]


def _decorators(node) -> str:
    return "".join(f"@{ast.unparse(d)} " for d in node.decorator_list)


def symbol_inventory(source: str, filename: str = "<source>") -> Dict[str, Symbol]:
    """Classes, functions and methods (nested classes included) of a module's source."""
    tree = ast.parse(source, filename=filename)
    out: Dict[str, Symbol] = {}

    def visit(body, prefix: str, in_class: bool):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + node.name
                sig = _decorators(node) + ("async " if isinstance(node, ast.AsyncFunctionDef) else "") + \
                    f"({_signature_of(node.args)})"
                display = f"{_decorators(node)}def {node.name}({ast.unparse(node.args)})"
                if node.returns is not None:
                    display += f" -> {ast.unparse(node.returns)}"
                out[qual] = Symbol(qual, "method" if in_class else "function", sig, display,
                                   _hash_nodes(_strip_docstring(node.body)), node.lineno)
            elif isinstance(node, ast.ClassDef):
                qual = prefix + node.name
                bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
                sig = _decorators(node) + f"({', '.join(bases)})"
                # class-level statements other than methods/classes (attributes, config_class, ...)
                own = [n for n in _strip_docstring(node.body)
                       if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
                out[qual] = Symbol(qual, "class", sig, f"{_decorators(node)}class {node.name}({', '.join(bases)})",
                                   _hash_nodes(own), node.lineno)
                visit(node.body, qual + ".", True)

    visit(tree.body, "", False)
    return out


@dataclass
class SymbolChange:
    file: str
    qualname: str
    change: str  # added (fork only) | removed (upstream only) | signature | body
    kind: str
    fork: Optional[str] = None
    upstream: Optional[str] = None


def diff_inventories(fork: Dict[str, Symbol], upstream: Dict[str, Symbol], file: str) -> List[SymbolChange]:
    out = []
    for q in sorted(set(fork) | set(upstream), key=lambda q: (q.split(".")[0], q)):
        f, u = fork.get(q), upstream.get(q)
        if u is None:
            out.append(SymbolChange(file, q, "added", f.kind, fork=f.display))
        elif f is None:
            out.append(SymbolChange(file, q, "removed", u.kind, upstream=u.display))
        elif f.signature != u.signature or f.kind != u.kind:
            out.append(SymbolChange(file, q, "signature", f.kind, fork=f.display, upstream=u.display))
        elif f.body_hash != u.body_hash:
            out.append(SymbolChange(file, q, "body", f.kind, fork=f.display, upstream=u.display))
    return out


def documented_by(change: SymbolChange, pin: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The pin entry that documents ``change``, if any.

    An entry ``{"file", "symbol", "kind"}`` (``symbol`` is an fnmatch pattern on the
    qualified name) documents changes of its kind: ``changed`` covers ``signature`` and
    ``body``; ``added`` (a fork-only symbol), ``removed`` (an upstream symbol the fork
    drops) and ``replaced`` (both) cover presence.
    """
    covers = {
        "changed": {"signature", "body"},
        "added": {"added", "signature", "body"},
        "removed": {"removed"},
        "replaced": {"added", "removed", "signature", "body"},
    }
    for entry in pin.get("changes", []):
        if entry.get("file") not in (change.file, "*"):
            continue
        if not fnmatch.fnmatchcase(change.qualname, entry.get("symbol", "")):
            continue
        if change.change in covers.get(entry.get("kind", "changed"), set()):
            return entry
    return None


# --------------------------------------------------------------------------------------
# relative imports and the remote-code file list
# --------------------------------------------------------------------------------------
def relative_imports(path) -> Tuple[List[str], List[str]]:
    """(module names imported relatively, warnings) for one flat module file.

    Both ``from .x import y`` and ``from . import x`` are followed; the latter is
    reported as a warning because transformers' remote-code loader only copies modules
    named in ``from .x import y`` / ``import .x`` lines.
    """
    path = Path(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mods, warnings = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            if node.level > 1:
                warnings.append(f"{path.name}:{node.lineno}: relative import beyond the package (level {node.level})")
                continue
            if node.module:
                mods.append(node.module.split(".")[0])
            else:
                for alias in node.names:
                    mods.append(alias.name)
                    warnings.append(f"{path.name}:{node.lineno}: 'from . import {alias.name}' is not followed by "
                                    "transformers' remote-code loader; write 'from .{0} import ...'".format(alias.name))
    return sorted(set(mods)), warnings


def remote_code_files(src_dir=None, roots: Sequence[str] = REMOTE_CODE_ROOTS) -> Tuple[List[str], List[str]]:
    """The .py files a checkpoint folder needs: the roots plus everything they import relatively.

    Returns (sorted file names, warnings). A missing root is a warning for the processor
    side; ``modeling_minicpmv.py`` and ``configuration_minicpm.py`` are required.
    """
    src_dir = Path(src_dir) if src_dir is not None else fork_dir()
    warnings: List[str] = []
    seen: Dict[str, None] = {}
    todo = []
    for root in roots:
        if (src_dir / root).is_file():
            todo.append(root)
        elif root in ("modeling_minicpmv.py", "configuration_minicpm.py"):
            raise FileNotFoundError(f"{src_dir / root} does not exist: the fork is incomplete")
        else:
            warnings.append(f"{root} not found in {src_dir}; not installed")
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = None
        mods, warn = relative_imports(src_dir / name)
        warnings.extend(warn)
        for mod in mods:
            fname = mod + ".py"
            if (src_dir / fname).is_file():
                todo.append(fname)
            elif (src_dir / mod).is_dir():
                warnings.append(f"{name} imports the sub-package .{mod}: remote code must be flat")
            else:
                warnings.append(f"{name} imports .{mod}, which does not exist in {src_dir}")
    return sorted(seen), warnings


def class_names(path) -> List[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    return [n.name for n in tree.body if isinstance(n, ast.ClassDef)]


# --------------------------------------------------------------------------------------
# loading a folder of flat remote code as a package, with shims
# --------------------------------------------------------------------------------------
TYPING_SHIM_NAMES = ("List", "Dict", "Tuple", "Optional", "Union", "Any", "Callable", "Sequence")


class _FolderFinder(importlib.abc.MetaPathFinder):
    """Finds ``<prefix>.<module>`` in a registered folder; seeds module globals before exec."""

    def __init__(self):
        self.packages: Dict[str, Tuple[Path, Dict[str, Any]]] = {}

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, mod = fullname.rpartition(".")
        if pkg not in self.packages or "." in mod or not mod:
            return None
        folder, seed = self.packages[pkg]
        file = folder / (mod + ".py")
        if not file.is_file():
            return None
        loader = _SeedingLoader(fullname, str(file), seed)
        return importlib.util.spec_from_file_location(fullname, str(file), loader=loader)


class _SeedingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname, path, seed):
        super().__init__(fullname, path)
        self._seed = seed

    def exec_module(self, module):
        for k, v in self._seed.items():
            module.__dict__.setdefault(k, v)
        super().exec_module(module)

    # never write .pyc files next to someone's checkpoint or upstream copy
    def set_data(self, path, data, *, _mode=0o666):
        return None


_FINDER = _FolderFinder()
_PKG_COUNTER = itertools.count()


@contextlib.contextmanager
def _auto_register_disabled():
    """Module-level ``Auto*.register`` calls in loaded code become no-ops (no registry pollution)."""
    patched = []
    try:
        import transformers

        names = ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoImageProcessor", "AutoProcessor",
                 "AutoTokenizer")
        for name in names:
            cls = getattr(transformers, name, None)
            if cls is None or "register" not in dir(cls):
                continue
            patched.append((cls, cls.__dict__.get("register")))
            setattr(cls, "register", staticmethod(lambda *a, **k: None))
    except ImportError:
        pass
    try:
        yield
    finally:
        for cls, orig in reversed(patched):
            if orig is None:
                with contextlib.suppress(AttributeError):
                    delattr(cls, "register")
            else:
                setattr(cls, "register", orig)


def load_folder_package(folder, label: str = "pkg", typing_shim: bool = True) -> str:
    """Make the flat remote code in ``folder`` importable as a fresh package; return its name.

    Relative imports resolve inside the folder. With ``typing_shim`` every module starts
    with ``List``, ``Optional``, ... from :mod:`typing` in its globals (upstream's
    ``resampler.py`` relies on a star import that no longer provides ``List``). Nothing
    is written to the folder.
    """
    folder = Path(folder).resolve()
    name = f"_minicpmv_attn_{label}_{next(_PKG_COUNTER)}"
    pkg = types.ModuleType(name)
    pkg.__path__ = []  # our finder, not the path finder, resolves submodules
    pkg.__package__ = name
    pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    pkg.__file__ = str(folder / "__init__.py")
    seed = {n: getattr(typing, n) for n in TYPING_SHIM_NAMES} if typing_shim else {}
    _FINDER.packages[name] = (folder, seed)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    sys.modules[name] = pkg
    return name


def import_from_package(pkg: str, module: str):
    with _auto_register_disabled():
        return importlib.import_module(f"{pkg}.{module}")


def unload_package(pkg: str) -> None:
    for mod in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[mod]
    _FINDER.packages.pop(pkg, None)


class _ProcessorStub:
    """Stands in for ``transformers.AutoProcessor`` while upstream ``MiniCPMV.__init__`` runs."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        return None


@contextlib.contextmanager
def upstream_construction_shims(modeling_module):
    """Upstream ``MiniCPMV.__init__`` loads a processor from ``config._name_or_path``: stub it."""
    had = hasattr(modeling_module, "AutoProcessor")
    orig = getattr(modeling_module, "AutoProcessor", None)
    modeling_module.AutoProcessor = _ProcessorStub
    try:
        yield
    finally:
        if had:
            modeling_module.AutoProcessor = orig
        else:
            with contextlib.suppress(AttributeError):
                delattr(modeling_module, "AutoProcessor")


@dataclass
class LoadedSide:
    label: str
    folder: Path
    package: str
    config_cls: Any
    model_cls: Any
    modeling: Any


def load_side(folder, label: str, is_upstream: bool) -> LoadedSide:
    """Import the config and model classes of one side (fork or upstream) from its folder."""
    pkg = load_folder_package(folder, label, typing_shim=is_upstream)
    cfg_mod = import_from_package(pkg, CONFIG_MODULE)
    modeling = import_from_package(pkg, MODEL_MODULE)
    return LoadedSide(label, Path(folder), pkg, getattr(cfg_mod, CONFIG_CLASS), getattr(modeling, MODEL_CLASS),
                      modeling)


def build_config(side: LoadedSide, config_dict: Dict[str, Any], attn_implementation: Optional[str] = None):
    d = copy.deepcopy(config_dict)
    d.pop("auto_map", None)
    cfg = side.config_cls.from_dict(d) if hasattr(side.config_cls, "from_dict") else side.config_cls(**d)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def build_model(side: LoadedSide, config, is_upstream: bool, device=None):
    import torch

    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    shims = upstream_construction_shims(side.modeling) if is_upstream else contextlib.nullcontext()
    with ctx, shims:
        model = side.model_cls(config)
    return model


# --------------------------------------------------------------------------------------
# structural parity (meta device)
# --------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if hasattr(d, "to_dict") and not isinstance(d, dict):
        d = d.to_dict()
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) or (hasattr(v, "to_dict") and not isinstance(v, (str, bytes))):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_fields(config) -> Dict[str, Any]:
    flat = _flatten(config.to_dict())
    return {k: v for k, v in flat.items()
            if not any(part.startswith("_") for part in k.split(".")) and k.split(".")[-1] not in CONFIG_FIELDS_IGNORED}


def compare_config_fields(fork_cfg, up_cfg, pin: Dict[str, Any], label: str) -> List[Finding]:
    ff, uf = _config_fields(fork_cfg), _config_fields(up_cfg)
    expected = set(pin.get("expected_config_differences", []))
    out = []
    for k in sorted(set(ff) | set(uf)):
        if k in ff and k in uf and ff[k] == uf[k]:
            continue
        if k not in uf:
            status, detail = "fork only", f"fork={ff[k]!r}"
        elif k not in ff:
            status, detail = "upstream only", f"upstream={uf[k]!r}"
        else:
            status, detail = "differs", f"fork={ff[k]!r} upstream={uf[k]!r}"
        documented = any(fnmatch.fnmatchcase(k, p) for p in expected)
        out.append(Finding("config", f"{label}:{k}", status + (" (documented)" if documented else ""), detail,
                           attention=not documented))
    if not out:
        out.append(Finding("config", label, "ok", f"{len(ff)} fields equal"))
    return out


def state_dict_shapes(model) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}


def compare_state_dicts(fork_sd, up_sd) -> List[Finding]:
    out = []
    for k in sorted(set(fork_sd) | set(up_sd)):
        if k not in up_sd:
            out.append(Finding("state_dict", k, "fork only", f"shape={fork_sd[k][0]}", attention=True))
        elif k not in fork_sd:
            out.append(Finding("state_dict", k, "upstream only", f"shape={up_sd[k][0]}", attention=True))
        elif fork_sd[k] != up_sd[k]:
            out.append(Finding("state_dict", k, "differs", f"fork={fork_sd[k]} upstream={up_sd[k]}", attention=True))
    if not out:
        out.append(Finding("state_dict", "keys", "ok", f"{len(fork_sd)} keys, shapes and dtypes equal"))
    return out


def structural_parity(fork: LoadedSide, upstream: LoadedSide, config_dict: Dict[str, Any], pin: Dict[str, Any],
                      log: Log = _stderr) -> List[Finding]:
    findings: List[Finding] = []
    # config fields: from the same dict, and the classes' defaults
    try:
        fork_default, up_default = fork.config_cls(), upstream.config_cls()
        findings += compare_config_fields(fork_default, up_default, pin, "defaults")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        findings.append(Finding("config", "defaults", "error", f"{type(e).__name__}: {e}", attention=True))
    try:
        fork_cfg = build_config(fork, config_dict)
        up_cfg = build_config(upstream, config_dict, attn_implementation="eager")
        findings += compare_config_fields(fork_cfg, up_cfg, pin, "from config.json")
    except Exception as e:  # noqa: BLE001
        findings.append(Finding("config", "from config.json", "error", f"{type(e).__name__}: {e}", attention=True))
        return findings
    sds = {}
    for side, cfg, is_up in ((fork, fork_cfg, False), (upstream, up_cfg, True)):
        log(f"  building {side.label} {MODEL_CLASS} on the meta device")
        try:
            model = build_model(side, cfg, is_upstream=is_up, device="meta")
            sds[side.label] = state_dict_shapes(model)
            del model
        except Exception as e:  # noqa: BLE001
            findings.append(Finding("state_dict", side.label, "error", f"build on meta failed: {type(e).__name__}: {e}",
                                    attention=True))
    if len(sds) == 2:
        findings += compare_state_dicts(sds[fork.label], sds[upstream.label])
    return findings


# --------------------------------------------------------------------------------------
# numeric parity (random weights, same inputs)
# --------------------------------------------------------------------------------------
TINY_OVERRIDES = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "query_num": 16,
    "vocab_size": 160,
    "tie_word_embeddings": False,
    "use_cache": True,
}
TINY_VISION_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}


def tiny_config_dict(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The same architecture shrunk to a size that runs in a second on a CPU."""
    d = copy.deepcopy(config_dict)
    d.update(TINY_OVERRIDES)
    d.pop("torch_dtype", None)
    d.pop("dtype", None)
    d.pop("layer_types", None)  # derived from num_hidden_layers on transformers 5
    d.pop("max_window_layers", None)
    for i, key in enumerate(("bos_token_id", "eos_token_id", "pad_token_id")):
        ids = d.get(key)
        if isinstance(ids, int) and ids >= d["vocab_size"]:
            d[key] = 3 + i  # keep special ids inside the shrunk vocabulary
        elif isinstance(ids, list):
            d[key] = [x if x < d["vocab_size"] else 3 + i for x in ids]
    vc = dict(d.get("vision_config") or {})
    vc.update(TINY_VISION_OVERRIDES)
    vc.setdefault("patch_size", 14)
    vc.setdefault("image_size", 980)
    d["vision_config"] = vc
    return d


def randomize_state_dict(state: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Non-trivial random values for every float tensor (norm weights near 1), deterministic."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(state):
        v = state[k]
        if not torch.is_floating_point(v):
            out[k] = v.clone()
            continue
        r = torch.randn(v.shape, generator=g, dtype=torch.float32)
        norm_like = v.dim() == 1 and k.endswith("weight") and ("norm" in k or k.split(".")[-2].startswith("ln"))
        out[k] = (1.0 + 0.1 * r if norm_like else 0.05 * r).to(v.dtype)
    return out


def synthetic_inputs(config, seed: int = 0) -> Tuple[Dict[str, Any], Any]:
    """Two samples, left padded: sample 0 has two slices, sample 1 one slice. Returns (data, mask)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    q = int(config.query_num)
    patch = int(getattr(config, "patch_size", 14))
    vocab = int(config.vocab_size)
    slices = [[(4, 6), (3, 3)], [(5, 4)]]
    bounds, lengths = [], []
    for s in slices:
        b, pos = [], 2
        for _ in s:
            b.append((pos, pos + q))
            pos += q + 3
        bounds.append(b)
        lengths.append(pos + 2)
    L = max(lengths)
    ids = torch.randint(5, vocab, (2, L), generator=g)
    mask = torch.zeros(2, L, dtype=torch.long)
    image_bound, pixel_values, tgt_sizes = [], [], []
    for i, (s, b, n) in enumerate(zip(slices, bounds, lengths)):
        pad = L - n
        ids[i, :pad] = 0
        mask[i, pad:] = 1
        image_bound.append(torch.tensor([[x + pad, y + pad] for x, y in b], dtype=torch.long))
        pixel_values.append([torch.randn(3, patch, patch * h * w, generator=g) for h, w in s])
        tgt_sizes.append(torch.tensor(s, dtype=torch.int32))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    data = {"input_ids": ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": image_bound,
            "position_ids": position_ids}
    return data, mask


def _logits_of(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def numeric_parity(fork: LoadedSide, upstream: LoadedSide, config_dict: Dict[str, Any], atol: float = 1e-4,
                   seed: int = 0, fork_attn: Optional[str] = None, log: Log = _stderr) -> List[Finding]:
    import torch

    tiny = tiny_config_dict(config_dict)
    try:
        up_cfg = build_config(upstream, tiny, attn_implementation="eager")
        fork_cfg = build_config(fork, tiny, attn_implementation=fork_attn)
        log("  building upstream on the CPU (tiny config, random weights)")
        torch.manual_seed(seed)
        up_model = build_model(upstream, up_cfg, is_upstream=True)
        weights = randomize_state_dict(up_model.state_dict(), seed)
        up_model.load_state_dict(weights, strict=True)
        log("  building the fork and loading the same weights")
        fork_model = build_model(fork, fork_cfg, is_upstream=False)
        res = fork_model.load_state_dict(weights, strict=False)
    except Exception as e:  # noqa: BLE001
        return [Finding("numeric", "setup", "error", f"{type(e).__name__}: {e}", attention=True)]
    missing, unexpected = list(res.missing_keys), list(res.unexpected_keys)
    if missing or unexpected:
        return [Finding("numeric", "load_state_dict", "error",
                        f"fork missing {missing[:5]} unexpected {unexpected[:5]}", attention=True)]
    up_model.eval()
    fork_model.eval()
    data, mask = synthetic_inputs(up_cfg, seed)
    try:
        with torch.no_grad():
            up_logits = _logits_of(up_model(copy.deepcopy(data), attention_mask=mask.clone()))
            fork_logits = _logits_of(fork_model(copy.deepcopy(data), attention_mask=mask.clone()))
    except Exception as e:  # noqa: BLE001
        return [Finding("numeric", "forward", "error", f"{type(e).__name__}: {e}", attention=True)]
    if up_logits.shape != fork_logits.shape:
        return [Finding("numeric", "logits", "differs", f"shape fork={tuple(fork_logits.shape)} "
                        f"upstream={tuple(up_logits.shape)}", attention=True)]
    real = mask.bool()
    diff = (up_logits.float() - fork_logits.float()).abs()[real].max().item()
    ok = diff <= atol
    return [Finding("numeric", "logits", "ok" if ok else "differs",
                    f"max |fork - upstream| = {diff:.3g} on real positions (atol {atol:g})", attention=not ok)]


# --------------------------------------------------------------------------------------
# transformers: the Qwen2 / SigLIP / SDPA attention code the fork mirrors
# --------------------------------------------------------------------------------------
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
            "fork_attention_functions": base.get("fork_attention_functions", ["capture.py::attention_forward"])}


def _fork_module_with_class(fork: Path, cls: str) -> Optional[str]:
    for path in sorted(fork.glob("*.py")):
        with contextlib.suppress(SyntaxError, UnicodeDecodeError):
            if cls in class_names(path):
                return path.name
    return None


def _function_source(path: Path, qualname: str) -> Optional[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return ast.get_source_segment(source, node)


def _split_signature(sig: str) -> Tuple[List[str], Dict[str, str]]:
    """``"@dec(...) (a, b=1, *, c)"`` -> (decorators, {name: "name=default"})."""
    depth, start = 0, 0
    for i in range(len(sig) - 1, -1, -1):  # the parameter list is the last parenthesised group
        depth += {")": 1, "(": -1}.get(sig[i], 0)
        if depth == 0:
            start = i
            break
    prefix = " " + sig[:start].strip()
    decorators = ["@" + d.strip() for d in prefix.split(" @") if d.strip()]
    params, depth, cur = {}, 0, ""
    for ch in sig[start + 1:-1] + ",":
        if ch == "," and depth == 0:
            part = cur.strip()
            if part and part not in ("/", "*"):
                params[part.partition("=")[0].lstrip("*")] = part
            cur = ""
            continue
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        cur += ch
    return decorators, params


def signature_change(old: str, new: str) -> str:
    """A one-line parameter diff, e.g. ``-past_key_values +cache +@deprecate_kwarg(...)``."""
    (da, a), (db, b) = _split_signature(old), _split_signature(new)
    parts = [f"-{n}" for n in a if n not in b] + [f"+{n}" for n in b if n not in a]
    parts += [f"~{b[n]}" for n in b if n in a and a[n] != b[n]]
    parts += [f"-{d.split('(')[0]}" for d in da if d not in db] + [f"+{d.split('(')[0]}" for d in db if d not in da]
    if not parts and list(a) != list(b):
        parts.append("parameters reordered")
    return " ".join(parts) or "parameter kinds changed"


def compare_transformers(pin: Dict[str, Any], fork: Path, out_dir: Optional[Path], log: Log = _stderr
                         ) -> Tuple[List[Finding], Dict[str, Any]]:
    """Installed transformers vs the pinned snapshot of the same release (its attention code and
    the generation interface the fork relies on); the fork's counterparts informational.

    A release without a snapshot is compared with the newest snapshot older than it and
    flagged: it is not verified.
    """
    import transformers

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
    fork_attn_fns = list(tpin.get("fork_attention_functions", ["capture.py::attention_forward"]))
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
            theirs = _function_source(path, fn)
            for fref in fork_attn_fns:
                fname, _, qual = fref.partition("::")
                mine = _function_source(fork / fname, qual) if (fork / fname).is_file() else None
                if theirs is None and fn not in (pinned_syms or {}):
                    continue  # e.g. transformers 4.4x has no such function: nothing to compare
                if theirs is None or mine is None:
                    findings.append(Finding("transformers", f"{rel}::{fn} vs {fref}", "not found",
                                            "attention function missing on one side", attention=theirs is None))
                    continue
                text = "".join(difflib.unified_diff(
                    theirs.splitlines(True), mine.splitlines(True),
                    fromfile=f"transformers/{rel}::{fn}", tofile=f"fork/{fref}"))
                target = out_dir / "transformers" / f"{rel.replace('/', '__')}__{fn}__vs__{fname}__{qual}.diff"
                atomic_write_text(target, text)
    return findings, details


# --------------------------------------------------------------------------------------
# the whole diff
# --------------------------------------------------------------------------------------
def unified_file_diff(upstream_path: Optional[Path], fork_path: Optional[Path], name: str) -> str:
    a = upstream_path.read_text(encoding="utf-8").splitlines(True) if upstream_path and upstream_path.is_file() else []
    b = fork_path.read_text(encoding="utf-8").splitlines(True) if fork_path and fork_path.is_file() else []
    return "".join(difflib.unified_diff(a, b, fromfile=f"upstream/{name}", tofile=f"fork/{name}"))


def _clean_generated(out_dir: Path) -> None:
    """Remove what a previous run wrote (only our own file kinds)."""
    for sub, pattern in (("files", "*.diff"), ("transformers", "*.diff"), (".", "report.json"), (".", "summary.txt")):
        for p in (out_dir / sub).glob(pattern):
            if p.is_file():
                p.unlink()


def download_upstream(revision: str, repo_id: str = UPSTREAM_REPO_ID, cache_dir=None) -> Path:
    """Download upstream's remote code and config at ``revision``; a clear error when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a transformers dependency
        raise RuntimeError("huggingface_hub is not installed; pass --upstream DIR instead") from e
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=["*.py", "*.json"])
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise RuntimeError(
            f"could not download {repo_id}@{revision} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "If this machine is offline (or HF_HUB_OFFLINE is set), download the repository's *.py and "
            "config.json elsewhere and pass --upstream DIR.") from e
    return Path(path)


def run_diff(upstream_dir, out_dir=None, pin_path=None, fork=None, numeric: bool = False, structural: bool = True,
             check_transformers: bool = True, config_path=None, atol: float = 1e-4, seed: int = 0,
             fork_attn: Optional[str] = None, log: Log = _stderr) -> Tuple[List[Finding], Dict[str, Any]]:
    """Every check; returns (findings, report dict). Writes diffs and report.json to ``out_dir``."""
    upstream_dir = Path(upstream_dir)
    fork = Path(fork) if fork is not None else fork_dir()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    pin = load_pin(pin_path)
    findings: List[Finding] = []
    report: Dict[str, Any] = {"upstream_dir": str(upstream_dir), "fork_dir": str(fork), "out_dir": str(out_dir),
                              "pin": str(pin_path or default_pin_path())}
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_generated(out_dir)

    # (1) files vs the pin
    log(f"[1/5] upstream files in {upstream_dir} vs the pin")
    statuses = compare_files_to_pin(upstream_dir, pin)
    for st in statuses:
        if st.status == "match":
            findings.append(Finding("files", st.name, "matches pin"))
        elif st.status == "changed":
            findings.append(Finding("files", st.name, "changed since pin",
                                    f"sha256 {st.sha256[:12]}.. (pinned {st.pinned_sha256[:12]}..)", attention=True))
        elif st.status == "missing":
            findings.append(Finding("files", st.name, "missing", "pinned file not in the upstream copy", attention=True))
        else:
            findings.append(Finding("files", st.name, "not pinned", "extra upstream .py file; review", attention=True))
    report["files"] = [asdict(s) for s in statuses]

    # (2) unified diffs, (3) symbol inventories
    log("[2/5] unified diffs and (3/5) symbol inventories")
    names = sorted({s.name for s in statuses if s.status != "missing"} | set(pinned_files(pin)))
    symbol_rows = []
    for name in names:
        up_path, fork_path = upstream_dir / name, fork / name
        if not up_path.is_file():
            continue
        if not fork_path.is_file():
            findings.append(Finding("files", name, "not in fork", f"{fork_path} is missing", attention=True))
            continue
        text = unified_file_diff(up_path, fork_path, name)
        if text:
            atomic_write_text(out_dir / "files" / f"{name}.diff", text)
        try:
            f_inv = symbol_inventory(fork_path.read_text(encoding="utf-8"), str(fork_path))
            u_inv = symbol_inventory(up_path.read_text(encoding="utf-8"), str(up_path))
        except SyntaxError as e:
            findings.append(Finding("symbols", name, "error", f"cannot parse: {e}", attention=True))
            continue
        changes = diff_inventories(f_inv, u_inv, name)
        n_doc = 0
        for ch in changes:
            entry = documented_by(ch, pin)
            row = asdict(ch)
            row["documented"] = entry is not None
            symbol_rows.append(row)
            if ch.change == "body":
                findings.append(Finding("symbols", f"{name}::{ch.qualname}", "body differs"
                                        + (" (documented)" if entry else ""), ""))
                continue
            if entry is not None:
                n_doc += 1
                findings.append(Finding("symbols", f"{name}::{ch.qualname}", f"{ch.change} (documented)",
                                        entry.get("note", "")))
                continue
            detail = {"added": f"fork only: {ch.fork}", "removed": f"upstream only: {ch.upstream}",
                      "signature": f"fork {ch.fork} | upstream {ch.upstream}"}[ch.change]
            findings.append(Finding("symbols", f"{name}::{ch.qualname}", f"{ch.change} (undocumented)", detail,
                                    attention=True))
        if not [c for c in changes if c.change != "body"]:
            findings.append(Finding("symbols", name, "ok", f"{len(f_inv)} symbols, same names and signatures"))
    report["symbols"] = symbol_rows
    fork_only_files = sorted(p.name for p in fork.glob("*.py") if p.name not in names and p.name != "__init__.py")
    report["fork_only_files"] = fork_only_files

    # (4) structural parity, (5) numeric parity
    config_dict: Dict[str, Any] = {}
    if config_path is not None:
        config_dict = read_json(config_path)
    elif (upstream_dir / "config.json").is_file():
        config_dict = read_json(upstream_dir / "config.json")
    report["config_source"] = str(config_path or (upstream_dir / "config.json" if config_dict else "class defaults"))
    if structural or numeric:
        log("[4/5] structural parity on the meta device")
        try:
            fork_side = load_side(fork, "fork", is_upstream=False)
            up_side = load_side(upstream_dir, "upstream", is_upstream=True)
        except Exception as e:  # noqa: BLE001
            findings.append(Finding("state_dict", "import", "error", f"{type(e).__name__}: {e}", attention=True))
            fork_side = up_side = None
        if fork_side is not None:
            try:
                if structural:
                    findings += structural_parity(fork_side, up_side, config_dict, pin, log=log)
                if numeric:
                    log("[5/5] numeric parity on random weights")
                    findings += numeric_parity(fork_side, up_side, config_dict or {}, atol=atol, seed=seed,
                                               fork_attn=fork_attn, log=log)
            finally:
                unload_package(fork_side.package)
                unload_package(up_side.package)
    if not numeric:
        findings.append(Finding("numeric", "logits", "skipped", "pass --numeric to compare logits"))

    # transformers
    if check_transformers:
        log("[+] transformers' Qwen2 / SigLIP / SDPA attention code vs the pin and the fork")
        try:
            t_findings, t_details = compare_transformers(pin, fork, out_dir, log=log)
        except Exception as e:  # noqa: BLE001
            t_findings, t_details = [Finding("transformers", "check", "error", f"{type(e).__name__}: {e}",
                                             attention=True)], {}
        findings += t_findings
        report["transformers"] = t_details

    report["findings"] = [asdict(f) for f in findings]
    report["needs_attention"] = needs_attention(findings)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "summary.txt", format_table(summarize(findings), max_detail=10_000) + "\n")
    return findings, report


# --------------------------------------------------------------------------------------
# install into a checkpoint folder
# --------------------------------------------------------------------------------------
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


def _class_in_fork(target: str, src: Path) -> bool:
    if isinstance(target, (list, tuple)):
        return all(t is None or _class_in_fork(t, src) for t in target)
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
            if _class_in_fork(value, src):
                continue
            wanted = targets.get(key)
            if wanted is None:
                warnings.append(f"{name}: auto_map[{key!r}] = {value!r} is not a class of the fork; left as is")
                continue
            if not _class_in_fork(wanted, src):
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
    folder = Path(folder)
    src = Path(src) if src is not None else fork_dir()
    check_checkpoint(folder)
    copies, warnings = remote_code_files(src)
    edits, w2 = _auto_map_edits(folder, src)
    return InstallPlan(folder, copies, edits, warnings + w2)


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


def install(folder, src=None, dry_run: bool = False, log: Log = _stderr) -> InstallPlan:
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
        atomic_write_json(folder / name, obj)
        installed[name] = sha256_file(folder / name)
        log(f"updated auto_map in {name}")
    manifest.setdefault("installed", {}).update(installed)
    atomic_write_json(mpath, manifest)
    log(f"installed {len(plan.copies)} files into {folder}; undo with --restore")
    return plan


def restore(folder, force: bool = False, log: Log = _stderr) -> List[str]:
    """Put every file recorded in the backup back byte for byte; remove the backup."""
    folder = Path(folder)
    mpath = _manifest_path(folder)
    if not mpath.is_file():
        raise FileNotFoundError(f"{folder} has no {BACKUP_DIRNAME}/{MANIFEST_NAME}: nothing to restore")
    manifest = read_json(mpath)
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
