"""The README's Python blocks run, and no literal command in README.md or docs/ writes into the repository.

Every ```python block of README.md is run on its own (fresh namespace, a temporary working folder,
matplotlib's Agg backend), with the shipped trained demo model standing in for the real checkpoint.
The prelude is two substitutions, nothing else:

    "/models/MiniCPM-V-2_6"  ->  the trained demo's folder (minicpmv_attn.demo.trained_demo_folder())
    "photo.jpg"              ->  a generated coloured-shape scene (demo.scenes.default_example), saved as PNG

so a block that runs here runs as written on a real checkpoint and photo.
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text):
    return [m.group(1) for m in BLOCK.finditer(text)]


def stand_ins(tmp_path):
    from minicpmv_attn.demo import trained_demo_folder
    from minicpmv_attn.demo.scenes import default_example

    scene = tmp_path / "scene.png"
    default_example()[0].save(scene)
    return {"/models/MiniCPM-V-2_6": str(trained_demo_folder()), "photo.jpg": str(scene)}


def test_the_readme_has_python_blocks_to_run():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    assert any("image_heatmap" in b and "plt." in b for b in blocks)  # chat -> record -> heatmap -> overlay
    assert any("model(inputs, output_attentions=True)" in b for b in blocks)  # the processor's output, as is


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    code = python_blocks(README.read_text(encoding="utf-8"))[index]
    for literal, value in stand_ins(tmp_path).items():
        code = code.replace(literal, value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102 - the README's code
    made = sorted(p.name for p in work.iterdir())
    if "savefig(" in code:
        assert "overlay.png" in made and (work / "overlay.png").stat().st_size > 1000, made
    if "record.save(" in code:
        assert {"run1.json", "run1.safetensors"} <= set(made), made
    import matplotlib.pyplot as plt

    plt.close("all")


WRITE_FLAGS = re.compile(r"(?:^|\s)(--out|--plot|--readme|--pin|--json|--write-teacher)[ =](\S+)")
COMMAND = re.compile(r"(?:python \S+\.py|minicpmv-attn-[a-z-]+|torchrun|accelerate launch)[^\n`]*(?:\\\n[^\n`]*)*")


def _tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available to list the tracked files")
    return set(out.stdout.splitlines())


def test_no_literal_command_writes_into_tracked_files():
    tracked = _tracked()
    folders = {str(Path(f).parent) for f in tracked} - {"."}
    bad = []
    for doc in [README] + DOCS:
        for cmd in COMMAND.findall(doc.read_text(encoding="utf-8")):
            for flag, value in WRITE_FLAGS.findall(cmd):
                target = value.strip("'\"`").rstrip("/")
                hits_tracked = target in tracked or target in folders or any(
                    f.startswith(target + "/") for f in tracked)
                if hits_tracked:
                    bad.append(f"{doc.relative_to(REPO)}: {flag} {value} in: {cmd.strip()[:120]}")
    assert not bad, "literal commands that overwrite tracked files:\n" + "\n".join(bad)
