"""What runs on upstream's side of the parity checks, in this interpreter or in another one.

Upstream's code is executed: its folder is imported as a package (with the shims of
:mod:`loader`) and its ``MiniCPMV`` is built and run. Two operations:

* :func:`describe`: config fields (class defaults and from a config dict) with the plain
  transformers configs they build on, and the state-dict keys, shapes and dtypes of a model
  built on the meta device;
* :func:`run_numeric`: a tiny model with deterministic random weights, one forward with
  every attention (LLM from transformers' eager Qwen2; vision and per-head resampler
  weights recorded from upstream's own attention modules) and a greedy generation.

``--upstream-python PY`` runs this file as a script in that interpreter
(``PY upstream_run.py REQUEST.json``); tensors go both ways as safetensors files next to the
request. It imports nothing from the package (only :mod:`loader`, by path), so the other
interpreter needs torch, transformers and safetensors, not this package.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # a script in another interpreter: keep this folder off sys.path
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != _here]

import contextlib
import copy
import importlib.util
import inspect
import json
import platform
import traceback
from typing import Any, Dict, List, Tuple

if __package__:
    from . import loader as _loader
else:  # loaded by path: loader.py imports nothing from the package either
    _spec = importlib.util.spec_from_file_location("_minicpmv_attn_upstream_loader",
                                                   Path(__file__).with_name("loader.py"))
    _loader = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _loader
    _spec.loader.exec_module(_loader)

# Config fields never compared (bookkeeping, not architecture).
CONFIG_FIELDS_IGNORED = ("transformers_version", "_name_or_path", "_commit_hash", "auto_map")
TERMINATOR_IDS = (1, 2)  # what the stand-in tokenizer answers for <|im_end|>, <|endoftext|>


def versions() -> Dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "executable": sys.executable}


def json_value(v: Any) -> Any:
    """A config value as JSON would carry it (tuples -> lists, dtypes -> strings)."""
    return json.loads(json.dumps(v, default=str))


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if hasattr(d, "to_dict") and not isinstance(d, dict):
        d = d.to_dict()
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) or (hasattr(v, "to_dict") and not isinstance(v, (str, bytes))):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_fields(config) -> Dict[str, Any]:
    """Flattened public fields (``vision_config.hidden_size``, ...), JSON-normalised."""
    flat = _flatten(config.to_dict() if hasattr(config, "to_dict") else config)
    return {k: json_value(v) for k, v in flat.items()
            if not any(p.startswith("_") for p in k.split(".")) and k.split(".")[-1] not in CONFIG_FIELDS_IGNORED}


def base_fields(config_dict: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """What plain transformers configs of this interpreter give: ``Qwen2Config()``, the same
    built from ``config_dict``, ``PretrainedConfig()`` (the base of the nested configs). A field
    that differs between two interpreters only as these do is transformers' drift."""
    from transformers import PretrainedConfig, Qwen2Config

    d = {k: v for k, v in copy.deepcopy(config_dict).items() if k != "auto_map"}
    return {"defaults": config_fields(Qwen2Config()), "from_config": config_fields(Qwen2Config.from_dict(d)),
            "nested": config_fields(PretrainedConfig())}


def _attempt(errors: Dict[str, str], stage: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is reported with its stage
        errors[stage] = f"{type(e).__name__}: {e}"
        return None


def describe(folder, config_dict: Dict[str, Any], label: str = "upstream", is_upstream: bool = True
             ) -> Dict[str, Any]:
    """Config fields and state-dict shapes of the ``MiniCPMV`` in ``folder``, as JSON-able data
    (``is_upstream=False``: the fork's folder, without upstream's shims)."""
    shims = _loader.Shims()
    out: Dict[str, Any] = {"versions": versions(), "errors": {}}
    errors = out["errors"]
    side = _attempt(errors, "import", _loader.load_side, folder, label, is_upstream, shims)
    if side is not None:
        try:
            cfg_defaults = _attempt(errors, "config defaults", side.config_cls)
            if cfg_defaults is not None:
                out["config_defaults"] = config_fields(cfg_defaults)
            cfg = _attempt(errors, "config", _loader.build_config, side, config_dict,
                           "eager" if is_upstream else None)
            if cfg is not None:
                out["config_from_dict"] = config_fields(cfg)
                model = _attempt(errors, "state_dict", _loader.build_model, side, cfg, is_upstream, "meta")
                if model is not None:
                    out["state_dict"] = {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                                         for k, v in model.state_dict().items()}
            out["base"] = _attempt(errors, "base config", base_fields, config_dict)
        finally:
            _loader.unload_package(side.package)
    out["shims"] = shims.used
    return out


# --------------------------------------------------------------------------------------
# numeric: tiny config, random weights, synthetic inputs
# --------------------------------------------------------------------------------------
TINY_OVERRIDES = {
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 2048, "query_num": 16, "vocab_size": 160,
    "tie_word_embeddings": False, "use_cache": True,
}
TINY_VISION_OVERRIDES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}


