"""Stage ``evaluate``: perplexity (the default task) or a task evaluation of a model.

``evaluate.task=perplexity``: loss (nats/token), perplexity and bits per byte of a checkpoint on
any data preset, with the checkpoint's own tokenizer (the data is encoded with it, cached).
``lmrun stage=evaluate evaluate.checkpoint=runs/pretrain/<run>`` (the run's latest checkpoint)
or ``evaluate.checkpoint=path/to/ckpt.pt``; ``data=text_files data.train=… [data.val=…]`` to
score other text. Writes ``eval.json`` into the run directory.

``evaluate.task=gsm8k|mmlu|alpaca_eval|safety`` with ``evaluate.data_path=…``: the task
evaluations of ``lmrun.eval.tasks`` on our checkpoint or a local Hugging Face model directory.
Writes ``<task>.jsonl`` (one record per example), ``eval.json`` (metrics, per-subject / per-harm-
area breakdowns, settings), ``alpaca_eval_outputs.json`` for alpaca_eval, and ``summary.json``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lmrun.data.corpora import prepare_corpus
from lmrun.errors import ConfigError, DataError, FormatError
from lmrun.tokenizer.artifacts import get_or_encode_tokens, tokens_material
from lmrun.tracking.cache import open_cache
from lmrun.tracking.files import atomic_write_json, atomic_write_text, json_dumps
from lmrun.tracking.run import active_run
from lmrun.train.loading import checkpoint_facts as _checkpoint_facts
from lmrun.train.loading import checkpoint_tokenizer_files as _tokenizer_files
from lmrun.train.loading import resolve_checkpoint

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    if cfg.evaluate.task != "perplexity":
        return _plan_task(cfg)
    from lmrun.model.flops import model_summary

    _refuse_hf(cfg.evaluate.checkpoint)
    path = resolve_checkpoint(cfg.evaluate.checkpoint)
    facts = _checkpoint_facts(path)
    files = _tokenizer_files(facts, path)
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    key = cache.key("tokens", tokens_material(corpus, files.identity))
    summary = model_summary(facts["model_config"])
    _check_stride(cfg.evaluate.stride, facts)
    return {"stage": "evaluate", "checkpoint": str(path), "step": int(facts["iteration"]),
            "model": {"architecture": summary["architecture"], "params": summary["params"]["total"]},
            "tokenizer": str(files.vocab), "inputs": corpus.sources,
            "tokens": str(cache.path("tokens", key)) + ("" if cache.lookup("tokens", key) else " (encoded first)"),
            "splits": ["train", "val"] if cfg.evaluate.split == "both" else [cfg.evaluate.split],
            "outputs": ["eval.json", "summary.json", "run.json"]}


def run(cfg) -> dict:
    if cfg.evaluate.task != "perplexity":
        return _run_task(cfg)
    import numpy as np
    import torch

    from lmrun.tracking.progress import Progress
    from lmrun.train.evaluation import bits_per_byte, evaluate_loss
    from lmrun.train.loading import load_model
    from lmrun.train.trainer import resolve_device

    run = active_run()
    e = cfg.evaluate
    _refuse_hf(e.checkpoint)
    path = resolve_checkpoint(e.checkpoint)
    facts = _checkpoint_facts(path)
    files = _tokenizer_files(facts, path)
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache)
    artifact = get_or_encode_tokens(cfg, cache, corpus, files, special_tokens=facts["tokenizer"]["special_tokens"])
    meta = json.loads((artifact.path / "meta.json").read_text())
    if meta["vocab_size"] > int(facts["model_config"]["vocab_size"]):
        raise FormatError(f"{path}: the model's vocabulary ({facts['model_config']['vocab_size']}) is smaller than "
                          f"its tokenizer's ({meta['vocab_size']})")
    device = resolve_device(e.device)
    log.info("loading checkpoint %s", path)
    model, step = load_model(path, facts, device)
    if e.int8:
        from lmrun.inference.quantize import quantize_int8

        quantize_int8(model)
    context = _check_stride(e.stride, facts)
    results = {"checkpoint": str(path), "step": step, "data": corpus.name, "int8": bool(e.int8),
               "stride": int(e.stride or context)}
    for split in (["train", "val"] if e.split == "both" else [e.split]):
        tokens = np.memmap(artifact.path / f"{split}.bin", dtype=meta["dtype"], mode="r")
        n = len(tokens) if e.max_tokens is None else min(int(e.max_tokens), len(tokens))
        with Progress(max(0, n - 1), f"evaluate {split}", unit="token", bar=bool(cfg.progress), log_start=True) as p:
            r = evaluate_loss(model, tokens, int(e.batch_size), context, device, max_tokens=e.max_tokens,
                              autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, stride=e.stride,
                              progress=p.update)
        bpt = meta["splits"][split]["bytes_per_token"]
        results.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"],
                        f"{split}_bpb": bits_per_byte(r["loss"], bpt), f"{split}_tokens": r["tokens"]})
        log.info("%s: loss %.4f nats/token, perplexity %.2f, %.4f bits/byte over %d tokens", split, r["loss"],
                 r["perplexity"], results[f"{split}_bpb"], r["tokens"])
    atomic_write_json(run.dir / "eval.json", results)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    run.log(summary, step=step)
    return summary


def _check_stride(stride: int | None, facts: dict) -> int:
    """The checkpoint's context length; ConfigError if ``evaluate.stride`` exceeds it."""
    context = int(facts["model_config"]["context_length"])
    if stride is not None and stride > context:
        raise ConfigError(f"evaluate.stride={stride}: expected null or an integer in [1, {context}], the checkpoint's "
                          "context length")
    return context


