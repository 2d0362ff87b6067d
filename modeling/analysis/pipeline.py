"""Shared plumbing of the command-line tools: load a model + processor, run one capture, and
read inputs / keep output folders safely (bounded image files, a folder lock, stale temporary
files, JSONL rows that survive a crash or a full disk).

Kept out of the CLI files so notebooks and other scripts can reuse it.
"""
import contextlib
import errno
import io
import json
import os
import re
import stat
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # not POSIX: FolderLock locks nothing
    fcntl = None

from ..attention_record import atomic_writer
from ..capture import resolve_dtype
from ..image_processing_minicpmv import ImageLoadError, ImageTooLargeError, load_image
from .sources import check_model_source

DEFAULT_PROMPT = "Describe this image."
DEFAULT_MAX_IMAGE_BYTES = 256 * 2 ** 20
# what attention_record.atomic_write_bytes leaves behind when killed: mkstemp's ".tmp-", 8 random
# characters, then the target's file name
STALE_TMP = re.compile(r"^\.tmp-[a-z0-9_]{8}.+\.(safetensors|json|jsonl|csv|parquet|html)$")
_write = os.write  # the one raw write of append_jsonl, so tests can inject a failing disk


class ToolError(Exception):
    """A problem the command-line tools report as ``error: <message>`` with exit status 2."""


def check_model_arg(model: Optional[str]) -> None:
    """Refuse a ``--model`` that names a local path which is not a folder, without loading anything.

    A value that exists must be a folder; one that does not exist is only accepted when it can be a
    hub id (``"org/name"``: relative, at most one ``/``, not starting with ``.`` or ``~``)."""
    if model is None:
        return
    if os.path.exists(model):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"--model {model}: is a file, expected a checkpoint folder or a hub id")
        return
    looks_local = (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
                   or os.sep != "/" and os.sep in model or model.endswith("/"))
    if looks_local:
        raise FileNotFoundError(f"--model {model}: no such folder; expected a checkpoint folder or a hub id "
                                f"like 'openbmb/MiniCPM-V-2_6'")


def load_model_and_processor(model: Optional[str] = None, device: Optional[str] = "auto", dtype: Optional[str] = None,
                             attn_implementation: str = "sdpa", fallback_dtype: Optional[str] = "auto",
                             progress: bool = True) -> Tuple[Any, Any, bool]:
    """(model, processor, is_demo). ``model`` None -> the embedded tiny demo (built locally, no download).

    ``device`` "auto"/None: CUDA, then MPS, then the CPU; ``dtype`` None: bfloat16 on CUDA, else
    ``fallback_dtype`` ("auto": the checkpoint's) -- see :mod:`.devices`. ``progress=False``: no
    "Loading weights" bar from transformers (``--quiet``)."""
    from transformers import AutoProcessor

    from ..demo import build_demo_checkpoint, default_demo_folder
    from ..modeling_minicpmv import MiniCPMV
    from ..processing_minicpmv import register_processing
    from .devices import pick

    device, dtype = pick(device, dtype, fallback_dtype)  # an unusable device fails before anything is built
    torch_dtype = resolve_dtype(dtype, "--dtype")  # and so does a bad dtype name
    check_model_arg(model)
    check_model_source(model)  # a hub id out of reach, a folder without tokenizer files: one line, at once
    register_processing()
    is_demo = model is None
    if is_demo:
        model = build_demo_checkpoint(default_demo_folder())
    kwargs = {"attn_implementation": attn_implementation}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    with transformers_progress(progress):
        net = MiniCPMV.from_pretrained(model, **kwargs).eval()
    if device != "cpu":
        net = net.to(device)
    processor = AutoProcessor.from_pretrained(model)
    net.processor = processor
    return net, processor, is_demo


