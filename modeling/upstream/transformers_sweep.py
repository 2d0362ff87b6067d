"""Run the compatibility subset of the tests on many transformers releases, one venv each.

The subset is the tests marked ``compat`` (golden logits, attention and greedy generate,
capture during generate, chat, the main command, the generation guard). The sweep is what
the README's compatibility table and ``TRANSFORMERS_CAP`` rest on; the canary is what CI runs
to notice a new release above the cap.

Besides the standard library only the package's atomic writer is used here (the venvs hold the
transformers releases under test). Nothing here computes paths outside the package: the
checkout to test comes in as ``repo`` (the script's ``--repo``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..attention_record import atomic_write_json, atomic_write_text

TORCH_REQUIREMENT = "torch==2.13.0"  # the local CPU build (a plain `torch` pulls CUDA)
TEST_REQUIREMENTS = ["pytest", "hypothesis"]
TABLE_START, TABLE_END = "<!-- compat-table:start -->", "<!-- compat-table:end -->"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# versions
# ----------------------------------------------------------------------------------------
def release(version: str) -> Tuple[int, ...]:
    """``"5.24.0"`` -> (5, 24, 0); pre-releases sort with their release."""
    out = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d*", part).group(0)
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def is_final(version: str) -> bool:
    return re.fullmatch(r"\d+(\.\d+)*", version) is not None


def verified_range(source: Optional[Path] = None) -> Dict[str, str]:
    """TRANSFORMERS_MIN / _CAP / _NEWEST_VERIFIED as written in ``source`` (a ``modeling_qwen2.py``;
    default: the installed package's own)."""
    source = Path(source) if source is not None else Path(__file__).resolve().parents[1] / "modeling_qwen2.py"
    found = dict(re.findall(r'^(TRANSFORMERS_[A-Z_]+) = "([0-9.]+)"$', source.read_text(encoding="utf-8"), re.M))
    missing = {"TRANSFORMERS_MIN", "TRANSFORMERS_CAP", "TRANSFORMERS_NEWEST_VERIFIED"} - set(found)
    if missing:
        raise RuntimeError(f"{source}: {', '.join(sorted(missing))} not found")
    return {"min": found["TRANSFORMERS_MIN"], "cap": found["TRANSFORMERS_CAP"],
            "newest": found["TRANSFORMERS_NEWEST_VERIFIED"]}


def index_versions(python: str = sys.executable) -> List[str]:
    """The final transformers releases the package index serves, newest first."""
    proc = subprocess.run([python, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                          text=True, timeout=300)
    text = proc.stdout
    m = re.search(r"Available versions:\s*(.+)", text)
    if proc.returncode != 0 or not m:
        # older pips: the list of versions is in the error of an impossible request
        proc = subprocess.run([python, "-m", "pip", "download", "--no-deps", "-d", tempfile.gettempdir(),
                               "transformers==0.0.0.invalid"], capture_output=True, text=True, timeout=300)
        m = re.search(r"from versions:\s*([^)]+)\)", proc.stderr)
        if not m:
            raise RuntimeError("could not list transformers releases on the package index: "
                               + (proc.stderr.strip().splitlines() or ["no answer"])[-1])
    versions = [v.strip() for v in m.group(1).split(",") if is_final(v.strip())]
    return sorted(set(versions), key=release, reverse=True)


def sweep_versions(available: Sequence[str], minimum: str = "4.40.0") -> List[str]:
    """The releases the sweep covers: ``minimum`` (the model card's), the newest patch of the
    last 4.x minor, and the newest patch of every 5.x (and later) minor."""
    finals = [v for v in available if is_final(v) and release(v) >= release(minimum)]
    newest_patch: Dict[Tuple[int, int], str] = {}
    for v in finals:
        key = release(v)[:2]
        if key not in newest_patch or release(v) > release(newest_patch[key]):
            newest_patch[key] = v
    chosen = {minimum} if minimum in finals else set()
    four = [k for k in newest_patch if k[0] == 4]
    if four:
        chosen.add(newest_patch[max(four)])
    chosen.update(v for k, v in newest_patch.items() if k[0] >= 5)
    return sorted(chosen, key=release)


# ----------------------------------------------------------------------------------------
# one release
# ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    version: str
    status: str  # pass | FAIL | error (the venv could not be built)
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: List[str] = field(default_factory=list)  # "test id: first line of the error"
    differ: str = ""  # the transformers differ's verdict
    seconds: float = 0.0
    detail: str = ""


def _run(cmd: Sequence[str], log_file: Path, env=None, timeout: int = 1800) -> int:
    with open(log_file, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return 124


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build_env(version: str, workdir: Path, repo: Path, log_file: Path) -> Path:
    """A venv with torch, transformers==version, the test tools and the fork (editable, no deps).

    Reused when it already holds that release (the fork is installed again: ``repo`` may be
    another checkout). The fork is installed without its dependencies so a release above
    setup.py's cap can be tried (the canary).
    """
    venv = workdir / f"tf-{version}"
    python = venv_python(venv)
    marker = venv / ".minicpmv-attn-sweep"
    fork = [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(repo)]
    if marker.is_file() and marker.read_text().strip() == version and python.is_file():
        if _run(fork, log_file) != 0:
            raise RuntimeError(f"installing the fork from {repo} failed (see {log_file})")
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", TORCH_REQUIREMENT],
        [str(python), "-m", "pip", "install", "-q", f"transformers=={version}", "safetensors", "einops", "numpy",
         "matplotlib", "pillow", "tqdm", *TEST_REQUIREMENTS],
        fork,
    ]
    for cmd in steps:
        if _run(cmd, log_file) != 0:
            raise RuntimeError(f"`{' '.join(cmd[2:5])} ...` failed (see {log_file})")
    marker.write_text(version + "\n")
    return venv


def parse_junit(path: Path) -> Tuple[int, int, int, List[str]]:
    """(passed, failed, skipped, ["test id: first line of the error", ...]) of a pytest junit xml."""
    root = ET.parse(str(path)).getroot()
    passed = failed = skipped = 0
    failures = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed += 1
            test = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(f"{test}: {message[0][:160] if message else bad.tag}")
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def run_release(version: str, workdir: Path, repo: Path, marker: str = "compat", threads: int = 1,
                log: Log = _stderr, drop_venv: bool = False) -> Outcome:
    """Build (or reuse) the venv for ``version`` and run the ``marker`` tests and the differ there.

    The tests' temporary files go under ``workdir`` (``tf-VERSION.tmp``, emptied by pytest at
    each run). With ``drop_venv`` the venv (~1.3 GB) and those files are deleted once the run is
    over, so a sweep's disk use stays at one venv however many releases it tries (CI).
    """
    try:
        return _run_release(version, workdir, repo, marker, threads, log)
    finally:
        if drop_venv:
            for path in (workdir / f"tf-{version}", workdir / f"tf-{version}.tmp"):
                shutil.rmtree(path, ignore_errors=True)


def _run_release(version: str, workdir: Path, repo: Path, marker: str, threads: int, log: Log) -> Outcome:
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / f"tf-{version}.log"
    log_file.write_text("")
    start = time.time()
    log(f"transformers {version}: building the venv ...")
    try:
        venv = build_env(version, workdir, repo, log_file)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return Outcome(version, "error", detail=str(e), seconds=time.time() - start)
    python = str(venv_python(venv))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1")
    junit = workdir / f"tf-{version}.junit.xml"
    if junit.exists():
        junit.unlink()
    log(f"transformers {version}: running the '{marker}' tests ...")
    with tempfile.TemporaryDirectory() as tmp:
        env["MINICPMV_ATTN_CACHE"] = tmp
        rc = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(repo / "tests"),
                   f"--basetemp={workdir / f'tf-{version}.tmp'}", f"--junitxml={junit}", "-o",
                   "junit_family=xunit1"], log_file, env=env)
    if not junit.is_file():
        return Outcome(version, "error", detail=f"pytest exited {rc} without a report (see {log_file})",
                       seconds=time.time() - start)
    passed, failed, skipped, failures = parse_junit(junit)
    differ_rc = _run([python, str(repo / "scripts" / "diff_upstream.py"), "--transformers-only", "-q"], log_file,
                     env=env, timeout=600)
    differ = {0: "as pinned", 1: "drift (see log)"}.get(differ_rc, f"error {differ_rc}")
    ok = rc == 0 and failed == 0 and passed > 0
    return Outcome(version, "pass" if ok else "FAIL", passed, failed, skipped, failures, differ,
                   time.time() - start, "" if ok or failures else f"pytest exited {rc} (see {log_file})")


