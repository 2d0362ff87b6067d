"""The architecture's rules, checked: capture is attached (not threaded), kernels never import
capture, hook names have one home, and what ships is exactly modeling/'s top-level files."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from minicpmv_attn import modeling_minicpmv, modeling_navit_siglip, modeling_qwen2, resampler

PACKAGE = Path(__file__).resolve().parents[1] / "modeling"

TOWER_FORWARDS = [
    modeling_navit_siglip.SiglipAttention.forward, modeling_navit_siglip.SiglipEncoderLayer.forward,
    modeling_navit_siglip.SiglipEncoder.forward, modeling_navit_siglip.SiglipVisionTransformer.forward,
    resampler.ResamplerAttention.forward, resampler.Resampler.forward,
    modeling_qwen2.Qwen2Attention.forward, modeling_qwen2.Qwen2DecoderLayer.forward,
    modeling_qwen2.Qwen2Model.forward, modeling_qwen2.Qwen2ForCausalLM.forward,
    modeling_minicpmv.MiniCPMV.get_vllm_embedding, modeling_minicpmv.MiniCPMV._vision_embedding,
]


@pytest.mark.parametrize("fn", TOWER_FORWARDS, ids=lambda f: f.__qualname__)
def test_tower_forwards_carry_no_capture_parameter(fn):
    params = inspect.signature(fn).parameters
    assert not [p for p in params if "capture" in p or p == "implementation"], list(params)


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_attention_kernels_never_import_capture():
    mods = set(imported_modules(PACKAGE / "attention.py"))
    assert not [m for m in mods if "capture" in m], mods


HOOK_LITERAL = re.compile(r"""(f["'](llm|vision)\.layers\.\{)|(["'](llm|vision)\.layers\.["']\s*\+)|split\(["']\.["']\)\[2\]""")


def test_hook_names_are_built_and_read_in_one_place():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "attention.py" and path.parent == PACKAGE:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HOOK_LITERAL.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not offenders, "build/read hook names with attention.hook_name / parse_hook_name:\n" + "\n".join(offenders)


def test_hook_name_round_trip_and_refusals():
    from minicpmv_attn.capture import hook_name, hook_sort_key, parse_hook_name

    for stage, layer in (("llm", 0), ("vision", 26), ("llm", 27)):
        assert parse_hook_name(hook_name(stage, layer)) == (stage, layer)
    assert hook_name("resampler") == "resampler.attn" and parse_hook_name("resampler.attn") == ("resampler", 0)
    names = [hook_name("vision", 10), hook_name("llm", 10), hook_name("llm", 2), "resampler.attn"]
    assert sorted(names, key=hook_sort_key) == ["llm.layers.2.attn", "llm.layers.10.attn", "vision.layers.10.attn",
                                                 "resampler.attn"]
    for bad in ("llm.layers.x.attn", "llm.3.attn", "text.layers.1.attn", ""):
        with pytest.raises(ValueError, match="not a hook name"):
            parse_hook_name(bad)
    with pytest.raises(ValueError):
        hook_name("llm")


def test_attached_capture_is_removed_after_the_call():
    from golden import load_inputs
    from minicpmv_attn.capture import attached_capture
    from test_golden import load

    model = load("single_image")
    data, mask = load_inputs("single_image")
    model(data, attention_mask=mask, output_attentions={"stages": ["vision"], "layers": [0]})
    assert attached_capture(model) is None
    assert all(getattr(m, "attention_capture", None) is None for m in model.modules())


def test_kernel_check_ships_flat_and_imports_only_torch_and_the_stdlib():
    """The self-check sits directly in modeling/ (it ships), imports nothing of the package (so the
    kernels in attention.py may import it without importing capture), and the remote-code loader
    sees it as a relative import of both attention.py and capture.py."""
    from transformers.dynamic_module_utils import get_relative_imports

    from minicpmv_attn.upstream.install import remote_code_files

    mods = set(imported_modules(PACKAGE / "kernel_check.py"))
    stdlib = {"__future__", "math", "os", "sys", "threading", "time", "warnings", "dataclasses", "typing"}
    assert mods <= stdlib | {"torch"}, mods - stdlib
    assert "kernel_check.py" in remote_code_files()
    for user in ("attention.py", "capture.py"):
        assert "kernel_check" in get_relative_imports(str(PACKAGE / user)), user


def _direct_relative_imports(path: Path):
    """What transformers 4.4x copies beside a remote-code file: the modules it imports relatively
    (``from .x import``/``import .x`` lines anywhere in the file, the rule of 4.40's dynamic_module_utils)."""
    text = path.read_text(encoding="utf-8")
    return set(re.findall(r"^\s*from\s+\.(\w+)\s+import", text, re.M)) | set(
        re.findall(r"^\s*import\s+\.(\w+)\s*$", text, re.M))


def _closure(src: Path, start):
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_NEEDED_AS_REMOTE_CODE:
            continue
        seen.add(name)
        todo += _direct_relative_imports(src / f"{name}.py")
    return seen


@pytest.mark.parametrize("entries", [("configuration_minicpm", "modeling_minicpmv"), ("processing_minicpmv",),
                                     ("image_processing_minicpmv",), ("tokenization_minicpmv_fast",)])
def test_remote_code_loads_where_only_direct_imports_are_copied(entries):
    """transformers 4.4x copies a remote-code entry file and its *direct* relative imports only (not
    theirs), and AutoModel loads the config's file and the model's file into one folder: every shipped
    module those need, at any depth, must be a direct import of an entry file, or loading dies with
    'No module named transformers_modules.<folder>.<module>' (kernel_check.py once did)."""
    src = Path(modeling_minicpmv.__file__).parent
    copied = set(entries).union(*(_direct_relative_imports(src / f"{e}.py") for e in entries))
    needed = _closure(src, entries)
    assert needed <= copied, f"needed but never copied by transformers 4.4x: {sorted(needed - copied)}"


#: lazy imports that remote code never runs or survives without, and why
NOT_NEEDED_AS_REMOTE_CODE = {
    "capture_triton": "imported inside capture's kernel choice; an ImportError there means the torch path "
                      "(the fused kernel is an optional speed-up, never needed for a right answer)",
    "configuration_minicpm": "processing_minicpmv imports it only in register_processing, which the installed "
                             "package runs, never remote code (the model group lists it as an entry itself)",
}
