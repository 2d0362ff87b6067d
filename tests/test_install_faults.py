"""Interrupted installs and restores: after a crash (``kill -9``) at any step, rerunning the same
command completes it and ``--restore`` undoes it, byte for byte; the crash never reaches outside
the folder.

The in-process tests make step n of a run "kill" it: every change install.py makes goes through
``attention_record.atomic_write_bytes`` (a kill inside leaves its half-written temporary file, as a
real one would) or a mutating ``os``/``shutil`` function; step n raises :class:`Killed` (a
BaseException, so no ``except Exception`` tidies up). n runs over every step of the run. The
subprocess tests kill a real process with SIGKILL inside its n-th ``os.replace``.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from minicpmv_attn import attention_record
from minicpmv_attn.scripts import install_into_snapshot as cli
from minicpmv_attn.upstream import install
from test_install_snapshot import tiny_checkpoint, tree

OS_MUTATORS = {"replace", "rename", "chmod", "symlink", "unlink", "remove", "rmdir", "mkdir", "makedirs"}
SHUTIL_MUTATORS = {"rmtree", "move", "copy", "copy2", "copyfile", "copymode", "copystat"}


class Killed(BaseException):
    """The process died at this step."""


class Clock:
    """Counts the steps of a run; step ``n`` and every later one kill it."""

    def __init__(self, n: int):
        self.n, self.steps = n, 0

    def tick(self, dying=None):
        self.steps += 1
        if self.steps >= self.n:
            if dying is not None:
                dying()
            raise Killed(f"step {self.steps}")


class Faulty:
    """A module whose mutating functions are steps of ``clock``."""

    def __init__(self, real, mutators, clock):
        self._real, self._mutators, self._clock = real, mutators, clock

    def __getattr__(self, name):
        value = getattr(self._real, name)
        if name not in self._mutators:
            return value

        def step(*args, **kwargs):
            self._clock.tick()
            return value(*args, **kwargs)
        return step


def faulty_atomic_write(clock, real):
    def write(path, data):
        def dying():  # killed mid-write: a temporary file with half the bytes stays behind
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            fd, _ = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
            os.write(fd, data[: len(data) // 2])
            os.close(fd)
        clock.tick(dying)
        return real(path, data)
    return write


def killed_at(n, run, monkeypatch) -> bool:
    """Run ``run()`` with a kill at step ``n``; False when it finished in fewer steps."""
    clock = Clock(n)
    with monkeypatch.context() as m:
        m.setattr(install, "os", Faulty(os, OS_MUTATORS, clock))
        m.setattr(install, "shutil", Faulty(shutil, SHUTIL_MUTATORS, clock))
        real_write = attention_record.atomic_write_bytes
        m.setattr(attention_record, "atomic_write_bytes", faulty_atomic_write(clock, real_write))
        try:
            run()
        except Killed:
            return True
    return False


def stub_fork(path: Path, version: int) -> Path:
    """A small fork: the classes auto_map needs, a module per version, one executable module."""
    files = {"configuration_minicpm.py": "class MiniCPMVConfig:\n    pass\n",
             "modeling_minicpmv.py": f"class MiniCPMV:\n    version = {version}\n",
             "tokenization_minicpmv_fast.py": "class MiniCPMVTokenizerFast:\n    pass\n",
             "resampler.py": f"VERSION = {version}\n",
             f"only_in_v{version}.py": "x = 1\n"}
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
        os.chmod(path / name, 0o755 if name == "resampler.py" else 0o644)
    return path


def checkpoint(base: Path) -> Path:
    """Originals of every kind: a file (mode 0600), a hub-style symlink, absent files, two JSON
    files whose auto_map install rewrites (one mode 0640)."""
    def cfg(c):
        c["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "old.MiniCPMV"}
        return c

    folder = tiny_checkpoint(base / "ck", config=cfg)
    os.chmod(folder / "config.json", 0o640)
    (folder / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    os.chmod(folder / "modeling_minicpmv.py", 0o600)
    (base / "blobs").mkdir()
    (base / "blobs" / "resampler").write_text("# upstream's resampler, a hub blob\n")
    os.symlink("../blobs/resampler", folder / "resampler.py")
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.Slow", "t.Fast"]}}))
    return folder


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Folders in the states the scenarios start from and end in (clean, uninterrupted runs)."""
    base = tmp_path_factory.mktemp("states")
    forks = {v: stub_fork(base / f"fork_v{v}", v) for v in (1, 2)}
    original = checkpoint(base)
    folders = {"original": original}
    for name, versions in (("v1", (1,)), ("v1_then_v2", (1, 2))):
        folders[name] = base / name
        shutil.copytree(original, folders[name], symlinks=True)
        for v in versions:
            assert cli.main([str(folders[name]), "-q", "--fork", str(forks[v])]) == 0
    trees = {name: tree(path) for name, path in folders.items()}
    assert trees["v1"] != trees["original"] and trees["v1_then_v2"] != trees["v1"]
    return base, forks, folders, trees


