"""The demo tokenizers: character-level (``tokenizer/``, the golden fixtures' toy vocabulary)
and word-level (the trained demo model's, ``trained/``). Built by ``scripts/build_demo_tokenizer.py``
and ``scripts/train_demo.py``; deterministic (same bytes on every run).

Both start with the same 19 ids::

    0        <pad>            (left padding; upstream pads with id 0)
    1..18    <unk> <|endoftext|> <|im_start|> <|im_end|> <image> </image> <slice> </slice>
             <image_id> </image_id> <ref> </ref> <box> </box> <quad> </quad> <point> </point>

Character-level: then printable ASCII ``' '..'~'`` (19..113) and ``'\\n'`` (114).
Word-level: then ``' '``, ``'\\n'``, the digits, ``? . ,``, the chat roles and the given words;
text splits into words and single non-word characters, unknown ones become ``<unk>``.
Every marker is an added special token, so ``<image>``, ``<unk>``, ... are single ids.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, WordLevel

PAD = "<pad>"
SPECIAL_TOKENS: List[str] = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
]
# The multimodal markers (everything after the four chat/control tokens).
MARKER_TOKENS: List[str] = SPECIAL_TOKENS[4:]
# What every word-level vocabulary holds besides its words: the chat frame and image ids.
WORD_BASE: List[str] = [" ", "\n"] + [str(d) for d in range(10)] + ["?", ".", ",", "user", "assistant", "system"]

# ChatML, as MiniCPM-V-2.6 (Qwen2) formats conversations.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _check_unique(tokens: Sequence[str]) -> Dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a special token colliding with a character would be a bug
        dup = sorted({t for t in tokens if list(tokens).count(t) > 1})
        raise ValueError(f"duplicate token(s) in the demo vocabulary: {dup}")
    return vocab


def char_vocab() -> Dict[str, int]:
    """token -> id of the character-level vocabulary (pad, specials, printable ASCII, newline)."""
    return _check_unique([PAD] + SPECIAL_TOKENS + [chr(c) for c in range(0x20, 0x7F)] + ["\n"])


def word_vocab(words: Sequence[str]) -> Dict[str, int]:
    """token -> id of a word-level vocabulary: pad, specials, :data:`WORD_BASE`, then ``words`` (sorted)."""
    bad = [w for w in words if not w.isalpha()]
    if bad:
        raise ValueError(f"word-level vocabulary: words must be letters only, got {bad}")
    extra = sorted(set(words) - set(WORD_BASE))
    return _check_unique([PAD] + SPECIAL_TOKENS + WORD_BASE + extra)


def _add_specials(tok: Tokenizer) -> Tokenizer:
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in [PAD] + SPECIAL_TOKENS
    ])
    return tok


def char_tokenizer() -> Tokenizer:
    """One token per character; unknown characters become ``<unk>``."""
    # BPE without merges = one token per character
    tok = Tokenizer(BPE(vocab=char_vocab(), merges=[], unk_token="<unk>", fuse_unk=False))
    tok.decoder = decoders.Fuse()
    return _add_specials(tok)


def word_tokenizer(words: Sequence[str]) -> Tokenizer:
    """One token per word (letters) or per other character; decoding concatenates."""
    tok = Tokenizer(WordLevel(vocab=word_vocab(words), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _add_specials(tok)


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "auto_map": {"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]},
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": PAD,
        "additional_special_tokens": MARKER_TOKENS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": PAD,
        "additional_special_tokens": MARKER_TOKENS,
    }


def write_tokenizer(tok: Tokenizer, out: str) -> str:
    """Write ``tok`` with the MiniCPM-V tokenizer config into ``out`` (3 JSON files)."""
    from ..attention_record import atomic_write_json as _write_json

    os.makedirs(out, exist_ok=True)
    # Re-serialise through json so the file layout (indent, key order) is ours and stable.
    _write_json(os.path.join(out, "tokenizer.json"), json.loads(tok.to_str()))
    _write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config())
    _write_json(os.path.join(out, "special_tokens_map.json"), special_tokens_map())
    return out
