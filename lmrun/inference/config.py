"""Config schema of the ``generate`` node (``stage=generate``) and its validation (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmrun.errors import ConfigError, check, check_choice


@dataclass
class GenerateConfig:
    """checkpoint: a pretrain checkpoint file or run directory (its latest checkpoint).
    prompt: one prompt (its completion is streamed to the console); prompts_file: a JSONL file,
        one ``{"prompt": "..."}`` (or a bare JSON string) per line — exactly one of the two.
    max_new_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1 = off): sampling.
    stop: stop strings; stop_at_special: also stop at the tokenizer's special tokens
        (``<|endoftext|>``). num_samples: completions per prompt. batch_size: prompts decoded
        together. draft_checkpoint: a smaller model's checkpoint -> speculative decoding with
        ``speculative_k`` draft tokens per round (same tokenizer). use_cache: false recomputes
        every step (the baseline). int8: weight-only int8 linear layers. device: auto, cpu or cuda.
    """

    checkpoint: str | None = None
    prompt: str | None = None
    prompts_file: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    stop_at_special: bool = True
    num_samples: int = 1
    batch_size: int = 16
    draft_checkpoint: str | None = None
    speculative_k: int = 4
    use_cache: bool = True
    int8: bool = False
    device: str = "auto"


def validate_generate(cfg: GenerateConfig, stage: str) -> None:
    """Raise ConfigError naming the key for an impossible ``generate`` config."""
    if stage == "generate":
        check("generate.checkpoint", cfg.checkpoint, bool(cfg.checkpoint),
              "a checkpoint file or a pretrain run directory (required with stage=generate)")
        check("generate.prompt", cfg.prompt, (cfg.prompt is not None) != bool(cfg.prompts_file),
              "exactly one of generate.prompt and generate.prompts_file")
    for key in ("max_new_tokens", "num_samples", "batch_size", "speculative_k"):
        check(f"generate.{key}", getattr(cfg, key), getattr(cfg, key) >= 1, "an integer >= 1")
    check("generate.temperature", cfg.temperature, cfg.temperature >= 0, "a number >= 0 (0 = greedy)")
    check("generate.top_k", cfg.top_k, cfg.top_k >= 0, "an integer >= 0 (0 = off)")
    check("generate.top_p", cfg.top_p, 0 < cfg.top_p <= 1, "a number in (0, 1]")
    check_choice("generate.device", cfg.device, ["auto", "cpu", "cuda"])
    check("generate.use_cache", cfg.use_cache, cfg.use_cache or not cfg.draft_checkpoint,
          "true with generate.draft_checkpoint (speculative decoding uses the cache)")


def fit_new_tokens(prompt_lengths: list[int], max_new_tokens: int, context_length: int, key: str = "generate.prompt"
                   ) -> int:
    """The new-token budget that fits a batch of prompts: ``min(max_new_tokens, context_length -
    longest prompt)`` (tokens). ConfigError (naming ``key``) when a prompt leaves no room for even
    one new token."""
    longest = max(prompt_lengths)
    if longest >= context_length:
        raise ConfigError(f"{key}: a prompt of {longest} tokens leaves no room for new tokens in the checkpoint's "
                          f"context_length={context_length}; use a prompt of at most {context_length - 1} tokens")
    return min(int(max_new_tokens), context_length - longest)
