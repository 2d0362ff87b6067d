"""MiniCPM-V-2.6 processor: image processor + tokenizer -> the model's ``data`` dict.

``processor(text, images)`` does what upstream's ``MiniCPMVProcessor`` does: every
``(<image>./</image>)`` tag in a text becomes the image's placeholder (optional
``<image_id>i</image_id>``, ``<image>`` + Q ``<unk>`` + ``</image>``, then one
``<slice>`` block per grid cell, grid rows joined by newlines), the text is tokenised,
``image_bound`` rows are (index after each ``<image>``/``<slice>``, index of the matching
end marker), samples are left padded with 0.

Where upstream fails silently, the fork refuses with a ``ValueError``: tag/image count
mismatch (upstream: bare ``assert``), stray marker tokens in the text, and a ``max_length``
that would cut through an image placeholder (upstream truncates and breaks
``image_bound``). The output also carries ``slice_layouts`` (per sample, per image: the
:class:`~.layout.ImageLayout` with every slice's box in the
original image) for attention-to-pixel mapping.
"""
# fork: processing_minicpmv (rewritten file)
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
import transformers
from transformers.processing_utils import ProcessorMixin

from .image_processing_minicpmv import MiniCPMVBatchFeature, MiniCPMVImageProcessor
from .layout import ImageLayout  # noqa: F401  # fork: processing_minicpmv (4.4x copies direct imports only)
from .tokenization_minicpmv_fast import MiniCPMVTokenizerFast

__all__ = ["IMAGE_TAG", "MiniCPMVProcessor", "register_processing"]

