"""Builds the CLIP tokenizer of the built-in tiny models without any download.

Called by `models.builtin`. The vocabulary is the 256 byte-level symbols (alone and as word ends), a
few whole-word merges and CLIP's two special tokens at the end, as in the real CLIP vocabulary; the
tokenizer pads to 77 tokens like every Stable Diffusion text encoder.
"""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

CLIP_MAX_LENGTH = 77
"""Token length every CLIP prompt is padded or truncated to."""

_WORDS = (
    *("a", "an", "the", "of", "and", "in", "on", "with", "photo", "painting", "portrait"),
    *("cat", "dog", "city", "street", "night", "sky", "mountain", "river", "forest"),
    *("red", "blue", "green", "light", "dark", "high", "quality", "detailed"),
)
"""Words that get merges, so that common prompts are a handful of tokens rather than letters."""

_END = "</w>"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that turn the byte-level symbols of `word` into one token."""
    symbols = [*word[:-1], word[-1] + _END]
    merges = []
    current = symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A small byte-level BPE CLIP tokenizer; identical on every call."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + _END for s in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(_WORDS):
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # The tokenizers backend takes (left, right) pairs; transformers' annotation only names strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)  # type: ignore[arg-type]
