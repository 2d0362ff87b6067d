"""SigLIP vision tower, NaViT-style (variable resolution), as MiniCPM-V-2.6 uses it.

Same config, module tree and state-dict keys as upstream's ``modeling_navit_siglip.py``.
Changed: attention goes through :func:`attention.attend` (SDPA by default, upstream forced
eager) and every layer's attention is a capture hook point ``vision.layers.{i}.attn``
(a capture is attached from outside, see ``capture.attached``).
"""
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .attention import AttnMask, attend, checkpoint_call, hook_name


# fork: modeling_navit_siglip.SiglipVisionConfig (from_pretrained removed)
class SiglipVisionConfig(PretrainedConfig):
    """SigLIP vision configuration (``vision_config`` of a MiniCPM-V checkpoint)."""

    model_type = "siglip_vision_model"

    def __init__(
        self,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act


class SiglipVisionEmbeddings(nn.Module):
    """Patch embedding + learned position embedding looked up by bucketed fractional coordinates."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size, padding="valid")
        self.num_patches_per_side = self.image_size // self.patch_size
        self.num_patches = self.num_patches_per_side ** 2
        self.num_positions = self.num_patches
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    # fork: modeling_navit_siglip.SiglipVisionEmbeddings
    def position_ids(self, patch_attention_mask: torch.Tensor, tgt_sizes: Optional[torch.Tensor]) -> torch.Tensor:
        """[N, P] position ids: a slice of h x w patches maps its grid onto the 70 x 70 table."""
        n, p = patch_attention_mask.shape[0], patch_attention_mask[0].numel()
        side = self.num_patches_per_side
        bounds = torch.arange(1 / side, 1.0, 1 / side)
        ids = torch.zeros((n, p), dtype=torch.long)
        for i in range(n):
            valid = patch_attention_mask[i].reshape(-1).cpu()
            if tgt_sizes is not None:
                h, w = int(tgt_sizes[i][0]), int(tgt_sizes[i][1])
            else:
                h, w = int(patch_attention_mask[i, :, 0].sum()), int(patch_attention_mask[i, 0].sum())
            rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), bounds, right=True)
            cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), bounds, right=True)
            ids[i][valid] = (rows[:, None] * side + cols).flatten()
        return ids

    def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor,
                tgt_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = patches.flatten(2).transpose(1, 2)  # [N, P, D]
        # fork: modeling_navit_siglip.SiglipVisionEmbeddings -- ids on the patches' device (the table may be offloaded)
        ids = self.position_ids(patch_attention_mask, tgt_sizes).to(patches.device)
        return embeddings + self.position_embedding(ids)


class SiglipAttention(nn.Module):
    """Multi-head self-attention over patches (hook point ``vision.layers.{i}.attn``)."""

    # fork: modeling_navit_siglip.SiglipAttention (SDPA kernel chosen by the model, capture hook point)
    attn_implementation = "sdpa"  # the model sets it from config._attn_implementation

    def __init__(self, config: SiglipVisionConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"vision hidden_size {self.embed_dim} is not divisible by num_attention_heads {self.num_heads}")
        self.scale = self.head_dim ** -0.5
        self.dropout = config.attention_dropout
        self.hook_name = hook_name("vision", layer_idx)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out, _ = attend(self, q, k, v, mask, self.scale, self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(b, n, self.embed_dim))


# fork: modeling_navit_siglip.SiglipVisionTransformer
class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


# fork: modeling_navit_siglip.SiglipVisionTransformer
class SiglipEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: SiglipVisionConfig, layer_idx: int = 0):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = SiglipAttention(config, layer_idx)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states, mask: AttnMask):
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


# fork: modeling_navit_siglip.SiglipVisionTransformer
class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([SiglipEncoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, mask: AttnMask, output_hidden_states=False) -> BaseModelOutput:
        states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = checkpoint_call(self, layer, hidden_states, mask)
            else:
                hidden_states = layer(hidden_states, mask)
            if output_hidden_states:
                states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)


# fork: modeling_navit_siglip.SiglipVisionTransformer
class SiglipVisionTransformer(nn.Module):
    """Embeddings -> encoder -> post_layernorm, on a padded batch of slices.

    ``patch_attention_mask`` [N, 1, P] marks the real patches of each slice; padded
    keys are masked out (additive mask) as upstream does.
    """

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size

    def forward(self, pixel_values, patch_attention_mask: Optional[torch.Tensor] = None,
                tgt_sizes: Optional[torch.Tensor] = None, output_hidden_states: bool = False):
        n = pixel_values.shape[0]
        if patch_attention_mask is None:
            patch_attention_mask = torch.ones(
                (n, pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size),
                dtype=torch.bool, device=pixel_values.device)
        hidden = self.embeddings(pixel_values, patch_attention_mask, tgt_sizes)
        valid = patch_attention_mask.reshape(n, -1).to(hidden.device)
        mask = AttnMask(key_valid=None if bool(valid.all()) else valid, query_valid=valid)
        enc = self.encoder(hidden, mask, output_hidden_states)
        last = self.post_layernorm(enc.last_hidden_state)
        return BaseModelOutputWithPooling(last_hidden_state=last, hidden_states=enc.hidden_states)
