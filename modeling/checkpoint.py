"""Checkpoint folders: what a MiniCPM-V-2.6 checkpoint must be, checked before and after loading.

Before loading: the folder's config names a MiniCPM-V-2.6 model and its safetensors headers
hold exactly the model's state dict (names and shapes), read without loading any weight.
After loading: every tensor holds the checkpoint's values (a sample of each, read through
safetensors' slices), so a transformers release that re-initialises loaded weights (5.0 did
for models whose ``_init_weights`` draws in place) is an error, not random logits.

Quantised checkpoints (bitsandbytes 4-bit nf4/fp4 and 8-bit, as transformers' ``save_pretrained``
writes them and as ``openbmb/MiniCPM-V-2_6-int4`` ships) are checked by the same rules, per
format (:data:`QUANT_FORMATS`): a quantised ``nn.Linear`` weight must come with every companion
tensor of its format (4-bit: ``W.absmax``, ``W.quant_map``, ``W.quant_state.bitsandbytes__<type>``,
plus ``W.nested_absmax`` / ``W.nested_quant_map`` with double quantisation; 8-bit: ``M.SCB``),
packed to the size its recorded shape needs, and nothing else may be in the file.
"""
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch


class CheckpointError(ValueError):
    """A folder that is not a loadable MiniCPM-V-2.6 checkpoint (names the file / keys)."""


def check_checkpoint_folder(path: str) -> None:
    """Refuse, with the reason, a folder that is not a MiniCPM-V-2.6 checkpoint."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face checkpoint folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("model_type") != "minicpmv":
        raise CheckpointError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'minicpmv' "
                              f"(a MiniCPM-V-2.6 checkpoint)")
    for key in ("vision_config", "query_num"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_path}: field {key!r} is missing; a MiniCPM-V-2.6 config has it")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if all(os.path.isfile(os.path.join(path, w)) for w in weights[:2]):
        raise CheckpointError(f"{path}: both model.safetensors and model.safetensors.index.json are present; "
                              f"transformers would load one while the other may be what was checked: remove the "
                              f"stale one")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise CheckpointError(f"{path}: no weights file (expected one of {', '.join(weights)})")


def _listed_files(path: str, index_name: str, single: str, what: str) -> Optional[List[str]]:
    """The weight files of a folder: those its index ``index_name`` maps to, else ``[single]`` when
    that file exists, else None."""
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a {what} index ({type(e).__name__}: {e})") from None
    return [single] if os.path.isfile(os.path.join(path, single)) else None


def safetensors_files(path: str) -> Optional[List[str]]:
    """The safetensors weight files of a folder (from its index when sharded); None if it has none."""
    return _listed_files(path, "model.safetensors.index.json", "model.safetensors", "safetensors")


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of floating dtypes
_TORCH_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL", torch.int16: "I16", torch.int32: "I32",
                      torch.int64: "I64"}


def bin_files(path: str) -> Optional[List[str]]:
    """The ``pytorch_model.bin`` weight files of a folder (from its index when sharded); None if it has none."""
    return _listed_files(path, "pytorch_model.bin.index.json", "pytorch_model.bin", "PyTorch weights")


def load_bin(file: str) -> Dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, read with ``weights_only`` (no code runs; memory-mapped
    where the file allows): name -> tensor, or :class:`CheckpointError` naming the file."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: weights file listed in the index is missing")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch raise many types
        raise CheckpointError(f"{file}: not a weights-only PyTorch state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a state dict of name -> tensor, found {type(state).__name__}")
    return state


def _weight_files(path: str) -> Tuple[Optional[List[str]], str]:
    """(weight files, "safetensors" | "bin"): what transformers loads, safetensors first."""
    files = safetensors_files(path)
    if files is not None:
        return files, "safetensors"
    return bin_files(path), "bin"


def _read_tensor(path: str, files: List[str], key: str) -> Optional[torch.Tensor]:
    """The whole tensor ``key`` from the folder's weight files (safetensors or bin); None if absent."""
    from safetensors import safe_open

    for name in files:
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        else:
            state = load_bin(file)
            if key in state:
                return state[key]
    return None


