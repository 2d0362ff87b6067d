"""The embedded default: a tiny seeded MiniCPM-V-2.6 and its tokenizer, built locally (never shipped)."""
from .checkpoint import (
    DEMO_CONFIG, DEMO_PREPROCESSOR, DEMO_SEED, build_demo_checkpoint, build_demo_model, default_demo_folder,
    demo_image_path, demo_tokenizer_path,
)

__all__ = [
    "DEMO_CONFIG", "DEMO_PREPROCESSOR", "DEMO_SEED", "build_demo_checkpoint", "build_demo_model",
    "default_demo_folder", "demo_image_path", "demo_tokenizer_path",
]