def sweep(versions: Sequence[str], workdir: Path, repo: Path, jobs: int = 1, log: Log = _stderr,
          drop_venvs: bool = False) -> List[Outcome]:
    """Run :func:`run_release` for each of ``versions`` on the checkout ``repo``, ``jobs`` at once."""
    repo = Path(repo)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda v: run_release(v, workdir, repo, log=log, drop_venv=drop_venvs), versions))
    return sorted(outcomes, key=lambda o: release(o.version))


def pin_snapshots(outcomes: Sequence[Outcome], workdir: Path, pin: Path, repo: Path, log: Log = _stderr
                  ) -> List[str]:
    """Add each passing release's transformers snapshot to ``pin`` (one at a time: one file)."""
    repo = Path(repo)
    done = []
    for o in outcomes:
        if o.status != "pass":
            continue
        python = str(venv_python(workdir / f"tf-{o.version}"))
        rc = _run([python, str(repo / "scripts" / "diff_upstream.py"), "--transformers-only", "--pin", str(pin),
                   "--write-pin", str(pin), "-q"], workdir / f"tf-{o.version}.log")
        if rc == 0:
            done.append(o.version)
        else:
            log(f"transformers {o.version}: could not add its snapshot to {pin} (exit {rc})")
    return done


# ----------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------
def commit_of(repo: Optional[Path]) -> str:
    """The short commit id of a git checkout ("" when it is not one)."""
    if repo is None:
        return ""
    try:
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def markdown_table(outcomes: Sequence[Outcome], torch_version: str = TORCH_REQUIREMENT.split("==")[1],
                   commit: str = "") -> str:
    lines = [f"| transformers | result | compat tests (passed / failed) | differ | minutes |",
             "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        tests = f"{o.passed} / {o.failed}" if o.status != "error" else o.detail[:60]
        lines.append(f"| {o.version} | {o.status} | {tests} | {o.differ or '-'} | {o.seconds / 60:.1f} |")
    lines.append("")
    lines.append(f"torch {torch_version} CPU, Python {sys.version_info[0]}.{sys.version_info[1]}; "
                 f"`python scripts/sweep_transformers.py` on {time.strftime('%Y-%m-%d')}"
                 + (f", commit {commit}." if commit else "."))
    return "\n".join(lines)


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{readme}: no {TABLE_START} ... {TABLE_END} block to replace")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    atomic_write_text(readme, head + TABLE_START + "\n" + table + "\n" + TABLE_END + tail)


def failure_line(o: Outcome, rng: Dict[str, str], limit: int = 3) -> str:
    """One line: which release broke what."""
    shown = "; ".join(o.failures[:limit]) + (f"; and {len(o.failures) - limit} more" if len(o.failures) > limit
                                             else "")
    what = shown or o.detail
    return (f"CANARY FAILED: transformers {o.version} (above the verified {rng['min']}..{rng['newest']}, "
            f"cap <{rng['cap']}) breaks {o.failed} of {o.passed + o.failed} compatibility tests: {what}")


def canary_decision(available: Sequence[str], rng: Dict[str, str]) -> Optional[str]:
    """The release the canary must try: the newest on the index at or above the cap, else None."""
    above = [v for v in available if release(v) >= release(rng["cap"])]
    return max(above, key=release) if above else None


def canary(workdir: Path, repo: Path, version: Optional[str] = None, log: Log = _stderr,
           drop_venv: bool = False) -> Tuple[int, str]:
    """(exit code, one line). Exit 1 when a release above the cap breaks the compatibility tests
    of the checkout ``repo``."""
    repo = Path(repo)
    rng = verified_range(repo / "modeling" / "modeling_qwen2.py")
    if version is None:
        try:
            available = index_versions()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            return 1, f"CANARY ERROR: {e}"
        version = canary_decision(available, rng)
        if version is None:
            return 0, (f"canary: the newest transformers on the package index is {available[0]}, inside the "
                       f"verified range (<{rng['cap']}): nothing new to try")
    o = run_release(version, workdir, repo, log=log, drop_venv=drop_venv)
    if o.status == "error":
        return 1, f"CANARY ERROR: transformers {version}: {o.detail}"
    if o.status == "FAIL":
        return 1, failure_line(o, rng)
    return 0, (f"canary: transformers {version} passes the {o.passed} compatibility tests (differ: {o.differ}); "
               f"run the full sweep, then raise TRANSFORMERS_CAP in modeling/modeling_qwen2.py")


def save_json(outcomes: Sequence[Outcome], path: Path) -> None:
    atomic_write_json(path, [asdict(o) for o in outcomes])
