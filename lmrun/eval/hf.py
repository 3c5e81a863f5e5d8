"""Hugging Face causal LMs from a local directory behind the ``CausalLM`` interface (optional
extra: ``pip install lmrun[hf]``, which installs ``transformers``).

``load_hf_causal_lm(dir, device)`` reads a directory written by ``save_pretrained`` (``config.json``,
weights, ``tokenizer.json`` / tokenizer files) with ``local_files_only=True``: nothing is
downloaded. ``lmrun.eval.models.load_causal_lm`` calls it for any directory holding a
``config.json``.

- ``HFCausalLM.logits(input_ids (batch, seq))`` -> ``(batch, seq, vocab)`` float.
- ``HFCausalLM.generate(prompts, SamplingParams)`` -> ``lmrun.inference.Completion`` objects, the
  same contract as our engine: left-padded batch with an attention mask and per-row positions,
  KV-cached decoding (``past_key_values``), temperature / top-k / top-p / greedy from
  ``lmrun.inference.sampling``, stop ids and stop strings, and per-token log-probs under the
  raw distribution (temperature 1, no filters), in nats.
- ``encode`` adds no special tokens (so prompt + response ids concatenate); ``prefix_ids`` holds
  what the tokenizer puts in front of a text (a BOS token for Llama-style tokenizers), which
  ``generate`` and ``lmrun.eval.scoring`` prepend.

Folders whose architecture ``lmrun.model.hf`` maps (Llama, Qwen2, Qwen3, Mixtral, GPT-2 with an
exact activation) are converted to lmrun's own ``TransformerLM`` (``ConvertedHFCausalLM``): the
trainer, the KV-cache ``InferenceEngine`` and the evaluations then run lmrun's code on them, and
``save`` writes a Hugging Face folder again (``lmrun.model.hf.export_hf_model``). Other
architectures stay transformers models (``HFCausalLM``, the fallback).
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmrun.errors import DataError, FormatError
from lmrun.eval.models import EOS_TOKEN, CausalLM

log = logging.getLogger(__name__)


def _transformers(key: str):
    try:
        import transformers
    except ImportError:
        raise DataError(f"{key}: a Hugging Face model directory needs the [hf] extra "
                        "(pip install 'lmrun[hf]', i.e. transformers)") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def is_hf_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a Hugging Face ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def find_hf_model_dir(value: str | Path) -> Path | None:
    """``value`` if it is a Hugging Face model directory, its ``hf_model/`` when it is the run
    directory of an alignment stage that trained a Hugging Face policy, else None."""
    from lmrun.eval.models import HF_RUN_SUBDIR

    p = Path(str(value)).expanduser()
    if is_hf_model_dir(p):
        return p
    return p / HF_RUN_SUBDIR if p.is_dir() and is_hf_model_dir(p / HF_RUN_SUBDIR) else None


class HFTokenizer:
    """Our tokenizer interface over a ``transformers`` tokenizer: ``encode(str) -> list[int]``
    (no special tokens added), ``decode(ids) -> str`` (special tokens kept as text, no clean-up
    of spaces, so decode(encode(s)) == s for byte-level BPE), ``special_ids`` (token -> id)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        specials = getattr(hf_tokenizer, "all_special_tokens", None) or []
        self.special_ids = {s: int(i) for s, i in zip(specials, hf_tokenizer.convert_tokens_to_ids(list(specials)))
                            if i is not None}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __len__(self) -> int:
        return len(self.hf)


