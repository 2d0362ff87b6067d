"""Attention capture: the selected probabilities recomputed from the same q and k.

A capture is attached to the model's attention modules for one call and one context
(:func:`attached`, a context manager; threads sharing a model never see each other's), like transformers' ``_can_record_outputs`` or TransformerLens hook points;
no forward signature carries it. Each attention module has a hook name
(:func:`hook_name`: ``vision.layers.{i}.attn``, ``resampler.attn``, ``llm.layers.{i}.attn``)
and runs :func:`attention.attend`, which offers q and k to the attached capture, then runs
the kernel (SDPA by default).

* The output always comes from the chosen kernel; the capture never changes it.
* When the attached :class:`AttentionCapture` selects the hook name, the softmax
  probabilities of the selected query rows and heads are recomputed from the same ``q``
  and ``k`` with the same mask and scaling, in chunks of query rows, reduced over heads on
  the fly, gathered to the selected key columns, cast and moved (e.g. to the CPU) chunk by
  chunk. No [H, L, L] block is ever held unless asked for.
* With nothing attached nothing here runs: capture costs nothing unless asked.
"""
from __future__ import annotations

import math
import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import STAGES, AttnMask, attach, attached_to, hook_name, hook_sort_key, parse_hook_name  # noqa: F401  (re-exported)
from .kernel_check import MODES as KERNEL_CHECK_MODES, fused_probs_ok, triton_mode

#: The token-role vocabulary of every LLM position (records, capture columns, maps).
ROLES = ("text", "image", "special")
ROLE_CODES = {role: code for code, role in enumerate(ROLES)}  # int8 codes in role tensors
REDUCTIONS = ("none", "mean", "max")
ROW_MODES = ("all", "last", "generated")
COL_MODES = ("all", "image", "text", "special")
# fp32 scores per recompute chunk: large on GPUs (few kernel launches), cache-sized on CPUs
# (measured on a 2-core CPU at 2k tokens: head-mean maps 2.6x SDPA's time with 2**20, 6.2x with 2**26)
GPU_CHUNK_ELEMENTS = 1 << 26  # 256 MiB
CPU_CHUNK_ELEMENTS = 1 << 20  # 4 MiB


def chunk_elements_for(spec, device) -> int:
    """The spec's chunk size, or the default for ``device`` (CUDA or not)."""
    if spec.chunk_elements is not None:
        return int(spec.chunk_elements)
    return GPU_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS


class CaptureError(ValueError):
    """An attention capture selection that cannot be honoured."""


def special_token_ids(tokenizer) -> set:
    """Ids whose role is "special" (``<unk>`` excluded: it is the image placeholder)."""
    return set(getattr(tokenizer, "all_special_ids", []) or []) - {getattr(tokenizer, "unk_token_id", None)}


def token_roles(input_ids: torch.Tensor, image_bound=None, valid: Optional[torch.Tensor] = None,
                special_ids=()) -> torch.Tensor:
    """[B, L] int8 role codes (``ROLE_CODES``): image inside ``image_bound``, special for
    ``special_ids`` and invalid (padding) positions, text otherwise."""
    input_ids = torch.as_tensor(input_ids).cpu()
    roles = torch.full(input_ids.shape, ROLE_CODES["text"], dtype=torch.int8)
    if special_ids:
        roles[torch.isin(input_ids, torch.tensor(sorted(special_ids), dtype=input_ids.dtype))] = ROLE_CODES["special"]
    if valid is not None:
        roles[torch.as_tensor(valid).cpu() == 0] = ROLE_CODES["special"]
    for i, bound in enumerate(image_bound or []):
        for a, b in (bound.tolist() if isinstance(bound, torch.Tensor) else bound):
            roles[i, int(a):int(b)] = ROLE_CODES["image"]
    return roles


# --------------------------------------------------------------------------------------
# small shared vocabularies: dtypes by name, index lists from the command line
# --------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(value, what: str = "dtype", allow_auto: bool = True) -> Optional[torch.dtype]:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"``, ...) or a dtype; None/"auto" -> None."""
    if value is None or (allow_auto and value == "auto"):
        return None
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"{what}={value!r}: expected one of {sorted(DTYPES)}" + (" or 'auto'" if allow_auto else ""))
    return DTYPES[value]


#: the most indices one ``parse_index_list`` selection may name (far above any model's layers or heads)
MAX_INDEX_LIST = 1 << 16


