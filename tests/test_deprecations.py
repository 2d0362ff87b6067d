"""The fork triggers no deprecation warning from the installed transformers or torch.

Each new release deprecates something (transformers 5.23: ``gradient_checkpointing_enable``);
the fork picks the current API by the installed version. This test runs a representative call
path (loading under either dtype keyword, the processor, chat with a capture, i.e. generate and
the capture hooks, and a training step with activation checkpointing and an attention loss) and
fails on any DeprecationWarning / FutureWarning that transformers or torch emits while the
fork's code is on the stack.

Why not ``filterwarnings("error", module=...)``: the ``module`` a filter matches is the one a
warning is *attributed* to, which transformers moves to its caller with ``stacklevel``; so each
warning is caught as it is shown and the real stack is read instead: who emitted it (the
innermost frame, in transformers or torch; or the fork's own line for a warning torch raises from
C++) and whether the fork called into it (a fork frame on the stack). A warning peft or the tests
cause on their own is not the fork's.
"""
import contextlib
import os
import shutil
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import minicpmv_attn
from golden import case_dir
from minicpmv_attn import MiniCPMV
from minicpmv_attn.demo import demo_tokenizer_path

FORK = Path(minicpmv_attn.__file__).resolve().parent
LIBRARIES = {"transformers": Path(transformers.__file__).resolve().parent,
             "torch": Path(torch.__file__).resolve().parent}
WARNINGS_PY = Path(warnings.__file__).resolve()
CATEGORIES = (DeprecationWarning, FutureWarning)
MSGS = [{"role": "user", "content": "What is in the picture?"}]


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def classify(frames, category) -> str:
    """"" when a warning is not the fork's deprecation, else "emitter file:line <- fork file:line"."""
    if not issubclass(category, CATEGORIES):
        return ""
    frames = [f for f in frames if Path(f.filename).resolve() != WARNINGS_PY]
    if not frames:
        return ""
    emitter = frames[-1]
    fork_frames = [f for f in frames if _inside(f.filename, FORK)]
    if not fork_frames:
        return ""
    if not (any(_inside(emitter.filename, root) for root in LIBRARIES.values()) or _inside(emitter.filename, FORK)):
        return ""
    caller = fork_frames[-1]
    return f"{emitter.filename}:{emitter.lineno} <- {caller.filename}:{caller.lineno}"


@contextlib.contextmanager
def fork_deprecations():
    """Collect (category, message, where) for each deprecation transformers / torch emits from a fork call."""
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        where = classify(traceback.extract_stack()[:-1], category)
        if where:
            found.append((category.__name__, str(message).splitlines()[0][:200], where))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield found


def assert_none(found):
    assert not found, (f"the fork triggers {len(found)} deprecation warning(s) on transformers "
                       f"{transformers.__version__} / torch {torch.__version__}:\n"
                       + "\n".join(f"  {c}: {m} ({w})" for c, m, w in found))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "single_image"
    shutil.copytree(case_dir("single_image"), out)
    for name in os.listdir(str(demo_tokenizer_path())):
        shutil.copy(os.path.join(str(demo_tokenizer_path()), name), out)
    return out


def test_loading_processing_and_chat_with_capture_trigger_no_deprecation(folder):
    from transformers import AutoProcessor

    with fork_deprecations() as found:
        processor = AutoProcessor.from_pretrained(str(folder))
        model = MiniCPMV.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
        model = MiniCPMV.from_pretrained(str(folder), dtype=torch.float32).eval()
        image = Image.open(folder / "image_0_0.png")
        answer, record = model.chat(image, MSGS, processor.tokenizer, processor=processor, max_new_tokens=4,
                                    sampling=False, output_attentions={"rows": "generated", "reduce": "mean"})
    assert isinstance(answer, str) and record is not None
    assert_none(found)


def test_training_step_with_checkpointing_triggers_no_deprecation():
    from minicpmv_attn.train.data import builtin_examples, encode_examples
    from minicpmv_attn.train.forward import example_forward
    from minicpmv_attn.train.losses import LossConfig
    from minicpmv_attn.train.model import enable_checkpointing, load_model

    with fork_deprecations() as found:
        model, processor, _ = load_model()
        model.train()
        enable_checkpointing(model)
        enc = encode_examples(processor, builtin_examples()[:1])[0]
        out = example_forward(model, enc, LossConfig())
        out["loss"].backward()
    assert torch.isfinite(out["loss"]).item()
    assert_none(found)


def test_the_check_sees_a_deprecation_the_fork_causes_and_only_that():
    """The classifier itself: a library's deprecation reached from a fork frame counts; the same
    warning reached without the fork, or another category, does not."""
    fork_file, lib_file = str(FORK / "modeling_qwen2.py"), str(LIBRARIES["transformers"] / "modeling_utils.py")
    test_file = __file__
    frame = traceback.FrameSummary
    via_fork = [frame(test_file, 1, "t"), frame(fork_file, 10, "f"), frame(lib_file, 20, "g")]
    assert classify(via_fork, FutureWarning) == f"{lib_file}:20 <- {fork_file}:10"
    assert classify(via_fork, DeprecationWarning)
    assert classify(via_fork, UserWarning) == ""
    assert classify([frame(test_file, 1, "t"), frame(lib_file, 20, "g")], FutureWarning) == ""
    assert classify([frame(fork_file, 10, "f"), frame("/elsewhere/peft/x.py", 3, "p")], FutureWarning) == ""
    with fork_deprecations() as found:
        warnings.warn("not from the fork", FutureWarning)
    assert found == []