def _refuse_hf(checkpoint: str) -> None:
    from lmrun.eval.hf import is_hf_model_dir

    if is_hf_model_dir(checkpoint):
        raise ConfigError(f"evaluate.checkpoint={checkpoint}: perplexity needs an lmrun checkpoint (it encodes the "
                          "data preset with the checkpoint's tokenizer); Hugging Face directories take "
                          "evaluate.task=gsm8k|mmlu|alpaca_eval|safety")


# --- task evaluations (gsm8k, mmlu, alpaca_eval, safety) --------------------------------------------


def _model_facts(value: str, key: str) -> dict:
    """What a dry run shows of a model (without loading its weights): path, kind, step, size."""
    from lmrun.eval.hf import is_hf_model_dir

    if is_hf_model_dir(value):
        return {"path": str(Path(value).expanduser().absolute()), "kind": "hf"}
    p = Path(value).expanduser()
    if not p.exists():
        raise DataError(f"{key}={value}: no such checkpoint file or run directory")
    from lmrun.model.flops import model_summary

    path = resolve_checkpoint(value, key)
    facts = _checkpoint_facts(path)
    _tokenizer_files(facts, path)
    summary = model_summary(facts["model_config"])
    return {"path": str(path), "kind": "lmrun", "step": int(facts["iteration"]),
            "architecture": summary["architecture"], "params": summary["params"]["total"]}


def _template(e) -> tuple[str, str, tuple[str, ...]]:
    """(template name or path, template text, stop strings)."""
    from lmrun.align.prompts import load_prompt
    from lmrun.eval.tasks import DEFAULT_STOPS, DEFAULT_TEMPLATES

    name = e.prompt_template or DEFAULT_TEMPLATES[e.task]
    text = load_prompt(name)
    stop = tuple(e.stop) if e.stop is not None else DEFAULT_STOPS.get(name, ())
    return name, text, stop


def _task_outputs(task: str) -> list[str]:
    out = [f"{task}.jsonl", "eval.json", "summary.json", "run.json"]
    if task == "alpaca_eval":
        out.insert(1, "alpaca_eval_outputs.json")
    return out