def parse_index_list(text: Optional[str], what: str) -> Optional[List[int]]:
    """``"0,3,5"``, ``"2:6"`` (end exclusive), ``"-1"``; ``"all"``/""/None -> None (everything)."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":")
                span = range(int(a), int(b))
            else:
                span = range(int(part), int(part) + 1)
        except ValueError:
            raise ValueError(f"--{what}: cannot read {part!r}; use e.g. '0,3,5', '2:6' or 'all'") from None
        if len(out) + len(span) > MAX_INDEX_LIST:  # checked before expanding: '0:3000000000' is not a list
            raise ValueError(f"--{what}: {text!r} selects more than {MAX_INDEX_LIST:,} indices; no model has that "
                             f"many layers or heads")
        out.extend(span)
    if not out:
        raise ValueError(f"--{what}: empty selection {text!r}")
    return out


class CaptureTooLarge(CaptureError, MemoryError):
    """The estimated capture does not fit in the memory available; raised before allocating."""


# --------------------------------------------------------------------------------------
# the capture spec
# --------------------------------------------------------------------------------------
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
               "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value, what: str = "max_bytes") -> Optional[int]:
    """An int number of bytes, or a string like ``"1.5GiB"``/``"800MB"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise CaptureError(f"capture {what}={value!r}: expected a number of bytes or a string like '2GiB'")
    if isinstance(value, numbers.Integral) and value >= 0:
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value >= 0:  # 1e400 (JSON) is inf: refused below
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            size = float(number) * _BYTE_UNITS[unit] if unit in _BYTE_UNITS else -1.0
            if math.isfinite(size) and size >= 0:
                return int(size)
        except ValueError:
            pass
    raise CaptureError(f"capture {what}={value!r}: expected a non-negative number of bytes (finite) or a string like "
                       f"'2GiB', '500MB' (units {sorted(u for u in _BYTE_UNITS if u)})")


