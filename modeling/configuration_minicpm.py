"""MiniCPM-V-2.6 configuration: a Qwen2 config plus the vision tower, resampler and slicing settings.

Same fields, defaults and ``config.json`` layout as upstream's ``configuration_minicpm.py``.
"""
import os
from typing import Union

from transformers import PretrainedConfig, Qwen2Config
from transformers.utils import logging

# fork: configuration_minicpm.MiniCPMVConfig -- transformers 4.4x copies only the direct relative
# imports of a remote-code file, and modeling_navit_siglip below needs attention.py (and it kernel_check.py)
from .attention import AttnMask  # noqa: F401
from .kernel_check import flash_ok  # noqa: F401
from .modeling_navit_siglip import SiglipVisionConfig

logger = logging.get_logger(__name__)


class MiniCPMVSliceConfig(PretrainedConfig):
    """How images are cut into slices (``slice_config`` in ``config.json``)."""

    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=448, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution

    # fork: configuration_minicpm.MiniCPMVSliceConfig
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs) -> "PretrainedConfig":
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "minicpmv":
            config_dict = config_dict["slice_config"]
        return cls.from_dict(config_dict, **kwargs)


class MiniCPMVConfig(Qwen2Config):
    """Configuration of :class:`MiniCPMV` (``model_type="minicpmv"``).

    The LLM fields are Qwen2's. Added: ``query_num`` (resampler queries per slice),
    ``image_size``, ``drop_vision_last_layer``, ``batch_vision_input``, ``use_image_id``,
    ``vision_batch_size`` (slices per vision forward), ``slice_config``
    (:class:`MiniCPMVSliceConfig`), ``vision_config`` (:class:`SiglipVisionConfig`);
    ``patch_size`` is copied from the vision config.
    """

    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    default_vision_config = {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "siglip",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    }

    def __init__(
        self,
        use_cache=True,
        query_num=64,
        image_size=448,
        drop_vision_last_layer=True,
        batch_vision_input=True,
        slice_config=None,
        vision_config=None,
        use_image_id=True,
        vision_batch_size=16,
        **kwargs,
    ):
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size

        if slice_config is None:
            self.slice_config = MiniCPMVSliceConfig(max_slice_nums=1)
        elif isinstance(slice_config, MiniCPMVSliceConfig):
            self.slice_config = slice_config
        else:
            self.slice_config = MiniCPMVSliceConfig(**slice_config)
        self.slice_mode = True

        if vision_config is None:
            self.vision_config = SiglipVisionConfig(**self.default_vision_config)
        elif isinstance(vision_config, dict):
            self.vision_config = SiglipVisionConfig(**vision_config)
        elif isinstance(vision_config, SiglipVisionConfig):
            self.vision_config = vision_config
        else:
            raise TypeError(
                f"MiniCPMVConfig.vision_config: expected a dict or SiglipVisionConfig, got {type(vision_config).__name__}"
            )
        self.patch_size = self.vision_config.patch_size
        # fork: configuration_minicpm.MiniCPMVConfig
        kwargs.pop("slice_mode", None)
        kwargs.pop("patch_size", None)
        super().__init__(use_cache=use_cache, **kwargs)

    # fork: configuration_minicpm.MiniCPMVConfig
    def to_dict(self):
        out = super().to_dict()
        for key in ("slice_config", "vision_config"):
            value = getattr(self, key, None)
            if isinstance(value, PretrainedConfig):
                out[key] = value.to_dict()
        return out
