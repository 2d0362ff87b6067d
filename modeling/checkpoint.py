"""Checkpoint folders: what a MiniCPM-V-2.6 checkpoint must be, checked before and after loading.

Before loading: the folder's config names a MiniCPM-V-2.6 model and its safetensors headers
hold exactly the model's state dict (names and shapes), read without loading any weight.
After loading: every tensor holds the checkpoint's values (a sample of each, read through
safetensors' slices), so a transformers release that re-initialises loaded weights (5.0 did
for models whose ``_init_weights`` draws in place) is an error, not random logits.
"""
import json
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


def check_checkpoint_tensors(path: str, cls) -> None:
    """Compare a folder's tensor names and shapes with the model its config builds (on the meta device)."""
    dtypes: Dict[str, str] = {}
    found = checkpoint_tensor_shapes(path, dtypes)
    if found is None:
        return
    config = cls.config_class.from_pretrained(path)
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k} (expected {list(expected[k])}, got {list(found[k])})"
                   for k in set(expected) & set(found) if expected[k] != found[k])
    not_float = sorted(f"{k} ({dtypes[k]})" for k in set(expected) & set(found) if dtypes.get(k) not in FLOAT_DTYPES)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else "")
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("wrong shapes", wrong), ("not floating-point", not_float)) if keys]
    if problems:
        raise CheckpointError(f"{path}: the weights do not match MiniCPM-V-2.6's state dict: " + "; ".join(problems))


def check_loaded_weights(model: torch.nn.Module, path: str, sample: int = 64) -> None:
    """Every tensor of ``model`` holds the values the folder's safetensors files hold.

    Compares the first ``sample`` values of each tensor's first row (cast to the model's
    dtype, exactly), which catches weights re-initialised or never copied after loading, at
    the cost of reading a few kilobytes per tensor. Tensors on the meta device (offloaded)
    and tensors whose shape differs from the file's (quantised) are skipped.
    """
    from safetensors import safe_open

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
