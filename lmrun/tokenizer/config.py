"""Config schema of the `tokenizer` group (presets in conf/tokenizer/)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import check, check_choice


#: The largest ``tokenizer.vocab_size``: token ids are int32 in the BPE trainer and the encoders.
MAX_VOCAB_SIZE = 2**31 - 1


@dataclass
class TokenizerConfig:
    """Which tokenizer the stages train or load, and how bulk encoding runs.

    kind: "bpe" (byte-level BPE trained by ``lmrun.tokenizer.bpe.train_bpe``) or "bytes"
        (raw UTF-8 bytes, no merges: the tokenizer-free baseline).
    vocab_size: total tokens including the 256 bytes and the special tokens (for "bytes" it
        must be exactly 256 + the number of special tokens; at most ``MAX_VOCAB_SIZE``). BPE
        stops early when the training text has no pairs left to merge: the vocabulary is then
        smaller (a warning states it, ``vocab_size_requested`` records it) and the model's
        ``model.vocab_size`` follows the real size unless set explicitly.
    special_tokens: strings never split or merged; the first one separates documents.
    path: null (train, or reuse from the cache) or an existing tokenizer: a folder holding
        ``vocab.json`` and ``merges.txt`` (a ``stage=tokenizer`` run directory, a cache entry)
        or a tokenizer cache key.
    backend: bulk encoder for ``stage=encode`` and pretrain's token arrays: "native" (our own
        encoder, the default; needs nothing beyond the base install) or "tiktoken" (our vocab and
        merges exported to tiktoken; identical ids; needs ``pip install tiktoken``).
    train_backend: BPE merge-loop implementation, "c" (compiled extension), "python" or "auto".
    num_workers: workers for pre-tokenization (processes) and bulk encoding (threads with the C
        core, else processes); null: the CPUs this process may use.
    report_max_bytes: bytes of the validation split encoded for the compression report.
    compare: also report bytes per token for characters, bytes, words and BPE (stage tokenizer).
    """

    kind: str = "bpe"
    vocab_size: int = 1024
    special_tokens: list[str] = field(default_factory=lambda: ["<|endoftext|>"])
    path: str | None = None
    backend: str = "native"
    train_backend: str = "auto"
    num_workers: int | None = None
    report_max_bytes: int = 16 * 1024 * 1024
    compare: bool = False


def validate_tokenizer(cfg: TokenizerConfig) -> None:
    """Raise ConfigError (one line naming the key, the value and the limit) for values the
    schema's types cannot exclude: e.g. a ``vocab_size`` below 256 + the special tokens or above
    ``MAX_VOCAB_SIZE``."""
    check_choice("tokenizer.kind", cfg.kind, ["bpe", "bytes"])
    check_choice("tokenizer.backend", cfg.backend, ["native", "tiktoken"])
    if cfg.backend == "tiktoken":
        import importlib.util

        check("tokenizer.backend", cfg.backend, importlib.util.find_spec("tiktoken") is not None,
              "native, or install tiktoken first (pip install tiktoken): it is not installed")
    check_choice("tokenizer.train_backend", cfg.train_backend, ["auto", "c", "python"])
    specials = list(cfg.special_tokens)
    check("tokenizer.special_tokens", specials, all(isinstance(s, str) and s for s in specials), "non-empty strings")
    check("tokenizer.special_tokens", specials, len(set(specials)) == len(specials), "distinct strings")
    minimum = 256 + len(specials)
    tokens = f"{len(specials)} special token" + ("" if len(specials) == 1 else "s")
    if cfg.kind == "bytes":
        check("tokenizer.vocab_size", cfg.vocab_size, cfg.vocab_size == minimum,
              f"{minimum} with tokenizer.kind=bytes (256 bytes + {tokens})")
    check("tokenizer.vocab_size", cfg.vocab_size, cfg.vocab_size >= minimum,
          f"an integer >= {minimum} (256 bytes + {tokens})")
    check("tokenizer.vocab_size", cfg.vocab_size, cfg.vocab_size <= MAX_VOCAB_SIZE,
          f"an integer <= {MAX_VOCAB_SIZE:,} (token ids are int32); a vocabulary larger than the training text "
          "supports is capped with a warning")
    if cfg.num_workers is not None:
        check("tokenizer.num_workers", cfg.num_workers, cfg.num_workers >= 1, "null or an integer >= 1")
    check("tokenizer.report_max_bytes", cfg.report_max_bytes, cfg.report_max_bytes >= 1, "an integer >= 1")
