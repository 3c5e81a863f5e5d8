"""Stage ``pretrain``: tokenizer (cached) -> token arrays (cached) -> train -> evaluate -> sample.

Run directory: ``run.json``, ``metrics.jsonl`` (loss, lr, grad norm, tokens/s, MFU, memory per
log step; validation loss, perplexity, bits per byte per evaluation), ``summary.json``,
``checkpoints/ckpt_<step>.pt`` (model, optimizer, data position, RNG states, the tokenizer's
files and identity, a checksum), ``tokenizer/`` (a copy of vocab.json, merges.txt and
special_tokens.json), ``loss_curve.png`` and ``samples.txt``. A checkpoint holds no path into the
cache: copied to another machine, ``generate``, ``evaluate`` and ``sft`` use it as it is.

Restarted in the same directory (``hydra.run.dir=<run>``), the run resumes from its newest intact
checkpoint — a corrupt newer one is reported and moved aside to ``<name>.corrupt`` — after removing
the temporary files of checkpoint writes that a kill interrupted; the metrics the earlier attempt
logged after that checkpoint are dropped, so every step is in metrics.jsonl once. Ctrl-C saves a
checkpoint after the current step and stops (a second Ctrl-C stops at once).

``model.init_from=<Hugging Face folder>`` starts from a Llama / Qwen2 / Qwen3 / Mixtral / GPT-2
folder's weights (converted to lmrun's ``TransformerLM``, ``lmrun.model.hf``), with its
architecture, shape and tokenizer (``lmrun.train.loading.apply_init_from``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from lmrun.data.corpora import data_summary, prepare_corpus
from lmrun.errors import ConfigError
from lmrun.model.flops import model_summary, training_flops
from lmrun.tokenizer.artifacts import follow_tokenizer_vocab, get_or_encode_tokens, get_tokenizer, tokens_material
from lmrun.tracking.cache import open_cache
from lmrun.tracking.files import atomic_write_text
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)

#: a checkpoint can be resumed: the CLI lets this stage continue in an existing run directory
RESUMABLE = True
#: runs as several processes (torchrun, or a Slurm job with several tasks; ``distributed.strategy``)
DISTRIBUTED = True


def _budget(cfg) -> dict:
    t, ctx = cfg.train, int(cfg.model.context_length)
    per_step = int(t.batch_size) * ctx
    if t.max_steps is not None:
        return {"steps": int(t.max_steps), "tokens": int(t.max_steps) * per_step, "tokens_per_step": per_step}
    if t.max_tokens is not None:
        steps = -(-int(t.max_tokens) // per_step)
        return {"steps": steps, "tokens": steps * per_step, "tokens_per_step": per_step}
    if t.max_flops is not None:
        from lmrun.model.flops import model_summary as summary

        import math

        steps = max(1, math.ceil(float(t.max_flops) / summary(cfg.model)["train_flops_per_token"] / per_step))
        return {"steps": steps, "tokens": steps * per_step, "tokens_per_step": per_step, "flops": float(t.max_flops)}
    return {"seconds": float(t.max_time), "tokens_per_step": per_step}


def _check_vocab(cfg, tokenizer_vocab_size: int) -> None:
    if int(cfg.model.vocab_size) < tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: expected >= {tokenizer_vocab_size}, the number of "
                          "token ids of the tokenizer (set model.vocab_size or tokenizer.vocab_size)")


def _distributed_plan(cfg) -> str:
    import os

    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world <= 1:
        return f"one process (distributed.strategy={cfg.distributed.strategy} applies with several)"
    return f"{world} processes, distributed.strategy={cfg.distributed.strategy}"


def _init_from(cfg) -> dict | None:
    """``model.init_from``: the folder's architecture, shape and tokenizer put into ``cfg``
    (``lmrun.train.loading.apply_init_from``); ConfigError with a sharded strategy."""
    import os

    from lmrun.train.loading import apply_init_from

    init = apply_init_from(cfg)
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if init is not None and world > 1 and cfg.distributed.strategy in ("fsdp", "tp", "torch_fsdp"):
        raise ConfigError(f"model.init_from={cfg.model.init_from}: with distributed.strategy="
                          f"{cfg.distributed.strategy} (sharded parameters); use a DDP strategy")
    return init


def plan(cfg) -> dict:
    init = _init_from(cfg)
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    tok = get_tokenizer(cfg, cache, corpus, dry_run=True)
    if cfg.tokenizer.path:
        _check_vocab(cfg, max(tok.load(list(cfg.tokenizer.special_tokens)).vocab) + 1)
    else:
        _check_vocab(cfg, int(cfg.tokenizer.vocab_size))
    tokens_key = cache.key("tokens", tokens_material(corpus, tok.identity))
    tokens_cached = cache.lookup("tokens", tokens_key) is not None and not cfg.cache.rebuild
    summary = model_summary(cfg.model)
    budget = _budget(cfg)
    flops = training_flops(cfg.model, budget["tokens"]) if "tokens" in budget else None
    return {
        "stage": "pretrain",
        "inputs": corpus.sources,
        **({"data": data_summary(corpus)} if corpus.info else {}),
        "tokenizer": str(tok.folder) + ("" if tok.reused else " (trained first)"),
        "tokens": str(cache.path("tokens", tokens_key)) + ("" if tokens_cached else " (encoded first)"),
        "model": {"architecture": summary["architecture"], "params": summary["params"],
                  "forward_flops_per_token": summary["forward_flops_per_token"],
                  "train_flops_per_token": summary["train_flops_per_token"],
                  "six_n_flops_per_token": summary["six_n_flops_per_token"]},
        "budget": budget,
        "train_flops": flops,
        "distributed": _distributed_plan(cfg),
        **({"init_from": init} if init else {}),
        "outputs": ["checkpoints/", "metrics.jsonl", "summary.json", "loss_curve.png", "samples.txt", "run.json"],
    }


def _samples(cfg, model, tok) -> list[str]:
    """``train.samples`` completions of a newline, drawn together through the KV-cached inference
    engine (at most the context's worth of new tokens; seeded by ``seed``)."""
    from lmrun.inference import InferenceEngine, SamplingParams
    from lmrun.inference.config import fit_new_tokens

    n = int(cfg.train.samples)
    if n == 0:
        return []
    prompt = tok.encode("\n")
    new_tokens = fit_new_tokens([len(prompt)], int(cfg.train.sample_tokens), int(cfg.model.context_length),
                                "train.samples")
    if new_tokens < int(cfg.train.sample_tokens):
        log.info("samples: train.sample_tokens=%d capped to %d (context %d)", cfg.train.sample_tokens, new_tokens,
                 cfg.model.context_length)
    log.info("sampling %d x %d tokens (KV-cached engine)", n, new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=float(cfg.train.temperature),
                            top_p=float(cfg.train.top_p), stop_token_ids=tuple(tok.special_ids.values()),
                            seed=int(cfg.seed))
    was_training = model.training
    completions = InferenceEngine(model, tok).generate([prompt] * n, params)
    model.train(was_training)
    return [tok.decode(prompt + c.token_ids) for c in completions]


def run(cfg) -> dict:
    import numpy as np

    from lmrun.distributed.env import is_main_process
    from lmrun.tracking.run import seed_everything
    from lmrun.train.loading import tokenizer_facts, write_run_tokenizer
    from lmrun.train.trainer import Trainer, plot_loss_curve

    run = active_run()
    seed_everything(int(cfg.seed))
    init = _init_from(cfg)
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    files = get_tokenizer(cfg, cache, corpus)
    artifact = get_or_encode_tokens(cfg, cache, corpus, files)
    meta = json.loads((artifact.path / "meta.json").read_text())
    follow_tokenizer_vocab(cfg, int(meta["vocab_size"]))  # an interpolated model.vocab_size: the real size
    _check_vocab(cfg, int(meta["vocab_size"]))
    train = np.memmap(artifact.path / "train.bin", dtype=meta["dtype"], mode="r")
    val = np.memmap(artifact.path / "val.bin", dtype=meta["dtype"], mode="r")
    specials = list(cfg.tokenizer.special_tokens)
    # the checkpoint carries its tokenizer files (no path into the cache); the run directory a copy
    tokenizer = tokenizer_facts(files, specials)
    if is_main_process():
        write_run_tokenizer(tokenizer, run.dir)
    extra = {"model_config": OmegaConf.to_container(cfg.model, resolve=True), "tokenizer": tokenizer,
             "tokens_dir": str(artifact.path)}
    from lmrun.distributed.env import teardown

    trainer = Trainer(cfg, run, train, val, meta["splits"]["val"]["bytes_per_token"], extra_state=extra)
    if init is not None:  # the folder's weights; a resumed run's checkpoint replaces them in fit()
        from lmrun.train.loading import load_init_weights

        load_init_weights(trainer.model, Path(init["folder"]))
        if trainer.ema is not None:
            from lmrun.train.ema import ParameterEMA

            trainer.ema = ParameterEMA(trainer.model, cfg.train.ema_decay)
        log.info("model.init_from: started from the weights of %s (%s)", init["folder"], init["hf_model_type"])
    try:
        summary = trainer.fit()
        model = trainer.plain_model()  # collective for sharded strategies; None on ranks > 0
    finally:
        if trainer.parallel.active:
            teardown()
    if model is None:  # ranks > 0: rank 0 writes plots and samples
        return summary
    plot_loss_curve(trainer.state.history, run.dir / "loss_curve.png",
                    f"{cfg.model.name} on {corpus.name}: {summary['steps']} steps")

    tok = files.load(specials)
    texts = _samples(cfg, model, tok)
    if texts:
        atomic_write_text(run.dir / "samples.txt", "".join(
            f"--- sample {i} (temperature {cfg.train.temperature}, top-p {cfg.train.top_p}) ---\n{t}\n\n"
            for i, t in enumerate(texts)))
        log.info("sample 0:\n%s", texts[0])
    log.info("validation: loss %.4f, perplexity %.2f, %.4f bits/byte; %.0f tokens/s; %.1f s of training",
             summary["val_loss"], summary["val_perplexity"], summary["val_bpb"], summary["tokens_per_s"],
             summary["train_seconds"])
    return summary
