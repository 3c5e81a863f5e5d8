"""Reading a pretrain checkpoint back (``evaluate``, ``generate``, ``lmrun.eval.models``):
resolve a checkpoint file or run directory, read its facts (model config, tokenizer identity)
and rebuild the model and tokenizer. The file format itself is ``lmrun.train.checkpoint``.

Checkpoints are self-contained: the ``tokenizer`` entry carries the bytes of ``vocab.json`` and
``merges.txt`` (:func:`tokenizer_facts`), never a path into the cache, and run directories keep a
copy in ``tokenizer/`` (:func:`write_run_tokenizer`). A run directory or a lone checkpoint file
copied to another machine works with an empty cache. Checkpoints written before this hold
absolute paths into the cache; they load while those files exist.

torch and the model are imported on first use, so a stage's ``plan`` can resolve a
checkpoint without them."""
from __future__ import annotations

import os
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


#: where a pretrain run directory keeps a copy of its tokenizer (``vocab.json``, ``merges.txt``,
#: ``special_tokens.json``): ``tokenizer.path=<run dir>/tokenizer`` reuses it
RUN_TOKENIZER_DIR = "tokenizer"
_FILES = ("vocab.json", "merges.txt")
#: keys of a checkpoint's ``tokenizer`` entry that are not part of its identity
_NOT_IDENTITY = ("vocab", "merges", "files")


def tokenizer_facts(files: TokenizerFiles, special_tokens: list[str]) -> dict:
    """The ``tokenizer`` entry a checkpoint carries, so that the file alone rebuilds its tokenizer
    anywhere (no path into the cache)::

        {"special_tokens": [str, ...], "vocab_digest": hex, "merges_digest": hex,
         "files": {"vocab.json": bytes, "merges.txt": bytes}}

    The digests (BLAKE2b-128 of the files, ``files.identity``) identify the tokenizer in cache keys;
    ``files`` holds the GPT-2 format files byte for byte (a few KB to ~1.5 MB for GPT-2's 50k
    tokens). DataError (one line naming the file) when a file cannot be read."""
    out = {"special_tokens": list(special_tokens),
           **{k: v for k, v in files.identity.items() if k != "special_tokens"}, "files": {}}
    for name, src in zip(_FILES, (files.vocab, files.merges)):
        try:
            out["files"][name] = Path(src).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read tokenizer file {src}: {e.strerror}") from None
    return out


def portable_tokenizer_facts(tok: dict, path: Path | str = "checkpoint") -> dict:
    """A checkpoint ``tokenizer`` entry that carries its files: ``tok`` itself when it does, else
    (a checkpoint written before checkpoints carried their tokenizer: paths into the cache) the
    entry with the files read in and the paths dropped. DataError naming a missing file."""
    if "files" in tok:
        return tok
    files = _old_style_files(tok, Path(path))
    return tokenizer_facts(files, list(tok.get("special_tokens") or []))


def write_run_tokenizer(tok: dict, run_dir: Path) -> Path:
    """Copy a checkpoint ``tokenizer`` entry (with ``files``) into ``<run_dir>/tokenizer/``:
    ``vocab.json``, ``merges.txt`` and ``special_tokens.json`` (a JSON list), each atomically.
    Returns the folder."""
    from lmrun.tracking.files import atomic_write_bytes, atomic_write_json

    folder = Path(run_dir) / RUN_TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in _FILES:
        if not _same_bytes(folder / name, tok["files"][name]):
            atomic_write_bytes(folder / name, tok["files"][name])
    atomic_write_json(folder / "special_tokens.json", list(tok.get("special_tokens") or []))
    return folder


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _identity(tok: dict) -> dict:
    return {k: v for k, v in tok.items() if k not in _NOT_IDENTITY}


def _old_style_files(tok: dict, path: Path) -> TokenizerFiles:
    """A checkpoint from before checkpoints carried their tokenizer: absolute paths into the cache."""
    if "vocab" not in tok or "merges" not in tok:
        raise FormatError(f"{path}: the checkpoint's tokenizer entry holds neither its files nor their paths")
    vocab, merges = Path(tok["vocab"]), Path(tok["merges"])
    for f in (vocab, merges):
        if not f.is_file():
            raise DataError(f"{path}: the checkpoint's tokenizer file is gone: {f} (re-run stage=tokenizer with the "
                            "same data and config, or restore the cache)")
    return TokenizerFiles(vocab, merges, _identity(tok), True, {})


