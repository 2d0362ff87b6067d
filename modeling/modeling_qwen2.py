"""Qwen2 decoder of MiniCPM-V-2.6, as the fork's own code so its attention can be captured.

Numerically the same model as transformers' ``Qwen2ForCausalLM`` (same module tree and
state-dict keys: ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``model.layers.N.mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm``, ``lm_head``), written against stable
transformers APIs only (``PreTrainedModel``, ``GenerationMixin``, ``DynamicCache``) so it
runs on transformers 4.4x and 5.x alike. Every attention is a capture hook point
``llm.layers.{i}.attn`` (a capture is attached from outside; see :mod:`capture`).
"""
import threading
import warnings
from typing import Optional, Tuple

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers import GenerationMixin
except ImportError:  # very old transformers: PreTrainedModel is the mixin
    GenerationMixin = object

from .attention import AttnMask, attend, checkpoint_call, parse_hook_name
from .capture import AttentionCapture, CaptureError, CaptureSpec, attached, attached_capture, hook_name
from .checkpoint import execution_device

#: The transformers releases whose generation loop the fork is verified on, and the torch
#: releases it is verified with (``scripts/sweep_transformers.py`` measures them and writes
#: docs/compatibility.md). setup.py reads the MIN / CAP lines and declares
#: ``transformers>=TRANSFORMERS_MIN,<TRANSFORMERS_CAP`` and ``torch>=TORCH_MIN,<TORCH_CAP``.
#: TORCH_MIN: what transformers 5.x needs (below torch 2.6 it turns its torch support off);
#: every torch minor from it up passed the sweep.
TRANSFORMERS_MIN = "4.40.0"
TRANSFORMERS_CAP = "5.26"
TRANSFORMERS_NEWEST_VERIFIED = "5.25.0"
TORCH_MIN = "2.6.0"
TORCH_CAP = "2.16"
TORCH_NEWEST_VERIFIED = "2.15.0"

#: What transformers calls the KV cache in model inputs and outputs: ``cache`` from 5.24 on,
#: ``past_key_values`` before. The fork accepts both names and writes the current one.
CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _release(version: str) -> Tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:3])


#: ``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on (``torch_dtype``
#: deprecated), ``torch_dtype`` before.
DTYPE_KWARG = "dtype" if _release(transformers.__version__) >= (4, 56) else "torch_dtype"


def dtype_kwargs(kwargs: dict) -> dict:
    """Accept ``dtype=`` or ``torch_dtype=`` on every transformers; pass the name it reads."""
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise ValueError("from_pretrained: pass dtype= (or the older torch_dtype=), not both")
    for name in ("dtype", "torch_dtype"):
        if name in kwargs:
            kwargs[DTYPE_KWARG] = kwargs.pop(name)
    return kwargs


def verified_range() -> str:
    return f"transformers {TRANSFORMERS_MIN} to {TRANSFORMERS_NEWEST_VERIFIED}"


def warn_if_unverified(version: str = transformers.__version__) -> bool:
    """Warn (once per process) when the installed transformers is outside the verified range."""
    if _release(TRANSFORMERS_MIN) <= _release(version) < _release(TRANSFORMERS_CAP):
        return False
    warnings.warn(f"minicpmv_attn: transformers {version} is outside the verified range ({verified_range()}); "
                  f"generation is checked at every step and raises GenerationInvariantError rather than return "
                  f"wrong tokens, but nothing else is verified. pip install 'transformers>={TRANSFORMERS_MIN},"
                  f"<{TRANSFORMERS_CAP}' for a verified release.", stacklevel=2)
    return True


warn_if_unverified()


#: the start of transformers' UserWarning that ``generate`` from ``inputs_embeds`` with a repetition_penalty
#: penalises only the generated tokens (a regex for warnings.filterwarnings)
REPETITION_PENALTY_NOTE = r"Passing `repetition_penalty` with `inputs_embeds`"


