"""minicpmv_attn: MiniCPM-V-2.6 that returns its attention weights.

``import minicpmv_attn`` registers ``model_type="minicpmv"`` with transformers' Auto
classes (AutoConfig, AutoModel, AutoModelForCausalLM, AutoImageProcessor, AutoProcessor),
so upstream checkpoints load without ``trust_remote_code``.
"""
from .attention_record import AttentionRecord, TokenLayout
from .layout import ImageLayout, SliceLayout
from .capture import AttentionCapture, CaptureError, CaptureSpec, CaptureTooLarge
from .configuration_minicpm import MiniCPMVConfig, MiniCPMVSliceConfig
from .modeling_minicpmv import CheckpointError, MiniCPMV, MiniCPMVGenerateOutput, MiniCPMVOutput
from .modeling_navit_siglip import SiglipVisionConfig

__version__ = "0.1.0"


def register() -> None:
    """Register the fork with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for fn in (lambda: AutoConfig.register("minicpmv", MiniCPMVConfig),
               lambda: AutoModel.register(MiniCPMVConfig, MiniCPMV),
               lambda: AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV)):
        try:
            fn()
        except ValueError:  # already registered
            pass
    try:
        from .processing_minicpmv import register_processing
    except ImportError:
        return
    register_processing()


register()

__all__ = [
    "AttentionCapture", "AttentionRecord", "CaptureError", "CaptureSpec", "CaptureTooLarge", "CheckpointError",
    "ImageLayout", "MiniCPMV", "MiniCPMVConfig", "MiniCPMVGenerateOutput", "MiniCPMVOutput", "MiniCPMVSliceConfig",
    "SiglipVisionConfig", "SliceLayout", "TokenLayout", "register",
]