def _positive_int(value, what: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise CaptureError(f"capture {what}={value!r}: expected a positive integer")
    return value


def _id_list(value, what: str) -> Optional[List[int]]:
    """None (all), an int, or a non-empty list/tuple/range of ints (no strings, bools, nesting)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (list, tuple, range)) and len(value) > 0 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    raise CaptureError(f"capture {what}={value!r}: expected None (all), an int or a non-empty list of ints")


def _selection(value, what: str, modes: Sequence[str], allow_range: bool = False):
    """A mode name, or positions: an int, a non-empty list of ints (or a range / slice for rows)."""
    if isinstance(value, str):
        if value not in modes:
            raise CaptureError(f"capture {what}={value!r}: valid are {list(modes)} or a list of positions")
        return value
    if allow_range and isinstance(value, slice):
        if value.step not in (None, 1) or value.start is None or value.stop is None:
            raise CaptureError(f"capture {what} as a slice needs explicit start and stop and step 1")
        value = range(value.start, value.stop)
    if allow_range and isinstance(value, range):  # kept as a range: checked against the sequence by its ends
        if len(value) == 0:
            raise CaptureError(f"capture {what}={value!r}: an empty range selects nothing")
        return value
    try:
        return _id_list(value, what)
    except CaptureError:
        raise CaptureError(f"capture {what}={value!r}: expected {list(modes)}, an int or a non-empty list of ints"
                           + (" or a range" if allow_range else "")) from None


def _check_device(value):
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise CaptureError(f"capture device={value!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaptureError(f"capture device={value!r}: CUDA is not available on this machine (use 'cpu')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CaptureError(f"capture device={value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class CaptureSpec:
    """What to capture. ``output_attentions=True`` means ``CaptureSpec()`` (everything).

    stages: any of ``"llm"``, ``"vision"``, ``"resampler"``.
    layers: None (all), a list of layer ids (negative ids count from the end; applied to
        llm and vision), or ``{"llm": [...], "vision": [...]}``.
    heads: None (all), a list of head ids, or ``{"llm": [...], "vision": [...], "resampler": [...]}``.
    rows (LLM query rows): ``"all"``, ``"last"`` (last prompt token), ``"generated"`` (the
        rows that produced each new token, generate/chat only), an int, a list of
        positions, or a ``range``/``slice`` (kept as a range, checked by its ends). Negative
        positions count from the prompt end; in ``generate`` / ``chat`` non-negative ones count
        from each sample's first real token (so a sample selects the same rows in any batch), in
        ``forward`` they are positions of the left-padded batch.
    cols (LLM key columns): ``"all"``, ``"image"``, ``"text"`` (prompt text and generated
        tokens), ``"special"``, or a list of positions (numbered as ``rows``).
    reduce: head reduction ``"none"``, ``"mean"`` or ``"max"`` (over the selected heads).
    dtype: stored dtype (None: the model's compute dtype, like eager attention).
    device: where to put captured tensors (None: where they are computed; ``"cpu"``
        offloads chunk by chunk).
    chunk_elements: fp32 score elements per recompute chunk (bounds the workspace; None:
        2**26 on CUDA, 2**20 elsewhere).
    max_bytes: refuse selections whose estimate exceeds this (None: the free memory of
        the target device).
    kernel_check: what a failed self-check of the fused Triton kernel does (``kernel_check.py``):
        ``"warn"`` (one warning, then the torch path), ``"error"`` (raise) or ``"off"`` (no
        check); None: ``$MINICPMV_ATTN_KERNEL_CHECK``, else ``"warn"``.
    """

    stages: Sequence[str] = STAGES
    layers: Any = None
    heads: Any = None
    rows: Any = "all"
    cols: Any = "all"
    reduce: str = "none"
    dtype: Any = None
    device: Any = None
    chunk_elements: Optional[int] = None
    max_bytes: Optional[int] = None
    kernel_check: Optional[str] = None

    def __post_init__(self):
        """Validate every field with its type; refuse with the valid values (never guess)."""
        stages = (self.stages,) if isinstance(self.stages, str) else self.stages
        if not isinstance(stages, (list, tuple)) or not stages or [s for s in stages if s not in STAGES]:
            raise CaptureError(f"capture stages={self.stages!r}: valid stages are {list(STAGES)} (a non-empty list)")
        self.stages = tuple(stages)
        self.reduce = "none" if self.reduce is None else self.reduce
        if self.reduce not in REDUCTIONS:
            raise CaptureError(f"capture reduce={self.reduce!r}: valid values are {list(REDUCTIONS)}")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise CaptureError(f"capture dtype={self.dtype!r}: valid values are {sorted(DTYPES)} or a torch.dtype")
            self.dtype = DTYPES[self.dtype]
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise CaptureError(f"capture dtype={self.dtype!r}: must be a floating torch dtype")
        self.device = _check_device(self.device)
        self.rows = _selection(self.rows, "rows", ROW_MODES, allow_range=True)
        self.cols = _selection(self.cols, "cols", COL_MODES)
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if isinstance(value, dict):
                bad = [k for k in value if k not in STAGES]
                if bad:
                    raise CaptureError(f"capture {name}: unknown stages {bad}; valid are {list(STAGES)}")
                setattr(self, name, {k: _id_list(v, f"{name}[{k!r}]") for k, v in value.items()})
            else:
                setattr(self, name, _id_list(value, name))
        self.chunk_elements = _positive_int(self.chunk_elements, "chunk_elements")
        self.max_bytes = parse_bytes(self.max_bytes, "max_bytes")
        if self.kernel_check is not None and self.kernel_check not in KERNEL_CHECK_MODES:
            raise CaptureError(f"capture kernel_check={self.kernel_check!r}: valid values are "
                               f"{list(KERNEL_CHECK_MODES)} or None (the environment's, else 'warn')")

    @classmethod
    def from_flag(cls, output_attentions) -> Optional["CaptureSpec"]:
        """``False``/``None`` -> None, ``True`` -> everything, a dict or spec -> that spec."""
        if output_attentions is None or output_attentions is False:
            return None
        if output_attentions is True:
            return cls()
        if isinstance(output_attentions, CaptureSpec):
            return output_attentions
        if isinstance(output_attentions, dict):
            try:
                return cls(**output_attentions)
            except TypeError as e:
                valid = [f for f in cls.__dataclass_fields__]
                raise CaptureError(f"capture spec {output_attentions!r}: {e}; valid keys are {valid}") from None
        raise CaptureError(
            f"output_attentions={output_attentions!r}: expected True/False, a dict or a CaptureSpec"
        )

    def _per_stage(self, value, stage):
        if isinstance(value, dict):
            return value.get(stage)
        if stage == "resampler" and value is not None and value is self.layers:
            return None
        return value

    def layer_ids(self, stage: str, n_layers: int) -> List[int]:
        if stage not in self.stages:
            return []
        sel = self._per_stage(self.layers, stage)
        if stage == "resampler":
            return [0]
        if sel is None:
            return list(range(n_layers))
        out = []
        for i in sel:
            j = int(i) + n_layers if int(i) < 0 else int(i)
            if not 0 <= j < n_layers:
                raise CaptureError(f"capture layers: {stage} layer {i} is out of range; {stage} has layers 0..{n_layers - 1}")
            out.append(j)
        return sorted(set(out))

    def head_ids(self, stage: str, n_heads: int) -> Optional[List[int]]:
        sel = self._per_stage(self.heads, stage)
        if sel is None:
            return None
        out = []
        for h in sel:
            j = int(h) + n_heads if int(h) < 0 else int(h)
            if not 0 <= j < n_heads:
                raise CaptureError(f"capture heads: {stage} head {h} is out of range; {stage} has heads 0..{n_heads - 1}")
            out.append(j)
        return sorted(set(out))

    def describe(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["stages"] = list(self.stages)
        d["rows"] = self.rows if isinstance(self.rows, str) else list(self.rows)
        d["dtype"] = str(self.dtype) if self.dtype is not None else None
        d["device"] = str(self.device) if self.device is not None else None
        return d


# --------------------------------------------------------------------------------------
# the recorder
# --------------------------------------------------------------------------------------
@dataclass
class _Piece:
    tensor: torch.Tensor
    rows: Optional[torch.Tensor]  # absolute query positions (LLM) or None
    cols: Optional[torch.Tensor]  # [B, K] key positions or None (all)
    col_valid: Optional[torch.Tensor] = None  # [B, K] bool


class AttentionCapture:
    """Collects the selected attention probabilities of one forward / generate call.

    Created by the model from a :class:`CaptureSpec`; attention modules call
    :meth:`wants` and :meth:`capture` through :func:`attention.attend` while attached (:func:`attached`).
    """

    def __init__(self, spec: CaptureSpec, n_layers: Dict[str, int], n_heads: Dict[str, int]):
        self.spec = spec
        self.n_heads = dict(n_heads)
        self.layers = {s: set(spec.layer_ids(s, n_layers.get(s, 1))) for s in STAGES}
        self.heads = {s: spec.head_ids(s, n_heads[s]) for s in spec.stages if s in n_heads}
        self.pieces: Dict[str, List[_Piece]] = {}
        self.frozen = False
        self.prompt_len: Optional[int] = None
        self.roles: Optional[torch.Tensor] = None  # [B, L_prompt] int8: 0 text, 1 image, 2 special
        self.generating = False
        self.offsets: Optional[List[int]] = None  # per sample: where its non-negative spec positions start

    @classmethod
    def start(cls, spec: CaptureSpec, dims: Dict[str, Any], batch: int, prompt_len: int, new_tokens: int = 0,
              n_slices: int = 0, patches: int = 0, image_tokens: int = 0, key_len: Optional[int] = None,
              compute_dtype=torch.float32, device="cpu") -> "AttentionCapture":
        """The one way a model starts a capture: validate the selection against the model's
        ``dims`` (``{"layers": {stage: n}, "heads": {stage: n}, "query_num": Q}``), estimate
        its memory and refuse what cannot fit (:class:`CaptureTooLarge`) before anything runs."""
        capture = cls(spec, dims["layers"], dims["heads"])
        est = estimate_bytes(spec, dims, batch, prompt_len, new_tokens, n_slices, patches, image_tokens,
                             compute_dtype, key_len=key_len, device=device)
        check_fits(spec, est, torch.device(device))
        capture.estimate = est
        return capture

    # -- what is wanted -------------------------------------------------------------------
    def wants(self, name: str) -> bool:
        stage, layer = parse_hook_name(name)
        return layer in self.layers.get(stage, ())

    def begin_llm(self, prompt_len: int, roles: Optional[torch.Tensor] = None, generating: bool = False,
                  positions: Optional[int] = None, offsets: Optional[Sequence[int]] = None):
        """Start the LLM part: ``prompt_len`` prompt positions (negative rows count from its end),
        int8 ``roles`` [B, L], and ``positions``, how many positions this call will feed in all
        (generate: prompt + new tokens - 1, the last token is never fed). Rows and columns that
        can never be fed are refused here, before anything runs.

        ``offsets`` (generate, and chat's replay: each sample's left padding, :func:`sample_offsets`):
        non-negative spec rows and columns count from each sample's first real token, as in a
        run of that sample alone. The batch tensor then holds the union of the samples' rows
        (batch positions in ``rows``; ``sample_rows`` says which are each sample's) and each
        sample's own columns. Without offsets positions are batch positions (forward)."""
        self.prompt_len = int(prompt_len)
        self.roles = roles
        self.generating = generating
        self.offsets = None if offsets is None else [int(o) for o in offsets]
        if "llm" not in self.spec.stages:
            return
        if self.spec.rows == "generated" and not generating:
            raise CaptureError("capture rows='generated' needs generate() or chat(); use 'last', 'all' or positions in forward")
        P = self.prompt_len
        limit = positions if positions is not None else (None if generating else P)
        if limit is not None and self.offsets:
            limit -= min(self.offsets)  # the most positions any sample feeds, in its own numbering
        where = (f"the {limit} positions this call feeds" if generating else f"the sequence of {limit} positions") \
            if limit is not None else "the sequence"
        rows = self.spec.rows
        if isinstance(rows, range):  # by its ends: range(0, 10**9) is never expanded before this check
            rows = sorted({rows[0], rows[-1]})
        if not isinstance(rows, str):
            bad = [r for r in rows if r < -P or (limit is not None and r >= limit)]
            if bad:
                top = f"..{limit - 1}" if limit is not None else "..."
                raise CaptureError(f"capture rows {bad} are outside {where} (valid: {-P}{top}; negative rows count "
                                   f"from the end of the {P}-token prompt)")
        if not isinstance(self.spec.cols, str):
            bad = [c for c in self.spec.cols if c < 0 or (limit is not None and c >= limit)]
            if bad:
                raise CaptureError(f"capture cols {bad} are outside {where} (valid: 0.."
                                   f"{'' if limit is None else limit - 1})")

    def _row_positions(self, q_offset: int, q_len: int, device) -> Optional[torch.Tensor]:
        """Absolute positions (within the current call's rows) that are selected, or None for all."""
        rows = self.spec.rows
        P = self.prompt_len if self.prompt_len is not None else q_offset + q_len
        pos = torch.arange(q_offset, q_offset + q_len, device=device)
        if rows == "all":
            return None
        if rows == "last":
            keep = pos == P - 1
        elif rows == "generated":
            keep = pos >= P - 1
        else:
            want = torch.tensor(sorted(self._wanted_rows(rows, P, self.offsets or [0])), device=device)
            keep = (pos[:, None] == want[None, :]).any(-1)
        return torch.nonzero(keep).flatten()

    def _col_index(self, batch: int, k_len: int, device):
        cols = self.spec.cols
        if cols == "all":
            return None, None
        if not isinstance(cols, str):
            offsets = self.offsets if self.offsets is not None else [0] * batch
            bad = [c for c in cols if c + min(offsets) >= k_len and not self.generating]
            if bad:
                raise CaptureError(f"capture cols {bad} are outside the {k_len} key positions")
            pos = torch.tensor(cols, device=device)[None] + torch.tensor(offsets, device=device)[:, None]
            return pos.clamp(max=k_len - 1), pos < k_len
        code = ROLE_CODES[cols]
        P = self.prompt_len or k_len
        roles = self.roles
        if roles is None:
            roles = torch.zeros((batch, P), dtype=torch.int8)
        roles = roles.to(device)
        member = roles[:, :min(P, k_len)] == code
        if k_len > P:  # generated tokens are text
            member = torch.cat([member, torch.full((batch, k_len - P), code == 0, device=device)], 1)
        counts = member.sum(1)
        K = int(counts.max()) if batch else 0
        if K == 0:
            hint = (" (forward does not know the tokenizer: pass special_token_ids=... or use chat/generate)"
                    if cols == "special" else "")
            raise CaptureError(f"capture cols={cols!r} selects no key column: this input has no {cols} tokens{hint}")
        order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)[:, :K]
        valid = torch.arange(K, device=device)[None] < counts[:, None]
        return order, valid

    @staticmethod
    def _wanted_rows(rows: Sequence[int], P: int, offsets: Sequence[int]) -> set:
        """Batch positions of a list of rows: negative ones from the end of the ``P``-token
        prompt, the others from each of ``offsets`` (a sample's first real token)."""
        return {r + P for r in rows if r < 0} | {r + o for r in rows if r >= 0 for o in offsets}

    # -- recording -----------------------------------------------------------------------
    def capture(self, name: str, module, query, key, scaling: float, mask: AttnMask):
        """Recompute and store the selection of ``softmax(q k^T * scaling + mask)``."""
        stage, _ = parse_hook_name(name)
        B, H, Lq, _ = query.shape
        Lk = key.shape[-2]
        n_rep = H // key.shape[1]
        heads = self.heads.get(stage)
        head_idx = torch.arange(H, device=query.device) if heads is None else torch.tensor(heads, device=query.device)
        row_sel = self._row_positions(mask.q_offset, Lq, query.device) if stage == "llm" else None
        if row_sel is not None and row_sel.numel() == 0:
            return
        col_idx, col_valid = self._col_index(B, Lk, query.device) if stage == "llm" else (None, None)
        q = query.index_select(1, head_idx)
        if row_sel is not None:
            q = q.index_select(2, row_sel)
        r_total = q.shape[2]
        out_dtype = self.spec.dtype or query.dtype
        dev = self.spec.device or query.device
        local_rows = row_sel if row_sel is not None else torch.arange(r_total, device=query.device)
        qv = None if mask.query_valid is None else mask.query_valid.to(query.device).index_select(1, local_rows)
        fused = self._fused_kernel(query, key)
        k = None if fused is not None else key.index_select(1, head_idx // n_rep).float()
        step = max(1, chunk_elements_for(self.spec, query.device) // max(B * (1 if fused else q.shape[1]) * Lk, 1))
        chunks = []
        for start in range(0, r_total, step):
            stop = min(r_total, start + step)
            rows = local_rows[start:stop]
            if fused is not None:  # GPU: scores, softmax and head reduction in one Triton kernel
                probs = fused(q[:, :, start:stop], key, scaling, rows, mask.q_offset, mask.causal, mask.key_valid,
                              self.spec.reduce, torch.float32, head_map=head_idx // n_rep,
                              row_valid=None if qv is None else qv[:, start:stop])
            else:
                probs = _torch_probs(q[:, :, start:stop], k, scaling, mask.allowed(Lq, Lk, rows=rows, device=query.device),
                                     None if qv is None else qv[:, start:stop], self.spec.reduce)
            if col_idx is not None:  # the same key columns for every head: gather after the reduction
                gather = col_idx[:, None, None, :].expand(B, probs.shape[1], probs.shape[2], -1)
                probs = probs.gather(-1, gather) * col_valid[:, None, None, :].to(probs.dtype)
            chunks.append(probs.to(out_dtype).to(dev))
        tensor = torch.cat(chunks, 2) if len(chunks) > 1 else chunks[0]
        rows_abs = None
        if stage == "llm":
            base = torch.arange(mask.q_offset, mask.q_offset + Lq)
            rows_abs = base if row_sel is None else base[row_sel.cpu()]
        self.add(name, _Piece(tensor, rows_abs, None if col_idx is None else col_idx.cpu(),
                              None if col_valid is None else col_valid.cpu()))

    def _fused_kernel(self, query, key):
        """The Triton kernel for head-reduced maps when nothing needs gradients, else None.

        On CUDA by default, on any device with ``MINICPMV_ATTN_TRITON=force``, never with
        ``=off`` (``kernel_check.triton_mode``). Before its first use per (device, dtype,
        reduce) in this process it must pass its self-check (``kernel_check.fused_probs_ok``);
        if it fails, the torch path is used (or the check raises, per ``spec.kernel_check``)."""
        if self.spec.reduce == "none" or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)):
            return None
        mode = triton_mode()
        if mode == "off" or (mode == "auto" and query.device.type != "cuda"):
            return None
        try:  # imported here: a test may have replaced the kernel (a deliberately wrong one)
            from .capture_triton import fused_reduced_probs as fused, is_available
        except ImportError:
            fused, is_available = None, None
        if fused is None or not is_available(query.device):
            if mode == "force":
                raise CaptureError(f"MINICPMV_ATTN_TRITON=force: the fused kernel cannot run on {query.device} "
                                   f"(it needs triton and CUDA, or TRITON_INTERPRET=1)")
            return None
        ok = fused_probs_ok(fused, torch_reduced_probs, query.device, query.dtype, self.spec.reduce,
                            self.spec.kernel_check)
        return fused if ok else None

    def add(self, name: str, piece: _Piece):
        if self.frozen:  # e.g. recomputation under gradient checkpointing
            return
        self.pieces.setdefault(name, []).append(piece)

    # -- results -------------------------------------------------------------------------
    def result(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, Any]]]:
        """``({name: tensor}, {name: index})`` with LLM pieces joined along the query rows."""
        self.frozen = True
        tensors, index = {}, {}
        for name in sorted(self.pieces, key=hook_sort_key):
            pieces = self.pieces[name]
            stage, _ = parse_hook_name(name)
            heads = self.heads.get(stage)
            info = {"heads": heads, "reduce": self.spec.reduce}
            if stage != "llm":
                tensors[name] = _join([p.tensor for p in pieces], 0, self.spec.device)
                info.update(rows=None, cols=None)
            else:
                rows = torch.cat([p.rows for p in pieces])
                tensors[name] = _join([p.tensor for p in pieces], 2, self.spec.device)
                full_rows = len(pieces) == 1 and rows.numel() == pieces[0].tensor.shape[2] and bool(
                    (rows == torch.arange(rows.numel())).all()) and self.spec.rows == "all"
                info["rows"] = None if full_rows else rows.tolist()
                if self.offsets is not None and not isinstance(self.spec.rows, str):
                    wanted = [self._wanted_rows(self.spec.rows, self.prompt_len, [o]) for o in self.offsets]
                    info["sample_rows"] = [[p for p in info["rows"] if p in w] for w in wanted]
                last = pieces[-1]
                if last.cols is None:
                    info["cols"] = None
                else:
                    info["cols"] = [[int(c) for c, v in zip(cr, vr) if v] for cr, vr in zip(last.cols, last.col_valid)]
            index[name] = info
        return tensors, index


