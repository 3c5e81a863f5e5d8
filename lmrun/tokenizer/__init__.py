"""Tokenization: byte-level BPE training (``train_bpe``), encoding and decoding (``Tokenizer``),
GPT-2 file formats, tiktoken / HuggingFace export, parallel bulk encoding, and the cached
tokenizer and token-array artifacts the stages build (``artifacts``).

Names are imported on first use, so ``lmrun.tokenizer.config`` (read by the CLI to compose
and validate) does not import numpy, regex or the encoder."""
from lmrun import lazy_exports

_EXPORTS = {
    "artifacts": ["TokenizerFiles", "get_or_encode_tokens", "get_tokenizer", "tokens_material"],
    "bpe": ["train_bpe", "train_bpe_from_counts"],
    "bulk": ["encode_file", "token_dtype"],
    "formats": ["load_merges", "load_vocab", "save_merges", "save_vocab"],
    "pretokenize": ["GPT2_PATTERN", "count_pretokens"],
    "tokenizer": ["Tokenizer", "UnknownTokenError"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
