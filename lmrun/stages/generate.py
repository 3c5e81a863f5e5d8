"""Stage ``generate``: completions from a pretrain checkpoint with ``lmrun.inference``.

``generate.checkpoint`` may also be a local Hugging Face model folder (or an alignment run
directory holding one): Llama, Qwen2, Qwen3, Mixtral and GPT-2 folders are converted to lmrun's
``TransformerLM`` (``lmrun.model.hf``) and decoded by the same engine, with the folder's
tokenizer (its BOS prefix put in front of each prompt); other architectures decode with
transformers (``lmrun.eval.hf.HFEngine``; no draft model, no int8).

``lmrun stage=generate generate.checkpoint=runs/pretrain/<run> generate.prompt="To be"`` streams
the completion to the console; ``generate.prompts_file=prompts.jsonl`` (one ``{"prompt": ...}``
or JSON string per line) decodes them in batches of ``generate.batch_size``.
``generate.draft_checkpoint=…`` enables speculative decoding (same tokenizer). Writes
``generations.jsonl`` (one object per completion: prompt, sample index, text, token ids,
log-probs, finish reason) and ``summary.json`` (tokens, decode tokens/s, acceptance rate).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from lmrun.errors import ConfigError, DataError, FormatError
from lmrun.inference.config import fit_new_tokens
from lmrun.tracking.files import atomic_write_text, json_dumps
from lmrun.tracking.progress import Progress
from lmrun.tracking.run import active_run
from lmrun.train.loading import checkpoint_facts, checkpoint_tokenizer_files, resolve_checkpoint

log = logging.getLogger(__name__)


def read_prompts(g) -> list[str]:
    """The prompts of ``generate.prompt`` or ``generate.prompts_file`` (JSONL)."""
    if g.prompt is not None:
        return [str(g.prompt)]
    path = Path(g.prompts_file).expanduser()
    if not path.is_file():
        raise DataError(f"generate.prompts_file={g.prompts_file}: no such file")
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{i}: not JSON ({e.msg})") from None
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str) or not text:
            raise FormatError(f'{path}:{i}: expected a non-empty string or {{"prompt": "..."}}')
        prompts.append(text)
    if not prompts:
        raise DataError(f"generate.prompts_file={g.prompts_file}: no prompts")
    return prompts


def _sources(g):
    path = resolve_checkpoint(g.checkpoint, "generate.checkpoint")
    facts = checkpoint_facts(path)
    files = checkpoint_tokenizer_files(facts, path)
    draft = None
    if g.draft_checkpoint:
        dpath = resolve_checkpoint(g.draft_checkpoint, "generate.draft_checkpoint")
        dfacts = checkpoint_facts(dpath)
        dfiles = checkpoint_tokenizer_files(dfacts, dpath)
        if dfiles.identity != files.identity:  # content digests: equal tokenizers in two caches are the same
            raise FormatError(f"generate.draft_checkpoint={g.draft_checkpoint}: its tokenizer ({dfiles.vocab}) is not "
                              f"the target's ({files.vocab})")
        draft = (dpath, dfacts)
    return path, facts, files, draft


def _hf_sources(g):
    """(HF folder, lmrun ModelConfig or None) when ``generate.checkpoint`` is a Hugging Face
    folder, else None; ConfigError for options it cannot take."""
    from lmrun.eval.hf import find_hf_model_dir, hf_model_type, lmrun_model_config

    folder = find_hf_model_dir(g.checkpoint)
    if folder is None:
        if g.draft_checkpoint and find_hf_model_dir(g.draft_checkpoint) is not None:
            raise ConfigError(f"generate.draft_checkpoint={g.draft_checkpoint}: a Hugging Face folder cannot be the "
                              "draft of an lmrun checkpoint (different tokenizers)")
        return None
    if g.draft_checkpoint:
        raise ConfigError(f"generate.draft_checkpoint={g.draft_checkpoint}: speculative decoding takes lmrun "
                          "checkpoints; a Hugging Face generate.checkpoint decodes without a draft")
    mc = lmrun_model_config(folder, "generate.checkpoint")
    if mc is None and g.int8:
        raise ConfigError(f"generate.int8=true: the Hugging Face {hf_model_type(folder)} model of "
                          f"generate.checkpoint={g.checkpoint} has no lmrun equivalent (int8 needs one)")
    return folder, mc


def plan(cfg) -> dict:
    from lmrun.model.flops import model_summary

    g = cfg.generate
    hf = _hf_sources(g)
    if hf is not None:
        folder, mc = hf
        prompts = read_prompts(g)
        from lmrun.eval.hf import hf_model_type

        model = {"hf_model_type": hf_model_type(folder), "backend": "transformers"}
        if mc is not None:
            summary = model_summary(mc)
            model = {"hf_model_type": model["hf_model_type"], "backend": "lmrun TransformerLM (converted)",
                     "architecture": summary["architecture"], "params": summary["params"]["total"]}
        return {"stage": "generate", "checkpoint": str(folder.absolute()), "model": model, "tokenizer": str(folder),
                "prompts": len(prompts), "completions": len(prompts) * g.num_samples,
                "decoding": ("cached" if g.use_cache or mc is None else "uncached") + (" int8" if g.int8 else ""),
                "outputs": ["generations.jsonl", "summary.json", "run.json"]}
    path, facts, files, draft = _sources(cfg.generate)
    prompts = read_prompts(g)
    summary = model_summary(facts["model_config"])
    out = {"stage": "generate", "checkpoint": str(path), "step": int(facts["iteration"]),
           "model": {"architecture": summary["architecture"], "params": summary["params"]["total"]},
           "tokenizer": str(files.vocab), "prompts": len(prompts), "completions": len(prompts) * g.num_samples,
           "decoding": ("speculative" if draft else "cached" if g.use_cache else "uncached")
           + (" int8" if g.int8 else ""),
           "outputs": ["generations.jsonl", "summary.json", "run.json"]}
    if draft:
        out["draft_checkpoint"] = str(draft[0])
    return out


def run(cfg) -> dict:
    t_start = time.perf_counter()
    g = cfg.generate
    log.info("reading checkpoint %s", g.checkpoint)
    import torch

    from lmrun.inference.engine import GenerationStats, InferenceEngine, SamplingParams
    from lmrun.train.loading import load_model
    from lmrun.train.trainer import resolve_device

    run = active_run()
    device = resolve_device(g.device)
    hf = _hf_sources(g)
    prompts = read_prompts(g)
    draft, prefix = None, []
    if hf is not None:
        from lmrun.eval.models import load_causal_lm

        lm = load_causal_lm(hf[0], device, key="generate.checkpoint")
        model, tok, path, prefix, ctx = lm.model, lm.tokenizer, hf[0].absolute(), list(lm.prefix_ids), lm.context_length
        step = int(json.loads((hf[0] / "lmrun.json").read_text()).get("iteration", 0)) \
            if (hf[0] / "lmrun.json").is_file() else 0
        log.info("loaded the Hugging Face folder %s (%s): %s parameters", hf[0],
                 "converted to lmrun's TransformerLM" if hf[1] is not None else "transformers model",
                 f"{sum(p.numel() for p in model.parameters()):,}")
    else:
        path, facts, files, draft_src = _sources(g)
        mc = facts["model_config"]
        log.info("loading the model of %s (step %d, context %d tokens) on %s", path.name, int(facts["iteration"]),
                 int(mc["context_length"]), device)
        t = time.perf_counter()
        model, step = load_model(path, facts, device)
        ctx = int(model.context_length)
        log.info("model loaded in %.1f s: %s parameters", time.perf_counter() - t,
                 f"{sum(p.numel() for p in model.parameters()):,}")
        if draft_src:
            log.info("loading the draft model %s", draft_src[0])
            draft = load_model(draft_src[0], draft_src[1], device)[0]
        log.info("loading the tokenizer %s", files.vocab)
        tok = files.load(list(facts["tokenizer"]["special_tokens"]))
    if g.int8:
        from lmrun.inference.quantize import quantize_int8

        log.info("quantizing the weights to int8")
        quantize_int8(model)
        if draft is not None:
            quantize_int8(draft)
    prompt_ids = [prefix + tok.encode(p) for p in prompts]
    log.info("tokenizer ready (%d tokens); %d prompt(s) of %d-%d tokens; ready after %.1f s",
             len(tok.vocab) if hasattr(tok, "vocab") else len(tok), len(prompts), min(map(len, prompt_ids)),
             max(map(len, prompt_ids)), time.perf_counter() - t_start)
    key = "generate.prompt" if g.prompt is not None else "generate.prompts_file"
    if any(not ids for ids in prompt_ids):
        raise ConfigError(f"{key}: a prompt encodes to no tokens")
    specials = tuple(tok.special_ids.values()) if g.stop_at_special else ()
    if hf is not None and hf[1] is None:
        engine = lm.engine()  # transformers' model: HFEngine (KV-cached, BOS prefix)
    else:
        engine = InferenceEngine(model, tok, draft, speculative_k=int(g.speculative_k), use_cache=bool(g.use_cache))
    if getattr(engine, "use_cache", False) and draft is None:
        from lmrun.inference.kv_cache import supports_cache

        if not supports_cache(model):
            log.info("this model's token mixer (Hyena) has no cache here: every step recomputes the sequence")
    items = [(p, s, ids) for p, ids in zip(prompts, prompt_ids) for s in range(int(g.num_samples))]
    # the new-token budget of each batch: what the context leaves after its longest prompt
    budgets = [fit_new_tokens([len(x[2]) for x in items[i:i + int(g.batch_size)]], int(g.max_new_tokens), ctx, key)
               for i in range(0, len(items), int(g.batch_size))]
    if min(budgets) < int(g.max_new_tokens):
        capped = sum(b < int(g.max_new_tokens) for b in budgets)
        where = "" if len(budgets) == 1 else f" in {capped} of {len(budgets)} batches"
        log.warning("generate.max_new_tokens=%d does not fit the checkpoint's context (%d tokens) after prompts of "
                    "up to %d tokens: generating at most %d new tokens%s", int(g.max_new_tokens), ctx,
                    max(map(len, prompt_ids)), min(budgets), where)
    total = GenerationStats()
    lines, results = [], []
    stream = len(items) == 1
    progress = None if stream else Progress(len(items), "generating", unit="completion", bar=bool(cfg.progress))
    for b, start in enumerate(range(0, len(items), int(g.batch_size))):
        chunk = items[start:start + int(g.batch_size)]
        params = SamplingParams(max_new_tokens=budgets[b], temperature=float(g.temperature),
                                top_k=int(g.top_k), top_p=float(g.top_p), stop_token_ids=specials,
                                stop_strings=tuple(g.stop), seed=int(cfg.seed) + start)
        on_token = None
        if stream:
            printed = [0]
            ids: list[int] = []
            sys.stdout.write(chunk[0][0])
            sys.stdout.flush()

            def on_token(row, token, ids=ids, printed=printed):
                ids.append(token)
                text = tok.decode([t for t in ids if t not in specials])
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[printed[0]:])
                    sys.stdout.flush()
                    printed[0] = len(text)
        try:
            with torch.no_grad():
                out = engine.generate([ids for _, _, ids in chunk], params, on_token)
        except ValueError as e:  # what the checks above missed (an engine limit): one line, no traceback
            raise ConfigError(f"generate.max_new_tokens={g.max_new_tokens}: {e}") from None
        finally:
            if stream:  # end the streamed line, also on an error or Ctrl-C: a log line never follows the text
                sys.stdout.write("\n")
                sys.stdout.flush()
        st = engine.last_stats
        for name in ("prompt_tokens", "new_tokens", "prefill_s", "decode_s", "target_passes", "proposed", "accepted"):
            setattr(total, name, getattr(total, name) + getattr(st, name))
        for (prompt, s, _), c in zip(chunk, out):
            rec = {"prompt": prompt, "sample": s, "text": c.text, "finish_reason": c.finish_reason,
                   "token_ids": c.token_ids, "logprobs": [round(x, 6) for x in c.logprobs]}
            results.append(rec)
            lines.append(json_dumps(rec, ensure_ascii=False))
        if progress is not None:
            progress.update(len(chunk), new_tokens=total.new_tokens)
    if progress is not None:
        progress.close()
    atomic_write_text(run.dir / "generations.jsonl", "\n".join(lines) + "\n")
    summary = {k: v for k, v in total.as_dict().items() if v is not None}
    summary.update({"checkpoint": str(path), "step": step, "completions": len(results),
                    "max_new_tokens_requested": int(g.max_new_tokens), "max_new_tokens": max(budgets),
                    "finished_by_stop": sum(r["finish_reason"] == "stop" for r in results)})
    run.log({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=step)
    if not stream:
        for r in results[:3]:
            log.info("%r -> %r (%s)", r["prompt"], r["text"], r["finish_reason"])
    log.info("%d completions, %d new tokens, %.1f decode tokens/s%s", len(results), total.new_tokens,
             summary.get("decode_tokens_per_s") or 0.0,
             f", acceptance rate {total.acceptance_rate:.2f}" if total.acceptance_rate is not None else "")
    return summary