def _prefix_ids(hf_tokenizer) -> list[int]:
    """The ids the tokenizer adds in front of any text (BOS for Llama-style tokenizers)."""
    try:
        with_specials = list(hf_tokenizer("x", add_special_tokens=True)["input_ids"])
        plain = list(hf_tokenizer("x", add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer without a post-processor
        return []
    n = len(with_specials) - len(plain)
    return with_specials[:n] if n > 0 and with_specials[n:n + len(plain)] == plain else []


class HFEngine:
    """Batched, KV-cached sampling from a Hugging Face causal LM with the semantics of
    ``lmrun.inference.InferenceEngine.generate`` (see the module docstring). ``generate`` raises
    ValueError for an empty prompt or a prompt plus ``max_new_tokens`` beyond the context."""

    def __init__(self, model, tokenizer: HFTokenizer, context_length: int, prefix_ids: list[int], pad_id: int):
        from lmrun.inference.engine import GenerationStats

        self.model, self.tokenizer = model.eval(), tokenizer
        self.context_length, self.prefix_ids, self.pad_id = context_length, list(prefix_ids), int(pad_id)
        self.device = next(model.parameters()).device
        self.last_stats = GenerationStats()

    def _ids(self, prompts) -> list[list[int]]:
        out = []
        for p in prompts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids and not self.prefix_ids:
                raise ValueError("every prompt must hold at least one token")
            if self.prefix_ids and ids[:len(self.prefix_ids)] != self.prefix_ids:
                ids = self.prefix_ids + ids
            out.append(ids)
        return out

    @torch.no_grad()
    def generate(self, prompts, params=None, on_token=None) -> list:
        """prompts: strings or token-id lists -> one ``Completion`` per prompt, in order."""
        from lmrun.inference.engine import GenerationStats, InferenceEngine, SamplingParams, _Row

        params = params or SamplingParams()
        ids = self._ids(prompts)
        for p in ids:
            if len(p) + params.max_new_tokens > self.context_length:
                raise ValueError(f"a prompt of {len(p)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                                 f"context_length={self.context_length}")
        st = self.last_stats = GenerationStats(prompt_tokens=sum(len(p) for p in ids))
        rows = [_Row(p, params, self.tokenizer) for p in ids]
        gen = None if params.seed is None else torch.Generator(device=self.device).manual_seed(int(params.seed))
        lengths = [len(p) for p in ids]
        L, b = max(lengths), len(ids)
        batch = torch.full((b, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(b, L, dtype=torch.long)
        for i, p in enumerate(ids):
            batch[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
        batch, mask = batch.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        t0 = time.perf_counter()
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        out = self.model(input_ids=batch, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
        tokens, logp = InferenceEngine._choose(out.logits[:, -1].float(), params, gen)
        tokens.tolist()
        st.prefill_s, st.target_passes = time.perf_counter() - t0, 1
        t0 = time.perf_counter()
        last = positions[:, -1:]
        while True:
            for i, row in enumerate(rows):
                if not row.done:
                    row.push(int(tokens[i]), float(logp[i]))
                    if on_token is not None:
                        on_token(i, int(tokens[i]))
            if all(r.done for r in rows):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=self.device)], 1)
            last = last + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last,
                             past_key_values=out.past_key_values, use_cache=True)
            st.target_passes += 1
            tokens, logp = InferenceEngine._choose(out.logits[:, -1].float(), params, gen)
        st.decode_s = time.perf_counter() - t0
        st.new_tokens = sum(len(r.c.token_ids) for r in rows)
        return [r.finish() for r in rows]


@dataclass
class HFCausalLM(CausalLM):
    """A ``CausalLM`` over a ``transformers`` model (``kind="hf"``). ``model`` is the HF module
    (``logits`` reads ``.logits`` of its output); ``tokenizer`` an ``HFTokenizer``; ``prefix_ids``
    the ids put in front of every prompt (BOS where the tokenizer adds one)."""

    kind: str = "hf"

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def engine(self) -> HFEngine:
        """An ``HFEngine`` over this model (puts the model in eval mode)."""
        return HFEngine(self.model, self.tokenizer, self.context_length, self.prefix_ids, self.pad_id)

    def save(self, path: str | Path, iteration: int = 0, optimizer=None, **extra) -> Path:
        """Write a Hugging Face directory (``save_pretrained`` of model and tokenizer) that
        ``load_causal_lm`` reads back; ``iteration`` and JSON-serialisable ``extra`` go to
        ``lmrun.json``, the optimizer state to ``optimizer.pt``."""
        from lmrun.tracking.files import atomic_write_json

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(p)
        self.tokenizer.hf.save_pretrained(p)
        meta = {"iteration": int(iteration)}
        meta.update({k: v for k, v in extra.items() if _jsonable(v)})
        atomic_write_json(p / "lmrun.json", meta)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), p / "optimizer.pt")
        return p


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _context_length(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    raise FormatError("cannot tell the model's context length: its config.json has no max_position_embeddings "
                      "or n_positions")


def hf_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a Hugging Face folder's config.json (None: unreadable or absent)."""
    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def lmrun_model_config(path: str | Path, key: str = "model"):
    """The lmrun ``ModelConfig`` a Hugging Face folder converts to (``lmrun.model.hf.from_hf_config``),
    or None when lmrun has no equivalent (the folder then loads as a transformers model). Reads
    config.json only. DataError when transformers is missing."""
    from lmrun.model.hf import IMPORTABLE, from_hf_config

    kind = hf_model_type(path)
    if kind not in IMPORTABLE:
        if kind is not None:
            log.info("%s: Hugging Face model_type %s has no lmrun equivalent: it runs in transformers", key, kind)
        return None
    tf = _transformers(key)
    try:
        return from_hf_config(tf.AutoConfig.from_pretrained(str(Path(path).expanduser()), local_files_only=True), key)
    except (FormatError, OSError, ValueError, KeyError, TypeError) as e:
        log.info("%s: not converted to an lmrun model, it runs in transformers (%s)", key,
                 (str(e).splitlines() or [type(e).__name__])[0])
        return None


class _PrefixedEngine:
    """lmrun's ``InferenceEngine`` with the tokenizer's prefix ids (BOS) put in front of every
    prompt, as ``HFEngine`` does; ``last_stats`` is the engine's."""

    def __init__(self, engine, prefix_ids: list[int]):
        self.engine, self.prefix_ids = engine, list(prefix_ids)

    @property
    def last_stats(self):
        return self.engine.last_stats

    def generate(self, prompts, params=None, on_token=None) -> list:
        ids = []
        for p in prompts:
            p = self.engine.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
            ids.append(p if not self.prefix_ids or p[:len(self.prefix_ids)] == self.prefix_ids else self.prefix_ids + p)
        return self.engine.generate(ids, params, on_token)


@dataclass
class ConvertedHFCausalLM(HFCausalLM):
    """A Hugging Face folder converted to lmrun's ``TransformerLM`` (``model``), with the folder's
    tokenizer (``HFTokenizer``). ``kind`` stays ``hf`` (alignment stages save it as a model
    folder); ``facts["model_config"]`` is the lmrun model config. ``engine()`` is lmrun's
    ``InferenceEngine`` (KV cache) with the prefix ids in front of each prompt; ``save`` writes a
    Hugging Face folder through ``lmrun.model.hf.export_hf_model`` (Qwen2 comes back as a Llama
    with zero o_proj / MLP biases: the same function)."""

    @property
    def vocab_size(self) -> int:
        return int(self.model.vocab_size)

    def engine(self) -> _PrefixedEngine:
        from lmrun.inference.engine import InferenceEngine

        return _PrefixedEngine(InferenceEngine(self.model, self.tokenizer), self.prefix_ids)

    def save(self, path: str | Path, iteration: int = 0, optimizer=None, **extra) -> Path:
        from lmrun.model.hf import export_hf_model
        from lmrun.tracking.files import atomic_write_json

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        hf = self.facts.get("hf_config", {})
        export_hf_model(self.model, self.facts["model_config"], p, bos_token_id=_one(hf.get("bos_token_id")),
                        eos_token_id=self.eos_token_id, pad_token_id=self.pad_id)
        self.tokenizer.hf.save_pretrained(p)
        meta = {"iteration": int(iteration)}
        meta.update({k: v for k, v in extra.items() if _jsonable(v)})
        atomic_write_json(p / "lmrun.json", meta)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), p / "optimizer.pt")
        return p


