"""Perceiver resampler of MiniCPM-V-2.6: Q learned queries cross-attend to one slice's patches.

Same module tree and state-dict keys as upstream's ``resampler.py`` (``query``, ``kv_proj``,
``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj``, ``ln_q``, ``ln_kv``,
``ln_post``, ``proj``). Changed: no ``from torch.nn.functional import *`` (breaks on torch
2.13), the attention is the fork's (:func:`attention.attend`: SDPA + capture hook
``resampler.attn``, per-head weights instead of upstream's discarded head mean), and the 2-D sin-cos table is computed
per call instead of living in a non-persistent buffer (which transformers 5 re-creates
uninitialised when loading).
"""

import torch
from torch import nn

from .attention import AttnMask, attend, hook_name


# fork: resampler.get_2d_sincos_pos_embed
def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[..., dim]: sin(pos * omega) then cos(pos * omega), omega_k = 1 / 10000^(k / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = pos.to(torch.float32)[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def get_2d_sincos_pos_embed(embed_dim: int, size) -> torch.Tensor:
    """[h, w, embed_dim] table; the first half encodes the column (w), the second the row (h)."""
    if embed_dim % 4:
        raise ValueError(f"resampler embed_dim must be divisible by 4, got {embed_dim}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    return torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=-1)


# fork: resampler.MultiheadAttention (replaced by ResamplerAttention)
class ResamplerAttention(nn.Module):
    """Multi-head cross-attention with upstream's parameters (packed ``in_proj``, ``out_proj``)."""

    hook_name = hook_name("resampler")
    attn_implementation = "sdpa"  # set by the model from config._attn_implementation

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"resampler embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, mask: AttnMask) -> torch.Tensor:
        """query [N, Q, D], key/value [N, P, D] -> [N, Q, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        n = key.shape[0]

        def heads(x):
            return x.view(n, -1, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(nn.functional.linear(query, w_q, b_q))
        k = heads(nn.functional.linear(key, w_k, b_k))
        v = heads(nn.functional.linear(value, w_v, b_v))
        out, _ = attend(self, q, k, v, mask, self.head_dim ** -0.5, 0.0)
        return self.out_proj(out.reshape(n, -1, self.embed_dim))


# fork: resampler.Resampler
class Resampler(nn.Module):
    """2-D perceiver resampler: one cross-attention layer from learned queries, 2-D sin-cos keys."""

    def __init__(self, num_queries, embed_dim, num_heads, kv_dim=None, adaptive=False, max_size=(70, 70)):
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.adaptive = adaptive
        self.max_size = max_size
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim not in (None, embed_dim) else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim ** -0.5) * torch.randn(embed_dim, embed_dim))
        self._pos_cache = {}

    def pos_embed(self, tgt_sizes: torch.Tensor, patches: int, device, dtype) -> torch.Tensor:
        """[N, P, D] position embedding of each slice's patch grid, zero past h*w."""
        out = torch.zeros((len(tgt_sizes), patches, self.embed_dim), device=device, dtype=dtype)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            key = (h, w, device, dtype)
            if key not in self._pos_cache:
                self._pos_cache[key] = get_2d_sincos_pos_embed(self.embed_dim, (h, w)).reshape(h * w, -1).to(device, dtype)
            out[i, : h * w] = self._pos_cache[key]
        return out

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x [N, P, Dv] vision features of N slices (padded), tgt_sizes [N, 2] -> [N, Q, D]."""
        if x.shape[0] != tgt_sizes.shape[0]:
            raise ValueError(f"resampler: {x.shape[0]} slices of features but {tgt_sizes.shape[0]} tgt_sizes")
        n, p = x.shape[:2]
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(x.device)
        key_valid = torch.arange(p, device=x.device)[None, :] < lengths[:, None]
        pos = self.pos_embed(tgt_sizes, p, x.device, x.dtype)
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query)[None].expand(n, -1, -1)
        mask = AttnMask(key_valid=None if bool(key_valid.all()) else key_valid)
        out = self.attn(q, x + pos, x, mask)
        return self.ln_post(out) @ self.proj
