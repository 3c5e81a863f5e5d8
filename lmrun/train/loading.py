"""Reading a pretrain checkpoint back (``evaluate``, ``generate``, ``lmrun.eval.models``):
resolve a checkpoint file or run directory, read its facts (model config, tokenizer identity)
and rebuild the model and tokenizer. The file format itself is ``lmrun.train.checkpoint``.

torch and the model are imported on first use, so a stage's ``plan`` can resolve a
checkpoint without them."""
from __future__ import annotations

from pathlib import Path

from lmrun.errors import DataError, FormatError
from lmrun.tokenizer.artifacts import TokenizerFiles


def resolve_checkpoint(value: str, key: str = "evaluate.checkpoint") -> Path:
    """A checkpoint file, or the latest ``checkpoints/ckpt_*.pt`` of a run directory. DataError
    (naming ``key``) when there is none."""
    path = Path(value).expanduser()
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("ckpt_*.pt")) or sorted(path.glob("ckpt_*.pt"))
        if not found:
            raise DataError(f"{key}={value}: no checkpoints/ckpt_*.pt in this directory")
        return found[-1].absolute()
    if not path.is_file():
        raise DataError(f"{key}={value}: no such file or run directory")
    return path.absolute()


def checkpoint_facts(path: Path) -> dict:
    """The whole checkpoint dict, its checksum verified (``read_checkpoint``). FormatError (one
    line naming the file) when it is corrupt, truncated or does not match its checksum
    (``CorruptCheckpointError``), or lacks ``model_config`` or ``tokenizer``."""
    from lmrun.train.checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    missing = [k for k in ("model_config", "tokenizer") if k not in obj]
    if missing:
        raise FormatError(f"{path}: checkpoint lacks {', '.join(missing)} (not written by stage=pretrain)")
    return obj


def checkpoint_tokenizer_files(facts: dict, path: Path) -> TokenizerFiles:
    """The checkpoint's tokenizer files; DataError when they are gone."""
    tok = facts["tokenizer"]
    vocab, merges = Path(tok["vocab"]), Path(tok["merges"])
    for f in (vocab, merges):
        if not f.is_file():
            raise DataError(f"{path}: the checkpoint's tokenizer file is gone: {f} (re-run stage=tokenizer with the "
                            "same data and config, or restore the cache)")
    identity = {k: v for k, v in tok.items() if k not in ("vocab", "merges")}
    return TokenizerFiles(vocab, merges, identity, True, {})


def load_model(path: Path, facts: dict, device):
    """Rebuild the checkpoint's ``TransformerLM`` on ``device`` and load its weights ->
    ``(model in eval mode, step)``. ``facts``: the checkpoint dict :func:`checkpoint_facts` read
    (and verified) from ``path``; the weights come from it, so the file is read once. A run
    trained with ``train.ema_decay`` loads the averaged weights (the ones its validation figures
    describe). FormatError (one line naming the file) when the weights do not fit the model
    config."""
    from lmrun.model import build_model
    from lmrun.train.checkpoint import load_state

    model = build_model(facts["model_config"], device=device)
    step = load_state(facts, model, name=str(path))
    if "ema" in facts:
        import torch

        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in facts["ema"]["shadow"].items():
                params[name].copy_(value)
    return model.eval(), step
