"""Loading a folder of flat remote code (the fork's or upstream's) as a fresh package, with shims.

Upstream is loaded from its folder with run-time shims for its known breakages, never by
editing its files: typing names seeded into module globals (``resampler.py``'s star import
no longer provides ``List`` on torch 2.13), ``AutoProcessor`` stubbed while
``MiniCPMV.__init__`` runs (it loads a processor from ``config._name_or_path``), and direct
construction + ``load_state_dict`` instead of ``from_pretrained`` (which fails on
transformers 5 with ``all_tied_weights_keys``). ``Auto*.register`` calls at import time are
no-ops and no ``.pyc`` is written into the folder.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

MODEL_MODULE, MODEL_CLASS = "modeling_minicpmv", "MiniCPMV"
CONFIG_MODULE, CONFIG_CLASS = "configuration_minicpm", "MiniCPMVConfig"
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
