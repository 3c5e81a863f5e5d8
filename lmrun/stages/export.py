"""Stage ``export``: an lmrun checkpoint as a Hugging Face model folder.

``lmrun stage=export export.checkpoint=runs/pretrain/<run> [export.out=DIR] [export.dtype=bfloat16]``
writes ``config.json``, ``model.safetensors``, ``generation_config.json`` (transformers'
``save_pretrained``) and ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json`` (``lmrun.tokenizer.hf.save_hf_tokenizer``; EOS/BOS/pad = lmrun's
end-of-text special token) into ``export.out`` (default ``<run dir>/hf``), loadable offline
with ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``.
The architecture mapping is ``lmrun.model.hf`` (Llama, Qwen3, Mixtral, GPT-2); a model no
transformers class computes is refused by ``plan`` before anything is written. The folder is
written next to its destination and renamed into place, then read back with transformers and
its logits compared with lmrun's on one sequence (``max_abs_logit_diff`` in the summary).
Writes ``export.json`` and ``summary.json`` (architecture, size in bytes, seconds).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from lmrun.errors import ConfigError
from lmrun.model.hf import HF_CLASSES, hf_architecture
from lmrun.tracking.files import atomic_write_json
from lmrun.tracking.run import active_run
from lmrun.train.loading import checkpoint_facts, checkpoint_tokenizer_files, resolve_checkpoint

log = logging.getLogger(__name__)


def _destination(cfg, run_dir: Path | None) -> Path | None:
    e = cfg.export
    if e.out is None:
        return None if run_dir is None else run_dir / "hf"
    out = Path(e.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export.out={e.out}: exists and is not an empty folder (exports never overwrite)")
    return out


def _sources(cfg):
    path = resolve_checkpoint(cfg.export.checkpoint, "export.checkpoint")
    facts = checkpoint_facts(path)
    arch = hf_architecture(facts["model_config"], key=f"export.checkpoint={cfg.export.checkpoint}")
    files = checkpoint_tokenizer_files(facts, path)
    return path, facts, arch, files


def plan(cfg) -> dict:
    path, facts, arch, files = _sources(cfg)
    out = _destination(cfg, None)
    return {"stage": "export", "checkpoint": str(path), "step": int(facts["iteration"]),
            "architecture": HF_CLASSES[arch], "dtype": cfg.export.dtype, "tokenizer": str(files.vocab),
            "out": str(out) if out is not None else "<run dir>/hf",
            "outputs": ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json"]}


def run(cfg) -> dict:
    import torch

    from lmrun.model.hf import export_hf_model, load_hf_model
    from lmrun.tokenizer.hf import save_hf_tokenizer
    from lmrun.train.loading import load_model

    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()
    run = active_run()
    t0 = time.perf_counter()
    e = cfg.export
    path, facts, arch, files = _sources(cfg)
    out = _destination(cfg, run.dir)
    specials = list(facts["tokenizer"].get("special_tokens") or [])
    log.info("reading %s (%s -> %s)", path, facts["model_config"].get("name"), HF_CLASSES[arch])
    model, step = load_model(path, facts, torch.device("cpu"))
    tok = files.load(specials)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_hf_tokenizer(tok.vocab, tok.merges, specials, tmp,
                          model_max_length=int(facts["model_config"]["context_length"]))
        roles = json.loads((tmp / "special_tokens_map.json").read_text(encoding="utf-8"))
        ids = {role: tok.special_ids.get(roles.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
        export_hf_model(model, facts["model_config"], tmp, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                        pad_token_id=ids["pad"], dtype=e.dtype)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # mkdtemp and transformers' temporary files are private (0600)
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty (checked by _destination)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    size = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    # read it back as transformers does, and compare logits on one sequence
    hf = tf.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    n = min(32, int(facts["model_config"]["context_length"]))
    x = torch.randint(0, int(facts["model_config"]["vocab_size"]), (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.to(getattr(torch, e.dtype)).float()(x) if e.dtype != "float32" else model(x)
        diff = float((hf(x).logits - reference).abs().max())
    del hf
    # the round trip through lmrun's own import (the inverse mapping)
    back, _ = load_hf_model(out, "cpu", key="export.out")
    with torch.no_grad():
        diff_import = float((back(x) - reference).abs().max())
    result = {"checkpoint": str(path), "step": step, "out": str(out.absolute()), "architecture": HF_CLASSES[arch],
              "dtype": e.dtype, "bytes": sum(size.values()), "files": size, "seconds": round(seconds, 3),
              "max_abs_logit_diff": diff, "max_abs_logit_diff_reimport": diff_import,
              "params": sum(p.numel() for p in model.parameters())}
    atomic_write_json(run.dir / "export.json", result)
    log.info("wrote %s (%s, %s, %.1f MB) in %.1f s; transformers' logits differ from lmrun's by at most %.2e",
             out, HF_CLASSES[arch], e.dtype, result["bytes"] / 1e6, seconds, diff)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    run.log(summary, step=step)
    return summary
