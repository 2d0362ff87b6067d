"""MiniCPM-V-2.6 fast tokenizer: a Qwen2 (tokenizers-backed) tokenizer plus the ids of the
multimodal markers (``<image>``, ``<slice>``, ``<image_id>``, ``<ref>``, ``<box>``, ...).

Same public names as upstream's ``tokenization_minicpmv_fast.py``. The class adds no
``__init__`` on purpose: transformers 5 then loads ``tokenizer.json`` verbatim (a custom
``__init__`` makes it rebuild the backend from vocab/merges), and transformers 4 behaves as
for any ``PreTrainedTokenizerFast``. The checkpoint's ``tokenizer.json`` therefore defines
the vocabulary; this class only names the special tokens.
"""
# fork: tokenization_minicpmv_fast (rewritten file)
import os

from transformers import PreTrainedTokenizerFast

__all__ = ["MiniCPMVTokenizerFast"]


class MiniCPMVTokenizerFast(PreTrainedTokenizerFast):
    """Fast tokenizer with MiniCPM-V's marker tokens as attributes and their ids as properties."""

    # Marker strings (upstream sets them per instance in __init__; class attributes keep the
    # tokenizer.json loading path of the base class untouched).
    im_start = "<image>"
    im_end = "</image>"
    ref_start = "<ref>"
    ref_end = "</ref>"
    box_start = "<box>"
    box_end = "</box>"
    quad_start = "<quad>"
    quad_end = "</quad>"
    point_start = "<point>"
    point_end = "</point>"
    slice_start = "<slice>"
    slice_end = "</slice>"
    im_id_start = "<image_id>"
    im_id_end = "</image_id>"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load from ``tokenizer.json``; a local folder with only Qwen2's ``vocab.json`` +
        ``merges.txt`` is built through transformers' Qwen2 tokenizer first."""
        path = str(pretrained_model_name_or_path)
        files = ("vocab.json", "merges.txt")
        if ("tokenizer_object" not in kwargs and os.path.isdir(path)
                and not os.path.isfile(os.path.join(path, "tokenizer.json"))
                and all(os.path.isfile(os.path.join(path, f)) for f in files)):
            from transformers import Qwen2TokenizerFast

            kwargs["tokenizer_object"] = Qwen2TokenizerFast.from_pretrained(path, *args, **kwargs).backend_tokenizer
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _marker_id(self, token: str) -> int:
        idx = self.convert_tokens_to_ids(token)
        if idx is None or (idx == self.unk_token_id and token != self.unk_token):
            raise KeyError(f"the tokenizer has no token {token!r} (MiniCPM-V needs it as a single special token)")
        return idx

    @property
    def eos_id(self):
        return self.eos_token_id

    @property
    def bos_id(self):
        return self.bos_token_id

    @property
    def unk_id(self):
        return self.unk_token_id

    @property
    def im_start_id(self):
        return self._marker_id(self.im_start)

    @property
    def im_end_id(self):
        return self._marker_id(self.im_end)

    @property
    def slice_start_id(self):
        return self._marker_id(self.slice_start)

    @property
    def slice_end_id(self):
        return self._marker_id(self.slice_end)

    @property
    def im_id_start_id(self):
        return self._marker_id(self.im_id_start)

    @property
    def im_id_end_id(self):
        return self._marker_id(self.im_id_end)

    @property
    def ref_start_id(self):
        return self._marker_id(self.ref_start)

    @property
    def ref_end_id(self):
        return self._marker_id(self.ref_end)

    @property
    def box_start_id(self):
        return self._marker_id(self.box_start)

    @property
    def box_end_id(self):
        return self._marker_id(self.box_end)

    @property
    def quad_start_id(self):
        return self._marker_id(self.quad_start)

    @property
    def quad_end_id(self):
        return self._marker_id(self.quad_end)

    @property
    def point_start_id(self):
        return self._marker_id(self.point_start)

    @property
    def point_end_id(self):
        return self._marker_id(self.point_end)

    @property
    def newline_id(self):
        # Encode rather than look up "\n": byte-level vocabularies (Qwen2) store it as "Ċ".
        ids = self.encode("\n", add_special_tokens=False)
        if len(ids) != 1:
            raise KeyError(f"'\\n' is not a single token in this vocabulary (got ids {ids})")
        return ids[0]

    @staticmethod
    def escape(text: str) -> str:
        return text

    @staticmethod
    def unescape(text: str) -> str:
        return text