def _materialized_folder(tok: dict, path: Path) -> Path:
    """A folder holding the checkpoint's embedded tokenizer files byte for byte: the run
    directory's ``tokenizer/`` next to the checkpoint when it matches, else a content-addressed
    folder in the temporary directory (``lmrun-tokenizers-<uid>/<digest>``), written once."""
    import hashlib
    import tempfile

    data = tok["files"]
    for run_dir in ((path.parent.parent, path.parent) if path.parent.name == "checkpoints" else (path.parent,)):
        folder = run_dir / RUN_TOKENIZER_DIR
        if all(_same_bytes(folder / name, data[name]) for name in _FILES):
            return folder.absolute()
    h = hashlib.blake2b(digest_size=16)
    for name in _FILES:
        h.update(len(data[name]).to_bytes(8, "little"))
        h.update(data[name])
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    folder = Path(tempfile.gettempdir()) / f"lmrun-tokenizers-{uid}" / h.hexdigest()
    if all(_same_bytes(folder / name, data[name]) for name in _FILES):
        return folder
    from lmrun.tracking.files import atomic_write_bytes

    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            atomic_write_bytes(folder / name, data[name])
    except OSError:  # e.g. a read-only or foreign temp folder: a private one for this process
        folder = Path(tempfile.mkdtemp(prefix="lmrun-tokenizer-"))
        for name in _FILES:
            atomic_write_bytes(folder / name, data[name])
    return folder


def checkpoint_tokenizer_files(facts: dict, path: Path) -> TokenizerFiles:
    """The checkpoint's tokenizer as files on disk (``vocab.json``, ``merges.txt``; GPT-2 format)
    with its identity (digests and special tokens, as recorded at training).

    A checkpoint carries its tokenizer files (``facts["tokenizer"]["files"]``, see
    :func:`tokenizer_facts`): they are used from the run directory's ``tokenizer/`` folder next to
    the checkpoint when it holds the same bytes, else written once to a content-addressed folder
    in the temporary directory; no cache is needed. Older checkpoints hold absolute paths into
    the cache instead: used while they exist, DataError (one line naming the missing file) when
    they are gone. FormatError when the entry holds neither."""
    tok = facts["tokenizer"]
    path = Path(path)
    if "files" not in tok:
        return _old_style_files(tok, path)
    data = tok["files"]
    if not isinstance(data, dict) or any(not isinstance(data.get(n), bytes) for n in _FILES):
        raise FormatError(f"{path}: the checkpoint's tokenizer files are malformed (expected bytes of "
                          f"{' and '.join(_FILES)})")
    folder = _materialized_folder(tok, path)
    return TokenizerFiles(folder / "vocab.json", folder / "merges.txt", _identity(tok), True, {})


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


# --- model.init_from: pretraining from a Hugging Face folder's weights (issue 27) ------------------

# the ModelConfig keys a Hugging Face folder decides (architecture and shape); the others
# (context_length up to the folder's, dropout, attention.impl, norm.impl) stay the run's
_INIT_FROM_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "n_kv_heads", "d_ff", "bias", "tie_embeddings",
                   "logit_softcap")


def init_from_folder(cfg) -> Path | None:
    """``model.init_from`` as a Hugging Face model folder (None when unset). DataError when it is
    not a folder with a ``config.json``."""
    value = cfg.model.get("init_from")
    if not value:
        return None
    from lmrun.eval.hf import is_hf_model_dir

    folder = Path(str(value)).expanduser()
    if not is_hf_model_dir(folder):
        raise DataError(f"model.init_from={value}: not a Hugging Face model folder (no config.json)")
    return folder.absolute()


