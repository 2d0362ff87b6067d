"""Build the tiny character-level demo tokenizer shipped in ``modeling/demo/tokenizer/``.

Its vocabulary is the toy one the golden fixtures use (``shared/golden``); see
``minicpmv_attn.demo.vocab`` for the id layout (pad, 18 specials, printable ASCII, newline).
With ``--words`` it builds the word-level tokenizer of the trained demo model instead
(``modeling/demo/trained/`` ships one; ``scripts/train_demo.py`` writes it). Output is
deterministic (same bytes on every run). Usage::

    python scripts/build_demo_tokenizer.py            # writes modeling/demo/tokenizer/
    python scripts/build_demo_tokenizer.py --out DIR
    python scripts/build_demo_tokenizer.py --words --out DIR
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from minicpmv_attn.demo.vocab import (  # noqa: F401  (names kept for callers of this script)
    CHAT_TEMPLATE, MARKER_TOKENS, PAD, SPECIAL_TOKENS, char_tokenizer, char_vocab, special_tokens_map,
    tokenizer_config, word_tokenizer, word_vocab, write_tokenizer,
)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modeling", "demo", "tokenizer")
demo_vocab = char_vocab
build_tokenizer = char_tokenizer


def build(out: str, words: bool = False) -> str:
    """Write the character-level (or, with ``words``, the scenes' word-level) tokenizer to ``out``."""
    if words:
        from minicpmv_attn.demo.scenes import WORDS

        return write_tokenizer(word_tokenizer(WORDS), out)
    return write_tokenizer(char_tokenizer(), out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Build the MiniCPM-V demo tokenizer (character-level, or word-level "
                                            "for the trained demo model).")
    p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT}; required with --words)")
    p.add_argument("--words", action="store_true", help="the word-level tokenizer of the trained demo model")
    args = p.parse_args(argv)
    if args.words and args.out is None:
        p.error("--words needs --out (the shipped word-level tokenizer lives in modeling/demo/trained/)")
    out = build(args.out or DEFAULT_OUT, words=args.words)
    if args.words:
        from minicpmv_attn.demo.scenes import WORDS

        n = len(word_vocab(WORDS))
    else:
        n = len(char_vocab())
    print(f"wrote demo tokenizer ({n} tokens) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
