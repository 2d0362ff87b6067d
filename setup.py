"""minicpmv-attn: MiniCPM-V-2.6 that returns its attention weights."""
import re
from pathlib import Path

from setuptools import setup


def verified_range(package: str) -> str:
    """``PACKAGE>=MIN,<CAP`` from modeling/modeling_qwen2.py, the one place the verified ranges are kept
    (``package``: "transformers" or "torch")."""
    source = (Path(__file__).resolve().parent / "modeling" / "modeling_qwen2.py").read_text(encoding="utf-8")
    prefix = package.upper()
    found = dict(re.findall(rf'^{prefix}_(MIN|CAP) = "([0-9.]+)"$', source, re.M))
    if set(found) != {"MIN", "CAP"}:
        raise RuntimeError(f"modeling/modeling_qwen2.py: {prefix}_MIN / {prefix}_CAP not found")
    return f"{package}>={found['MIN']},<{found['CAP']}"


setup(
    name="minicpmv-attn",
    version="0.1.0",
    description=(
        "A patched fork of MiniCPM-V-2.6 that returns vision, resampler and LLM "
        "attention weights, with tools to capture, store, map and plot them."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # modeling/*.py ships as Hugging Face remote code; its subpackages are the tools and never ship
    packages=["minicpmv_attn", "minicpmv_attn.analysis", "minicpmv_attn.bench", "minicpmv_attn.demo",
              "minicpmv_attn.train", "minicpmv_attn.upstream", "minicpmv_attn.scripts", "minicpmv_attn.patches"],
    package_dir={"minicpmv_attn": "modeling", "minicpmv_attn.scripts": "scripts", "minicpmv_attn.patches": "patches"},
    package_data={"minicpmv_attn.demo": ["tokenizer/*.json", "trained/*.json", "trained/*.safetensors"],
                  "minicpmv_attn.patches": ["*.json", "*.md", "notes/*.md"]},
    install_requires=[
        verified_range("torch"),  # the torch releases the compatibility tests pass on
        verified_range("transformers"),  # the releases the generation path is verified on
        "safetensors",
        "einops",
        "numpy",
        "matplotlib",
        "pillow",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "peft": ["peft"],
        "parquet": ["pyarrow"],       # DIR/summary.parquet (else summary.csv)
        "browser": ["selenium"],      # the viewer's browser tests (with Debian's chromium + chromium-driver)
        "quant": ["bitsandbytes>=0.45", "accelerate>=0.26"],  # bitsandbytes 4/8-bit checkpoints, device_map
    },
    entry_points={
        "console_scripts": [
            "minicpmv-attn-visualize=minicpmv_attn.scripts.visualize_attention:main",
            "minicpmv-attn-extract=minicpmv_attn.scripts.extract_attention:main",
            "minicpmv-attn-diff-upstream=minicpmv_attn.scripts.diff_upstream:main",
            "minicpmv-attn-install=minicpmv_attn.scripts.install_into_snapshot:main",
            "minicpmv-attn-finetune=minicpmv_attn.scripts.finetune_attention:main",
            "minicpmv-attn-sweep-transformers=minicpmv_attn.scripts.sweep_transformers:main",
        ]
    },
)
