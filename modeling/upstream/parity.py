"""Parity of the fork with an upstream copy: structure (meta device) and numbers (random weights).

* **Structural**: both ``MiniCPMV`` classes built on the meta device from one config;
  state-dict keys, shapes, dtypes and config fields (from ``config.json`` and the classes'
  defaults) compared. Config fields the pin lists under ``expected_config_differences``
  are documented, not flagged.
* **Numeric**: both built on a tiny version of the config and given the same random
  weights (every tensor non-trivial), run on two left-padded samples with images; logits on
  real positions compared within ``atol``.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Dict, List, Optional, Tuple

from .common import Log, log_stderr
from .loader import MODEL_CLASS, LoadedSide, build_config, build_model, load_side, unload_package
from .report import Finding

# Config fields never compared (bookkeeping, not architecture).
CONFIG_FIELDS_IGNORED = ("transformers_version", "_name_or_path", "_commit_hash", "auto_map")


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
                      log: Log = log_stderr) -> List[Finding]:
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
                   seed: int = 0, fork_attn: Optional[str] = None, log: Log = log_stderr) -> List[Finding]:
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
# both, on two folders
# --------------------------------------------------------------------------------------
def run_parity(fork_dir, upstream_dir, config_dict: Dict[str, Any], pin: Dict[str, Any], structural: bool = True,
               numeric: bool = False, atol: float = 1e-4, seed: int = 0, fork_attn: Optional[str] = None,
               log: Log = log_stderr) -> List[Finding]:
    """Load both folders as packages and run the structural and/or numeric check; unload them."""
    findings: List[Finding] = []
    if structural or numeric:
        log("[4/5] structural parity on the meta device")
        try:
            fork_side = load_side(fork_dir, "fork", is_upstream=False)
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
    return findings