def _torch_probs(q, k, scaling: float, allowed, row_valid, reduce: str) -> torch.Tensor:
    """The torch recompute of one chunk: ``softmax(q k^T * scaling)`` in fp32 where ``allowed``
    ([B|1, 1, r, Lk] bool or None), rows where ``row_valid`` ([B, r] or None) is False zeroed,
    reduced over heads. q: [B, H, r, D]; k: [B, H, Lk, D] float32, the key head of each q head."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scaling
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    if row_valid is not None:
        probs = probs * row_valid[:, None, :, None].to(probs.dtype)
    if reduce == "mean":
        return probs.mean(1, keepdim=True)
    if reduce == "max":
        return probs.amax(1, keepdim=True)
    return probs


def torch_reduced_probs(q, k, scaling: float, rows=None, q_offset: int = 0, causal: bool = False, key_valid=None,
                        reduce: str = "mean", out_dtype=None, head_map=None, row_valid=None) -> torch.Tensor:
    """Capture's torch path with the signature of ``capture_triton.fused_reduced_probs`` (the
    reference of the kernel's self-check): [B, 1, R, Lk] in ``out_dtype``."""
    B, H, R, _ = q.shape
    if head_map is None:
        head_map = torch.arange(H, device=q.device) // (H // k.shape[1])
    if rows is None:
        rows = torch.arange(R, device=q.device)
    allowed = AttnMask(key_valid=key_valid, causal=causal, q_offset=q_offset).allowed(R, k.shape[2], rows=rows,
                                                                                       device=q.device)
    probs = _torch_probs(q, k.index_select(1, head_map.long()).float(), scaling, allowed, row_valid, reduce)
    return probs.to(out_dtype or q.dtype)