def _plan_task(cfg) -> dict:
    from lmrun.eval.datasets import load_reference_outputs, load_task_data

    e = cfg.evaluate
    model = _model_facts(e.checkpoint, "evaluate.checkpoint")
    examples = load_task_data(e.task, e.data_path, e.limit)
    name, _, stop = _template(e)
    out = {"stage": "evaluate", "task": e.task, "model": model, "data": str(Path(e.data_path).expanduser().absolute()),
           "examples": len(examples), "prompt_template": name, "stop": list(stop),
           "sampling": {"max_new_tokens": int(e.max_new_tokens), "temperature": float(e.temperature),
                        "top_p": float(e.top_p)}}
    if e.task == "mmlu":
        out["mmlu_method"] = e.mmlu_method
    if e.judge:
        out["judge"] = _model_facts(e.judge, "evaluate.judge")
    if e.reference_outputs:
        out["reference_outputs"] = len(load_reference_outputs(e.reference_outputs))
    out["outputs"] = _task_outputs(e.task)
    return out


def _generator_name(e, source: str) -> str:
    if e.generator:
        return str(e.generator)
    p = Path(source)
    if p.is_dir():
        return p.name
    return f"{p.parent.parent.name}-{p.stem}" if p.parent.name == "checkpoints" else p.stem


def _run_task(cfg) -> dict:
    import time

    from lmrun.eval import tasks
    from lmrun.eval.datasets import load_reference_outputs, load_task_data
    from lmrun.eval.models import load_causal_lm
    from lmrun.eval.scoring import GenerationOptions
    from lmrun.train.trainer import resolve_device

    run = active_run()
    e = cfg.evaluate
    t0 = time.perf_counter()
    examples = load_task_data(e.task, e.data_path, e.limit)
    name, template, stop = _template(e)
    references = load_reference_outputs(e.reference_outputs) if e.reference_outputs else None
    device = resolve_device(e.device)
    lm = load_causal_lm(e.checkpoint, device, key="evaluate.checkpoint")
    judge = load_causal_lm(e.judge, device, key="evaluate.judge") if e.judge else None
    if judge is not None:
        from lmrun.eval.judge import text_budget

        try:
            text_budget(judge)
        except ValueError as err:
            raise ConfigError(f"evaluate.judge={e.judge}: {err}") from None
    opts = GenerationOptions(max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature),
                             top_p=float(e.top_p), stop=stop, batch_size=int(e.batch_size), seed=int(cfg.seed),
                             progress=bool(cfg.progress))
    log.info("%s: %d examples, template %s, model %s (%s)", e.task, len(examples), name, lm.source, lm.kind)
    if e.task == "gsm8k":
        result = tasks.evaluate_gsm8k(lm, examples, template, opts)
    elif e.task == "mmlu":
        result = tasks.evaluate_mmlu(lm, examples, template, opts, method=e.mmlu_method)
    elif e.task == "alpaca_eval":
        result = tasks.evaluate_alpaca_eval(lm, examples, template, opts, _generator_name(e, lm.source),
                                            judge=judge, references=references)
    else:
        result = tasks.evaluate_safety(lm, examples, template, opts)
    seconds = time.perf_counter() - t0
    atomic_write_text(run.dir / f"{e.task}.jsonl",
                      "".join(json_dumps(r, ensure_ascii=False) + "\n" for r in result.records))
    for fname, obj in result.files.items():
        atomic_write_json(run.dir / fname, obj)
    summary = {**result.metrics, "seconds": seconds}
    atomic_write_json(run.dir / "eval.json", {
        "task": e.task, "checkpoint": lm.source, "model_kind": lm.kind, "data": str(Path(e.data_path).expanduser()),
        "prompt_template": name, "stop": list(stop), "judge": judge.source if judge is not None else None,
        **summary, **result.groups})
    run.log(summary)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
             if k in ("examples", "accuracy", "accuracy_generate", "accuracy_loglik", "win_rate", "refusal_rate",
                      "seconds")}
    log.info("%s: %s", e.task, ", ".join(f"{k} {v}" for k, v in shown.items()))
    return summary
