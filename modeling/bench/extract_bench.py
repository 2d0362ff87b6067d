"""Throughput of ``scripts/extract_attention.py`` with 1, 2, ... processes under torchrun.

Each run extracts the same ``n`` lines (images of two sizes, distinct prompts) into a fresh
folder with the default spec on the chosen model (default: the tiny demo), ``--no-summary`` so
only the extraction is timed. Two numbers per process count: the run's own ``samples/s`` (lines
over the time of the extraction loop, model loading excluded: the slowest rank's loop) and the
end-to-end wall time of the torchrun command (start-up, loading, rendezvous included).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

__all__ = ["ExtractBench", "bench_extract", "format_table"]

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts",
                      "extract_attention.py")


@dataclass
class ExtractBench:
    procs: int
    lines: int
    samples_per_s: float  # the run's own rate (extraction loop)
    wall_s: float  # the whole torchrun command
    command: str


def _jobs(folder: str, n: int) -> str:
    from PIL import Image

    Image.new("RGB", (448, 336), (200, 40, 40)).save(os.path.join(folder, "a.png"))
    Image.new("RGB", (300, 400), (40, 40, 200)).save(os.path.join(folder, "b.png"))
    path = os.path.join(folder, "jobs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": "a.png" if i % 2 else "b.png", "prompt": f"Describe picture {i}.",
                                "id": f"b{i}"}) + "\n")
    return path


def bench_extract(n: int = 32, procs: Sequence[int] = (1, 2), max_new_tokens: int = 8, model: Optional[str] = None,
                  extra: Sequence[str] = (), threads: int = 1) -> List[ExtractBench]:
    """Run the extraction of ``n`` lines once per process count; raises RuntimeError when a run fails."""
    out: List[ExtractBench] = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        jobs = _jobs(tmp, n)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        for p in procs:
            dest = os.path.join(tmp, f"out{p}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p), SCRIPT,
                   jobs, "--out", dest, "--max-new-tokens", str(max_new_tokens), "--quiet", "--no-summary",
                   *(["--model", model] if model else []), *extra]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            m = re.search(r"(\d+) succeeded.*\(([\d.]+) samples/s\)", proc.stdout)
            if proc.returncode != 0 or not m or int(m.group(1)) != n:
                raise RuntimeError(f"{p} process(es): the run failed (exit {proc.returncode}): "
                                   f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
            shown = " ".join(["OMP_NUM_THREADS=" + str(threads)] + [os.path.basename(c) if c == sys.executable else c
                                                                    for c in cmd])
            out.append(ExtractBench(p, n, float(m.group(2)), wall, shown.replace(tmp, "$TMP")))
    return out


def format_table(rows: Sequence[ExtractBench]) -> str:
    """The runs side by side, with the speed-up over the first."""
    base = rows[0]
    lines = [f"{'processes':>9}  {'samples/s':>9}  {'speed-up':>8}  {'wall s':>7}  {'wall speed-up':>13}"]
    for r in rows:
        lines.append(f"{r.procs:>9}  {r.samples_per_s:>9.2f}  {r.samples_per_s / base.samples_per_s:>7.2f}x  "
                     f"{r.wall_s:>7.1f}  {base.wall_s / r.wall_s:>12.2f}x")
    return "\n".join(lines)
