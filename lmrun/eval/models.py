"""One interface to the causal language models that evaluations and alignment stages score,
sample from and train: ``load_causal_lm(path, device) -> CausalLM``.

A ``CausalLM`` bundles a ``torch.nn.Module`` whose ``forward(input_ids (batch, seq) int64)``
returns logits ``(batch, seq, vocab)``, its tokenizer (``encode(str) -> list[int]``,
``decode(ids) -> str``), the end-of-sequence id, the context length, and ``generate`` (batched,
KV-cached sampling through ``lmrun.inference.InferenceEngine``). ``save(path, **extra)`` writes
a checkpoint the same loader reads back (so ``stage=sft`` output feeds ``stage=grpo``,
``stage=evaluate`` and ``stage=generate``).

Our checkpoints (a ``stage=pretrain``/``sft``/... checkpoint file or run directory) load by
default; a directory with a Hugging Face ``config.json`` loads through ``lmrun.eval.hf``: a Llama,
Qwen2, Qwen3, Mixtral or GPT-2 folder converted to lmrun's ``TransformerLM``
(``ConvertedHFCausalLM``, ``lmrun.model.hf``), any other architecture as a transformers model
(``HFCausalLM``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmrun.errors import DataError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
HF_RUN_SUBDIR = "hf_model"  # where alignment stages save a Hugging Face policy inside their run directory


@dataclass
class CausalLM:
    """model: the network (logits ``(batch, seq, vocab)`` from ``input_ids``); tokenizer: encode/
    decode; eos_token_id: the id that ends a document/response (None: none); context_length:
    the longest sequence the model takes (tokens); source: where it was loaded from; facts:
    what ``save`` must store to rebuild it (model config, tokenizer identity)."""

    model: torch.nn.Module
    tokenizer: object
    eos_token_id: int | None
    context_length: int
    source: str = ""
    facts: dict = field(default_factory=dict)
    kind: str = "lmrun"
    prefix_ids: list[int] = field(default_factory=list)
    pad_id: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return int(self.facts.get("model_config", {}).get("vocab_size") or self.model.vocab_size)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` float of ``input_ids`` ``(batch, seq)``."""
        out = self.model(input_ids)
        return getattr(out, "logits", out)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def engine(self):
        """An ``InferenceEngine`` over this model (puts the model in eval mode)."""
        from lmrun.inference.engine import InferenceEngine

        return InferenceEngine(self.model, self.tokenizer)

    def generate(self, prompts: list[str], params, on_token=None) -> list:
        """Completions (``lmrun.inference.Completion``) of ``prompts`` under ``params``
        (``SamplingParams``; generation stops at ``eos_token_id`` in addition to its stop ids).
        ``on_token(row, token_id)`` is called as each token is accepted (progress, streaming).
        The model's train/eval mode is restored afterwards."""
        from dataclasses import replace

        if self.eos_token_id is not None and self.eos_token_id not in params.stop_token_ids:
            params = replace(params, stop_token_ids=tuple(params.stop_token_ids) + (self.eos_token_id,))
        was_training = self.model.training
        try:
            return self.engine().generate(list(prompts), params, on_token=on_token)
        finally:
            self.model.train(was_training)

    def save(self, path: str | Path, iteration: int = 0, optimizer=None, **extra) -> Path:
        """Write a checkpoint of the current weights that ``load_causal_lm`` reads back."""
        from lmrun.train.checkpoint import save_checkpoint

        save_checkpoint(self.model, optimizer, iteration, path, **{**self.facts, **extra})
        return Path(path)


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", key: str = "model") -> CausalLM:
    """Load a model for scoring/sampling/training.

    path: a checkpoint written by an lmrun stage (file, or a run directory: its latest
    ``checkpoints/ckpt_*.pt``), or a local Hugging Face model directory (``config.json``; converted
    to lmrun's ``TransformerLM`` where ``lmrun.model.hf`` maps it, see
    ``lmrun.eval.hf.load_hf_causal_lm``). device: where the weights go. key: the config key
    named in errors. Raises DataError (missing file, missing tokenizer files) or FormatError
    (not an lmrun checkpoint)."""
    from lmrun.train.loading import checkpoint_facts, checkpoint_tokenizer_files, load_model, resolve_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key}={path}: no such checkpoint file or run directory")
    if p.is_dir() and not (p / "config.json").is_file() and (p / HF_RUN_SUBDIR / "config.json").is_file():
        p = p / HF_RUN_SUBDIR  # a run directory of an alignment stage that trained a Hugging Face policy
    if p.is_dir() and (p / "config.json").is_file():
        from lmrun.eval.hf import load_hf_causal_lm

        log.info("loading %s: Hugging Face model %s", key, p)
        return load_hf_causal_lm(p, device, key)
    ckpt = resolve_checkpoint(str(p), key)
    log.info("loading %s: %s", key, ckpt)
    facts = checkpoint_facts(ckpt)
    files = checkpoint_tokenizer_files(facts, ckpt)
    specials = list(facts["tokenizer"].get("special_tokens") or [])
    tok = files.load(specials)
    model, _ = load_model(ckpt, facts, torch.device(device))
    eos = tok.special_ids.get(EOS_TOKEN)
    keep = {k: facts[k] for k in ("model_config", "tokenizer", "tokens_dir") if k in facts}
    return CausalLM(model=model, tokenizer=tok, eos_token_id=eos,
                    context_length=int(facts["model_config"]["context_length"]), source=str(ckpt), facts=keep)