def tiny_config_dict(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The same architecture shrunk to a size that runs in a second on a CPU."""
    d = copy.deepcopy(config_dict)
    d.update(TINY_OVERRIDES)
    for key in ("torch_dtype", "dtype", "layer_types", "max_window_layers"):  # layer_types: derived on 5.x
        d.pop(key, None)
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
            out[k] = v.detach().clone().contiguous()
            continue
        r = torch.randn(v.shape, generator=g, dtype=torch.float32)
        norm_like = v.dim() == 1 and k.endswith("weight") and ("norm" in k or k.split(".")[-2].startswith("ln"))
        out[k] = (1.0 + 0.1 * r if norm_like else 0.05 * r).to(v.dtype).contiguous()
    return out


SLICES = ([(4, 6), (3, 3)], [(5, 4)])  # per sample, the (rows, cols) patch grid of each slice


def synthetic_inputs(config_dict: Dict[str, Any], seed: int = 0) -> Tuple[Dict[str, Any], Any]:
    """Two samples, left padded: sample 0 has two slices, sample 1 one slice. Returns (data, mask)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    if not isinstance(config_dict, dict):  # a config object
        config_dict = {"query_num": config_dict.query_num, "vocab_size": config_dict.vocab_size,
                       "vision_config": {"patch_size": getattr(config_dict, "patch_size", 14)}}
    q = int(config_dict.get("query_num", 64))
    patch = int((config_dict.get("vision_config") or {}).get("patch_size", 14))
    vocab = int(config_dict["vocab_size"])
    bounds, lengths = [], []
    for s in SLICES:
        b, pos = [], 2
        for _ in s:
            b.append((pos, pos + q))
            pos += q + 3
        bounds.append(b)
        lengths.append(pos + 2)
    length = max(lengths)
    ids = torch.randint(5, vocab, (2, length), generator=g)
    mask = torch.zeros(2, length, dtype=torch.long)
    image_bound, pixel_values, tgt_sizes = [], [], []
    for i, (s, b, n) in enumerate(zip(SLICES, bounds, lengths)):
        pad = length - n
        ids[i, :pad] = 0
        mask[i, pad:] = 1
        image_bound.append(torch.tensor([[x + pad, y + pad] for x, y in b], dtype=torch.long))
        pixel_values.append([torch.randn(3, patch, patch * h * w, generator=g) for h, w in s])
        tgt_sizes.append(torch.tensor(s, dtype=torch.int32))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": image_bound,
            "position_ids": position_ids}, mask


def pack_inputs(data: Dict[str, Any], mask) -> Dict[str, Any]:
    """``data`` + mask as a flat ``{name: tensor}`` (safetensors can carry it)."""
    out = {"input_ids": data["input_ids"], "position_ids": data["position_ids"], "attention_mask": mask}
    for i, per in enumerate(data["pixel_values"]):
        for j, p in enumerate(per):
            out[f"pixel_values.{i}.{j}"] = p
        out[f"tgt_sizes.{i}"] = data["tgt_sizes"][i]
        out[f"image_bound.{i}"] = data["image_bound"][i]
    return {k: v.contiguous() for k, v in out.items()}


