"""scripts/install_into_snapshot.py: install the fork's remote code into a checkpoint folder and undo it."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minicpmv_attn.modeling_qwen2 import DTYPE_KWARG
from minicpmv_attn.scripts import install_into_snapshot as cli
from minicpmv_attn.upstream import install
from minicpmv_attn.upstream.common import sha256_file

from golden import GOLDEN_ROOT

REPO = Path(__file__).resolve().parents[1]
FORK = REPO / "modeling"
GOLDEN = GOLDEN_ROOT  # ../shared/golden or MINICPMV_ATTN_GOLDEN
CASES = ["single_image", "two_images_batch", "text_only"]


def tree(folder: Path):
    """Everything under ``folder``: bytes, links, modes (byte-for-byte comparison)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", p.stat().st_mode & 0o7777)
            else:
                out[rel] = ("file", p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


def golden_copy(tmp_path: Path, case: str = "single_image") -> Path:
    dst = tmp_path / case
    shutil.copytree(GOLDEN / "minicpmv26" / case, dst)
    # the shared fixtures are read-only; a user's checkpoint folder is writable
    os.chmod(dst, 0o755)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    return dst


def tiny_checkpoint(folder: Path, config=None, keys=None) -> Path:
    """A minimal MiniCPM-V-2.6-shaped folder: golden config.json and a tiny safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((GOLDEN / "minicpmv26" / "single_image" / "config.json").read_text())
    if config is not None:
        cfg = config(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    keys = keys or ["llm.model.layers.0.self_attn.q_proj.bias", "llm.lm_head.weight", "vpm.post_layernorm.weight",
                    "resampler.query"]
    save_file({k: torch.zeros(2) for k in keys}, str(folder / "model.safetensors"))
    return folder


def expected_files():
    """The layout rule: every top-level ``modeling/*.py`` but ``__init__.py`` is remote code."""
    return sorted(p.name for p in FORK.glob("*.py") if p.name != "__init__.py")


# ----------------------------------------------------------------------------------------
# the file list
# ----------------------------------------------------------------------------------------
def test_remote_code_files_are_exactly_the_top_level_modules():
    files = install.remote_code_files(FORK)
    assert files == expected_files()
    assert install.remote_code_files() == files, "the default is the installed package folder"
    for root in ("configuration_minicpm.py", "modeling_minicpmv.py", "modeling_navit_siglip.py", "resampler.py"):
        assert root in files
    # everything transformers' remote-code loader will look for is installed
    from transformers.dynamic_module_utils import get_relative_import_files

    needed = {Path(p).name for p in get_relative_import_files(str(FORK / "modeling_minicpmv.py"))}
    assert needed <= set(files)
    assert "__init__.py" not in files


def test_install_copies_the_top_level_modules_and_no_subpackage_file(tmp_path):
    subpackage_files = [p for p in FORK.rglob("*.py") if p.parent != FORK]
    assert subpackage_files, "the tool subpackages exist"
    folder = tiny_checkpoint(tmp_path / "ck")
    before = set(os.listdir(folder))
    assert install.plan_install(folder).copies == expected_files()
    assert cli.main([str(folder), "-q"]) == 0
    added = set(os.listdir(folder)) - before
    assert added == set(expected_files()) | {install.BACKUP_DIRNAME}
    assert not any((folder / name).is_dir() for name in added - {install.BACKUP_DIRNAME})
    assert not any((folder / p.relative_to(FORK)).exists() for p in subpackage_files)
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert set(os.listdir(folder)) == before


def test_remote_code_files_rule_on_a_folder(tmp_path):
    for name in ("modeling_minicpmv.py", "configuration_minicpm.py", "a.py", "__init__.py"):
        (tmp_path / name).write_text("from .a import x\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "b.py").write_text("")
    (tmp_path / "notes.md").write_text("")
    assert install.remote_code_files(tmp_path) == ["a.py", "configuration_minicpm.py", "modeling_minicpmv.py"]
    (tmp_path / "configuration_minicpm.py").unlink()
    with pytest.raises(FileNotFoundError, match="configuration_minicpm.py"):
        install.remote_code_files(tmp_path)


def test_list_files_cli(capsys):
    assert cli.main(["--list-files", "-q"]) == 0
    assert capsys.readouterr().out.split() == expected_files()


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--restore" in out and "MiniCPM-V-2.6" in out


# ----------------------------------------------------------------------------------------
# golden round trip and loading
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_install_restore_round_trips_byte_for_byte(tmp_path, case):
    folder = golden_copy(tmp_path, case)
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    for name in expected_files():
        assert (folder / name).read_bytes() == (FORK / name).read_bytes()
    assert (folder / install.BACKUP_DIRNAME / install.MANIFEST_NAME).is_file()
    # golden config.json already points auto_map at MiniCPMVConfig / MiniCPMV: left untouched
    assert (folder / "config.json").read_bytes() == before["config.json"][1]
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


LOAD_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[2])
    from golden import load_expected, load_inputs
    from transformers import AutoModel

    folder, case, dtype_kwarg = sys.argv[1], sys.argv[3], sys.argv[4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **{dtype_kwarg: torch.float32})
    model.eval()
    data, mask = load_inputs(case)
    with torch.no_grad():
        out = model(data, attention_mask=mask)
    expected = load_expected(case)["logits"]
    real = mask.bool()
    print(json.dumps({"module": type(model).__module__,
                      "shape": list(out.logits.shape), "expected_shape": list(expected.shape),
                      "max_diff": (out.logits.float() - expected).abs()[real].max().item()}))
''')


@pytest.mark.parametrize("case", CASES)
def test_installed_folder_loads_with_trust_remote_code_and_reproduces_golden_logits(tmp_path, case):
    folder = golden_copy(tmp_path, case)
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    # a fresh process with its own modules cache: only the folder's code can be loaded
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(script), str(folder), str(Path(__file__).parent), case, DTYPE_KWARG],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["module"].startswith("transformers_modules."), res["module"]
    assert res["shape"] == res["expected_shape"]
    assert res["max_diff"] <= 1e-4, res
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


CHAT_SCRIPT = textwrap.dedent('''
    import json, sys
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(folder + "/image_0_0.png").convert("RGB")
    answer, record = model.chat(image, [{"role": "user", "content": "Describe."}], processor.tokenizer,
                                processor=processor, max_new_tokens=3, sampling=False, num_beams=1,
                                output_attentions={"rows": "generated", "stages": ["llm", "resampler"],
                                                   "layers": [-1]})
    print(json.dumps({"model": type(model).__module__, "processor": type(processor).__module__,
                      "layout": type(record.layout.images[0]).__module__, "names": record.names(),
                      "slices": len(record.layout.slices), "answer": answer}))
''')


def test_installed_folder_chats_with_attention_through_remote_code_only(tmp_path):
    """Model, processor and a chat with an attention record, all from the folder's copied code
    (on transformers 4.4x too, whose copier follows only direct relative imports)."""
    from minicpmv_attn.demo import demo_tokenizer_path

    folder = golden_copy(tmp_path, "single_image")
    for f in Path(demo_tokenizer_path()).iterdir():
        shutil.copy(f, folder / f.name)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["auto_map"] = {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                       "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    assert cli.main([str(folder), "-q"]) == 0
    script = tmp_path / "chat.py"
    script.write_text(CHAT_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("model", "processor", "layout"):
        assert res[key].startswith("transformers_modules."), res
    assert res["names"] == ["llm.layers.1.attn", "resampler.attn"] and res["slices"] == 7, res


# ----------------------------------------------------------------------------------------
# backups, auto_map, symlinks, refusals
# ----------------------------------------------------------------------------------------
def test_second_install_keeps_the_first_backup(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ck")
    (folder / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    (folder / "resampler.py").write_text("# upstream's resampler\n")
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    assert cli.main([str(folder), "-q"]) == 0  # the installed files are not "originals"
    manifest = json.loads((folder / install.BACKUP_DIRNAME / install.MANIFEST_NAME).read_text())
    assert manifest["files"]["modeling_minicpmv.py"]["state"] == "file"
    assert manifest["files"]["capture.py"]["state"] == "absent"
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


def test_auto_map_is_pointed_at_the_fork(tmp_path):
    def cfg(c):
        c["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                         "AutoModel": "modeling_minicpmv_old.MiniCPMV"}
        return c

    folder = tiny_checkpoint(tmp_path / "ck", config=cfg)
    os.chmod(folder / "config.json", 0o640)
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                        "AutoModel": "modeling_minicpmv.MiniCPMV",
                        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o640
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


def test_missing_auto_map_is_added(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ck", config=lambda c: {k: v for k, v in c.items() if k != "auto_map"})
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


def test_processor_auto_map_points_at_fork_classes(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ck")
    pre = {"image_processor_type": "MiniCPMVImageProcessor",
           "auto_map": {"AutoProcessor": "processing_minicpmv.SomeOldProcessor"}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))  # no auto_map: untouched
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    target = "processing_minicpmv.MiniCPMVProcessor"
    now = json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]["AutoProcessor"]
    assert now == (target if install.class_in_fork(target, FORK) else "processing_minicpmv.SomeOldProcessor")
    assert (folder / "tokenizer_config.json").read_bytes() == before["tokenizer_config.json"][1]
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == before


def test_hugging_face_snapshot_symlinks_are_never_written_through(tmp_path):
    """A hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    src = tiny_checkpoint(tmp_path / "src")
    (src / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    blobs, snap = tmp_path / "repo" / "blobs", tmp_path / "repo" / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in src.iterdir():
        blob = blobs / sha256_file(p)
        shutil.copy2(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    blobs_before, snap_before = tree(blobs), tree(snap)
    assert cli.main([str(snap), "-q"]) == 0
    assert not (snap / "modeling_minicpmv.py").is_symlink()
    assert (snap / "modeling_minicpmv.py").read_bytes() == (FORK / "modeling_minicpmv.py").read_bytes()
    assert tree(blobs) == blobs_before
    assert cli.main([str(snap), "--restore", "-q"]) == 0
    assert tree(snap) == snap_before and tree(blobs) == blobs_before


def test_restore_refuses_to_lose_edits_unless_forced(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "ck")
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    with open(folder / "modeling_minicpmv.py", "a") as f:
        f.write("# my local edit\n")
    assert cli.main([str(folder), "--restore", "-q"]) == 1
    assert "modified after install" in capsys.readouterr().err
    assert cli.main([str(folder), "--restore", "--force", "-q"]) == 0
    assert tree(folder) == before


def test_restore_without_backup_and_dry_runs(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "ck")
    before = tree(folder)
    assert cli.main([str(folder), "--restore", "-q"]) == 1
    assert "nothing to restore" in capsys.readouterr().err
    assert cli.main([str(folder), "--dry-run"]) == 0
    assert "would copy modeling_minicpmv.py" in capsys.readouterr().err
    assert tree(folder) == before


def _llama_keys():
    return ["llm.model.layers.0.self_attn.q_proj.weight", "vpm.post_layernorm.weight", "resampler.query"]


REFUSALS = {
    "no_config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "bad_json": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "other_model_type": (lambda d: _edit_cfg(d, model_type="llava"), "model_type is 'llava'"),
    "not_minicpmv_fields": (lambda d: _edit_cfg(d, drop="vision_config"), "lacks MiniCPM-V field"),
    "minicpmv_2_0": (lambda d: _edit_cfg(d, scale_emb=12), "MiniCPM-V 2.0"),
    "version_2_5": (lambda d: (d / "preprocessor_config.json").write_text('{"version": 2.5}'), "not 2.6"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "llama_llm": (lambda d: save_file({k: torch.zeros(1) for k in _llama_keys()}, str(d / "model.safetensors")),
                  "not Qwen2"),
    "not_minicpmv_weights": (lambda d: save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(1)},
                                                 str(d / "model.safetensors")), "top-level modules"),
}


def _edit_cfg(d, drop=None, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kv)
    cfg.pop(drop, None)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_folders_that_are_not_minicpmv26_checkpoints(tmp_path, capsys, name):
    folder = tiny_checkpoint(tmp_path / "ck")
    edit, reason = REFUSALS[name]
    edit(folder)
    before = tree(folder)
    assert cli.main([str(folder), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and reason in err, err
    assert tree(folder) == before


def test_refuses_a_path_that_is_not_a_folder(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing"), "-q"]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_folder_is_required(capsys):
    assert cli.main([]) == 2


# ----------------------------------------------------------------------------------------
# a manifest is never trusted: confinement, corrupt manifests, edited files, one-line errors
# ----------------------------------------------------------------------------------------
def _manifest_file(folder: Path) -> Path:
    return folder / install.BACKUP_DIRNAME / install.MANIFEST_NAME


def _one_refusal(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refused: "), err
    return err.strip()


def _installed_with_manifest(tmp_path: Path):
    """A checkpoint (with an original modeling file), installed; its manifest as a dict."""
    folder = tiny_checkpoint(tmp_path / "ck")
    (folder / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    assert cli.main([str(folder), "-q"]) == 0
    return folder, json.loads(_manifest_file(folder).read_text())


# names a manifest of another origin may hold: each would make restore touch what install never wrote
UNSAFE_NAMES = {
    "parent": "../victim.py",
    "absolute": None,  # filled in with an absolute path to the victim
    "subfolder": "sub/victim.py",
    "backslash": "..\\victim.py",
    "dotdot": "..",
    "empty": "",
    "weights": "model.safetensors",
    "hidden": ".minicpmv_attn_backup",
    "newline": "victim.py\n",
}


@pytest.mark.parametrize("kind", sorted(UNSAFE_NAMES))
@pytest.mark.parametrize("state", ["absent", "file"])
def test_restore_is_confined_to_the_folder_whatever_the_manifest_says(tmp_path, capsys, kind, state):
    folder, manifest = _installed_with_manifest(tmp_path)
    victim = tmp_path / "victim.py"
    victim.write_text("# not the checkpoint's\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "victim.py").write_text("# a file in a subfolder\n")
    name = UNSAFE_NAMES[kind] or str(victim)
    sha = sha256_file(victim)
    manifest["files"][name] = ({"state": "absent"} if state == "absent" else
                               {"state": "file", "sha256": sha, "mode": 0o644})
    _manifest_file(folder).write_text(json.dumps(manifest))
    outside, before = tree(tmp_path), tree(folder)
    for argv in ([str(folder), "--restore", "-q"], [str(folder), "--restore", "--force", "-q"],
                 [str(folder), "--restore", "--dry-run"], [str(folder), "-q"]):
        assert cli.main(argv) == 1, argv
        err = _one_refusal(capsys)
        assert str(_manifest_file(folder)) in err and json.dumps(name) in err, err
        assert "expected a plain file name install writes" in err, err
        assert tree(tmp_path) == outside and tree(folder) == before


@pytest.mark.parametrize("where", ["backup_folder", "files_folder", "manifest", "backup_file"])
def test_a_symlinked_backup_is_refused_by_restore_and_install(tmp_path, capsys, where):
    """A backup (or part of it) that is a link: restore would read, and install write, outside the folder."""
    folder, _ = _installed_with_manifest(tmp_path)
    bdir = folder / install.BACKUP_DIRNAME
    elsewhere = tmp_path / "elsewhere"
    part = {"backup_folder": bdir, "files_folder": bdir / "files", "manifest": _manifest_file(folder),
            "backup_file": bdir / "files" / "modeling_minicpmv.py"}[where]
    shutil.move(str(part), str(elsewhere))
    os.symlink(elsewhere, part)
    outside, before = tree(tmp_path), tree(folder)
    for argv in ([str(folder), "--restore", "-q"], [str(folder), "--restore", "--dry-run"], [str(folder), "-q"],
                 [str(folder), "-q", "--force"]):
        assert cli.main(argv) == 1, argv
        err = _one_refusal(capsys)
        assert str(part) in err and "symlink" in err, err
        assert tree(tmp_path) == outside and tree(folder) == before


def test_a_backup_folder_holding_what_install_never_writes_is_refused(tmp_path, capsys):
    folder, _ = _installed_with_manifest(tmp_path)
    stray = folder / install.BACKUP_DIRNAME / "files" / "sub"
    stray.mkdir()
    before = tree(folder)
    assert cli.main([str(folder), "--restore", "-q"]) == 1
    assert str(stray) in _one_refusal(capsys)
    assert tree(folder) == before


VALID_SHA = "0" * 64
CORRUPT_MANIFESTS = {
    "not_json": (b"{not json", "not JSON"),
    "not_utf8": (b"\xff\xfe{}", "not JSON"),
    "empty_file": (b"", "not JSON"),
    "a_list": ([], "the top level: expected a JSON object, got []"),
    "wrong_format": ({"format": "other/9", "files": {}}, 'format: expected "minicpmv-attn.install/1"'),
    "no_files": ({"format": install.INSTALL_FORMAT}, "files: expected an object of file name -> entry, "
                                                    "got nothing (the field is missing)"),
    "files_a_list": ({"format": install.INSTALL_FORMAT, "files": ["config.json"]}, "files: expected an object"),
    "entry_a_string": ({"format": install.INSTALL_FORMAT, "files": {"a.py": "absent"}},
                       'files["a.py"]: expected an object with a state, got "absent"'),
    "no_state": ({"format": install.INSTALL_FORMAT, "files": {"a.py": {}}},
                 'files["a.py"].state: expected "file", "symlink" or "absent", got nothing'),
    "unknown_state": ({"format": install.INSTALL_FORMAT, "files": {"a.py": {"state": "dir"}}},
                      'files["a.py"].state: expected "file", "symlink" or "absent", got "dir"'),
    "no_sha": ({"format": install.INSTALL_FORMAT, "files": {"a.py": {"state": "file", "mode": 420}}},
               'files["a.py"].sha256: expected 64 hex digits, got nothing'),
    "mode_a_string": ({"format": install.INSTALL_FORMAT,
                       "files": {"a.py": {"state": "file", "sha256": VALID_SHA, "mode": "644"}}},
                      'files["a.py"].mode: expected permission bits 0..4095, got "644"'),
    "no_link_target": ({"format": install.INSTALL_FORMAT, "files": {"a.py": {"state": "symlink"}}},
                       'files["a.py"].target: expected a link target'),
    "installed_a_number": ({"format": install.INSTALL_FORMAT, "files": {"a.py": {"state": "absent"}},
                            "installed": {"a.py": 1}}, 'installed["a.py"]: expected 64 hex digits, got 1'),
    "installed_unrecorded": ({"format": install.INSTALL_FORMAT, "files": {}, "installed": {"b.py": VALID_SHA}},
                             'installed["b.py"]: expected a name recorded in files'),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_MANIFESTS))
def test_a_corrupt_manifest_is_one_line_exit_1_and_changes_nothing(tmp_path, capsys, case):
    folder, _ = _installed_with_manifest(tmp_path)
    content, expected = CORRUPT_MANIFESTS[case]
    _manifest_file(folder).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    before = tree(folder)
    for argv in ([str(folder), "--restore", "-q"], [str(folder), "--restore", "--force", "-q"],
                 [str(folder), "--restore", "--dry-run"], [str(folder), "-q"], [str(folder), "--dry-run"]):
        assert cli.main(argv) == 1, argv
        err = _one_refusal(capsys)
        assert str(_manifest_file(folder)) in err and expected in err and "expected" in err, err
        assert tree(folder) == before


def test_second_install_refuses_to_overwrite_an_edited_file_unless_forced(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "ck")
    (folder / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    original = tree(folder)
    assert cli.main([str(folder), "-q"]) == 0
    manifest = json.loads(_manifest_file(folder).read_text())
    assert manifest["installed"] == {name: sha256_file(FORK / name) for name in expected_files()}
    with open(folder / "resampler.py", "a") as f:
        f.write("# my local edit\n")
    edited = tree(folder)
    for argv in ([str(folder), "-q"], [str(folder), "--dry-run"]):
        assert cli.main(argv) == 1
        err = _one_refusal(capsys)
        assert "'resampler.py'" in err and "modified after install" in err and "--force" in err, err
        assert tree(folder) == edited
    assert cli.main([str(folder), "-q", "--force"]) == 0
    assert (folder / "resampler.py").read_bytes() == (FORK / "resampler.py").read_bytes()
    assert cli.main([str(folder), "-q"]) == 0  # what --force wrote is now the installed copy
    assert cli.main([str(folder), "--restore", "-q"]) == 0
    assert tree(folder) == original


def test_install_refuses_a_shipped_backup_that_does_not_match_the_folder(tmp_path, capsys):
    """A checkpoint that ships a backup saying its own modeling file is 'absent' (restore would then
    delete it): install and restore see a file that is neither the original nor an installed copy."""
    folder = tiny_checkpoint(tmp_path / "ck")
    (folder / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    manifest = {"format": install.INSTALL_FORMAT, "files": {"modeling_minicpmv.py": {"state": "absent"}}}
    _manifest_file(folder).parent.mkdir()
    _manifest_file(folder).write_text(json.dumps(manifest))
    before = tree(folder)
    for argv in ([str(folder), "-q"], [str(folder), "--restore", "-q"]):
        assert cli.main(argv) == 1
        assert "'modeling_minicpmv.py'" in _one_refusal(capsys)
        assert tree(folder) == before


def test_usage_errors_are_one_line_with_exit_2(capsys):
    for argv in ([], ["--no-such-option"], ["a", "b"], ["x", "--restore", "--fork", "y"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("usage error: "), err


def test_help_states_the_promises(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for promise in ("never through a symlink", "refused as a whole", "byte for byte", "unless --force",
                    "temporary file and a rename", "kill -9", "completes it", "--restore undoes it",
                    "change nothing", "0 done, 1 refused or failed", "2 usage error"):
        assert promise in out, promise


def test_unreadable_weight_index_is_a_one_line_refusal(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "ck")
    (folder / "model.safetensors.index.json").write_text("[1, 2")
    assert cli.main([str(folder), "-q"]) == 1
    assert "weight names cannot be read" in _one_refusal(capsys)
