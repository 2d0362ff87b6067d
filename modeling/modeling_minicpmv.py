"""MiniCPM-V-2.6 (SigLIP -> resampler -> Qwen2) that returns its attention weights.

Drop-in for upstream's ``modeling_minicpmv.MiniCPMV``: same config, module tree,
state-dict keys, ``forward(data, **kwargs)``, ``generate(...)`` and ``chat(...)``.
Added: ``output_attentions=True`` (everything, per head) or a capture spec (see
:class:`capture.CaptureSpec`) in all three, returning vision, resampler and LLM
attention; SDPA everywhere when nothing is captured.
"""
import json
import os
from dataclasses import dataclass
from threading import Thread
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

from .attention import set_attention_implementation
from .capture import (AttentionCapture, CaptureError, CaptureSpec, attached, pad_llm_columns, parse_hook_name,
                      sample_offsets, special_token_ids, token_roles)
from .checkpoint import (CheckpointError, check_checkpoint_folder, check_checkpoint_tensors, check_loaded_weights,
                         execution_device)  # fork: modeling_minicpmv.MiniCPMV.get_vllm_embedding (device_map)
from .configuration_minicpm import MiniCPMVConfig
from .layout import ImageLayout  # noqa: F401  # fork: modeling_minicpmv.MiniCPMV.chat (4.4x copies direct imports only)
from .modeling_navit_siglip import SiglipVisionTransformer
# fork: modeling_minicpmv.Qwen2ForCausalLM -- the fork's own Qwen2 (same keys, capture)
# fork: modeling_minicpmv.MiniCPMVPreTrainedModel -- and its Qwen2PreTrainedModel
from .modeling_qwen2 import CACHE_FIELD, Qwen2ForCausalLM, Qwen2PreTrainedModel, dtype_kwargs, output_cache
from .resampler import Resampler

TERMINATORS = ["<|im_end|>", "<|endoftext|>"]


