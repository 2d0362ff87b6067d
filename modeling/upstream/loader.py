"""Loading a folder of flat remote code (the fork's or upstream's) as a fresh package, with shims.

Upstream is loaded from its folder with run-time shims for its known breakages on current
software, never by editing its files (:data:`KNOWN_SHIMS` names them; :class:`Shims`
records which ones a run needed):

* ``typing``: names seeded into module globals (``resampler.py``'s star import no longer
  provides ``List`` on torch 2.13);
* ``torchvision``: ``modeling_minicpmv.py`` imports it and never uses it; where it is not
  installed an empty stand-in is importable while upstream's modules are imported;
* ``modeling_attn_mask_utils``: gone in transformers 5.24; while upstream's modules are
  imported a stand-in provides ``_prepare_4d_attention_mask`` (the additive padding mask);
* ``AutoProcessor``: stubbed while ``MiniCPMV.__init__`` runs (a copy may load a processor
  from ``config._name_or_path``);
* ``all_tied_weights_keys``: transformers 5 sets it in ``post_init``, which upstream's
  ``MiniCPMV.__init__`` never calls; it is filled in after construction;
* ``_initialize_weights``: models are built directly and given weights with
  ``load_state_dict`` (``from_pretrained`` fails on transformers 5); where transformers'
  weight initialisation cannot handle upstream's modules it is skipped while building
  (the weights are replaced anyway).

``Auto*.register`` calls at import time are no-ops and no ``.pyc`` is written into the
folder. This module imports nothing from the package: ``upstream_run`` loads it by path in
another interpreter (``--upstream-python``).
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


KNOWN_SHIMS = ("typing", "torchvision", "modeling_attn_mask_utils", "AutoProcessor", "all_tied_weights_keys",
               "_initialize_weights")


class Shims:
    """Which of :data:`KNOWN_SHIMS` a run needed, with the reason of each (for the report)."""

    def __init__(self):
        self.used: Dict[str, str] = {}

    def note(self, name: str, reason: str) -> None:
        self.used.setdefault(name, reason)

    def summary(self) -> str:
        return ", ".join(sorted(self.used)) or "none"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def _prepare_4d_attention_mask(mask, dtype, tgt_len=None):
    """[B, S] padding mask (1 = keep) -> [B, 1, T, S] additive mask (0 or dtype min), as transformers 4.x."""
    import torch

    b, s = mask.shape
    t = s if tgt_len is None else tgt_len
    keep = mask[:, None, None, :].to(torch.bool).expand(b, 1, t, s)
    return torch.zeros((b, 1, t, s), dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def _stand_in(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


@contextlib.contextmanager
def upstream_import_shims(shims: Shims):
    """While upstream's modules are imported: stand-ins for the modules it imports that this
    interpreter lacks (``torchvision``, ``transformers.modeling_attn_mask_utils``). They leave
    ``sys.modules`` afterwards, so nothing else in the process sees them."""
    added = {}
    if _missing("torchvision"):
        added["torchvision"] = _stand_in("torchvision")
        shims.note("torchvision", "not installed; modeling_minicpmv.py imports it and never uses it")
    if _missing("transformers.modeling_attn_mask_utils"):
        added["transformers.modeling_attn_mask_utils"] = _stand_in(
            "transformers.modeling_attn_mask_utils", _prepare_4d_attention_mask=_prepare_4d_attention_mask)
        shims.note("modeling_attn_mask_utils", "removed from transformers; stand-in _prepare_4d_attention_mask")
    for name, mod in added.items():
        sys.modules.setdefault(name, mod)
    try:
        with _auto_register_disabled():
            yield
    finally:
        for name, mod in added.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


def _processor_stub(shims: Optional[Shims]):
    """Stands in for ``transformers.AutoProcessor`` while upstream ``MiniCPMV.__init__`` runs."""

    class _ProcessorStub:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            if shims is not None:
                shims.note("AutoProcessor", "MiniCPMV.__init__ loads a processor: stubbed (None)")
            return None

    return _ProcessorStub


@contextlib.contextmanager
def upstream_construction_shims(modeling_module, shims: Optional[Shims] = None):
    """A copy's ``MiniCPMV.__init__`` may load a processor from ``config._name_or_path``: stub it."""
    had = hasattr(modeling_module, "AutoProcessor")
    orig = getattr(modeling_module, "AutoProcessor", None)
    modeling_module.AutoProcessor = _processor_stub(shims)
    try:
        yield
    finally:
        if had:
            modeling_module.AutoProcessor = orig
        else:
            with contextlib.suppress(AttributeError):
                delattr(modeling_module, "AutoProcessor")


