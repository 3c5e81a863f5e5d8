"""Tokenization: byte-level BPE training (``train_bpe``), encoding and decoding (``Tokenizer``),
GPT-2 file formats, tiktoken / HuggingFace export, and parallel bulk encoding."""
from lmrun.tokenizer.bpe import train_bpe, train_bpe_from_counts
from lmrun.tokenizer.bulk import encode_file, token_dtype
from lmrun.tokenizer.formats import load_merges, load_vocab, save_merges, save_vocab
from lmrun.tokenizer.pretokenize import GPT2_PATTERN, count_pretokens
from lmrun.tokenizer.tokenizer import Tokenizer, UnknownTokenError

__all__ = ["train_bpe", "train_bpe_from_counts", "Tokenizer", "UnknownTokenError", "encode_file", "token_dtype",
           "load_vocab", "save_vocab", "load_merges", "save_merges", "GPT2_PATTERN", "count_pretokens"]