IMAGE_TAG = "(<image>./</image>)"

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def _token_id(tokenizer, attr: str, token: str) -> int:
    """``tokenizer.<attr>`` when the tokenizer is a MiniCPMVTokenizerFast, else a vocabulary lookup."""
    idx = getattr(tokenizer, attr, None)
    if idx is None:
        idx = tokenizer.convert_tokens_to_ids(token)
    if idx is None or (idx == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no single token for {token!r}; MiniCPM-V needs it")
    return int(idx)


class MiniCPMVProcessor(ProcessorMixin):
    """Wraps a :class:`MiniCPMVImageProcessor` and a (MiniCPM-V) tokenizer.

    Call: ``processor(text, images=None, max_length=None, do_pad=True, max_slice_nums=None,
    use_image_id=None, return_tensors="pt")`` -> :class:`MiniCPMVBatchFeature` with

    * ``input_ids`` [B, L] int64, left padded with 0;
    * ``attention_mask`` [B, L] int64: 0 on the left padding, 1 elsewhere (upstream computes
      ``input_ids != 0``; identical unless a real token has id 0, which upstream would mask);
    * ``pixel_values``: per sample a list of float32 ``[3, 14, 14 * n]`` tensors (every slice of
      every image, source first, grid slices row by row);
    * ``image_sizes``: per sample a list of ``(width, height)`` tensors;
    * ``image_bound``: per sample an int64 ``[n_slices, 2]`` tensor of (start, end) positions
      (padding included);
    * ``tgt_sizes``: per sample an int32 ``[n_slices, 2]`` tensor (patch rows, cols), ``[]``
      for a sample without images (as upstream);
    * ``slice_layouts``: per sample a list (per image) of ``layout.ImageLayout`` (not tensors).
    """

    if _TRANSFORMERS_MAJOR < 5:  # transformers 4.x finds the sub-processors through these
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.version = getattr(image_processor, "version", 2.6)

    # fork: processing_minicpmv -- built directly, not through the Auto classes
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The image processor and tokenizer of a checkpoint folder (or hub id), built directly.

        No lookup through transformers' Auto classes: how ProcessorMixin resolves its parts
        changed across releases, and on transformers 5.4 to 5.16 ``AutoImageProcessor``
        refuses to work without torchvision. ``AutoProcessor.from_pretrained`` lands here.
        """
        kwargs.pop("trust_remote_code", None)
        image_processor = MiniCPMVImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = MiniCPMVTokenizerFast.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor, tokenizer)

    # ------------------------------------------------------------------ main call

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        images: Any = None,
        max_length: Optional[int] = None,
        do_pad: Optional[bool] = True,
        max_slice_nums: Optional[int] = None,
        use_image_id: Optional[bool] = None,
        return_tensors="pt",
    ) -> MiniCPMVBatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if images is None:
            image_batch = [[] for _ in texts]
        else:
            image_batch = self.image_processor.batch_images(images)
        if len(image_batch) != len(texts):
            raise ValueError(f"got {len(texts)} text(s) but images for {len(image_batch)} sample(s); "
                             "pass one list of images per text")
        for i, (t, ims) in enumerate(zip(texts, image_batch)):
            n_tags = t.count(IMAGE_TAG)
            if n_tags != len(ims):
                raise ValueError(
                    f"sample {i}: the text has {n_tags} image tag(s) {IMAGE_TAG!r} but {len(ims)} image(s) were "
                    f"given; put one {IMAGE_TAG} where each image goes"
                )
        image_inputs = self.image_processor(image_batch, do_pad=do_pad, max_slice_nums=max_slice_nums,
                                            return_tensors=return_tensors)
        return self._convert_images_texts_to_inputs(image_inputs, texts, max_length=max_length,
                                                    max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                                    return_tensors=return_tensors)

    def _convert(self, input_str: str, max_inp_length: Optional[int] = None, sample: int = 0,
                 n_slices: int = 0):
        """Tokenise one prompt -> (input_ids int64 [L], image_bound int64 [k, 2])."""
        tok = self.tokenizer
        ids = list(tok.encode(input_str))
        if self.version <= 2.5 and getattr(tok, "add_bos_token", False):
            ids = [tok.bos_token_id] + ids
        input_ids = torch.tensor(ids, dtype=torch.long)
        start_cond = (input_ids == _token_id(tok, "im_start_id", "<image>")) | \
                     (input_ids == _token_id(tok, "slice_start_id", "<slice>"))
        end_cond = (input_ids == _token_id(tok, "im_end_id", "</image>")) | \
                   (input_ids == _token_id(tok, "slice_end_id", "</slice>"))
        starts = torch.where(start_cond)[0] + 1
        ends = torch.where(end_cond)[0]
        if len(starts) != n_slices or len(ends) != n_slices or bool((starts > ends).any()) \
                or bool((starts[1:] <= ends[:-1]).any()):
            raise ValueError(
                f"sample {sample}: the prompt has {len(starts)} <image>/<slice> and {len(ends)} </image>/</slice> "
                f"markers but its images have {n_slices} slice(s); marker tokens may only come from "
                f"{IMAGE_TAG} tags"
            )
        if max_inp_length is not None and len(ids) > max_inp_length:
            needed = int(ends[-1]) + 1 if n_slices else 0
            if max_inp_length < needed:
                raise ValueError(
                    f"max_length={max_inp_length} would cut through an image placeholder in sample {sample}: the "
                    f"prompt has {len(ids)} tokens and its last image placeholder ends at token {needed}; "
                    f"use max_length >= {needed} (>= {len(ids)} keeps the whole prompt)"
                )
            input_ids = input_ids[:max_inp_length]
        image_bound = torch.stack([starts, ends], dim=1) if n_slices else torch.zeros((0, 2), dtype=torch.long)
        return input_ids, image_bound

    def _convert_images_texts_to_inputs(self, images, texts, truncation=None, max_length=None,
                                        max_slice_nums=None, use_image_id=None, return_tensors="pt"):
        if isinstance(texts, str):
            texts = [texts]
        pixel_values, image_sizes, tgt_sizes = images["pixel_values"], images["image_sizes"], images["tgt_sizes"]
        ip = self.image_processor
        input_ids_list, bounds_list, layouts_list = [], [], []
        for index, text in enumerate(texts):
            sizes = image_sizes[index]
            chunks = text.split(IMAGE_TAG)
            if len(chunks) - 1 != len(sizes):
                raise ValueError(f"sample {index}: the text has {len(chunks) - 1} image tag(s) {IMAGE_TAG!r} but "
                                 f"{len(sizes)} image(s) were given")
            layouts = [ip.get_slice_layout(size, max_slice_nums) for size in sizes]
            final_text = chunks[0]
            for i, size in enumerate(sizes):
                final_text += ip.get_slice_image_placeholder(size, i, max_slice_nums, use_image_id) + chunks[i + 1]
            n_slices = sum(len(l.slices) for l in layouts)
            ids, bounds = self._convert(final_text, max_length, sample=index, n_slices=n_slices)
            input_ids_list.append(ids)
            bounds_list.append(bounds)
            layouts_list.append(layouts)
        padded, attention_mask, pads = self.pad(input_ids_list, padding_side="left")
        bounds_list = [b + p for b, p in zip(bounds_list, pads)]
        return MiniCPMVBatchFeature(
            data={
                "input_ids": padded,
                "attention_mask": attention_mask,
                "pixel_values": pixel_values,
                "image_sizes": image_sizes,
                "image_bound": bounds_list,
                "tgt_sizes": tgt_sizes,
                "slice_layouts": layouts_list,
            },
            tensor_type=return_tensors,
        )

    @staticmethod
    def pad(inputs: List[torch.Tensor], max_length: Optional[int] = None, padding_value: int = 0,
            padding_side: str = "left"):
        """Stack 1-D id tensors to [B, L] -> (ids, attention_mask, padding lengths)."""
        length = max([max_length or 0] + [len(x) for x in inputs])
        ids = torch.full((len(inputs), length), padding_value, dtype=inputs[0].dtype)
        mask = torch.zeros((len(inputs), length), dtype=torch.long)
        pads = []
        for i, x in enumerate(inputs):
            n = len(x)
            if padding_side == "left":
                ids[i, length - n:] = x
                mask[i, length - n:] = 1
            else:
                ids[i, :n] = x
                mask[i, :n] = 1
            pads.append(length - n if padding_side == "left" else 0)
        return ids, mask, pads

    # ------------------------------------------------------------------ decoding

    def _strip(self, ids) -> List[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(t) for t in ids if int(t) != 0]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        ends = {getattr(self.tokenizer, "eos_token_id", None), getattr(self.tokenizer, "eot_id", None)} - {None}
        if ids and ids[-1] in ends:
            ids = ids[:-1]
        return ids

    def batch_decode(self, *args, **kwargs) -> List[str]:
        """Upstream's: per row drop 0s, a leading bos and a trailing eos, decode, strip."""
        return [self.tokenizer.decode(self._strip(row), *args[1:], **kwargs).strip() for row in args[0]]

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(self._strip(args[0]), *args[1:], **kwargs).strip()

    @property
    def model_input_names(self):
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))


def register_processing() -> None:
    """Register the image processor, tokenizer and processor for ``model_type="minicpmv"``
    with transformers' Auto classes (idempotent), so ``AutoProcessor.from_pretrained(folder)``
    works without ``trust_remote_code``."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    from .configuration_minicpm import MiniCPMVConfig

    try:
        AutoImageProcessor.register(MiniCPMVConfig, MiniCPMVImageProcessor, exist_ok=True)
    except ImportError:  # transformers 5.4 to 5.16 without torchvision: AutoImageProcessor is unusable
        pass  # AutoProcessor and MiniCPMVProcessor still work (they build the image processor directly)
    AutoTokenizer.register(MiniCPMVConfig, fast_tokenizer_class=MiniCPMVTokenizerFast, exist_ok=True)
    AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)
