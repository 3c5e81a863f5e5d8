"""Stage ``evaluate``: loss (nats/token), perplexity and bits per byte of a pretrain checkpoint on
any data preset, with the checkpoint's own tokenizer (the data is encoded with it, cached).

``lmrun stage=evaluate evaluate.checkpoint=runs/pretrain/<run>`` (the run's latest checkpoint)
or ``evaluate.checkpoint=path/to/ckpt.pt``; ``data=text_files data.train=… [data.val=…]`` to
score other text. Writes ``eval.json`` into the run directory.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lmrun.data.corpora import prepare_corpus
from lmrun.errors import DataError, FormatError
from lmrun.stages.encode import get_or_encode_tokens, tokens_material
from lmrun.stages.tokenizer import TokenizerFiles, open_cache
from lmrun.tracking.files import atomic_write_json
from lmrun.tracking.run import active_run

log = logging.getLogger(__name__)


def resolve_checkpoint(value: str) -> Path:
    """A checkpoint file, or the latest ``checkpoints/ckpt_*.pt`` of a run directory."""
    path = Path(value).expanduser()
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("ckpt_*.pt")) or sorted(path.glob("ckpt_*.pt"))
        if not found:
            raise DataError(f"evaluate.checkpoint={value}: no checkpoints/ckpt_*.pt in this directory")
        return found[-1].absolute()
    if not path.is_file():
        raise DataError(f"evaluate.checkpoint={value}: no such file or run directory")
    return path.absolute()


def _checkpoint_facts(path: Path) -> dict:
    from lmrun.train.checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    missing = [k for k in ("model_config", "tokenizer") if k not in obj]
    if missing:
        raise FormatError(f"{path}: checkpoint lacks {', '.join(missing)} (not written by stage=pretrain)")
    return obj


def _tokenizer_files(facts: dict, path: Path) -> TokenizerFiles:
    tok = facts["tokenizer"]
    vocab, merges = Path(tok["vocab"]), Path(tok["merges"])
    for f in (vocab, merges):
        if not f.is_file():
            raise DataError(f"{path}: the checkpoint's tokenizer file is gone: {f} (re-run stage=tokenizer with the "
                            "same data and config, or restore the cache)")
    identity = {k: v for k, v in tok.items() if k not in ("vocab", "merges")}
    return TokenizerFiles(vocab, merges, identity, True, {})


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

    from lmrun.model import build_model
    from lmrun.train.checkpoint import load_checkpoint
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
    model = build_model(facts["model_config"], device=device)
    step = load_checkpoint(path, model)
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
