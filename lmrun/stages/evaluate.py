"""Stage ``evaluate``: perplexity (the default task) or a task evaluation of a model.

``evaluate.task=perplexity``: loss (nats/token), perplexity and bits per byte of a checkpoint on
any data preset, with the checkpoint's own tokenizer (the data is encoded with it, cached).
``lmrun stage=evaluate evaluate.checkpoint=runs/pretrain/<run>`` (the run's latest checkpoint)
or ``evaluate.checkpoint=path/to/ckpt.pt``; ``data=text_files data.train=… [data.val=…]`` to
score other text. Writes ``eval.json`` into the run directory. A local Hugging Face model folder
works too (``evaluate.checkpoint=DIR``): the data is encoded with the folder's tokenizer (in
memory, not cached) and scored by lmrun's ``TransformerLM`` where ``lmrun.model.hf`` maps the
architecture (Llama, Qwen2, Qwen3, Mixtral, GPT-2), by the transformers model otherwise.

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
    from lmrun.eval.hf import find_hf_model_dir
    from lmrun.model.flops import model_summary

    if find_hf_model_dir(cfg.evaluate.checkpoint) is not None:
        return _plan_perplexity_hf(cfg)
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

    from lmrun.eval.hf import find_hf_model_dir

    run = active_run()
    e = cfg.evaluate
    if find_hf_model_dir(e.checkpoint) is not None:
        return _run_perplexity_hf(cfg)
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


def _plan_perplexity_hf(cfg) -> dict:
    from lmrun.eval.hf import find_hf_model_dir

    e = cfg.evaluate
    folder = find_hf_model_dir(e.checkpoint)
    model = _model_facts(str(folder), "evaluate.checkpoint")
    corpus = prepare_corpus(cfg.data, open_cache(cfg), dry_run=True)
    if e.stride is not None and model.get("context_length") and e.stride > model["context_length"]:
        raise ConfigError(f"evaluate.stride={e.stride}: expected null or an integer in [1, {model['context_length']}], "
                          "the model's context length")
    return {"stage": "evaluate", "checkpoint": str(folder.absolute()), "model": model, "tokenizer": str(folder),
            "inputs": corpus.sources, "tokens": "encoded with the folder's tokenizer when the run starts (not cached)",
            "splits": ["train", "val"] if e.split == "both" else [e.split],
            "outputs": ["eval.json", "summary.json", "run.json"]}


def encode_text_file(path: Path, tokenizer, max_tokens: int | None = None, chunk_bytes: int = 1 << 20):
    """``path`` (UTF-8 text) encoded with ``tokenizer`` (``encode(str) -> list[int]``), read in
    chunks of about ``chunk_bytes`` cut after a newline (so a chunk boundary never splits a line);
    stops once ``max_tokens`` tokens are there. -> (int64 array ``(tokens,)``, bytes encoded)."""
    import numpy as np

    parts, n_tokens, n_bytes = [], 0, 0
    with open(path, "rb") as f:
        rest = b""
        while max_tokens is None or n_tokens < max_tokens:
            block = f.read(chunk_bytes)
            data = rest + block
            if not data:
                break
            cut = data.rfind(b"\n") + 1 if block else len(data)  # at the end of the file: all of it
            if cut == 0:  # no newline yet: read on
                rest = data
                continue
            chunk, rest = data[:cut], data[cut:]
            ids = tokenizer.encode(chunk.decode("utf-8", errors="replace"))
            parts.append(np.asarray(ids, dtype=np.int64))
            n_tokens += len(ids)
            n_bytes += len(chunk)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return tokens, n_bytes


def _logits_module(model):
    """A module whose forward is ``model(ids).logits`` (a transformers model, for ``evaluate_loss``)."""
    import torch

    class LogitsOf(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids).logits

    return LogitsOf(model)


def _run_perplexity_hf(cfg) -> dict:
    import torch

    from lmrun.eval.hf import ConvertedHFCausalLM, find_hf_model_dir
    from lmrun.eval.models import load_causal_lm
    from lmrun.tracking.progress import Progress
    from lmrun.train.evaluation import bits_per_byte, evaluate_loss
    from lmrun.train.trainer import resolve_device

    run = active_run()
    e = cfg.evaluate
    folder = find_hf_model_dir(e.checkpoint)
    corpus = prepare_corpus(cfg.data, open_cache(cfg))
    device = resolve_device(e.device)
    lm = load_causal_lm(folder, device, key="evaluate.checkpoint")
    converted = isinstance(lm, ConvertedHFCausalLM)
    model = lm.model if converted else _logits_module(lm.model)
    if e.int8:
        if not converted:
            raise ConfigError(f"evaluate.int8=true: {folder} is not converted to an lmrun model (int8 needs one)")
        from lmrun.inference.quantize import quantize_int8

        quantize_int8(model)
    context = int(lm.context_length)
    if e.stride is not None and e.stride > context:
        raise ConfigError(f"evaluate.stride={e.stride}: expected null or an integer in [1, {context}], the model's "
                          "context length")
    results = {"checkpoint": str(folder.absolute()), "step": 0, "data": corpus.name, "int8": bool(e.int8),
               "stride": int(e.stride or context), "backend": "lmrun" if converted else "transformers"}
    for split in (["train", "val"] if e.split == "both" else [e.split]):
        src = corpus.train if split == "train" else corpus.val
        log.info("encoding %s with the tokenizer of %s", src, folder)
        tokens, n_bytes = encode_text_file(Path(src), lm.tokenizer, None if e.max_tokens is None else int(e.max_tokens))
        n = len(tokens) if e.max_tokens is None else min(int(e.max_tokens), len(tokens))
        with Progress(max(0, n - 1), f"evaluate {split}", unit="token", bar=bool(cfg.progress), log_start=True) as p:
            r = evaluate_loss(model, tokens, int(e.batch_size), context, device, max_tokens=e.max_tokens,
                              autocast_dtype=torch.bfloat16 if device.type == "cuda" else None, stride=e.stride,
                              progress=p.update)
        bpt = n_bytes / max(len(tokens), 1)
        results.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"],
                        f"{split}_bpb": bits_per_byte(r["loss"], bpt), f"{split}_tokens": r["tokens"]})
        log.info("%s: loss %.4f nats/token, perplexity %.2f, %.4f bits/byte over %d tokens", split, r["loss"],
                 r["perplexity"], results[f"{split}_bpb"], r["tokens"])
    atomic_write_json(run.dir / "eval.json", results)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    run.log(summary, step=0)
    return summary


# --- task evaluations (gsm8k, mmlu, alpaca_eval, safety) --------------------------------------------


def _model_facts(value: str, key: str) -> dict:
    """What a dry run shows of a model (without loading its weights): path, kind, step, size."""
    from lmrun.eval.hf import find_hf_model_dir, hf_model_type, lmrun_model_config

    folder = find_hf_model_dir(value)
    if folder is not None:
        out = {"path": str(folder.absolute()), "kind": "hf", "hf_model_type": hf_model_type(folder)}
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            context = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx")
                            if isinstance(config.get(k), int)), None)
        except (OSError, ValueError, AttributeError):
            context = None
        if context is not None:
            out["context_length"] = int(context)
        mc = lmrun_model_config(folder, key)
        if mc is not None:
            from lmrun.model.flops import model_summary

            summary = model_summary(mc)
            out.update({"backend": "lmrun TransformerLM (converted)", "architecture": summary["architecture"],
                        "params": summary["params"]["total"], "context_length": int(mc.context_length)})
        return out
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