def _join(parts: List[torch.Tensor], dim: int, device=None) -> torch.Tensor:
    """Concatenate along ``dim``, zero-padding the last axis to the widest part.

    One part is returned as is (no copy); several are copied into one preallocated
    tensor, so the peak is the result plus the parts, never a second padded copy.
    Parts computed on different devices (a model split by ``device_map``) are gathered on
    ``device`` (the spec's), else on the first part's device.
    """
    device = torch.device(device) if device is not None else parts[0].device
    if len(parts) == 1:
        return parts[0].to(device)
    width = max(p.shape[-1] for p in parts)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    shape[-1] = width
    out = parts[0].new_empty(shape, device=device)
    offset = 0
    for p in parts:
        n = p.shape[dim]
        target = out.narrow(dim, offset, n)
        target[..., : p.shape[-1]] = p.to(device)
        if p.shape[-1] < width:
            target[..., p.shape[-1]:] = 0
        offset += n
    return out


# --------------------------------------------------------------------------------------
# memory estimate
# --------------------------------------------------------------------------------------
def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def estimate_bytes(spec: CaptureSpec, dims: Dict[str, Any], batch: int, prompt_len: int, new_tokens: int = 0,
                   n_slices: int = 0, patches: int = 0, image_tokens: int = 0, compute_dtype=torch.float32,
                   key_len: Optional[int] = None, device="cpu") -> Dict[str, int]:
    """Bytes the selection will hold once captured, per stage, plus the recompute workspace.

    ``prompt_len`` query rows (plus ``new_tokens`` generated ones) over ``key_len`` keys
    (default: all rows, i.e. a square map).
    """
    if spec.dtype is None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise CaptureError(f"capture estimate: compute_dtype={compute_dtype!r} is not a floating dtype (q and k of a "
                           f"quantised model are in its compute dtype, not its storage dtype)")
    itemsize = torch.empty((), dtype=spec.dtype or compute_dtype).element_size()
    out = {}
    L_total = prompt_len + new_tokens
    K_total = key_len if key_len is not None else L_total
    for stage in STAGES:
        n_layers = len(spec.layer_ids(stage, dims["layers"][stage])) if stage in dims["layers"] else 0
        if not n_layers:
            continue
        heads = spec.head_ids(stage, dims["heads"][stage])
        h = 1 if spec.reduce != "none" else (len(heads) if heads is not None else dims["heads"][stage])
        if stage == "llm":
            rows = spec.rows
            if rows == "all":
                r = L_total
            elif rows == "last":
                r = 1
            elif rows == "generated":
                r = max(new_tokens, 1)
            else:
                r = min(len(rows), L_total)  # positions past the sequence are refused by begin_llm
            cols = spec.cols
            c = K_total if cols in ("all", "text") else (image_tokens if cols == "image" else
                                                         (K_total if cols == "special" else len(cols)))
            out[stage] = n_layers * batch * h * r * c * itemsize
        elif stage == "vision" and n_slices:
            out[stage] = n_layers * n_slices * h * patches * patches * itemsize
        elif stage == "resampler" and n_slices:
            out[stage] = n_slices * h * dims["query_num"] * patches * itemsize
    out["workspace"] = int(min(chunk_elements_for(spec, device), batch * dims["heads"]["llm"] * L_total * max(K_total, 1)) * 4 * 3)
    return out