def apply_init_from(cfg, materialize_tokenizer: bool = True) -> dict | None:
    """Make ``cfg`` (in place) describe the model of ``model.init_from``: its architecture and shape
    (``lmrun.model.hf.from_hf_config``; ``model.context_length`` capped at the folder's), and,
    unless ``tokenizer.path`` is set, its tokenizer — the folder itself when it holds GPT-2's
    ``vocab.json`` + ``merges.txt``, else its byte-level ``tokenizer.json`` converted to those two
    files in ``<cache>/hf_tokenizer/<digest>/`` (``lmrun.tokenizer.hf.load_hf_tokenizer``; with
    ``materialize_tokenizer=False``, for a plan, nothing is written and the tokenizer is left
    alone). Returns what was done (for plans and logs), None when ``model.init_from`` is unset.
    DataError / FormatError (one line naming ``model.init_from``) for a folder lmrun cannot use."""
    import hashlib
    import json
    import logging

    from omegaconf import open_dict

    from lmrun.model.hf import from_hf_config

    folder = init_from_folder(cfg)
    if folder is None:
        return None
    key = f"model.init_from={cfg.model.init_from}"
    import transformers as tf

    try:
        hf_config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"{key}: cannot read its config.json ({(str(e).splitlines() or [''])[0]})") from None
    mc = from_hf_config(hf_config, key)
    done = {"folder": str(folder), "hf_model_type": hf_config.model_type}
    m = cfg.model
    with open_dict(m):
        for k in _INIT_FROM_KEYS:
            m[k] = getattr(mc, k)
        m.name, m.size = mc.name, "hf"
        if int(m.context_length) > int(mc.context_length):
            m.context_length = int(mc.context_length)
        for group in ("norm", "position"):
            for k, v in dataclass_items(getattr(mc, group)):
                if k != "impl":
                    m[group][k] = v
        m.ffn.kind = mc.ffn.kind
        for k, v in dataclass_items(mc.ffn.moe):
            m.ffn.moe[k] = v
        m.attention.kind, m.attention.window, m.attention.qk_norm = "mha", None, mc.attention.qk_norm
    t = cfg.tokenizer
    if t.path:
        done["tokenizer"] = f"tokenizer.path={t.path} (kept)"
        return done
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        path, specials, notes = folder, None, []
    elif (folder / "tokenizer.json").is_file():
        from lmrun.tokenizer.hf import load_hf_tokenizer

        data = load_hf_tokenizer(folder / "tokenizer.json")
        digest = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()[:32]
        path, specials, notes = Path(str(cfg.paths.cache_dir)).expanduser() / "hf_tokenizer" / digest, \
            list(data.special_tokens), list(data.notes)
        if materialize_tokenizer and not ((path / "vocab.json").is_file() and (path / "merges.txt").is_file()):
            from lmrun.tokenizer.formats import save_merges, save_vocab

            path.mkdir(parents=True, exist_ok=True)
            save_vocab(data.vocab, path / "vocab.json")
            save_merges(data.merges, path / "merges.txt")
    else:
        logging.getLogger(__name__).warning("%s: no tokenizer files in the folder; the data is encoded with "
                                            "tokenizer=%s, whose ids need not match the model's", key, t.get("kind"))
        done["tokenizer"] = "the run's own (the folder has none)"
        return done
    if notes:
        logging.getLogger(__name__).warning("%s: lmrun's tokenizer encodes some text differently from the folder's "
                                            "(%s)", key, "; ".join(notes))
    done["tokenizer"] = str(path) + ("" if (path / "vocab.json").is_file() else " (converted from tokenizer.json)")
    if materialize_tokenizer:
        with open_dict(t):
            t.path = str(path)
            if specials is not None:
                t.special_tokens = specials
            elif (folder / "special_tokens_map.json").is_file():
                roles = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
                found = [v if isinstance(v, str) else v.get("content") for v in roles.values()]
                t.special_tokens = list(dict.fromkeys(s for s in found if s))
    return done


def dataclass_items(obj):
    """(field name, value) pairs of a dataclass instance, nested dataclasses excluded."""
    import dataclasses

    return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not dataclasses.is_dataclass(getattr(obj, f.name))]


def load_init_weights(model, folder: Path) -> None:
    """Copy the weights of the Hugging Face folder ``folder`` into ``model`` (a ``TransformerLM``
    built from the config ``apply_init_from`` made; in place, so an optimizer built over its
    parameters keeps them). Learned position embeddings are cut to the model's context length.
    FormatError when the shapes do not fit."""
    import torch

    from lmrun.model.hf import load_hf_model

    source, _ = load_hf_model(folder, "cpu", key="model.init_from")
    state = source.state_dict()
    if "position_embeddings.weight" in state:
        state["position_embeddings.weight"] = state["position_embeddings.weight"][:model.context_length]
    own = model.state_dict()
    bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise FormatError(f"model.init_from={folder}: its weights do not fit the model at {bad[0]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