def unpack_inputs(flat: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
    b = flat["input_ids"].shape[0]
    data = {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"],
            "tgt_sizes": [flat[f"tgt_sizes.{i}"] for i in range(b)],
            "image_bound": [flat[f"image_bound.{i}"] for i in range(b)], "pixel_values": []}
    for i in range(b):
        n = len([k for k in flat if k.startswith(f"pixel_values.{i}.")])
        data["pixel_values"].append([flat[f"pixel_values.{i}.{j}"] for j in range(n)])
    return data, flat["attention_mask"]


class TerminatorTokenizer:
    """The little of a tokenizer ``generate`` needs: ids for the terminators (no text)."""

    bos_id = None

    def convert_tokens_to_ids(self, token):
        return {"<|im_end|>": TERMINATOR_IDS[0], "<|endoftext|>": TERMINATOR_IDS[1]}.get(token, 0)


def generate_kwargs(data, mask, new_tokens: int) -> Dict[str, Any]:
    """The same greedy ``generate`` call for both sides (``min_new_tokens``: no early stop)."""
    return dict(input_ids=data["input_ids"], pixel_values=data["pixel_values"], tgt_sizes=data["tgt_sizes"],
                image_bound=data["image_bound"], attention_mask=mask, tokenizer=TerminatorTokenizer(),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)


def _accepts(fn, *names) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


@contextlib.contextmanager
def recorded_attention(model):
    """Upstream's vision and resampler attention weights, per head, recorded from its modules.

    Every ``SiglipAttention`` is asked for its weights (``output_attentions=True``); the
    resampler's ``MultiheadAttention`` for per-head weights (``need_weights=True,
    average_attn_weights=False``) instead of the head mean it computes and discards. A module
    whose ``forward`` takes no such argument is left alone (a fork-like copy returns these
    weights from ``forward(..., output_attentions=True)`` itself).
    """
    rec: Dict[str, List[Any]] = {}
    patched = []

    def wrap(module, key, force):
        orig = module.forward
        if not _accepts(orig, *force):
            return

        def forward(*args, **kwargs):
            kwargs.update(force)
            out = orig(*args, **kwargs)
            rec.setdefault(key, []).append(out[1].detach().clone())
            return out

        module.forward = forward
        patched.append(module)

    for i, layer in enumerate(getattr(getattr(getattr(model, "vpm", None), "encoder", None), "layers", [])):
        wrap(layer.self_attn, f"attn.vision.{i}", {"output_attentions": True})
    if hasattr(getattr(model, "resampler", None), "attn"):
        wrap(model.resampler.attn, "attn.resampler", {"need_weights": True, "average_attn_weights": False})
    try:
        yield rec
    finally:
        for m in patched:
            del m.forward


def attention_outputs(out, recorded: Dict[str, List[Any]]) -> Dict[str, Any]:
    """``{attn.llm.i, attn.vision.i, attn.resampler}`` from a forward's output and the recorder."""
    import torch

    res = {f"attn.llm.{i}": a for i, a in enumerate(getattr(out, "attentions", None) or ())}
    res.update({k: torch.cat(v) for k, v in recorded.items()})
    if not any(k.startswith("attn.vision.") for k in res):
        res.update({f"attn.vision.{i}": a for i, a in enumerate(getattr(out, "vision_attentions", None) or ())})
    if "attn.resampler" not in res and getattr(out, "resampler_attentions", None) is not None:
        res["attn.resampler"] = out.resampler_attentions
    return res


def run_numeric(folder, tiny: Dict[str, Any], data: Dict[str, Any], mask, seed: int = 0, new_tokens: int = 6,
                label: str = "upstream") -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Upstream on ``tiny`` with random weights: (weights, outputs, info).

    outputs: ``logits``, ``attn.llm.{i}`` [B, H, L, L], ``attn.vision.{i}`` [N, Hv, P, P],
    ``attn.resampler`` [N, Hr, Q, P], ``generated`` [B, new_tokens]. info: versions, shims,
    and per stage (setup, forward, generate) the error that stopped it.
    """
    import torch

    shims = _loader.Shims()
    info: Dict[str, Any] = {"versions": versions(), "errors": {}}
    weights: Dict[str, Any] = {}
    outputs: Dict[str, Any] = {}
    side = _attempt(info["errors"], "setup", _loader.load_side, folder, label, True, shims)
    if side is None:
        info["shims"] = shims.used
        return weights, outputs, info
    try:
        def setup():
            cfg = _loader.build_config(side, tiny, attn_implementation="eager")
            torch.manual_seed(seed)
            model = _loader.build_model(side, cfg, True)
            w = randomize_state_dict(model.state_dict(), seed)
            model.load_state_dict(w, strict=True)
            return model.eval(), w

        built = _attempt(info["errors"], "setup", setup)
        if built is not None:
            model, weights = built

            def forward():
                with torch.no_grad(), recorded_attention(model) as rec:
                    out = model(copy.deepcopy(data), attention_mask=mask.clone(), output_attentions=True)
                return {"logits": out.logits, **attention_outputs(out, rec)}

            outputs.update(_attempt(info["errors"], "forward", forward) or {})
            gen = _attempt(info["errors"], "generate", lambda: model.generate(
                **generate_kwargs(copy.deepcopy(data), mask.clone(), new_tokens)))
            if gen is not None:
                outputs["generated"] = gen.sequences if hasattr(gen, "sequences") else gen
    finally:
        _loader.unload_package(side.package)
    info["shims"] = shims.used
    outputs = {k: v.detach().clone().contiguous() for k, v in outputs.items()}
    return weights, outputs, info


# --------------------------------------------------------------------------------------
# as a script in another interpreter
# --------------------------------------------------------------------------------------
def main(argv: List[str]) -> int:
    """``upstream_run.py REQUEST.json``: do the request's ``op`` (describe | numeric); the answer
    goes to ``response.json`` (and ``weights.safetensors``, ``outputs.safetensors``) beside it."""
    request_path = Path(argv[0])
    work = request_path.parent
    req = json.loads(request_path.read_text(encoding="utf-8"))
    try:
        if req["op"] == "describe":
            response = describe(req["folder"], req["config"])
        elif req["op"] == "numeric":
            from safetensors.torch import load_file, save_file

            data, mask = unpack_inputs(load_file(str(work / "inputs.safetensors")))
            weights, outputs, response = run_numeric(req["folder"], req["config"], data, mask, req["seed"],
                                                     req["new_tokens"])
            save_file(weights, str(work / "weights.safetensors"))
            save_file(outputs, str(work / "outputs.safetensors"))
        else:
            raise ValueError(f"unknown op {req['op']!r}")
    except Exception as e:  # noqa: BLE001 - the caller reports it
        response = {"fatal": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (work / "response.json").write_text(json.dumps(response), encoding="utf-8")
    return 0 if "fatal" not in response else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