# fork: modeling_minicpmv.MiniCPMV.forward
@dataclass
class MiniCPMVOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the vision-side attention and the raw capture.

    vision_attentions: tuple over captured SigLIP layers of [N_slices, Hv', P, P].
    resampler_attentions: [N_slices, Hr', Q, P] (padded patch columns are 0).
    captured: ``{hook name: tensor}`` of everything captured; capture_index: how each
    tensor's axes map back (rows, cols, heads, reduce).
    """

    vision_attentions: Optional[Tuple[torch.Tensor, ...]] = None
    resampler_attentions: Optional[torch.Tensor] = None
    captured: Optional[Dict[str, torch.Tensor]] = None
    capture_index: Optional[Dict[str, Any]] = None


# fork: modeling_minicpmv.MiniCPMV.generate
@dataclass
class MiniCPMVGenerateOutput(ModelOutput):
    """What ``generate`` returns when attention is requested.

    sequences: new tokens [B, n_new]; text: decoded answers (``decode_text=True``);
    attentions: for ``output_attentions=True``, transformers' per-step tuples
    (step 0 = prompt); captured / capture_index: with a spec, one tensor per selected
    layer, [B, H', rows, L_prompt + n_new] for the LLM.
    """

    sequences: Optional[torch.Tensor] = None
    text: Optional[List[str]] = None
    attentions: Optional[Tuple[Any, ...]] = None
    vision_attentions: Optional[Tuple[torch.Tensor, ...]] = None
    resampler_attentions: Optional[torch.Tensor] = None
    captured: Optional[Dict[str, torch.Tensor]] = None
    capture_index: Optional[Dict[str, Any]] = None
    prompt_length: Optional[int] = None
    scores: Optional[Tuple[torch.Tensor, ...]] = None


class MiniCPMVPreTrainedModel(Qwen2PreTrainedModel):
    config_class = MiniCPMVConfig
    # fork: modeling_minicpmv.MiniCPMVPreTrainedModel
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]


class MiniCPMV(MiniCPMVPreTrainedModel):
    """MiniCPM-V-2.6. ``model(data, output_attentions=True)`` returns all three attention families."""

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.vpm = self.init_vision_module()
        self.vision_dim = self.vpm.embed_dim
        self.embed_dim = self.llm.config.hidden_size
        self.resampler = self.init_resampler(self.embed_dim, self.vision_dim)
        self._processor = None
        self.terminators = list(TERMINATORS)
        # fork: modeling_minicpmv.MiniCPMV.__init__
        self.post_init()

    # -- construction (upstream's names) ------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.init_vision_module
    def init_vision_module(self):
        model = SiglipVisionTransformer(self.config.vision_config)
        if self.config.drop_vision_last_layer:
            model.encoder.layers = model.encoder.layers[:-1]
        return model

    def init_resampler(self, embed_dim, vision_dim):
        return Resampler(num_queries=self.config.query_num, embed_dim=embed_dim, num_heads=embed_dim // 128,
                         kv_dim=vision_dim, adaptive=True)

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    # fork: modeling_minicpmv.MiniCPMV.set_input_embeddings
    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.llm.lm_head = new_embeddings

    def set_decoder(self, decoder):
        self.llm = decoder

    def get_decoder(self):
        return self.llm

    # fork: modeling_minicpmv.MiniCPMV.__init__
    @property
    def processor(self):
        """The checkpoint folder's processor, loaded on first use (upstream loads it in __init__)."""
        if self._processor is None:
            from transformers import AutoProcessor

            # the processor's own modules, named here for transformers 4.4x's remote-code copier
            from .image_processing_minicpmv import MiniCPMVImageProcessor  # noqa: F401
            from .processing_minicpmv import register_processing
            from .tokenization_minicpmv_fast import MiniCPMVTokenizerFast  # noqa: F401

            register_processing()
            self._processor = AutoProcessor.from_pretrained(self.config._name_or_path)
        return self._processor

    @processor.setter
    def processor(self, value):
        self._processor = value

    # fork: modeling_minicpmv.MiniCPMV.init_vision_module
    @property
    def vision_implementation(self) -> str:
        impl = self.config._attn_implementation or "sdpa"
        return impl if impl in ("eager", "flash_attention_2") else "sdpa"

    # -- loading ------------------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMVPreTrainedModel
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """Load an upstream MiniCPM-V-2.6 checkpoint (local folder or hub id).

        ``dtype=`` (or the older ``torch_dtype=``) works on every supported transformers.
        With ``strict`` (default) a missing, unexpected or wrong-shaped tensor is an error
        naming the keys, and a folder of another model type is refused before loading.
        """
        path = str(pretrained_model_name_or_path)
        dtype_kwargs(kwargs)  # dtype= (current name) or torch_dtype= (older), on every transformers
        if os.path.isdir(path):
            check_checkpoint_folder(path)
            if strict:
                check_checkpoint_tensors(path, cls)
        kwargs.pop("trust_remote_code", None)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except RuntimeError as e:
            if "size mismatch" in str(e) or "mismatch" in str(e).lower():
                raise CheckpointError(f"{path}: tensor shapes do not match the config: {e}") from None
            raise
        problems = []
        for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = sorted(str(k) for k in info.get(label) or [])
            if keys:
                problems.append(f"{label.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:20])}"
                                + (" ..." if len(keys) > 20 else ""))
        if strict and problems:
            raise CheckpointError(f"{path}: the weights do not match MiniCPM-V-2.6's state dict: " + "; ".join(problems))
        if os.path.isdir(path):
            # the loaded tensors hold the file's values (keys the file lacks are not the file's)
            check_loaded_weights(model, path, missing=[str(k) for k in info.get("missing_keys") or []])
        return (model, info) if want_info else model

    # -- vision -------------------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.get_vllm_embedding
    def _vision_embedding(self, pixel_values_list, tgt_sizes):
        """All slices of the batch -> resampler outputs [N, Q, D] (None when there is no image)."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        device = execution_device(self.vpm)  # fork: modeling_minicpmv.MiniCPMV.get_vllm_embedding (device_map)
        strips, sizes = [], []
        for s, (pixels, sizes_s) in enumerate(zip(pixel_values_list, tgt_sizes or [None] * len(pixel_values_list))):
            if len(pixels) == 0:
                continue
            if sizes_s is None or len(sizes_s) != len(pixels):
                raise ValueError(f"sample {s}: {len(pixels)} pixel_values slices but "
                                 f"{0 if sizes_s is None else len(sizes_s)} tgt_sizes rows")
            for j, (p, hw) in enumerate(zip(pixels, sizes_s)):
                h, w = int(hw[0]), int(hw[1])
                if p.dim() != 3 or p.shape[0] != 3 or p.shape[1] != self.vpm.patch_size or p.shape[2] != self.vpm.patch_size * h * w:
                    raise ValueError(
                        f"pixel_values[{s}][{j}]: expected shape [3, {self.vpm.patch_size}, {self.vpm.patch_size * h * w}]"
                        f" for tgt_size ({h}, {w}), got {list(p.shape)}")
                strips.append(p.flatten(end_dim=1).permute(1, 0))  # [14*n, 42]
                sizes.append((h, w))
        if not strips:
            return None, None
        sizes = torch.tensor(sizes, dtype=torch.int32)
        pixels = torch.nn.utils.rnn.pad_sequence(strips, batch_first=True, padding_value=0.0)
        n, length, _ = pixels.shape
        pixels = pixels.permute(0, 2, 1).reshape(n, 3, -1, length).to(device=device, dtype=dtype)
        max_patches = int((sizes[:, 0] * sizes[:, 1]).max())
        patch_mask = torch.zeros((n, 1, max_patches), dtype=torch.bool, device=device)
        for i, (h, w) in enumerate(sizes.tolist()):
            patch_mask[i, 0, : h * w] = True
        chunk = max(1, int(self.config.vision_batch_size))
        # fork: modeling_minicpmv.MiniCPMV.init_vision_module
        set_attention_implementation(self, self.vision_implementation)
        hidden = torch.cat([
            self.vpm(pixels[i:i + chunk], patch_attention_mask=patch_mask[i:i + chunk],
                     tgt_sizes=sizes[i:i + chunk]).last_hidden_state
            for i in range(0, n, chunk)
        ])
        return self.resampler(hidden, sizes), sizes

    # fork: modeling_minicpmv.MiniCPMV.get_vllm_embedding
    def get_vllm_embedding(self, data):
        """Text embeddings with each sample's resampler outputs scattered into its image_bound rows."""
        check_data(data)
        input_ids = data["input_ids"]
        if "vision_hidden_states" in data and data["vision_hidden_states"] is not None:
            vision_hidden_states = data["vision_hidden_states"]
        else:
            pixel_values_list = data.get("pixel_values")
            if pixel_values_list is None:
                pixel_values_list = [[] for _ in range(len(input_ids))]
            if len(pixel_values_list) != len(input_ids):
                raise ValueError(f"pixel_values: one list per sample expected ({len(input_ids)} samples), "
                                 f"got {len(pixel_values_list)}")
            features, _ = self._vision_embedding(pixel_values_list, data.get("tgt_sizes"))
            if features is None and self.training:
                # upstream: a text-only training batch still runs the vision side on a blank image,
                # so its parameters take part in the graph (distributed training expects them)
                dummy = self.vpm(torch.zeros((1, 3, 224, 224), device=self.device, dtype=self.dtype))
                side = 224 // self.config.patch_size
                feature = self.resampler(dummy.last_hidden_state, torch.tensor([[side, side]], dtype=torch.int32))
                vision_hidden_states = [feature for _ in pixel_values_list]
            else:
                vision_hidden_states, start = [], 0
                for pixels in pixel_values_list:
                    vision_hidden_states.append(features[start:start + len(pixels)] if len(pixels) else [])
                    start += len(pixels)
        embeds = self.llm.model.embed_tokens(input_ids)
        if hasattr(self.llm.config, "scale_emb"):
            embeds = embeds * self.llm.config.scale_emb
        rows = []
        for i in range(len(input_ids)):
            feats = vision_hidden_states[i]
            bound = data["image_bound"][i] if data.get("image_bound") is not None else []
            if len(feats) and len(bound):
                feats = feats.to(embeds.dtype)
                index = torch.cat([torch.arange(int(a), int(b)) for a, b in bound]).to(embeds.device)
                flat = feats.reshape(-1, feats.shape[-1])
                if index.numel() != flat.shape[0]:
                    raise ValueError(f"sample {i}: image_bound covers {index.numel()} positions but the images give "
                                     f"{flat.shape[0]} tokens ({len(feats)} slices x {feats.shape[1]} queries)")
                row = embeds[i].index_copy(0, index, flat)
            else:
                row = embeds[i]
                if self.training and len(feats):
                    row = row + feats.mean() * 0
            rows.append(row)
        return torch.stack(rows), vision_hidden_states

    # -- capture plumbing ---------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.forward
    def capture_dims(self) -> Dict[str, Any]:
        return {
            "layers": {"llm": self.config.num_hidden_layers, "vision": len(self.vpm.encoder.layers), "resampler": 1},
            "heads": {"llm": self.config.num_attention_heads, "vision": self.config.vision_config.num_attention_heads,
                      "resampler": self.resampler.num_heads},
            "query_num": self.config.query_num,
        }

    def new_capture(self, spec: CaptureSpec, data, new_tokens: int = 0) -> AttentionCapture:
        """Validate the spec, estimate its memory (refusing what cannot fit) and make a recorder."""
        input_ids = data["input_ids"]
        sizes = [hw for per in (data.get("tgt_sizes") or []) for hw in (per if per is not None else [])]
        patches = max([int(h) * int(w) for h, w in sizes], default=0)
        n_image = max([sum(int(b) - int(a) for a, b in bound) for bound in (data.get("image_bound") or [])], default=0)
        return AttentionCapture.start(spec, self.capture_dims(), input_ids.shape[0], input_ids.shape[1], new_tokens,
                                      len(sizes), patches, n_image, compute_dtype=self.dtype, device=self.device)

    @staticmethod
    def _split_capture(capture: AttentionCapture):
        tensors, index = capture.result()
        llm = tuple(v for k, v in tensors.items() if parse_hook_name(k)[0] == "llm")
        vision = tuple(v for k, v in tensors.items() if parse_hook_name(k)[0] == "vision")
        return tensors, index, llm or None, vision or None, tensors.get("resampler.attn")

    # -- forward ------------------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.forward
    def forward(self, data, output_attentions=None, output_hidden_states=None, attention_mask=None, labels=None,
                return_dict=True, special_token_ids=(), prompt_length=None, **kwargs):
        """Upstream's call: ``data`` = input_ids, pixel_values, tgt_sizes, image_bound, position_ids.

        ``output_attentions``: True (everything, per head: ``attentions``,
        ``vision_attentions``, ``resampler_attentions``) or a capture spec (dict /
        :class:`CaptureSpec`; see ``captured``). Padding rows of captured maps are zero.
        ``prompt_length``: replaying a generated answer, positions from here on count as
        generated (capture ``rows="generated"``; negative rows count from here) and, as in
        ``generate``, non-negative spec positions count from each sample's first real token.
        Otherwise they are positions of the (left-padded) batch.
        ``data`` may be the processor's output as it comes (a ``MiniCPMVBatchFeature`` or any
        mapping); its ``attention_mask`` is used when no ``attention_mask`` is passed.
        """
        # fork: modeling_minicpmv.MiniCPMV.forward -- the processor's output is accepted as data
        data, attention_mask = forward_inputs(data, attention_mask)
        spec = CaptureSpec.from_flag(output_attentions)
        capture = self.new_capture(spec, data) if spec is not None else None
        position_ids = data.get("position_ids")
        if position_ids is not None and position_ids.dtype != torch.int64:
            position_ids = position_ids.long()
        if capture is not None:
            roles = token_roles(data["input_ids"], data.get("image_bound"), attention_mask, special_token_ids)
            capture.begin_llm(data["input_ids"].shape[1] if prompt_length is None else int(prompt_length), roles,
                              generating=prompt_length is not None, positions=data["input_ids"].shape[1],
                              offsets=None if prompt_length is None or attention_mask is None else
                              sample_offsets(spec, attention_mask[:, :int(prompt_length)]))
        with attached(self, capture):
            embeds, vision_hidden_states = self.get_vllm_embedding(data)
            out = self.llm(input_ids=None, inputs_embeds=embeds, position_ids=position_ids,
                           attention_mask=attention_mask, labels=labels, output_hidden_states=output_hidden_states,
                           **kwargs)
        # fork: modeling_minicpmv.MiniCPMV.forward -- captured fields passed at construction, so they are items
        # (4.4x: attributes set later are not, and accelerate's device_map hook rebuilds the output from its items)
        tensors, index, llm, vision, resampler = self._split_capture(capture) if capture is not None else (None,) * 5
        result = MiniCPMVOutput(loss=out.loss, logits=out.logits, hidden_states=out.hidden_states, attentions=llm,
                                vision_attentions=vision, resampler_attentions=resampler, captured=tensors,
                                capture_index=index, **{CACHE_FIELD: output_cache(out)})
        return result if return_dict else result.to_tuple()

    # -- generation ---------------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.generate
    def _terminator_ids(self, tokenizer):
        return [tokenizer.convert_tokens_to_ids(t) for t in self.terminators]

    def _decode_text(self, result_ids, tokenizer):
        terminators = self._terminator_ids(tokenizer)
        texts = []
        for result in result_ids:
            result = result[result != 0]
            if len(result) and result[0] == getattr(tokenizer, "bos_id", None):
                result = result[1:]
            if len(result) and int(result[-1]) in terminators:
                result = result[:-1]
            texts.append(tokenizer.decode(result).strip())
        return texts

    # fork: modeling_minicpmv.MiniCPMV.generate
    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, image_bound=None, attention_mask=None,
                 tokenizer=None, vision_hidden_states=None, return_vision_hidden_states=False, stream=False,
                 decode_text=False, output_attentions=None, **kwargs):
        """Upstream's generate (new tokens only; ``decode_text`` gives strings; ``stream``).

        ``output_attentions=True`` with ``return_dict_in_generate=True``: transformers'
        per-step LLM attentions plus vision/resampler attentions. A capture spec: each
        selected LLM layer ends as one tensor [B, H', rows, L_prompt + n_new] (rows
        appended as tokens are generated), returned in ``captured``. With attention
        requested the result is a :class:`MiniCPMVGenerateOutput`;
        ``attention_record.records_from_capture`` splits its capture into one record per
        sample, each the record that sample gets alone.
        """
        if input_ids is None:
            raise ValueError("generate: input_ids is required")
        if tokenizer is None:
            raise ValueError("generate: a tokenizer is required (for the terminator ids)")
        if pixel_values is not None and len(input_ids) != len(pixel_values):
            raise ValueError(f"generate: {len(input_ids)} samples of input_ids but {len(pixel_values)} of pixel_values")
        data = {"input_ids": input_ids, "image_bound": image_bound}
        if vision_hidden_states is None:
            data["pixel_values"], data["tgt_sizes"] = pixel_values, tgt_sizes
        else:
            data["vision_hidden_states"] = vision_hidden_states
        spec = CaptureSpec.from_flag(output_attentions)
        per_step = output_attentions is True
        if spec is not None and stream:
            raise CaptureError("generate: attention capture is not available with stream=True")
        if spec is not None and not per_step and kwargs.get("num_beams", 1) > 1:
            raise CaptureError("generate: a capture spec follows one sequence per sample; with num_beams > 1 use "
                               "output_attentions=True or chat(), which replays the chosen answer")
        max_new = kwargs.get("max_new_tokens") or 20
        capture = self.new_capture(spec, data, max_new) if spec is not None else None
        grad = torch.is_grad_enabled() and self.training
        with torch.set_grad_enabled(grad):
            with attached(self, capture):
                embeds, vision_hidden_states = self.get_vllm_embedding(data)
            terminators = self._terminator_ids(tokenizer)
            gen_kwargs = dict(inputs_embeds=embeds, pad_token_id=0, eos_token_id=terminators,
                              attention_mask=attention_mask, **kwargs)
            if stream:
                from transformers import TextIteratorStreamer

                streamer = TextIteratorStreamer(tokenizer=tokenizer)
                gen_kwargs["streamer"] = streamer
                result = _ThreadedStream(streamer, self.llm.generate, gen_kwargs)
            else:
                if capture is not None:
                    roles = token_roles(input_ids, image_bound, attention_mask, special_token_ids(tokenizer))
                    capture.begin_llm(embeds.shape[1], roles, generating=True,
                                      positions=embeds.shape[1] + max_new - 1,
                                      offsets=sample_offsets(spec, attention_mask))
                    if per_step:  # transformers collects the LLM's per-step attentions itself
                        gen_kwargs.update(output_attentions=True, return_dict_in_generate=True)
                with attached(self.llm, None if per_step else capture):
                    result = self.llm.generate(**gen_kwargs)
        if capture is not None:
            result = self._generate_output(result, capture, tokenizer, decode_text, embeds.shape[1], per_step)
        elif decode_text and not stream:
            seqs = result.sequences if hasattr(result, "sequences") else result
            result = self._decode_text(seqs, tokenizer)
        if return_vision_hidden_states:
            return result, vision_hidden_states
        return result

    def _generate_output(self, result, capture, tokenizer, decode_text, prompt_len, per_step):
        seqs = result.sequences if hasattr(result, "sequences") else result
        tensors, index, _, vision, resampler = self._split_capture(capture)
        tensors = pad_llm_columns(tensors, index, prompt_len + seqs.shape[1])
        llm = tuple(v for k, v in tensors.items() if parse_hook_name(k)[0] == "llm") or None
        return MiniCPMVGenerateOutput(
            sequences=seqs, text=self._decode_text(seqs, tokenizer) if decode_text else None,
            attentions=getattr(result, "attentions", None) if per_step else llm,
            vision_attentions=vision, resampler_attentions=resampler, captured=tensors, capture_index=index,
            prompt_length=prompt_len, scores=getattr(result, "scores", None))

    # -- chat ---------------------------------------------------------------------------
    # fork: modeling_minicpmv.MiniCPMV.chat
    def chat(self, image, msgs, tokenizer, processor=None, vision_hidden_states=None, max_new_tokens=2048,
             min_new_tokens=0, sampling=True, max_inp_length=8192, system_prompt="", stream=False,
             max_slice_nums=None, use_image_id=None, output_attentions=None, **kwargs):
        """Upstream's chat. With ``output_attentions`` (True or a capture spec) it returns
        ``(answer, record)``: the answer and an :class:`AttentionRecord` (a list of both
        for batched msgs; each conversation's record is the one it gets alone). ``True``
        captures everything; beam search (``sampling=False``) captures by replaying the
        chosen answer through one forward pass.
        """
        from .attention_record import chat_records

        batched = isinstance(msgs, list) and len(msgs) > 0 and isinstance(msgs[0], list)
        if batched:
            if image is not None:
                raise ValueError("chat: with batched msgs put the images inside msgs (image must be None)")
            images_list, msgs_list = [None] * len(msgs), msgs
        else:
            images_list, msgs_list = [image], [msgs]
        if processor is None:
            processor = self.processor
        self._check_processor(processor)
        if not sampling and stream:
            raise ValueError("chat: stream=True needs sampling=True (upstream's rule)")
        prompts, images = [], []
        for img, conversation in zip(images_list, msgs_list):
            prompt, imgs = chat_prompt(processor.tokenizer, img, conversation, system_prompt)
            prompts.append(prompt)
            images.append(imgs)
        inputs = processor(prompts, images, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                           return_tensors="pt").to(self.device)
        check_prompt_lengths(inputs, max_inp_length)  # fork: modeling_minicpmv.MiniCPMV.chat (never cut)
        if sampling:
            generation_config = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True,
                                 "repetition_penalty": 1.05}
        else:
            generation_config = {"num_beams": 3, "repetition_penalty": 1.2}
        if min_new_tokens > 0:
            generation_config["min_new_tokens"] = min_new_tokens
        generation_config.update((k, kwargs[k]) for k in generation_config.keys() & kwargs.keys())
        if kwargs.get("streamer") is not None and not stream:  # e.g. a progress bar
            generation_config["streamer"] = kwargs["streamer"]
        spec = CaptureSpec.from_flag(output_attentions)
        model_inputs = {k: inputs[k] for k in ("input_ids", "pixel_values", "tgt_sizes", "image_bound",
                                               "attention_mask") if k in inputs}
        replay = spec is not None and generation_config.get("num_beams", 1) > 1
        res = self.generate(**model_inputs, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                            vision_hidden_states=vision_hidden_states, stream=stream, decode_text=not replay,
                            output_attentions=None if (spec is None or replay) else spec, **generation_config)
        if stream:
            def stream_gen():
                for text in res:
                    for term in self.terminators:
                        text = text.replace(term, "")
                    yield text
            return stream_gen()
        if spec is None:
            return res if batched else res[0]
        # fork: modeling_minicpmv.MiniCPMV.chat
        texts, records = chat_records(self, res, spec, replay, inputs, prompts, tokenizer)
        if batched:
            return texts, records
        return texts[0], records[0]

    def _check_processor(self, processor):
        ip = processor.image_processor
        for model_key, proc_key, value in (
                ("query_num", "image_feature_size", self.config.query_num),
                ("patch_size", "patch_size", self.config.patch_size),
                ("use_image_id", "use_image_id", self.config.use_image_id),
                ("slice_config.max_slice_nums", "max_slice_nums", self.config.slice_config.max_slice_nums),
                ("slice_mode", "slice_mode", self.config.slice_mode)):
            if getattr(ip, proc_key, value) != value:
                raise ValueError(f"config.json {model_key}={value!r} but preprocessor_config.json "
                                 f"{proc_key}={getattr(ip, proc_key)!r}; they must be the same")


# fork: modeling_minicpmv.MiniCPMV.generate
class _ThreadedStream:
    """Iterates a streamer fed by ``generate`` in a thread; an error there is raised here.

    (A bare thread would print the error and leave the reader waiting forever.)
    """

    def __init__(self, streamer, generate, kwargs):
        self.streamer, self.error = streamer, None

        def run():
            try:
                generate(**kwargs)
            except BaseException as e:  # handed to the reader below
                self.error = e
                streamer.end()

        self.thread = Thread(target=run, daemon=True)
        self.thread.start()

    def __iter__(self):
        for text in self.streamer:
            yield text
        self.thread.join()
        if self.error is not None:
            raise self.error


# fork: modeling_minicpmv.MiniCPMV.chat
def check_prompt_lengths(inputs, max_inp_length: Optional[int]) -> None:
    """Refuse prompts longer than ``max_inp_length`` with the length they need.

    Upstream truncates them (through the assistant header at 8192 tokens), so the answer and
    its attention would belong to another prompt.
    """
    if max_inp_length is None:
        return
    mask = inputs.get("attention_mask")
    lengths = mask.sum(1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(inputs["input_ids"])
    for i, n in enumerate(lengths):
        if int(n) > int(max_inp_length):
            raise ValueError(f"chat: conversation {i} is {int(n)} tokens long, over max_inp_length={max_inp_length}; "
                             f"it is never cut (the answer would belong to another prompt): pass max_inp_length >= "
                             f"{int(n)} or shorten it")


# fork: modeling_minicpmv.MiniCPMV.chat
def chat_prompt(tokenizer, image, msgs, system_prompt=""):
    """(ChatML prompt text, images in order) for one conversation, with upstream's rules and clear errors."""
    from copy import deepcopy

    from PIL import Image

    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise ValueError(f"chat: msgs is a string but not valid JSON ({e})") from None
    if not isinstance(msgs, list) or len(msgs) == 0:
        raise ValueError("chat: msgs is empty; expected a list of {'role': 'user'|'assistant', 'content': ...}")
    msgs = deepcopy(msgs)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat: msgs[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
    if image is not None and isinstance(msgs[0]["content"], str):
        msgs[0]["content"] = [image, msgs[0]["content"]]
    images = []
    for i, m in enumerate(msgs):
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"chat: msgs[{i}] has role {m['role']!r}; roles must be 'user' or 'assistant' "
                             f"(use system_prompt= for a system message)")
        if i == 0 and m["role"] != "user":
            raise ValueError(f"chat: the first message must be from the user, got role {m['role']!r}")
        content = m["content"] if isinstance(m["content"], list) else [m["content"]]
        parts = []
        for c in content:
            if isinstance(c, Image.Image):
                images.append(c)
                parts.append("(<image>./</image>)")
            elif isinstance(c, str):
                parts.append(c)
            else:
                raise ValueError(f"chat: msgs[{i}] content item of type {type(c).__name__}; expected str or "
                                 f"PIL.Image.Image")
        m["content"] = "\n".join(parts)
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), images


# fork: modeling_minicpmv.MiniCPMV.forward
def forward_inputs(data, attention_mask):
    """``(dict, attention_mask)`` from what ``forward`` was given: a mapping that is not a dict (the
    processor's ``MiniCPMVBatchFeature``) becomes one, and its ``attention_mask`` stands in when
    none was passed. A plain dict is upstream's call and stays as it is (upstream ignores its mask)."""
    if isinstance(data, dict) or not isinstance(data, Mapping):
        return data, attention_mask
    data = dict(data.items())
    if attention_mask is None and isinstance(data.get("attention_mask"), torch.Tensor):
        attention_mask = data["attention_mask"]
    return data, attention_mask


# fork: modeling_minicpmv.MiniCPMV.get_vllm_embedding
def check_data(data) -> None:
    """Clear errors for a malformed ``data`` dict (upstream fails deep inside with an IndexError)."""
    if not isinstance(data, dict):
        raise TypeError(f"data: expected a dict with input_ids, pixel_values, tgt_sizes, image_bound, "
                        f"position_ids; got {type(data).__name__}")
    ids = data.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"data['input_ids']: expected a [batch, length] tensor, got {got}")
    b = ids.shape[0]
    for key in ("pixel_values", "tgt_sizes", "image_bound"):
        value = data.get(key)
        if value is not None and len(value) != b:
            raise ValueError(f"data[{key!r}]: expected one entry per sample ({b}), got {len(value)}")
    for i, bound in enumerate(data.get("image_bound") or []):
        for a, e in (bound.tolist() if isinstance(bound, torch.Tensor) else bound):
            if not 0 <= int(a) <= int(e) <= ids.shape[1]:
                raise ValueError(f"data['image_bound'][{i}]: span ({a}, {e}) is outside the {ids.shape[1]} positions")
    pos = data.get("position_ids")
    if pos is not None and tuple(pos.shape) != tuple(ids.shape):
        raise ValueError(f"data['position_ids']: expected shape {tuple(ids.shape)}, got {tuple(pos.shape)}")
