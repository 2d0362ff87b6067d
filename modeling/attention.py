"""The fork's attention: masks, the pure eager / SDPA / flash kernels, and one dispatcher.

Every attention module of the fork (SigLIP self-attention, resampler cross-attention,
Qwen2 self-attention) has a ``hook_name`` and calls :func:`attend`, which runs the kernel
chosen by name (``"sdpa"`` by default, ``"eager"``, ``"flash_attention_2"``), like
transformers' ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.

Capture is attached from outside (a context manager in ``capture.py`` attaches it to the
modules for one call, context-locally: see :func:`attach`), like TransformerLens hook points:
:func:`attend` offers the module's q and k to an attached recorder that wants its hook name,
then runs the kernel. The kernels never see a capture, and nothing here imports ``capture``.

Masks are :class:`AttnMask` descriptions (key validity, causality, query offset) rather
than dense [B, 1, Lq, Lk] tensors, so a capture can build the mask of one chunk of rows.
"""
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_check import flash_ok


STAGES = ("llm", "vision", "resampler")


# --------------------------------------------------------------------------------------
# attached captures: per context (thread, asyncio task), never a module attribute
# --------------------------------------------------------------------------------------
# {module: capture} of the calls running in this context. A module attribute would be shared by
# every thread using the model: two threads capturing at once would swap their maps, and a plain
# call in one thread would feed the capture another thread attached.
_ATTACHED: ContextVar[Optional[Dict[nn.Module, Any]]] = ContextVar("minicpmv_attn_attached", default=None)


def attached_to(module: nn.Module):
    """The capture attached to ``module`` in the current context (thread / task), or None."""
    table = _ATTACHED.get()
    return None if table is None else table.get(module)


@contextmanager
def attach(pairs: Iterable[Tuple[nn.Module, Any]]) -> Iterator[None]:
    """Attach each ``(module, capture)`` pair (None detaches) in the current context only,
    for the duration of the block; what was attached before is in force again after."""
    table = dict(_ATTACHED.get() or {})
    for module, capture in pairs:
        if capture is None:
            table.pop(module, None)
        else:
            table[module] = capture
    token = _ATTACHED.set(table)
    try:
        yield
    finally:
        _ATTACHED.reset(token)


# --------------------------------------------------------------------------------------
# hook names: the one place they are built and read (capture re-exports them)
# --------------------------------------------------------------------------------------
def hook_name(stage: str, layer: Optional[int] = None) -> str:
    """``llm.layers.{i}.attn``, ``vision.layers.{i}.attn`` or ``resampler.attn``."""
    if stage == "resampler":
        return "resampler.attn"
    if stage not in STAGES or layer is None:
        raise ValueError(f"hook_name({stage!r}, {layer!r}): expected a stage of {list(STAGES)} with a layer id")
    return f"{stage}.layers.{int(layer)}.attn"


def parse_hook_name(name: str) -> Tuple[str, int]:
    """``"llm.layers.3.attn"`` -> ("llm", 3); ``"resampler.attn"`` -> ("resampler", 0)."""
    if name == "resampler.attn":
        return "resampler", 0
    parts = name.split(".")
    if len(parts) != 4 or parts[0] not in ("llm", "vision") or parts[1] != "layers" or parts[3] != "attn" \
            or not parts[2].isdigit():
        raise ValueError(f"{name!r} is not a hook name (llm.layers.N.attn, vision.layers.N.attn, resampler.attn)")
    return parts[0], int(parts[2])


def hook_sort_key(name: str) -> Tuple[int, int]:
    """Stages in pipeline order (llm, vision, resampler), layers numerically."""
    stage, layer = parse_hook_name(name)
    return STAGES.index(stage), layer


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
@dataclass
class AttnMask:
    """What a query may attend to, without materialising [B, 1, Lq, Lk].

    key_valid: [B, Lk] bool (False = padding key) or None (all keys valid).
    causal: query row i (absolute position ``q_offset + i``) sees keys ``<= q_offset + i``.
    query_valid: [B, Lq] bool or None; captured rows of invalid (padding) queries are zero.
    """

    key_valid: Optional[torch.Tensor] = None
    causal: bool = False
    q_offset: int = 0
    query_valid: Optional[torch.Tensor] = None

    def allowed(self, q_len: int, k_len: int, rows: Optional[torch.Tensor] = None,
                device=None) -> Optional[torch.Tensor]:
        """Boolean [B|1, 1, r, Lk] of allowed (query, key) pairs, or None if all allowed."""
        out = None
        if self.causal and not (q_len == 1 and self.q_offset == k_len - 1 and rows is None):
            q_pos = (rows if rows is not None else torch.arange(q_len, device=device)) + self.q_offset
            k_pos = torch.arange(k_len, device=device)
            out = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, r, Lk]
        if self.key_valid is not None:
            kv = self.key_valid[:, None, None, :].to(device=device, dtype=torch.bool)
            out = kv if out is None else (out & kv)
        return out

    def additive(self, dtype: torch.dtype, q_len: int, k_len: int, rows=None, device=None):
        """Additive float mask (0 / dtype min) [B|1, 1, r, Lk], or None; built once per forward
        and shared by all layers (the AttnMask lives for one forward call)."""
        key = (dtype, q_len, k_len, str(device))
        cache = self.__dict__.setdefault("_additive_cache", {})
        if rows is None and key in cache:
            return cache[key]
        allowed = self.allowed(q_len, k_len, rows, device)
        if allowed is None:
            out = None
        else:
            zero = torch.zeros((), dtype=dtype, device=device)
            out = torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device))
        if rows is None:
            cache[key] = out
        return out

    def has_padding(self) -> bool:
        return self.key_valid is not None and not bool(self.key_valid.all())


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, L, D] -> [B, Hk * n_rep, L, D] (grouped-query attention)."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


