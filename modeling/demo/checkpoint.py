"""The embedded default: a tiny MiniCPM-V-2.6 with seeded random weights, built locally.

``build_demo_checkpoint(folder)`` writes a complete checkpoint folder (config.json,
model.safetensors, preprocessor_config.json and the character-level tokenizer from
``tokenizer/``, see ``demo_tokenizer_path()``) that loads through the same
``from_pretrained`` code as a real checkpoint. Its weights are random: attention maps
made with it show the pipeline, not meaning.
"""
import contextlib
import json
import os
import shutil
import tempfile
from typing import Optional

import torch

from .vocab import char_vocab

DEMO_SEED = 0
DEMO_FORMAT = 2  # bump when the built folder changes (2: vocab_size = the tokenizer's 115 tokens, was 160)
DEMO_CONFIG = {
    "architectures": ["MiniCPMV"],
    "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                 "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
    "model_type": "minicpmv",
    "hidden_act": "silu", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(char_vocab()),
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 3,
    "eos_token_id": 4, "query_num": 16, "image_size": 448, "patch_size": 14, "drop_vision_last_layer": False,
    "batch_vision_input": True, "use_image_id": True, "vision_batch_size": 16, "slice_mode": True,
    "slice_config": {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 224, "model_type": "minicpmv"},
    "vision_config": {"model_type": "siglip", "hidden_size": 64, "image_size": 980, "intermediate_size": 128,
                      "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14},
    "use_cache": True, "torch_dtype": "float32",
}
DEMO_PREPROCESSOR = {
    "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
    "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                 "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
    "max_slice_nums": 9, "scale_resolution": 224, "patch_size": 14, "use_image_id": True,
    "image_feature_size": 16, "version": 2.6, "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
    "slice_mode": True,
}


def demo_tokenizer_path() -> str:
    """Folder of the tiny character-level demo tokenizer (``tokenizer/``, built by
    ``scripts/build_demo_tokenizer.py``; the golden fixtures' toy vocabulary)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"the demo tokenizer is missing from {path}; rebuild it with scripts/build_demo_tokenizer.py"
        )
    return path


def demo_image_path() -> str:
    """A real photo that ships with matplotlib (Grace Hopper, 512 x 600)."""
    import matplotlib

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the bundled demo image is missing from matplotlib's sample data: {path}")
    return path


def build_demo_model(seed: int = DEMO_SEED, config_overrides: Optional[dict] = None):
    """A tiny seeded MiniCPMV (float32, eval mode); same seed, same weights."""
    from ..configuration_minicpm import MiniCPMVConfig
    from ..modeling_minicpmv import MiniCPMV

    cfg = dict(DEMO_CONFIG, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = MiniCPMV(MiniCPMVConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name or name.startswith("resampler.ln")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name == "resampler.query":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.numel()
                if p.dim() == 4:
                    fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return model.eval()


@contextlib.contextmanager
def atomic_folder(folder: str):
    """Yield a new temporary folder beside ``folder`` to fill; on leaving the block it gets the usual
    permissions (folder 0755, files 0644) and replaces ``folder`` (an error removes it instead)."""
    parent = os.path.dirname(os.path.abspath(folder)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".demo-")
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_checkpoint(folder: str, seed: int = DEMO_SEED, overwrite: bool = False) -> str:
    """Write the tiny demo checkpoint (weights, configs, tokenizer) to ``folder``; returns it."""
    marker = os.path.join(folder, "demo_seed.json")
    if os.path.isfile(marker) and not overwrite:
        with open(marker) as f:
            marker_data = json.load(f)
        if marker_data.get("seed") == seed and marker_data.get("format") == DEMO_FORMAT:
            return folder
    with atomic_folder(folder) as tmp:
        model = build_demo_model(seed)
        model.save_pretrained(tmp, safe_serialization=True)
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["auto_map"] = DEMO_CONFIG["auto_map"]
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(DEMO_PREPROCESSOR, f, indent=2)
        for name in os.listdir(demo_tokenizer_path()):
            shutil.copy(os.path.join(demo_tokenizer_path(), name), tmp)
        with open(os.path.join(tmp, "demo_seed.json"), "w") as f:
            json.dump({"seed": seed, "format": DEMO_FORMAT,
                       "note": "random weights: maps show the pipeline, not meaning"}, f)
    return folder


def default_demo_folder() -> str:
    base = os.environ.get("MINICPMV_ATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicpmv_attn")
    return os.path.join(base, f"demo-seed{DEMO_SEED}")
