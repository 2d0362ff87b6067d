"""The embedded demos.

* ``build_demo_checkpoint``: a tiny MiniCPM-V-2.6 with seeded *random* weights and the
  character-level tokenizer (``tokenizer/``), built locally; its maps show the pipeline, not meaning.
* ``trained_demo_folder()``: a tiny MiniCPM-V-2.6 *trained* on coloured-shape binding scenes
  (``scenes.py``, ``train.py``), shipped in ``trained/`` (fp16, about 1.6 MB); each answer depends on
  the one object the question names, so its maps can be checked (``pointing.py``,
  ``scripts/pointing_game.py``); ``trained_demo_task()`` names the scenes it was trained on.
"""
import os

from .checkpoint import (
    DEMO_CONFIG, DEMO_PREPROCESSOR, DEMO_SEED, build_demo_checkpoint, build_demo_model, default_demo_folder,
    demo_image_path, demo_tokenizer_path,
)


def trained_demo_folder() -> str:
    """Path of the shipped trained demo checkpoint (loadable with ``MiniCPMV.from_pretrained`` and
    ``AutoProcessor.from_pretrained``); raises ``FileNotFoundError`` if the install lacks it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained")
    needed = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json")
    missing = [n for n in needed if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(f"the trained demo model is incomplete in {path} (missing {', '.join(missing)}); "
                                f"rebuild it with scripts/train_demo.py --out {path}")
    return path


def trained_demo_task(folder=None) -> str:
    """The scene task (``scenes.TASKS``) the trained demo was trained on, from its ``train_log.json``
    (``"single"`` when the log does not name one)."""
    import json

    from .scenes import check_task

    path = os.path.join(trained_demo_folder() if folder is None else str(folder), "train_log.json")
    try:
        with open(path) as f:
            task = json.load(f).get("task", "single")
    except FileNotFoundError:
        return "single"
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable training log ({e}); expected the JSON train_demo.py writes") from e
    return check_task(task)


def load_trained_demo(folder=None, dtype=None):
    """``(model, processor)`` of the trained demo (default: the shipped folder), eval mode, float32 by default."""
    import torch

    from ..modeling_minicpmv import MiniCPMV
    from ..processing_minicpmv import MiniCPMVProcessor

    folder = trained_demo_folder() if folder is None else str(folder)
    model = MiniCPMV.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    processor = MiniCPMVProcessor.from_pretrained(folder)
    model.processor = processor
    return model, processor


__all__ = [
    "DEMO_CONFIG", "DEMO_PREPROCESSOR", "DEMO_SEED", "build_demo_checkpoint", "build_demo_model",
    "default_demo_folder", "demo_image_path", "demo_tokenizer_path", "load_trained_demo", "trained_demo_folder",
    "trained_demo_task",
]
