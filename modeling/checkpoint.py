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


def safetensors_files(path: str) -> Optional[List[str]]:
    """The safetensors weight files of a folder (from its index when sharded); None if it has none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    return None


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of floating dtypes


def checkpoint_tensor_shapes(path: str, dtypes: Optional[Dict[str, str]] = None
                             ) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor name -> shape from the safetensors headers of a folder (no data read); None if not
    safetensors. ``dtypes``, when given, is filled with each tensor's safetensors dtype name."""
    from safetensors import safe_open

    files = safetensors_files(path)
    if files is None:
        return None
    shapes = {}
    for name in files:
        file = os.path.join(path, name)
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
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format")


def quantization_format(path: str) -> Optional[Dict[str, object]]:
    """The folder's quantisation as ``{"format": "bnb-4bit"|"bnb-8bit", "type": "nf4"|"fp4"|None,
    "double": bool, "skip": llm_int8_skip_modules}``, from config.json's ``quantization_config``;
    None for a float checkpoint. Another quantisation method is refused (named)."""
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
    skip = list(qc.get("llm_int8_skip_modules") or [])
    if method == "bitsandbytes" and qc.get("load_in_4bit"):
        qtype = qc.get("bnb_4bit_quant_type", "fp4")
        if qtype not in ("nf4", "fp4"):
            raise CheckpointError(f"{cfg_path}: quantization_config.bnb_4bit_quant_type is {qtype!r}, "
                                  f"expected 'nf4' or 'fp4'")
        return {"format": "bnb-4bit", "type": qtype, "double": bool(qc.get("bnb_4bit_use_double_quant")), "skip": skip}
    if method == "bitsandbytes" and qc.get("load_in_8bit"):
        return {"format": "bnb-8bit", "type": None, "double": False, "skip": skip}
    raise CheckpointError(f"{cfg_path}: quantization_config (quant_method {method!r}) is not a supported format; "
                          f"supported: bitsandbytes load_in_4bit (nf4/fp4) and load_in_8bit")


def _quant_state_json(path: str, files: List[str], key: str) -> Dict[str, object]:
    """A 4-bit weight's packed quant state (JSON bytes in a uint8 tensor) read from the folder."""
    from safetensors import safe_open

    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            if key in handle.keys():
                raw = handle.get_tensor(key)
                try:
                    return json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"{path}: {key} is not a bitsandbytes quant state ({e})") from None
    raise CheckpointError(f"{path}: {key} is listed but not readable")


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
        groups, missing, wrong = _quantized_weights(path, safetensors_files(path), fmt, found, dtypes, expected,
                                                    linears)
    known = set(expected) | {k for ks in groups.values() for k in ks}
    missing = sorted(set(missing) | (set(expected) - set(found)))
    unexpected = sorted(set(found) - known)
    wrong = sorted(wrong + [f"{k} (expected {list(expected[k])}, got {list(found[k])})"
                            for k in set(expected) & set(found) if k not in groups and expected[k] != found[k]])
    not_float = sorted(f"{k} ({dtypes[k]})" for k in set(expected) & set(found)
                       if k not in groups and dtypes.get(k) not in FLOAT_DTYPES)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else "")
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong), ("not floating-point", not_float)) if keys]
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


def check_loaded_weights(model: torch.nn.Module, path: str, sample: int = 64) -> None:
    """Every tensor of ``model`` holds the values the folder's safetensors files hold.

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
    from safetensors import safe_open

    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        quiet_int8_casts()
    files = safetensors_files(path)
    if files is None:
        return
    state = model.state_dict()
    wrong = []
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            for key in handle.keys():
                param = state.get(key)
                if param is None or param.device.type == "meta":
                    continue
                sl = handle.get_slice(key)
                file_float = str(sl.get_dtype()) in FLOAT_DTYPES
                kind, qparam = _quantized_param(model, key) if file_float else (None, None)
                if kind is not None:
                    stored = sl[:1].reshape(-1)[:sample].to(torch.float32)
                    with torch.no_grad():
                        mine, tol = _dequantized_first_row(kind, qparam, sample)
                    if mine.shape != stored.shape or not bool(((mine.cpu() - stored).abs() <= tol.cpu()).all()):
                        wrong.append(key)
                    continue
                if tuple(sl.get_shape()) != tuple(param.shape):
                    continue
                stored = sl[:1] if param.dim() else handle.get_tensor(key)
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