def check_fits(spec: CaptureSpec, estimate: Dict[str, int], compute_device: torch.device) -> None:
    """Raise :class:`CaptureTooLarge` (before any allocation) if the estimate cannot fit."""
    stored = sum(v for k, v in estimate.items() if k != "workspace")
    target = spec.device or compute_device
    if spec.max_bytes is not None:
        limit, where = int(spec.max_bytes), "max_bytes"
    else:
        limit, where = _free_bytes(torch.device(target)), f"free memory on {target}"
    need = stored + (estimate.get("workspace", 0) if torch.device(target) == torch.device(compute_device) else 0)
    if need > limit:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in estimate.items())
        raise CaptureTooLarge(
            f"attention capture needs about {need / 2**30:.2f} GiB ({parts}) but {where} is "
            f"{limit / 2**30:.2f} GiB. Select fewer layers (layers=[...]), fewer rows (rows='last' or "
            f"'generated'), reduce over heads (reduce='mean'), a smaller dtype (dtype='bfloat16'), or "
            f"offload to the CPU (device='cpu')."
        )


# --------------------------------------------------------------------------------------
# attaching a capture to a model for one call
# --------------------------------------------------------------------------------------
@contextmanager
def attached(model: nn.Module, capture: Optional["AttentionCapture"]) -> Iterator[Optional["AttentionCapture"]]:
    """Attach ``capture`` to every attention module of ``model`` (those with a ``hook_name``)
    for the duration of the block, in the current context only (thread or asyncio task:
    other threads using the same model see nothing of it); what was attached before is in
    force again after. ``None`` attaches nothing (and costs nothing)."""
    if capture is None:
        yield None
        return
    with attach([(m, capture) for m in model.modules() if hasattr(m, "hook_name")]):
        yield capture


