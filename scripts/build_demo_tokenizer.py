"""Build the tiny character-level demo tokenizer shipped in ``modeling/demo/tokenizer/``.

Its vocabulary is the toy one the golden fixtures use (``shared/golden``):

    0        <pad>            (left padding; upstream pads with id 0)
    1..18    <unk> <|endoftext|> <|im_start|> <|im_end|> <image> </image> <slice> </slice>
             <image_id> </image_id> <ref> </ref> <box> </box> <quad> </quad> <point> </point>
    19..113  printable ASCII ' '..'~', one token per character
    114      '\\n'

Every marker is an added special token, so ``<image>``, ``<unk>``, ... are single ids;
any other character maps to ``<unk>``. The output is deterministic (same bytes on every
run). Usage::

    python scripts/build_demo_tokenizer.py            # writes modeling/demo/tokenizer/
    python scripts/build_demo_tokenizer.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from tokenizers import AddedToken, Tokenizer, decoders
from tokenizers.models import BPE

PAD = "<pad>"
SPECIAL_TOKENS: List[str] = [
    "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
    "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
]
# The multimodal markers (everything after the four chat/control tokens).
MARKER_TOKENS: List[str] = SPECIAL_TOKENS[4:]

# ChatML, as MiniCPM-V-2.6 (Qwen2) formats conversations.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modeling", "demo", "tokenizer")


def demo_vocab() -> Dict[str, int]:
    """token -> id, generated from ranges (pad, specials, printable ASCII, newline)."""
    tokens = [PAD] + SPECIAL_TOKENS + [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a special token colliding with a character would be a bug
        raise AssertionError("duplicate token in the demo vocabulary")
    return vocab


def build_tokenizer() -> Tokenizer:
    vocab = demo_vocab()
    # BPE without merges = one token per character; unknown characters become <unk>.
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in [PAD] + SPECIAL_TOKENS
    ])
    return tok


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


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def build(out: str) -> str:
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer()
    # Re-serialise through json so the file layout (indent, key order) is ours and stable.
    _write_json(os.path.join(out, "tokenizer.json"), json.loads(tok.to_str()))
    _write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config())
    _write_json(os.path.join(out, "special_tokens_map.json"), special_tokens_map())
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build the character-level MiniCPM-V demo tokenizer.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    out = build(args.out)
    print(f"wrote demo tokenizer ({len(demo_vocab())} tokens) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
