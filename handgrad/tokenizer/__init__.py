"""Tokenizers: byte-level BPE (GPT-2 style) and character level (nanoGPT's shakespeare_char).

Public API::

    from handgrad.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer, GPT2_PATTERN

    tok = BPETokenizer.train(["some text", Path("corpus.txt")], vocab_size=50257)
    ids = tok.encode("hello world")          # list[int]
    tok.decode(ids)                          # "hello world"
    tok.save("tok.json"); load_tokenizer("tok.json")
    BPETokenizer.from_hf("gpt2/")  # vocab.json + merges.txt, encoder.json + vocab.bpe or tokenizer.json
"""

from handgrad.tokenizer.bpe import BPETokenizer
from handgrad.tokenizer.bytelevel import ENDOFTEXT, GPT2_PATTERN
from handgrad.tokenizer.char import CharTokenizer
from handgrad.tokenizer.io import TokenizerFileError
from handgrad.tokenizer.load import load_tokenizer

__all__ = [
    "BPETokenizer",
    "CharTokenizer",
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "TokenizerFileError",
    "load_tokenizer",
]
