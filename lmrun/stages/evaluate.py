"""Stage ``evaluate``: loss (nats/token), perplexity and bits per byte of a pretrain checkpoint on
any data preset, with the checkpoint's own tokenizer (the data is encoded with it, cached).

``lmrun stage=evaluate evaluate.checkpoint=runs/pretrain/<run>`` (the run's latest checkpoint)
or ``evaluate.checkpoint=path/to/ckpt.pt``; ``data=text_files data.train=… [data.val=…]`` to
score other text. Writes ``eval.json`` into the run directory.
"""
from __future__ import annotations

import json
import logging

from lmrun.data.corpora import prepare_corpus
from lmrun.errors import FormatError
from lmrun.stages.checkpoints import checkpoint_facts as _checkpoint_facts
from lmrun.stages.checkpoints import checkpoint_tokenizer_files as _tokenizer_files
from lmrun.stages.checkpoints import resolve_checkpoint
from lmrun.stages.encode import get_or_encode_tokens, tokens_material
from lmrun.stages.tokenizer import open_cache
from lmrun.tracking.files import atomic_write_json
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def plan(cfg) -> dict:
    from lmrun.model.flops import model_summary

    path = resolve_checkpoint(cfg.evaluate.checkpoint)
    facts = _checkpoint_facts(path)
    files = _tokenizer_files(facts, path)
    cache = open_cache(cfg)
    corpus = prepare_corpus(cfg.data, cache, dry_run=True)
    key = cache.key("tokens", tokens_material(corpus, files.identity))
    summary = model_summary(facts["model_config"])
    return {"stage": "evaluate", "checkpoint": str(path), "step": int(facts["iteration"]),
            "model": {"architecture": summary["architecture"], "params": summary["params"]["total"]},
            "tokenizer": str(files.vocab), "inputs": corpus.sources,
            "tokens": str(cache.path("tokens", key)) + ("" if cache.lookup("tokens", key) else " (encoded first)"),
            "splits": ["train", "val"] if cfg.evaluate.split == "both" else [cfg.evaluate.split],
            "outputs": ["eval.json", "summary.json", "run.json"]}


def run(cfg) -> dict:
    import numpy as np
    import torch

    from lmrun.stages.checkpoints import load_model
    from lmrun.train.evaluation import bits_per_byte, evaluate_loss
    from lmrun.train.trainer import resolve_device

    run = active_run()
    e = cfg.evaluate
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
    model, step = load_model(path, facts, device)
    context = int(facts["model_config"]["context_length"])
    results = {"checkpoint": str(path), "step": step, "data": corpus.name}
    for split in (["train", "val"] if e.split == "both" else [e.split]):
        tokens = np.memmap(artifact.path / f"{split}.bin", dtype=meta["dtype"], mode="r")
        r = evaluate_loss(model, tokens, int(e.batch_size), context, device, max_tokens=e.max_tokens,
                          autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
        bpt = meta["splits"][split]["bytes_per_token"]
        results.update({f"{split}_loss": r["loss"], f"{split}_perplexity": r["perplexity"],
                        f"{split}_bpb": bits_per_byte(r["loss"], bpt), f"{split}_tokens": r["tokens"]})
        log.info("%s: loss %.4f nats/token, perplexity %.2f, %.4f bits/byte over %d tokens", split, r["loss"],
                 r["perplexity"], results[f"{split}_bpb"], r["tokens"])
    atomic_write_json(run.dir / "eval.json", results)
    summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    run.log(summary, step=step)
    return summary