@contextlib.contextmanager
def transformers_progress(enabled: bool):
    """transformers' own progress bars (e.g. "Loading weights") on or off for the block, restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def load_processor(model: Optional[str] = None):
    """(processor, config) of ``model`` (None: the tiny demo, built locally) without the weights:
    what the disk estimate needs before any model work."""
    from transformers import AutoConfig, AutoProcessor

    from ..demo import build_demo_checkpoint, default_demo_folder
    from ..processing_minicpmv import register_processing

    check_model_arg(model)
    check_model_source(model)
    register_processing()
    folder = build_demo_checkpoint(default_demo_folder()) if model is None else model
    return AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)


def capture_dims_from_config(config) -> Dict[str, Any]:
    """What ``MiniCPMV.capture_dims()`` returns, read from the config alone (no weights).

    Mirrors the model's construction: SigLIP drops its last layer with
    ``drop_vision_last_layer``; the resampler has ``hidden_size // 128`` heads. The extraction
    checks it against the loaded model (:func:`check_dims`)."""
    vc = config.vision_config
    n_vision = int(vc.num_hidden_layers) - (1 if getattr(config, "drop_vision_last_layer", False) else 0)
    return {"layers": {"llm": int(config.num_hidden_layers), "vision": n_vision, "resampler": 1},
            "heads": {"llm": int(config.num_attention_heads), "vision": int(vc.num_attention_heads),
                      "resampler": int(config.hidden_size) // 128},
            "query_num": int(config.query_num)}


class TokenProgress:
    """A transformers streamer that advances a tqdm bar per generated token."""

    def __init__(self, total: int, desc: str = "generating", disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=disable, leave=False)
        self.first = True

    def put(self, value):
        if self.first:  # the prompt (or nothing, with inputs_embeds) comes first
            self.first = False
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def capture_chat(model, processor, image, prompt: str, spec: Dict[str, Any], max_new_tokens: int = 8,
                 sampling: bool = False, progress: bool = True, min_new_tokens: int = 0):
    """Run ``chat`` on one image + prompt with ``spec``; returns (answer, AttentionRecord)."""
    msgs = [{"role": "user", "content": [image, prompt]}]
    streamer = TokenProgress(max_new_tokens, disable=not progress)
    try:
        answers, records = model.chat(None, [msgs], processor.tokenizer, processor=processor,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      sampling=sampling, num_beams=1,
                                      output_attentions=spec, streamer=streamer)
    finally:
        streamer.end()
    return answers[0], records[0]


# --------------------------------------------------------------------------------------
# input files and output folders that survive hostile inputs, crashes and a second run
# --------------------------------------------------------------------------------------
def open_image(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
    """Decode the image file ``path`` with :func:`load_image`, after checking (before reading a
    byte) that it is a regular file of at most ``max_bytes`` bytes: a FIFO, a device such as
    ``/dev/zero`` or a socket is refused (:class:`ImageLoadError`), never read; a larger file
    raises :class:`ImageTooLargeError`. Errors name the file."""
    what = f"image file {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return load_image(path)  # its message for a missing file
    except (OSError, ValueError) as e:
        raise ImageLoadError(f"{what} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        return load_image(path)  # its message for a directory
    _check_regular(st, what, max_bytes)
    buffer = io.BytesIO(read_regular_file(path, what, max_bytes))
    buffer.name = path  # load_image names the file in its errors
    return load_image(buffer)


def read_regular_file(path: str, what: str, max_bytes: int, flag: str = "--max-image-bytes") -> bytes:
    """The bytes of ``path``, refused (:class:`ImageLoadError` / :class:`ImageTooLargeError`, both
    ValueErrors naming ``what``) unless it is a regular file of at most ``max_bytes`` bytes: a FIFO
    is opened without blocking and never read, a device such as ``/dev/zero`` is never read, and a
    file that grows while being read stops at ``max_bytes + 1`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        with open(path, "rb", opener=lambda p, _: os.open(p, flags)) as f:
            _check_regular(os.fstat(f.fileno()), what, max_bytes, flag)  # the file opened is the file checked
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageLoadError(f"{what} cannot be read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{what} grew above the limit of {max_bytes:,} bytes while being read")
    return data


def _check_regular(st: os.stat_result, what: str, max_bytes: int, flag: str = "--max-image-bytes") -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise ImageLoadError(f"{what} cannot be read: expected a regular file, found {kind}")
    if st.st_size > max_bytes:
        raise ImageTooLargeError(f"{what} is {st.st_size:,} bytes, above the limit of {max_bytes:,} bytes "
                                 f"({flag})")


class FolderLock:
    """An exclusive ``flock`` on ``folder/name`` for as long as it is held (a context manager):
    a second holder is refused with :class:`ToolError` naming the folder, the holder's pid and the
    lock file. The lock dies with its process (even kill -9); the file stays (removing it races)."""

    def __init__(self, folder: str, name: str, holder: str = "run", flag: str = "--out"):
        self.folder, self.holder, self.flag = folder, holder, flag
        self.path = os.path.join(folder, name)
        self.fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        where = f"{self.flag} {self.folder}"
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ToolError(f"{where}: cannot create the lock file {self.path}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                try:
                    pid = os.read(fd, 32).decode("ascii", "replace").strip()
                finally:
                    os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ToolError(f"{where}: cannot lock {self.path}: {e.strerror or e}") from None
                who = f" (pid {pid})" if pid.isdigit() else ""
                raise ToolError(f"{where}: another {self.holder}{who} is writing to this folder (it holds "
                                f"{self.path}); wait for it to finish or use another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_tmp(folders: Sequence[str]) -> List[str]:
    """Remove the temporary files that killed atomic writes (``attention_record.atomic_write_*``)
    left directly in ``folders``: regular files named ``.tmp-XXXXXXXX<name>.safetensors|.json``
    only (nothing else, no sub-folder, no link). Call it holding the folder's lock. Returns them."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if STALE_TMP.match(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                    removed.append(entry.path)
                except FileNotFoundError:
                    pass
    return removed


def read_jsonl_rows(path: str, repair: bool = False, warn: Optional[Callable[[str], None]] = None,
                    what: str = "row") -> Iterator[dict]:
    """The JSON objects of the lines of ``path`` (none if it does not exist), read as a whole first.

    A line that is not a JSON object is skipped with a warning. A last line without its newline
    was cut by a crash: it is kept if it is a whole JSON object, else dropped, with a warning;
    with ``repair`` the file is fixed too (newline added, or the cut line removed)."""
    warn = warn or (lambda msg: None)
    if not os.path.isfile(path):
        return iter(())
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []

    def parse(raw: bytes) -> Optional[dict]:
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return row if isinstance(row, dict) else None

    for n, raw in enumerate(lines, 1):
        row = parse(raw)
        if row is not None:
            rows.append(row)
        elif raw.strip():
            warn(f"{path} line {n}: expected a JSON {what}, found unreadable text; ignored")
    if tail:
        row = parse(tail)
        if row is not None:
            rows.append(row)
        if repair:
            with open(path, "r+b") as f:
                if row is not None:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
        warn(f"{path} line {len(lines) + 1}: the last {what} was cut short by an interrupted write ({len(tail)} bytes, "
             f"no newline); " + ("it is complete, newline added" if row is not None else "dropped"))
    return iter(rows)


def append_jsonl(path: str, row: dict) -> None:
    """Append ``row`` as one line to ``path`` and make it durable before going on, all or nothing.

    The whole line goes to one ``write`` (repeated only after a short write) on an ``O_APPEND``
    descriptor, then fsync. If anything fails the file is cut back to its size before, so no later
    append glues onto half a row, and the error is raised; if even that fails (a crash), the next
    :func:`read_jsonl_rows` drops the cut line."""
    data = (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += _write(fd, data[written:])
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def merge_jsonl(target: str, parts: Sequence[str]) -> int:
    """Append the rows of the files ``parts`` to ``target`` in one atomic replace, then remove the parts.

    ``target`` is rewritten through a temporary file in its folder and a rename (readers see
    the old index or the new one, never half); a row of a part whose exact text is already in
    ``target`` (a merge that was killed after the rename, before removing its parts) is not
    added twice. Rows cut short are dropped as :func:`read_jsonl_rows` does. Returns the number
    of rows added. Call it holding the folder's lock."""
    import hashlib

    def digest(raw: bytes) -> bytes:
        return hashlib.blake2b(raw, digest_size=16).digest()

    parts = [p for p in parts if os.path.isfile(p)]
    if not parts:
        return 0
    seen = set()
    added = 0
    with atomic_writer(target) as out:
        if os.path.isfile(target):
            with open(target, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        raw += b"\n"
                    seen.add(digest(raw))
                    out.write(raw)
        for part in parts:
            for row in read_jsonl_rows(part):
                raw = (json.dumps(row, ensure_ascii=True) + "\n").encode("ascii")
                if digest(raw) not in seen:
                    seen.add(digest(raw))
                    out.write(raw)
                    added += 1
    for part in parts:
        os.unlink(part)
    return added


# --------------------------------------------------------------------------------------
# data parallel runs (torchrun / accelerate launch)
# --------------------------------------------------------------------------------------
class Ranks:
    """This process's place in a data-parallel launch, read from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    (what ``torchrun`` and ``accelerate launch`` set; absent: one process, rank 0 of 1).

    With more than one process, :meth:`start` joins the process group (gloo: only small
    control messages travel, so no GPU collectives are needed) and :meth:`gather` /
    :meth:`broadcast` exchange picklable objects; they also act as barriers."""

    def __init__(self, env: Optional[Dict[str, str]] = None):
        env = os.environ if env is None else env
        values = {}
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
            text = env.get(name, default)
            if text is None:
                continue
            try:
                values[name] = int(text)
            except ValueError:
                raise ToolError(f"environment variable {name}={text!r}: expected an integer (set by torchrun or "
                                f"accelerate launch)") from None
        self.rank, self.world = values["RANK"], values["WORLD_SIZE"]
        self.local_rank = values.get("LOCAL_RANK", self.rank)
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ToolError(f"environment variables RANK={self.rank}, WORLD_SIZE={self.world}: expected "
                            f"0 <= RANK < WORLD_SIZE")
        self._owns_group = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def start(self) -> "Ranks":
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self._owns_group = True
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise ToolError(f"torch.distributed has rank {dist.get_rank()} of {dist.get_world_size()} but the "
                                f"environment says RANK={self.rank}, WORLD_SIZE={self.world}")
        return self

    def stop(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def owns(self, key: Optional[str], line: int) -> bool:
        """Whether this rank handles a line: by its content key (SHA-256 hex) mod the world size,
        or by its line number when it has no key (a line that cannot be read)."""
        n = int(key[:15], 16) if key else int(line)
        return n % self.world == self.rank