def attached_capture(model: nn.Module) -> Optional["AttentionCapture"]:
    """The capture attached (in this context) to ``model``'s first attention module, if any."""
    for m in model.modules():
        if hasattr(m, "hook_name"):
            return attached_to(m)
    return None


def left_padding(attention_mask) -> List[int]:
    """Left padding positions per sample of a [B, L] prompt mask (zeros, then ones).

    A mask with a zero after a one (right or inner padding) is refused: a sample's positions
    would not be one run, and records could not be numbered as the sample alone."""
    mask = torch.as_tensor(attention_mask).detach().cpu().bool()
    pads = []
    for b, row in enumerate(mask):
        n = int((~row).sum())
        if bool(row[:n].any()) or not bool(row[n:].all()):
            raise ValueError(f"attention_mask row {b}: expected left padding (zeros, then ones), got "
                             f"{row.int().tolist()[:40]}{' ...' if len(row) > 40 else ''}")
        pads.append(n)
    return pads


def sample_offsets(spec: CaptureSpec, attention_mask) -> Optional[List[int]]:
    """Each sample's left padding when ``spec`` selects LLM rows or columns by position (so they
    count from each sample's first real token, :meth:`AttentionCapture.begin_llm`), else None."""
    if attention_mask is None or (isinstance(spec.rows, str) and isinstance(spec.cols, str)):
        return None
    return left_padding(attention_mask)


def pad_llm_columns(tensors: Dict[str, torch.Tensor], index: Dict[str, Any], total: int) -> Dict[str, torch.Tensor]:
    """Zero-pad full-width LLM maps to ``total`` key columns (prompt + every new token)."""
    out = dict(tensors)
    for name, t in tensors.items():
        if parse_hook_name(name)[0] == "llm" and index[name].get("cols") is None and t.shape[-1] < total:
            out[name] = torch.nn.functional.pad(t, (0, total - t.shape[-1]))
    return out