def take_cache(past_key_values, kwargs: dict):
    """The KV cache passed as ``past_key_values`` or (transformers >= 5.24) ``cache``; pops ``cache``."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as cache= (transformers >= 5.24) or past_key_values=, not both")
    return past_key_values if cache is None else cache


def output_cache(output):
    """The KV cache of a model output, under whichever name the installed transformers uses."""
    return getattr(output, CACHE_FIELD, None)


class GenerationInvariantError(RuntimeError):
    """transformers' generation loop broke an invariant the fork relies on.

    Raised during ``generate`` instead of returning wrong tokens or wrong attention: the
    message names the step, what was expected and got, the installed transformers and the
    verified range.
    """


class GenerationGuard:
    """Checks, at every decoding step of ``generate``, what the fork relies on from the loop.

    - the first step feeds the prompt (on an empty cache or the caller's prefix cache);
    - every later step feeds exactly the tokens that are not in the KV cache yet (one per
      step, unless an assisted mode proposes several) on the cache the previous step returned;
    - the attention mask covers cache + fed positions;
    - the cache grows by exactly what was fed;
    - captured LLM rows are the positions fed in that step (by the guard's own count, not the
      cache's) and advance by one per generated token;
    - at the end, one step per generated token.
    A step is the forward that follows the loop's ``prepare_inputs_for_generation`` (:meth:`arm`);
    other forwards of the same model inside ``generate`` (a verifier in a StoppingCriteria) are
    not checked, and a loop that skipped the preparation is caught by the final step count.
    Costs a few integer comparisons per step.
    """

    def __init__(self, one_token_steps: bool = True):
        self.one_token_steps = one_token_steps
        self.steps = 0
        self.cache_len: Optional[int] = None  # what the cache held after the previous step
        self._step = None
        self._armed = False  # set by prepare_inputs_for_generation: the next forward is the loop's step

    def arm(self) -> None:
        """The loop prepared a step's inputs: the next forward of the model is that step. Other
        forwards inside ``generate`` (a StoppingCriteria or logits processor that scores with the
        same model, e.g. a verifier) are not the loop's and are not checked."""
        self._armed = True

    def take_step(self) -> bool:
        """Whether this forward is the loop's step (consumes the arming of :meth:`arm`)."""
        armed, self._armed = self._armed, False
        return armed

    def fail(self, what: str):
        raise GenerationInvariantError(
            f"minicpmv_attn: generate step {self.steps}: {what}. The installed transformers "
            f"{transformers.__version__} drives generation in a way the fork is not verified for "
            f"(verified: {verified_range()}); install a verified release, e.g. "
            f"pip install 'transformers>={TRANSFORMERS_MIN},<{TRANSFORMERS_CAP}'")

    def before(self, past: int, n_fed: int, mask_len: Optional[int], uses_cache: bool, capture=None):
        """Called by the decoder before a step: ``past`` cached positions, ``n_fed`` new ones."""
        self.steps += 1
        if n_fed < 1:
            self.fail("fed no position")
        if self.steps > 1 and uses_cache:
            if past != self.cache_len:
                self.fail(f"the KV cache passed in holds {past} positions, expected the {self.cache_len} of the "
                          f"previous step (the cache was dropped or replaced)")
            if self.one_token_steps and n_fed != 1:
                self.fail(f"fed {n_fed} positions, expected 1 new token")
        if self.steps > 1 and not uses_cache and mask_len is not None and n_fed != mask_len:
            self.fail(f"without a KV cache a step must feed the whole sequence of {mask_len} positions, it fed {n_fed}")
        if mask_len is not None and mask_len != past + n_fed:
            self.fail(f"the attention mask covers {mask_len} positions but cache ({past}) + fed ({n_fed}) = "
                      f"{past + n_fed}")
        pieces = None
        if capture is not None and uses_cache:
            pieces = {k: len(v) for k, v in capture.pieces.items() if parse_hook_name(k)[0] == "llm"}
        self._step = (past, n_fed, uses_cache, pieces)

    def after(self, cache, capture=None):
        """Called by the decoder after a step with the cache it returns."""
        past, n_fed, uses_cache, pieces = self._step
        if not uses_cache:
            return
        got = cache.get_seq_length() if cache is not None else 0
        if got != past + n_fed:
            self.fail(f"the KV cache holds {got} positions after the step, expected {past} + {n_fed} fed")
        self.cache_len = got
        if capture is None or pieces is None:
            return
        rows_mode = capture.spec.rows if isinstance(capture.spec.rows, str) else None
        for name, all_pieces in capture.pieces.items():
            if parse_hook_name(name)[0] != "llm":
                continue
            new = all_pieces[pieces.get(name, 0):]
            rows = torch.cat([p.rows for p in new]).tolist() if new else []
            if any(r < past or r >= past + n_fed for r in rows):
                self.fail(f"{name} captured rows {rows} but this step fed positions {past}..{past + n_fed - 1}")
            if self.steps > 1 and rows_mode in ("generated", "all") and len(rows) != n_fed:
                self.fail(f"{name} captured {len(rows)} rows for the {n_fed} position(s) fed (rows must advance "
                          f"by one per generated token)")

    def finish(self, n_new: int, exact: bool):
        """After generate: one decoding step per new token (at least, for beam search)."""
        if (exact and self.steps != n_new) or self.steps < n_new:
            self.fail(f"generation returned {n_new} new tokens after {self.steps} decoding steps (expected one step "
                      f"per token)")


_ACTIVE = threading.local()


def active_guard(model) -> Optional[GenerationGuard]:
    return getattr(_ACTIVE, "guards", {}).get(id(model))


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise NotImplementedError(f"minicpmv_attn supports default RoPE only, the config asks for {params or scaling}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, head_dim] for positions [B, L] (computed in float32, like transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen2Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads (hook ``llm.layers.{i}.attn``)."""


    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.hook_name = hook_name("llm", layer_idx)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, cos_sin, mask: AttnMask, cache: Optional[Cache] = None):
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = attend(self, q, k, v, mask, self.scaling, self.attention_dropout if self.training else 0.0,
                        implementation=self.config._attn_implementation or "sdpa")
        return self.o_proj(out.reshape(b, n, -1))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos_sin, mask, cache=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos_sin, mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def positions_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Position ids of the last ``q_len`` tokens from a 2-D padding mask (left padding aware)."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -q_len:]


class Qwen2PreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_cache_class = True

    def _init_weights(self, module):
        init_module_weights(self.config, module)

    @property
    def device(self) -> torch.device:
        """The first parameter's device; where accelerate runs it when a ``device_map`` offloaded it
        (transformers' own property says ``meta`` there, and ``generate`` would put new tensors on it)."""
        return execution_device(self)


@torch.no_grad()
def init_module_weights(config, module):
    """Random init used for tiny test/demo models (checkpoint weights overwrite it).

    A tensor transformers marks as loaded (``_is_hf_initialized``, transformers 5.x) is left
    alone: 5.0 initialises after loading, and re-drawing it would silently discard the
    checkpoint's weights.
    """
    std = getattr(config, "initializer_range", 0.02)

    def fresh(tensor):
        return tensor is not None and not getattr(tensor, "_is_hf_initialized", False)

    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        if fresh(module.weight):
            module.weight.normal_(0.0, std)
        if fresh(getattr(module, "bias", None)):
            module.bias.zero_()
    elif isinstance(module, (nn.LayerNorm, Qwen2RMSNorm)):
        if fresh(module.weight):
            module.weight.fill_(1.0)
        if fresh(getattr(module, "bias", None)):
            module.bias.zero_()


class Qwen2Model(Qwen2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=False, **kwargs) -> BaseModelOutputWithPast:
        """The decoder. The KV cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values``."""
        cache = take_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Qwen2Model: pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, q_len = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        elif cache is not None and not isinstance(cache, Cache):
            cache = DynamicCache.from_legacy_cache(cache)
        past = cache.get_seq_length() if cache is not None else 0
        k_len = past + q_len
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask: expected a 2-D [batch, keys] padding mask, got shape "
                                 f"{tuple(attention_mask.shape)}")
            if attention_mask.shape != (b, k_len):
                raise ValueError(f"attention_mask: expected shape {(b, k_len)} (batch, past + new tokens), got "
                                 f"{tuple(attention_mask.shape)}")
            key_valid = attention_mask.to(torch.bool)
        else:
            key_valid = None
        if position_ids is None:
            if key_valid is not None:
                position_ids = positions_from_mask(attention_mask, q_len)
            else:
                position_ids = torch.arange(past, k_len, device=inputs_embeds.device)[None].expand(b, -1)
        mask = AttnMask(
            key_valid=None if key_valid is None or bool(key_valid.all()) else key_valid,
            causal=True, q_offset=past,
            query_valid=None if key_valid is None else key_valid[:, past:],
        )
        cos_sin = rotary_cos_sin(position_ids, self.layers[0].self_attn.head_dim, rope_theta(self.config),
                                 inputs_embeds.dtype)
        hidden = inputs_embeds
        states = (hidden,) if output_hidden_states else None
        cache = cache if use_cache else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint_call(self, layer, hidden, cos_sin, mask, cache)
            else:
                hidden = layer(hidden, cos_sin, mask, cache)
            if output_hidden_states:
                states += (hidden,)
        hidden = self.norm(hidden)
        if output_hidden_states:
            states = states[:-1] + (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states, **{CACHE_FIELD: cache})


class Qwen2ForCausalLM(Qwen2PreTrainedModel, GenerationMixin):
    """Qwen2 LM whose ``output_attentions`` accepts True or a capture spec.

    With ``output_attentions`` the output's ``attentions`` is a tuple over the selected
    layers (all layers for ``True``: [B, H, Lq, Lk] each, exactly the eager probabilities,
    but computed next to SDPA). A capture attached from outside (``capture.attached``, what
    ``MiniCPMV.forward`` and ``generate`` do) accumulates across calls instead.
    """

    _tied_weights_keys = []

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def capture_dims(self):
        return {"layers": {"llm": self.config.num_hidden_layers}, "heads": {"llm": self.config.num_attention_heads},
                "query_num": 0}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, **kwargs) -> CausalLMOutputWithPast:
        """Upstream's Qwen2 LM forward; the KV cache comes as ``cache`` (transformers >= 5.24) or
        ``past_key_values``, and the output carries it under transformers' current name."""
        cache = take_cache(past_key_values, kwargs)
        x = inputs_embeds if inputs_embeds is not None else input_ids
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        own = None
        if output_attentions and attached_capture(self) is None:
            spec = CaptureSpec.from_flag(output_attentions)
            if "llm" in spec.stages:
                own = AttentionCapture.start(spec, self.capture_dims(), x.shape[0], x.shape[1],
                                             key_len=past + x.shape[1], compute_dtype=self.dtype, device=self.device)
                if past == 0:
                    own.begin_llm(x.shape[1])
                else:
                    own.prompt_len = past + x.shape[1]
        guard = active_guard(self)
        if guard is not None and not guard.take_step():
            guard = None  # a forward inside generate that is not the loop's step (e.g. a verifier)
            if own is None and attached_capture(self) is not None:
                raise CaptureError(
                    "minicpmv_attn: a forward of this model ran inside generate (e.g. a verifier in a "
                    "StoppingCriteria) while generate captures attention: its rows would be mixed into the "
                    "record. Score with another model instance, or generate without output_attentions")
        capture = own or attached_capture(self)
        if guard is not None:
            uses_cache = self.config.use_cache if use_cache is None else use_cache
            guard.before(past, x.shape[1], None if attention_mask is None else attention_mask.shape[-1],
                         bool(uses_cache) and not (self.model.gradient_checkpointing and self.training), capture)
        with attached(self, own):
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_hidden_states=bool(output_hidden_states), **{CACHE_FIELD: cache})
        if guard is not None:
            guard.after(output_cache(outputs), capture)
        hidden = outputs.last_hidden_state
        keep = kwargs.get("num_logits_to_keep", logits_to_keep)
        if isinstance(keep, int) and keep > 0:
            hidden = hidden[:, -keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        attentions = None
        if own is not None:
            tensors, _ = own.result()
            attentions = tuple(tensors.values())
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=attentions, **{CACHE_FIELD: output_cache(outputs)})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        """Works for transformers 4.4x and 5.x: new tokens = mask length - cached length.

        The cache arrives as ``cache`` (5.24 on) or ``past_key_values`` (before); both are read.
        """
        cache = take_cache(past_key_values, kwargs)
        guard = active_guard(self)
        if guard is not None:
            guard.arm()  # the loop's next forward is its step
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if inputs_embeds is not None and past == 0:
            inputs = {"inputs_embeds": inputs_embeds, "input_ids": None}
        else:
            if attention_mask is not None:
                n_new = max(attention_mask.shape[1] - past, 1)
            else:
                n_new = 1 if past else input_ids.shape[1]
            inputs = {"input_ids": input_ids[:, -n_new:]}
        inputs.update(attention_mask=attention_mask, **{CACHE_FIELD: cache})
        for key in ("cache_position", "next_sequence_length", "is_first_iteration", "position_ids"):
            kwargs.pop(key, None)
        inputs.update(kwargs)
        return inputs

    def _get_logits_processor(self, *args, **kwargs):
        """transformers' logits processors, with the repetition penalty on every new token of
        every sample when generating from ``inputs_embeds`` (as MiniCPM-V does).

        There ``input_ids`` holds only the new tokens, yet transformers 5.x skips, per row, as
        many of them as the row has left padding (``prompt_ignore_length``, meant for a prompt
        that is not there): a padded sample's answer went unpenalised and so changed with its
        batch. transformers 4.4x (upstream's) penalises every new token; so does this.
        """
        processors = super()._get_logits_processor(*args, **kwargs)
        prompt_len = kwargs.get("input_ids_seq_length", args[1] if len(args) > 1 else None)
        if not prompt_len:  # no prompt ids: generating from inputs_embeds
            for p in processors:
                if type(p).__name__ == "RepetitionPenaltyLogitsProcessor" and \
                        getattr(p, "prompt_ignore_length", None) is not None:
                    p.prompt_ignore_length = None
        return processors

    def generate(self, *args, **kwargs):
        """transformers' ``generate``, with the fork's invariants checked at every step.

        See :class:`GenerationGuard`: a loop that drops the cache, re-feeds the prompt or skips
        a captured row raises :class:`GenerationInvariantError` instead of returning wrong tokens.
        """
        assisted = any(kwargs.get(k) is not None for k in ("assistant_model", "prompt_lookup_num_tokens",
                                                            "assistant_early_exit"))
        guard = GenerationGuard(one_token_steps=not assisted)
        guards = getattr(_ACTIVE, "guards", None)
        if guards is None:
            guards = _ACTIVE.guards = {}
        previous = guards.get(id(self))
        guards[id(self)] = guard
        try:
            with warnings.catch_warnings():
                if kwargs.get("inputs_embeds") is not None and kwargs.get("input_ids") is None:
                    # MiniCPM-V always generates from embeddings (the image is in them), so transformers'
                    # note that repetition_penalty then sees only the new tokens would print on every call;
                    # it is upstream's behaviour too, not something the caller can change
                    warnings.filterwarnings("ignore", message=REPETITION_PENALTY_NOTE, category=UserWarning)
                result = super().generate(*args, **kwargs)
        finally:
            if previous is None:
                guards.pop(id(self), None)
            else:
                guards[id(self)] = previous
        sequences = result.sequences if hasattr(result, "sequences") else result
        if isinstance(sequences, torch.Tensor) and sequences.dim() == 2:
            prompt = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
            n_new = sequences.shape[1] - (prompt.shape[1] if isinstance(prompt, torch.Tensor) else 0)
            beams = kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", None) or \
                getattr(self.generation_config, "num_beams", 1) or 1
            guard.finish(n_new, exact=beams == 1 and not assisted)
        return result
