"""A character-level tokenizer that ``AutoTokenizer`` loads from disk (no downloads).

Used by the micro-zoo and the tiny test checkpoints. Every printable ASCII character is one token, plus
``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]


def vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIALS + CHARS)}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer; ``save_pretrained(dir)`` makes it loadable with ``AutoTokenizer``."""
    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")
    return fast


VOCAB_SIZE = len(SPECIALS) + len(CHARS)