def _one(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def load_hf_causal_lm(path: str | Path, device: str | torch.device = "cpu", key: str = "model",
                      convert: bool = True) -> HFCausalLM:
    """A Hugging Face causal LM and its tokenizer from a local directory (never downloads).

    path: a directory with ``config.json``, weights and tokenizer files; device: where the
    weights go (float32 on a CPU; the config's dtype on a GPU, float32 when converted); key: the
    config key named in errors; convert: load an architecture lmrun maps (``lmrun_model_config``)
    as lmrun's ``TransformerLM`` (``ConvertedHFCausalLM``), else as a transformers model. Raises
    DataError (no such directory, transformers not installed) or FormatError (the directory cannot
    be loaded as a causal LM with a tokenizer)."""
    p = Path(path).expanduser()
    if not is_hf_model_dir(p):
        raise DataError(f"{key}={path}: not a Hugging Face model directory (no config.json)")
    tf = _transformers(key)
    device = torch.device(device)
    mc = lmrun_model_config(p, key) if convert else None
    try:
        try:
            hf_tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            if not (p / "tokenizer.json").is_file():
                raise
            hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
        if mc is None:
            dtype = torch.float32 if device.type == "cpu" else "auto"
            model = tf.AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
            config = model.config
        else:
            config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise FormatError(f"{key}={path}: cannot load it as a Hugging Face causal LM "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    tok = HFTokenizer(hf_tok)
    eos = hf_tok.eos_token_id
    if eos is None:
        eos = _one(getattr(config, "eos_token_id", None))
    if eos is None:
        eos = hf_tok.convert_tokens_to_ids(EOS_TOKEN) if EOS_TOKEN in hf_tok.get_vocab() else None
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else (eos if eos is not None else 0)
    common = dict(tokenizer=tok, eos_token_id=None if eos is None else int(eos), source=str(p.absolute()),
                  prefix_ids=_prefix_ids(hf_tok), pad_id=int(pad))
    if mc is not None:
        from dataclasses import asdict

        from lmrun.model.hf import load_hf_model

        model, mc = load_hf_model(p, device, key)
        return ConvertedHFCausalLM(model=model, context_length=int(mc.context_length),
                                   facts={"hf_config": config.to_dict(), "model_config": asdict(mc)}, **common)
    model.to(device).eval()
    return HFCausalLM(model=model, context_length=_context_length(model.config, hf_tok),
                      facts={"hf_config": model.config.to_dict()}, **common)
