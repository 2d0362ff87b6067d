"""minicpmv-attn: MiniCPM-V-2.6 that returns its attention weights."""
from setuptools import setup

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
    packages=["minicpmv_attn", "minicpmv_attn.scripts"],
    package_dir={"minicpmv_attn": "modeling", "minicpmv_attn.scripts": "scripts"},
    package_data={"minicpmv_attn": ["demo_tokenizer/*.json"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.40",
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
    },
    entry_points={
        "console_scripts": [
            "minicpmv-attn-visualize=minicpmv_attn.scripts.visualize_attention:main",
            "minicpmv-attn-extract=minicpmv_attn.scripts.extract_attention:main",
            "minicpmv-attn-diff-upstream=minicpmv_attn.scripts.diff_upstream:main",
            "minicpmv-attn-install=minicpmv_attn.scripts.install_into_snapshot:main",
            "minicpmv-attn-finetune=minicpmv_attn.scripts.finetune_attention:main",
        ]
    },
)