def checkpoint_tensor_shapes(path: str, dtypes: Optional[Dict[str, str]] = None
                             ) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor name -> shape from the safetensors headers of a folder (no data read), or from its
    ``pytorch_model.bin`` files (read with ``weights_only``) when it has no safetensors; None if it
    has neither. ``dtypes``, when given, is filled with each tensor's safetensors dtype name."""
    from safetensors import safe_open

    files, kind = _weight_files(path)
    if files is None:
        return None
    shapes = {}
    for name in files:
        file = os.path.join(path, name)
        if kind == "bin":  # the same checks as safetensors, read with weights_only
            for key, t in load_bin(file).items():
                shapes[key] = tuple(t.shape)
                if dtypes is not None:
                    dtypes[key] = _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype))
            continue
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: weights file {name} listed in the index is missing")
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    shapes[key] = tuple(sl.get_shape())
                    if dtypes is not None:
                        dtypes[key] = str(sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return shapes


#: bitsandbytes formats: the companion tensors a quantised ``nn.Linear`` weight ``W`` of module
#: ``M`` comes with (``{W}`` / ``{M}`` are filled in; ``{type}`` is nf4 or fp4).
QUANT_FORMATS = {
    "bnb-4bit": {"required": ("{W}.absmax", "{W}.quant_map", "{W}.quant_state.bitsandbytes__{type}"),
                 "nested": ("{W}.nested_absmax", "{W}.nested_quant_map")},
    "bnb-8bit": {"required": ("{M}.SCB",), "optional": ("{M}.weight_format",)},
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")  # bnb_4bit_compute_dtype values bitsandbytes computes in
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def quantization_format(path: str) -> Optional[Dict[str, object]]:
    """The folder's quantisation as ``{"format": "bnb-4bit"|"bnb-8bit", "type": "nf4"|"fp4"|None,
    "double": bool, "skip": llm_int8_skip_modules, "skip_given": whether the config has that list}``,
    from config.json's ``quantization_config``; None for a float checkpoint. Another quantisation
    method, a 4-bit compute dtype that is not floating and a skip list that is not a list of
    names are refused (named)."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # check_checkpoint_folder names an unreadable config
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: quantization_config is {type(qc).__name__}, expected an object")
    method = qc.get("quant_method", "bitsandbytes")
    given = qc.get("llm_int8_skip_modules")
    if given is not None and (not isinstance(given, list) or not all(isinstance(m, str) and m for m in given)):
        raise CheckpointError(f"{cfg_path}: quantization_config.llm_int8_skip_modules is {given!r}, expected a list "
                              f"of module names")
    skip = list(given or [])
    if method == "bitsandbytes" and qc.get("load_in_4bit"):
        qtype = qc.get("bnb_4bit_quant_type", "fp4")
        if qtype not in ("nf4", "fp4"):
            raise CheckpointError(f"{cfg_path}: quantization_config.bnb_4bit_quant_type is {qtype!r}, "
                                  f"expected 'nf4' or 'fp4'")
        compute = qc.get("bnb_4bit_compute_dtype")
        if compute is not None and str(compute).replace("torch.", "") not in COMPUTE_DTYPES:
            raise CheckpointError(f"{cfg_path}: quantization_config.bnb_4bit_compute_dtype is {compute!r}, expected "
                                  f"one of {', '.join(COMPUTE_DTYPES)} (4-bit layers compute in a floating dtype)")
        return {"format": "bnb-4bit", "type": qtype, "double": bool(qc.get("bnb_4bit_use_double_quant")), "skip": skip,
                "skip_given": given is not None}
    if method == "bitsandbytes" and qc.get("load_in_8bit"):
        return {"format": "bnb-8bit", "type": None, "double": False, "skip": skip, "skip_given": given is not None}
    raise CheckpointError(f"{cfg_path}: quantization_config (quant_method {method!r}) is not a supported format; "
                          f"supported: bitsandbytes load_in_4bit (nf4/fp4) and load_in_8bit")


def _quant_state_json(path: str, files: List[str], key: str) -> Dict[str, object]:
    """A 4-bit weight's packed quant state (JSON bytes in a uint8 tensor) read from the folder."""
    raw = _read_tensor(path, files, key)
    if raw is None:
        raise CheckpointError(f"{path}: {key} is listed but not readable")
    try:
        state = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {key} is not a bitsandbytes quant state ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {key} is not a bitsandbytes quant state (found {type(state).__name__})")
    return state


def _kept_float(module: str, skip: List[str]) -> bool:
    """Whether ``llm_int8_skip_modules`` keeps ``module`` float on every supported transformers:
    an entry equal to its name, a prefix ending at a module boundary, or its last component(s)."""
    return any(module == p or module.startswith(p + ".") or module.endswith("." + p) for p in skip)


def _quantized_weights(path: str, files: List[str], fmt: Dict[str, object], found, dtypes, expected,
                       linears) -> Tuple[Dict[str, List[str]], List[str], List[str]]:
    """Match the quantised weights of a folder to the model's ``nn.Linear`` weights.

    Returns ({weight key: its companion keys}, missing companion keys, wrong shapes). A weight
    counts as quantised when any companion of the folder's format is present or its dtype is an
    integer one; companions of other formats or of non-Linear tensors stay unexpected."""
    groups, missing, wrong = {}, [], []
    for w in sorted(linears):
        module = w[: -len(".weight")]
        if _kept_float(module, fmt["skip"]):
            continue  # its companions (if any) are unexpected
        spec = QUANT_FORMATS[fmt["format"]]
        fill = lambda t: t.format(W=w, M=module, type=fmt["type"])  # noqa: E731
        required = [fill(t) for t in spec["required"]] + ([fill(t) for t in spec.get("nested", ())]
                                                        if fmt["double"] else [])
        optional = [fill(t) for t in spec.get("optional", ())]
        present = [k for k in required + optional if k in found]
        integer = w in found and dtypes.get(w) not in FLOAT_DTYPES
        if not present and not integer:
            continue  # a float (skipped) module: checked as a plain tensor
        groups[w] = present
        missing += [k for k in required if k not in found]
        if w not in found:
            continue  # named as a missing key
        out_f, in_f = expected[w]
        if fmt["format"] == "bnb-8bit":
            if found[w] != (out_f, in_f):
                wrong.append(f"{w} (expected int8 [{out_f}, {in_f}], got {list(found[w])})")
            scb = f"{module}.SCB"
            if scb in found and found[scb] != (out_f,):
                wrong.append(f"{scb} (expected [{out_f}], got {list(found[scb])})")
            continue
        state_key = fill("{W}.quant_state.bitsandbytes__{type}")
        if state_key not in found:
            continue
        state = _quant_state_json(path, files, state_key)
        if list(state.get("shape") or []) != [out_f, in_f] or state.get("quant_type") != fmt["type"]:
            wrong.append(f"{state_key} (records {state.get('quant_type')} {state.get('shape')}, expected "
                         f"{fmt['type']} [{out_f}, {in_f}])")
            continue
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtypes.get(w), 0)
        n_bytes = itemsize * int(torch.tensor(found[w]).prod()) if found[w] else itemsize
        if n_bytes != (out_f * in_f + 1) // 2:
            wrong.append(f"{w} (expected {(out_f * in_f + 1) // 2} bytes of packed 4-bit data for "
                         f"[{out_f}, {in_f}], got {list(found[w])} {dtypes.get(w)})")
        blocksize = int(state.get("blocksize") or 0)
        absmax = f"{w}.absmax"
        if blocksize and absmax in found and found[absmax] != (-(-out_f * in_f // blocksize),):
            wrong.append(f"{absmax} (expected [{-(-out_f * in_f // blocksize)}] for blocksize {blocksize}, "
                         f"got {list(found[absmax])})")
    return groups, missing, wrong


def _unquantised_linears(model, fmt: Dict[str, object], found, dtypes, linears, groups) -> List[str]:
    """Float ``nn.Linear`` weights of the folder that its quantization_config does not keep float:
    transformers would put them in bitsandbytes layers and the first forward would fail there.
    Kept float: modules of ``llm_int8_skip_modules``, or, without that list, what transformers keeps
    by default (the output embeddings, tied weights, the module of the last parameter)."""
    skip = list(fmt["skip"])
    if not fmt.get("skip_given"):
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip += [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]
        params = [n for n, _ in model.named_parameters()]
        skip += [params[-1].rsplit(".", 1)[0]] if params else []
        tied = getattr(model, "_tied_weights_keys", None) or []
        skip += [k.rsplit(".", 1)[0] for k in (tied if isinstance(tied, (list, tuple)) else tied.keys())]
    out = []
    for w in sorted(linears):
        if w in groups or w not in found or dtypes.get(w) not in FLOAT_DTYPES or _kept_float(w[: -len(".weight")], skip):
            continue
        out.append(w)
    return out


def unquantised_label(fmt: Optional[Dict[str, object]]) -> str:
    """How a strict-check message names the float weights of :func:`_unquantised_linears`."""
    lacks = "" if fmt is not None and fmt.get("skip_given") else ", a list config.json lacks"
    return f"float weights that quantization_config would quantise (modules not in llm_int8_skip_modules{lacks})"


_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "F32": 4,
                         "I32": 4, "U32": 4, "F64": 8, "I64": 8, "U64": 8}


def check_checkpoint_tensors(path: str, cls) -> None:
    """Compare a folder's tensor names and shapes with the model its config builds (on the meta
    device); quantised folders (:func:`quantization_format`) by their format's rules."""
    dtypes: Dict[str, str] = {}
    found = checkpoint_tensor_shapes(path, dtypes)
    if found is None:
        return
    fmt = quantization_format(path)
    config = cls.config_class.from_pretrained(path)
    with torch.device("meta"):  # the float skeleton: names and float shapes
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups, missing, wrong = {}, [], []
    if fmt is not None:
        linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        groups, missing, wrong = _quantized_weights(path, _weight_files(path)[0], fmt, found, dtypes, expected,
                                                    linears)
    unquantised: List[str] = []
    if fmt is not None:
        unquantised = _unquantised_linears(model, fmt, found, dtypes, linears, groups)
        if unquantised and not groups:
            raise CheckpointError(
                f"{os.path.join(path, 'config.json')}: quantization_config says {fmt['format']} but no weight in the "
                f"folder is quantised (a float checkpoint): remove quantization_config from config.json, or pass "
                f"quantization_config= to from_pretrained to quantise while loading")
    known = set(expected) | {k for ks in groups.values() for k in ks}
    missing = sorted(set(missing) | (set(expected) - set(found)))
    unexpected = sorted(set(found) - known)
    wrong = sorted(wrong + [f"{k} (expected {list(expected[k])}, got {list(found[k])})"
                            for k in set(expected) & set(found) if k not in groups and expected[k] != found[k]])
    not_float = sorted(f"{k} ({dtypes[k]})" for k in set(expected) & set(found)
                       if k not in groups and dtypes.get(k) not in FLOAT_DTYPES)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else "")
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong), ("not floating-point", not_float),
                                    (unquantised_label(fmt), unquantised)) if keys]
    if fmt is None and any(k.endswith(_QUANT_SUFFIXES) or ".quant_state." in k for k in unexpected):
        problems.append("the file holds quantised tensors but config.json has no quantization_config")
    if problems:
        what = "MiniCPM-V-2.6's state dict" + (f" ({fmt['format']}{' ' + fmt['type'] if fmt['type'] else ''})"
                                               if fmt else "")
        raise CheckpointError(f"{path}: the weights do not match {what}: " + "; ".join(problems))


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` runs: its first parameter's device, or, when that is ``meta`` because a
    ``device_map`` offloaded it (accelerate loads it only for the forward), the execution
    device of the first accelerate hook under the module (``meta`` if there is none)."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "meta":
        return first.device
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.device("meta") if first is not None else torch.device("cpu")


def _quantized_param(model: torch.nn.Module, key: str):
    """The bitsandbytes parameter behind state-dict ``key`` ("4bit" / "8bit", param), or (None, None)."""
    if not key.endswith(".weight"):
        return None, None
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return None, None
    if getattr(param, "quant_state", None) is not None:
        return "4bit", param
    if type(param).__name__ == "Int8Params" or (param.dtype == torch.int8 and hasattr(param, "SCB")):
        return "8bit", param
    return None, None


def _dequantized_first_row(kind: str, param, sample: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first ``sample`` values of the dequantised weight's first row, per-value error bound).

    4-bit: bitsandbytes' own dequantisation; a value is within half the widest gap of the
    format's 16-entry code (+10%) times its block's absmax (plus 2% of it for a
    double-quantised absmax; measured: at most 0.99 of the bound on the golden weights, while
    a re-drawn weight puts about 65% of the values outside it). 8-bit (row-wise absmax ``SCB``):
    int8 * SCB / 127, within 0.6 steps."""
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        qs = param.quant_state
        full = bnbf.dequantize_4bit(param.data, qs).float().reshape(-1)
        code = qs.code.float().sort().values
        mine = full.reshape(qs.shape)[:1].reshape(-1)[:sample]  # row 0 = the first flat values
        n_blocks = -(-mine.numel() // qs.blocksize)
        span = n_blocks * qs.blocksize
        head = torch.nn.functional.pad(full[:span], (0, max(0, span - full.numel())))
        block_absmax = head.reshape(n_blocks, qs.blocksize).abs().amax(1).repeat_interleave(qs.blocksize)
        step = 0.55 * float((code[1:] - code[:-1]).max()) + (0.02 if qs.nested else 0.0)
        return mine, step * block_absmax[: mine.numel()] + 1e-6
    scb = param.SCB.float().reshape(-1)[0]
    mine = param.data[:1].reshape(-1)[:sample].float() * scb / 127
    return mine, (0.6 * scb / 127 + 1e-3 * mine.abs()).expand_as(mine)


#: bitsandbytes' logger that warns "MatMul8bitLt: inputs will be cast from ... to float16" at every int8
#: matmul whose input is not float16: every layer of every step in a bfloat16 / float32 model
INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


class FirstOfEach(logging.Filter):
    """A logging filter that lets the first record of each distinct message through and drops repeats."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quiet_int8_casts() -> None:
    """Show bitsandbytes' int8 cast message once per input dtype instead of at every matmul (idempotent)."""
    log = logging.getLogger(INT8_CAST_LOGGER)
    if not any(isinstance(f, FirstOfEach) for f in log.filters):
        log.addFilter(FirstOfEach())


def check_loaded_weights(model: torch.nn.Module, path: str, sample: int = 64, missing=()) -> None:
    """Every tensor of ``model`` holds the values the folder's weight files (safetensors, or
    ``pytorch_model.bin`` read with ``weights_only``) hold, and every weight is finite
    (:func:`check_finite_weights`, checked first and over all values).

    Compares the first ``sample`` values of each tensor's first row, which catches weights
    re-initialised or never copied after loading, at the cost of reading a few kilobytes per
    tensor. Rules, per kind of tensor:

    * same shape, float or integer (a float tensor, or packed 4-bit / int8 data and their
      quant states read from a quantised checkpoint): exactly equal after casting to the
      model's dtype;
    * a float file tensor that the model quantised while loading (``quantization_config=``
      on a float checkpoint; bitsandbytes 4-bit or 8-bit): the dequantised values within the
      format's rounding bound (:func:`_dequantized_first_row`);
    * tensors on the meta device (offloaded by a ``device_map``) are skipped, and so are
      tensors absent from the model or of another shape and not quantised (the key check,
      :func:`check_checkpoint_tensors` and transformers' loading report, names those).
    """
    check_finite_weights(model, path, skip=missing)  # first: a NaN is the file's fault, not a loader's
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        quiet_int8_casts()
    files, kind = _weight_files(path)
    if files is None:
        return
    state = model.state_dict()
    wrong = []
    for name in files:
        for key, shape, dtype_name, first_row, whole in _stored(os.path.join(path, name), kind):
            param = state.get(key)
            if param is None or param.device.type == "meta":
                continue
            q_kind, qparam = _quantized_param(model, key) if dtype_name in FLOAT_DTYPES else (None, None)
            if q_kind is not None:
                stored = first_row().reshape(-1)[:sample].to(torch.float32)
                with torch.no_grad():
                    mine, tol = _dequantized_first_row(q_kind, qparam, sample)
                if mine.shape != stored.shape or not bool(((mine.cpu() - stored).abs() <= tol.cpu()).all()):
                    wrong.append(key)
                continue
            if tuple(shape) != tuple(param.shape):
                continue
            stored = first_row() if param.dim() else whole()
            mine = param[:1] if param.dim() else param
            stored = stored.reshape(-1)[:sample].to(param.dtype)
            mine = mine.detach().reshape(-1)[:sample].to("cpu")
            if not torch.equal(stored, mine):
                wrong.append(key)
    if wrong:
        import transformers

        raise CheckpointError(
            f"{path}: after loading, {len(wrong)} tensor(s) do not hold the checkpoint's values "
            f"({', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}); transformers "
            f"{transformers.__version__} re-initialised or did not copy them")


def _stored(file: str, kind: str):
    """(key, shape, safetensors dtype name, first row (callable), whole tensor (callable)) for each
    tensor of one weight file; safetensors reads only what is asked for."""
    if kind == "bin":
        for key, t in load_bin(file).items():
            yield key, tuple(t.shape), _TORCH_DTYPE_NAMES.get(t.dtype, str(t.dtype)), \
                (lambda t=t: t[:1] if t.dim() else t), (lambda t=t: t)
        return
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        for key in handle.keys():
            sl = handle.get_slice(key)
            yield key, tuple(sl.get_shape()), str(sl.get_dtype()), (lambda sl=sl: sl[:1]), \
                (lambda key=key: handle.get_tensor(key))


def _non_finite(t: torch.Tensor, chunk: int = 1 << 24) -> str:
    """"" when every value of floating ``t`` is finite, else e.g. "3 inf, 1 NaN" (read in chunks)."""
    flat = t.detach().reshape(-1)
    n_inf = n_nan = 0
    for part in flat.split(chunk):
        if not bool(torch.isfinite(part).all()):
            n_nan += int(torch.isnan(part).sum())
            n_inf += int(torch.isinf(part).sum())
    return ", ".join(f"{n} {what}" for n, what in ((n_inf, "inf"), (n_nan, "NaN")) if n)


def _quant_statistics(model: torch.nn.Module):
    """(name, tensor) of the floating statistics of bitsandbytes parameters: 4-bit absmax / code
    (and the nested ones of double quantisation), 8-bit SCB."""
    for name, param in model.named_parameters():
        qs = getattr(param, "quant_state", None)
        if qs is not None:
            for label, holder in (("", qs), ("nested_", getattr(qs, "state2", None))):
                for attr in ("absmax", "code", "offset"):
                    t = getattr(holder, attr, None) if holder is not None else None
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        yield f"{name}.{label}{'quant_map' if attr == 'code' else attr}", t
        scb = getattr(param, "SCB", None)
        if isinstance(scb, torch.Tensor) and scb.is_floating_point():
            yield f"{name[: -len('.weight')] if name.endswith('.weight') else name}.SCB", scb


def check_finite_weights(model: torch.nn.Module, path: str, skip=()) -> None:
    """Every floating parameter of ``model`` and every bitsandbytes statistic (absmax, nested
    absmax, SCB, ...) holds finite values: an inf or NaN weight makes every logit NaN, and a
    value check by equality cannot see it (inf equals inf). Parameters left on the meta device
    (offloaded) are skipped, and so are the names in ``skip`` (keys the file lacks, loaded with
    ``strict=False``: whatever they hold did not come from the file). Raises
    :class:`CheckpointError` naming the tensors."""
    bad = []
    skip = set(skip)
    tensors = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    for name, t in tensors + list(_quant_statistics(model)):
        if name in skip or t.device.type == "meta" or not t.numel():
            continue
        what = _non_finite(t)
        if what:
            bad.append(f"{name} ({what})")
    if bad:
        raise CheckpointError(f"{path}: the checkpoint holds non-finite weights, which make the logits NaN: "
                              f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; the weights file is damaged")