# --------------------------------------------------------------------------------------
# the kernels: (module, q [B, H, Lq, D], k/v [B, Hk, Lk, D], mask, scaling, dropout)
#   -> (output [B, Lq, H, D], weights or None)
# --------------------------------------------------------------------------------------
def eager_attention_forward(module: nn.Module, query, key, value, mask: AttnMask, scaling: float,
                            dropout: float = 0.0):
    """softmax(q kᵀ·scale + mask) v, returning the per-head probabilities too (stock eager)."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    add = mask.additive(scores.dtype, query.shape[2], key.shape[2], device=query.device)
    if add is not None:
        scores = scores + add
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, v).transpose(1, 2).contiguous(), weights


def sdpa_attention_forward(module: nn.Module, query, key, value, mask: AttnMask, scaling: float,
                           dropout: float = 0.0):
    """torch's scaled_dot_product_attention; ``is_causal`` (no mask tensor) when nothing is padded."""
    n_rep = query.shape[1] // key.shape[1]
    q_len, k_len = query.shape[2], key.shape[2]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    is_causal = mask.causal and not mask.has_padding() and q_len == k_len
    add = None if is_causal else mask.additive(query.dtype, q_len, k_len, device=query.device)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=add, dropout_p=dropout, is_causal=is_causal,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# where flash-attention 2 runs (the self-check's tests widen these to CPU tensors and float32)
FLASH_DEVICE_TYPES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _sdpa_reference(query, key, value, causal: bool, scaling: float):
    """SDPA's output [B, L, H, D] for unmasked (or causal) [B, H, L, D] inputs: flash's self-check reference."""
    return sdpa_attention_forward(None, query, key, value, AttnMask(causal=causal), scaling)[0]


def flash_attention_forward(module: nn.Module, query, key, value, mask: AttnMask, scaling: float,
                            dropout: float = 0.0):
    """flash-attention 2 for unpadded half-precision CUDA batches; SDPA otherwise.

    Before its first use per (device, dtype, head dim) in a process, flash's output is compared
    with SDPA's on a small probe (``kernel_check.flash_ok``); if they differ, SDPA is used from
    then on (one warning), or ``MINICPMV_ATTN_KERNEL_CHECK=error`` raises."""
    usable = (query.device.type in FLASH_DEVICE_TYPES and query.dtype in FLASH_DTYPES
              and not mask.has_padding())
    causal = mask.causal and query.shape[2] > 1
    if usable and not (causal and query.shape[2] != key.shape[2]):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = None
        if flash_attn_func is not None and flash_ok(flash_attn_func, _sdpa_reference, query.device, query.dtype,
                                                    query.shape[-1]):
            out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                  dropout_p=dropout, softmax_scale=scaling, causal=causal)
            return out, None
    return sdpa_attention_forward(module, query, key, value, mask, scaling, dropout)


ATTENTION_FUNCTIONS: Dict[str, Callable] = {
    "sdpa": sdpa_attention_forward,
    "eager": eager_attention_forward,
    "flash_attention_2": flash_attention_forward,
}


def attend(module: nn.Module, query, key, value, mask: AttnMask, scaling: float, dropout: float = 0.0,
           implementation: Optional[str] = None):
    """The attention of every stage: offer q/k to an attached capture, then run the kernel.

    ``implementation`` defaults to the module's ``attn_implementation`` (``"sdpa"``); an
    unknown name runs SDPA. The capture is whatever object is attached as
    attached to the module in the current context (see ``capture.attached``); it is asked
    ``wants(hook_name)`` and given ``capture(hook_name, module, query, key, scaling, mask)``.
    """
    capture = attached_to(module)
    if capture is not None and capture.wants(module.hook_name):
        capture.capture(module.hook_name, module, query, key, scaling, mask)
    impl = implementation or getattr(module, "attn_implementation", None) or "sdpa"
    return ATTENTION_FUNCTIONS.get(impl, sdpa_attention_forward)(module, query, key, value, mask, scaling, dropout)


def set_attention_implementation(model: nn.Module, implementation: str) -> None:
    """Set the kernel of every attention module under ``model`` that chooses its own
    (the vision tower and the resampler; Qwen2 layers follow ``config._attn_implementation``)."""
    for module in model.modules():
        if hasattr(module, "hook_name") and "attn_implementation" in type(module).__dict__:
            module.attn_implementation = implementation


def checkpoint_call(owner: nn.Module, layer: nn.Module, *args):
    """Run ``layer(*args)`` under (non-reentrant) activation checkpointing.

    Whatever is attached to the layer's attention modules during the forward is attached
    again while the backward recomputes the layer (possibly in autograd's own thread, which
    does not share the forward's context), so the recomputation runs the same operations.
    """
    attached = [(m, attached_to(m)) for m in layer.modules() if hasattr(m, "hook_name")]

    def run(*inner):
        with attach(attached):
            return layer(*inner)

    fn = getattr(owner, "_gradient_checkpointing_func", None)
    if fn is None:
        from torch.utils.checkpoint import checkpoint

        fn = partial(checkpoint, use_reentrant=False)
    return fn(run, *args)
