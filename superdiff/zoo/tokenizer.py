"""A CLIP tokenizer for the shapes captions, written by code (no download).

The vocabulary holds the two special tokens ``<|startoftext|>`` (id 0) and ``<|endoftext|>`` (id 1,
also the padding token), the 256 byte-level characters, their ``</w>`` (end of word) forms, and
one token per merge; the merges make every caption word a single token.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .shapes import COLOURS, SHAPES

__all__ = ["CAPTION_WORDS", "MAX_LENGTH", "bpe_merges", "write_tokenizer", "build_tokenizer"]

CAPTION_WORDS: tuple[str, ...] = (*COLOURS, *SHAPES)
MAX_LENGTH = 8  # <|startoftext|>, at most a few words, <|endoftext|> and padding


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _apply_merges(word: str, merges: list[str]) -> list[str]:
    """The symbols BPE leaves of ``word`` with ``merges`` (lowest rank first, as CLIP applies them)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        best, i = min((rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if best == len(rank):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def bpe_merges(words: Sequence[str]) -> list[str]:
    """Merges that turn each word of ``words`` into one token: after the merges earlier words
    introduced, what is left is joined left to right."""
    merges: list[str] = []
    for word in words:
        symbols = _apply_merges(word, merges)
        current = symbols[0]
        for nxt in symbols[1:]:
            merges.append(f"{current} {nxt}")
            current += nxt
    return merges


def _vocab(merges: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(_bytes_to_unicode().values())
    for token in chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tokenizer(
    directory: str | os.PathLike, words: Sequence[str] = CAPTION_WORDS, model_max_length: int = MAX_LENGTH
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``directory``; returns it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges([w.lower() for w in words])
    (path / "vocab.json").write_text(json.dumps(_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def build_tokenizer(
    directory: str | os.PathLike | None = None,
    words: Sequence[str] = CAPTION_WORDS,
    model_max_length: int = MAX_LENGTH,
):
    """A :class:`transformers.CLIPTokenizer` over ``words``, written to ``directory`` (a temporary
    folder by default) and loaded from it offline."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer(directory or tempfile.mkdtemp(prefix="superdiff-zoo-tok-"), words, model_max_length)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length, local_files_only=True)