@contextlib.contextmanager
def _weight_init_skipped():
    """``PreTrainedModel._initialize_weights`` as a no-op (the weights are replaced afterwards)."""
    from transformers import PreTrainedModel

    orig = PreTrainedModel.__dict__.get("_initialize_weights")
    PreTrainedModel._initialize_weights = lambda self, module, *a, **k: None
    try:
        yield
    finally:
        if orig is None:
            del PreTrainedModel._initialize_weights
        else:
            PreTrainedModel._initialize_weights = orig


def _fails_in_weight_init(exc: BaseException) -> bool:
    tb = exc.__traceback__
    names = set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return bool(names & {"_initialize_weights", "initialize_weights", "init_weights", "_init_weights"})


def fill_tied_weights_keys(model, shims: Optional[Shims] = None) -> None:
    """transformers 5 expects ``all_tied_weights_keys`` (set by ``post_init``, which upstream's
    ``MiniCPMV.__init__`` never calls): compute it as ``post_init`` would."""
    if hasattr(model, "all_tied_weights_keys") or not hasattr(model, "get_expanded_tied_weights_keys"):
        return
    try:
        keys = dict(model.get_expanded_tied_weights_keys(all_submodels=False) or {})
    except Exception:  # noqa: BLE001 - the attribute is what matters, not its content
        keys = {}
    for name, child in model.named_children():
        for k, v in dict(getattr(child, "all_tied_weights_keys", None) or {}).items():
            keys[f"{name}.{k}"] = f"{name}.{v}"
    model.all_tied_weights_keys = keys
    if shims is not None:
        shims.note("all_tied_weights_keys", "MiniCPMV.__init__ never calls post_init; filled in after construction")


@dataclass
class LoadedSide:
    label: str
    folder: Path
    package: str
    config_cls: Any
    model_cls: Any
    modeling: Any
    is_upstream: bool = False
    shims: Optional[Shims] = None


def load_side(folder, label: str, is_upstream: bool, shims: Optional[Shims] = None) -> LoadedSide:
    """Import the config and model classes of one side (fork or upstream) from its folder.

    Upstream gets the import shims (``shims`` records which were needed); the fork none.
    """
    shims = shims if shims is not None else Shims()
    pkg = load_folder_package(folder, label, typing_shim=is_upstream)
    ctx = upstream_import_shims(shims) if is_upstream else contextlib.nullcontext()
    try:
        with ctx:
            cfg_mod = import_from_package(pkg, CONFIG_MODULE)
            modeling = import_from_package(pkg, MODEL_MODULE)
    except BaseException:
        unload_package(pkg)
        raise
    if is_upstream:
        shims.note("typing", "List, Optional, ... seeded into module globals (resampler.py's star import)")
    return LoadedSide(label, Path(folder), pkg, getattr(cfg_mod, CONFIG_CLASS), getattr(modeling, MODEL_CLASS),
                      modeling, is_upstream, shims)


def build_config(side: LoadedSide, config_dict: Dict[str, Any], attn_implementation: Optional[str] = None):
    d = copy.deepcopy(config_dict)
    d.pop("auto_map", None)
    cfg = side.config_cls.from_dict(d) if hasattr(side.config_cls, "from_dict") else side.config_cls(**d)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def build_model(side: LoadedSide, config, is_upstream: Optional[bool] = None, device=None):
    """``side.model_cls(config)`` (on ``device``); upstream with its construction shims."""
    import torch

    is_upstream = side.is_upstream if is_upstream is None else is_upstream

    def build():
        ctx = torch.device(device) if device is not None else contextlib.nullcontext()
        shims = upstream_construction_shims(side.modeling, side.shims) if is_upstream else contextlib.nullcontext()
        with ctx, shims:
            return side.model_cls(config)

    if not is_upstream:
        return build()
    try:
        model = build()
    except Exception as e:  # noqa: BLE001 - retried once without transformers' weight init
        if not _fails_in_weight_init(e):
            raise
        if side.shims is not None:
            side.shims.note("_initialize_weights", f"weight init failed ({type(e).__name__}: {e}); skipped")
        with _weight_init_skipped():
            model = build()
    fill_tied_weights_keys(model, side.shims)
    return model