# scenario: (start state, the interrupted run, the state it gives uninterrupted,
#            [(the reruns after the kill, the state they must give)])
I1, I2, R = ("install", 1), ("install", 2), ("restore",)
SCENARIOS = {
    "first_install": ("original", I1, "v1", [((I1,), "v1"), ((R,), "original")]),
    "second_install_of_a_new_fork": ("v1", I2, "v1_then_v2", [((I2,), "v1_then_v2"), ((R,), "original")]),
    "restore": ("v1", R, "original", [((R,), "original"), ((I1,), "v1")]),
    # (installing fork 2 again leaves only_in_v1.py as restore had left it: not v1_then_v2 exactly)
    "restore_after_two_installs": ("v1_then_v2", R, "original", [((R,), "original"), ((I2, R), "original")]),
}


def _call(op, folder, forks):
    if op[0] == "install":
        return lambda: install.install(folder, src=forks[op[1]], log=lambda msg: None)
    return lambda: install.restore(folder, log=lambda msg: None)


def _argv(op, folder, forks):
    return [str(folder), "-q"] + (["--fork", str(forks[op[1]])] if op[0] == "install" else ["--restore"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_kill_at_any_step_is_completed_or_undone_by_a_rerun(states, tmp_path, monkeypatch, scenario):
    base, forks, folders, trees = states
    start, op, done, reruns = SCENARIOS[scenario]
    blobs = tree(base / "blobs")
    allowed = set(trees["original"]) | set(trees["v1_then_v2"])  # top-level names a run may leave
    n, finished = 0, False
    while not finished:
        n += 1
        assert n < 500, "the run never finishes"
        for i, (chain, end) in enumerate(reruns):
            work = tmp_path / f"n{n}_{i}"
            shutil.copytree(folders[start], work, symlinks=True)
            if not killed_at(n, _call(op, work, forks), monkeypatch):
                finished = True  # n is past the run's last step: it completed
                assert tree(work) == trees[done]
                break
            assert set(os.listdir(work)) <= allowed, (n, sorted(set(os.listdir(work)) - allowed))
            assert tree(base / "blobs") == blobs, "a crash wrote through a symlink"
            for rerun in chain:
                rc = cli.main(_argv(rerun, work, forks))
                # a kill before the first change leaves nothing to restore: refused, the folder as it was
                assert rc == 0 or (rerun == R and rc == 1 and not os.path.lexists(work / install.BACKUP_DIRNAME)
                                   and tree(work) == trees["original"]), (scenario, n, rerun, rc)
            assert tree(work) == trees[end], (scenario, "killed at step", n, "then", chain)
            shutil.rmtree(work)
    assert n > 10, "the runs have more steps than that"


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from minicpmv_attn.scripts import install_into_snapshot as cli
    n, real_replace, calls = int(sys.argv[1]), os.replace, [0]

    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(*args, **kwargs)

    os.replace = replace
    sys.exit(cli.main(sys.argv[2:]))
''')


@pytest.mark.parametrize("op,n", [("install", 8), ("install", 22), ("restore", 2)])
def test_sigkill_inside_a_real_run_is_completed_or_undone(tmp_path, op, n):
    """The real fork, a real SIGKILL inside the n-th os.replace (mid atomic write or mid rename)."""
    original = tiny_checkpoint(tmp_path / "original")
    (original / "modeling_minicpmv.py").write_text("# upstream's modeling file\n")
    installed = tmp_path / "installed"
    shutil.copytree(original, installed)
    assert cli.main([str(installed), "-q"]) == 0
    trees = {"original": tree(original), "installed": tree(installed)}
    work = tmp_path / "work"
    shutil.copytree(original if op == "install" else installed, work, symlinks=True)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    argv = [str(work), "-q"] + (["--restore"] if op == "restore" else [])
    proc = subprocess.run([sys.executable, str(script), str(n)] + argv, capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert tree(work) not in (trees["original"], trees["installed"]), "killed half-way"
    again = tmp_path / "again"
    shutil.copytree(work, again, symlinks=True)
    assert cli.main(argv) == 0
    assert tree(work) == trees["installed" if op == "install" else "original"]
    other = [str(again), "-q"] + (["--restore"] if op == "install" else [])
    assert cli.main(other) == 0
    assert tree(again) == trees["original" if op == "install" else "installed"]
