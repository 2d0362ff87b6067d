"""Every tool is a console command that reads its arguments before importing torch, transformers or the
package (so --help answers at once; the time itself is measured by scripts/bench_cli_help.py, not here),
and the defaults its help names are the library's."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = re.compile(r'"(minicpmv-attn-[a-z-]+)=([a-z_.]+):main"')
HEAVY = ("torch", "transformers", "minicpmv_attn")


def console_commands():
    return dict(ENTRY.findall((REPO / "setup.py").read_text(encoding="utf-8")))


def test_every_script_is_a_console_command_started_outside_the_package():
    cmds = console_commands()
    scripts = {p.stem for p in (REPO / "scripts").glob("*.py") if "def main(" in p.read_text(encoding="utf-8")}
    scripts -= {"build_demo_tokenizer"}  # a maintainers' tool (writes the shipped tokenizer), not documented
    assert {m.rsplit(".", 1)[1] for m in cmds.values()} == scripts
    assert all(m.startswith("minicpmv_attn_cli.") for m in cmds.values()), cmds


def test_the_readme_names_only_installed_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    cmds = set(console_commands())
    named = set(re.findall(r"`(minicpmv-attn-[a-z-]+)", readme))
    named |= {"minicpmv-attn" + short for short in re.findall(r"`(-bench-[a-z-]+)`", readme)}
    assert named and named <= cmds, named - cmds
    assert "build_demo_tokenizer" not in readme


@pytest.mark.parametrize("name", sorted(console_commands()))
def test_help_answers_without_importing_torch_or_the_package(name):
    module = console_commands()[name]
    code = (f"import sys, json; sys.argv = [{name!r}, '--help']\n"
            f"from {module} import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], f"{name} --help imported heavy modules"


def test_visualize_help_names_the_library_defaults():
    from minicpmv_attn.analysis import pipeline, visualize
    from minicpmv_attn.demo import trained_demo_task
    from minicpmv_attn.demo.scenes import default_example
    from minicpmv_attn.scripts import visualize_attention as cli

    question = default_example(visualize.DEFAULTS["seed"], trained_demo_task())[1]
    assert cli.SCENE_QUESTION == question
    assert cli.DEFAULT_PROMPT == pipeline.DEFAULT_PROMPT and cli.RANDOM_DEMO == visualize.RANDOM_DEMO
    args = vars(cli.build_parser().parse_args([]))
    assert {k: args[k] for k in visualize.DEFAULTS} == visualize.DEFAULTS
    text = " ".join(cli.build_parser().format_help().split())
    assert f"'{question}' at --seed {visualize.DEFAULTS['seed']}" in text and "What color is the triangle" not in text


def test_other_help_constants_are_the_library_values():
    from minicpmv_attn.demo.train import DEFAULTS as TRAIN_DEFAULTS
    from minicpmv_attn.scripts import diff_upstream, install_into_snapshot, train_demo
    from minicpmv_attn.upstream.install import BACKUP_DIRNAME
    from minicpmv_attn.upstream.pin import UPSTREAM_REPO_ID

    assert train_demo.DEFAULTS == TRAIN_DEFAULTS
    parsed = vars(train_demo.build_parser().parse_args(["--out", "x"]))
    assert {k: parsed[k] for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS  # the flags' defaults are the recipe
    assert install_into_snapshot.BACKUP_DIRNAME == BACKUP_DIRNAME
    assert diff_upstream.UPSTREAM_REPO_ID == UPSTREAM_REPO_ID
    from minicpmv_attn.scripts import sweep_transformers
    from minicpmv_attn.upstream.transformers_sweep import DEFAULT_TORCH

    assert sweep_transformers.DEFAULT_TORCH == DEFAULT_TORCH


def test_bench_capture_help_constants_are_the_library_values():
    """bench_capture's help lists the benchmark's targets, rows, lengths and dtypes from copies kept
    in the script (so --help imports nothing heavy): they must be the library's."""
    from minicpmv_attn.bench import tasks
    from minicpmv_attn.bench.report import TARGETS
    from minicpmv_attn.capture import DTYPES
    from minicpmv_attn.scripts import bench_capture as cli

    assert cli.TARGETS == TARGETS
    assert cli.ROWS == [(r.name, r.label) for r in tasks.LLM_ROWS + tasks.VISION_ROWS]
    assert (cli.GPU_LENGTHS, cli.CPU_LENGTHS, cli.QUICK_GPU_LENGTHS, cli.QUICK_CPU_LENGTHS) == (
        tasks.GPU_LENGTHS, tasks.CPU_LENGTHS, tasks.QUICK_GPU_LENGTHS, tasks.QUICK_CPU_LENGTHS)
    assert cli.DTYPE_NAMES == sorted(DTYPES)
