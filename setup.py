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
    packages=["minicpmv_attn", "minicpmv_attn.analysis", "minicpmv_attn.bench", "minicpmv_attn.demo", "minicpmv_attn.maps",
              "minicpmv_attn.train", "minicpmv_attn.upstream", "minicpmv_attn.scripts", "minicpmv_attn.patches",
              "minicpmv_attn_cli"],
    # scripts/ twice: as minicpmv_attn.scripts (importable next to the package) and as the top-level
    # minicpmv_attn_cli that the console commands start from, which does not import minicpmv_attn (torch,
    # transformers) before the arguments are read: --help answers at once
    package_dir={"minicpmv_attn": "modeling", "minicpmv_attn.scripts": "scripts", "minicpmv_attn.patches": "patches",
                 "minicpmv_attn_cli": "scripts"},
    package_data={"minicpmv_attn.demo": ["tokenizer/*.json", "trained/*.json", "trained/*.safetensors"],
                  "minicpmv_attn.analysis": ["viewer_page/*.html", "viewer_page/*.js", "viewer_page/*.css"],
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
            "minicpmv-attn-visualize=minicpmv_attn_cli.visualize_attention:main",
            "minicpmv-attn-extract=minicpmv_attn_cli.extract_attention:main",
            "minicpmv-attn-finetune=minicpmv_attn_cli.finetune_attention:main",
            "minicpmv-attn-pointing-game=minicpmv_attn_cli.pointing_game:main",
            "minicpmv-attn-diagnose-binding=minicpmv_attn_cli.diagnose_binding:main",
            "minicpmv-attn-install=minicpmv_attn_cli.install_into_snapshot:main",
            "minicpmv-attn-diff-upstream=minicpmv_attn_cli.diff_upstream:main",
            "minicpmv-attn-train-demo=minicpmv_attn_cli.train_demo:main",
            "minicpmv-attn-sweep-transformers=minicpmv_attn_cli.sweep_transformers:main",
            "minicpmv-attn-mutation-pass=minicpmv_attn_cli.mutation_pass:main",
            "minicpmv-attn-bench-capture=minicpmv_attn_cli.bench_capture:main",
            "minicpmv-attn-bench-extract=minicpmv_attn_cli.bench_extract:main",
            "minicpmv-attn-bench-viewer=minicpmv_attn_cli.bench_viewer:main",
            "minicpmv-attn-bench-quant-memory=minicpmv_attn_cli.bench_quant_memory:main",
            "minicpmv-attn-bench-cli-help=minicpmv_attn_cli.bench_cli_help:main",
        ]
    },
)
