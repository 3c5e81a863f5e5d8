"""Checkpoints: model, optimizer and iteration (CS336 assignment 1's ``save_checkpoint`` /
``load_checkpoint``) plus whatever else a resumed run needs — schedule position, RNG states, data
position, the resolved config, the tokenizer identity — as named extras.

A checkpoint is one ``torch.save`` file holding a dict::

    {"format_version": 1, "iteration": int, "model": state_dict, "optimizer": state_dict | None,
     "checksum": {"algorithm": "sha256", "digest": hex}, **extra}

It is read back with ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled
objects, so extras must be plain: tensors, None, bool, int, float, str, bytes, and lists, tuples
and dicts of them (numpy arrays and scalars are converted to lists and numbers on save; an
OmegaConf config to a container). Saving to a path is atomic (temporary file in the same folder,
fsync, rename): a crash leaves the previous checkpoint, never half a file.

``checksum`` is a SHA-256 digest of everything else in the dict (:func:`checkpoint_digest`: every
tensor's dtype, shape and bytes and every other value, in key order), computed at save and verified
by :func:`read_checkpoint`: flipped bytes inside tensor data, which ``torch.load`` reads without
complaint, are a :class:`CorruptCheckpointError` instead of a model with garbage weights. Files
written before checksums existed still load (there is nothing to verify). Hashing runs at the
CPU's SHA-256 speed (about 1.6 GB/s on the 2-core development machine; SHA-256 with the SHA
instructions beat BLAKE2b's 0.85 GB/s there): for the main job's model with its AdamW state
(10 MB) 6.6 ms of a 27 ms save (fsync included), and the same again when it is read back.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lmrun.errors import DataError, FormatError
from lmrun.tracking.files import atomic_write

__all__ = ["FORMAT_VERSION", "CheckpointManager", "CorruptCheckpointError", "checkpoint_digest", "load_checkpoint",
           "load_state", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state", "unwrap_model"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESERVED = ("format_version", "iteration", "model", "optimizer", "checksum")
CHECKSUM_ALGORITHM = "sha256"
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")

PathOrFile = str | os.PathLike | IO[bytes]


class CorruptCheckpointError(FormatError):
    """A checkpoint file that cannot be trusted: truncated, not a checkpoint, unreadable by
    ``torch.load(weights_only=True)``, or with a checksum that does not match its contents. (A
    readable checkpoint that does not fit the model is a plain FormatError: falling back to an
    older checkpoint would not help.)"""


def _hash_value(h, value: Any) -> None:
    """Feed ``value`` (a checkpoint dict or part of it) into the hash ``h``: framed so that
    different structures cannot give the same byte stream."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"T{t.dtype}{tuple(t.shape)}:{data.nbytes}:".encode())
        h.update(data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}:".encode())
        for k, v in value.items():
            key = repr(k).encode()
            h.update(f"K{len(key)}:".encode() + key)
            _hash_value(h, v)
    elif isinstance(value, (list, tuple)):  # the same for both: only the values count
        h.update(f"L{len(value)}:".encode())
        for v in value:
            _hash_value(h, v)
    else:  # None, bool, int, float, str, bytes, torch.dtype / torch.device: repr round-trips
        text = repr(value).encode()
        h.update(f"V{type(value).__name__}{len(text)}:".encode() + text)


def checkpoint_digest(obj: dict) -> str:
    """The SHA-256 hex digest of a checkpoint dict without its ``checksum`` entry: every
    tensor's dtype, shape and bytes (moved to the CPU; the logical values, whatever the strides)
    and every other value and key, in the dict's order. The same before ``torch.save`` and after
    ``torch.load`` (any ``map_location``)."""
    h = hashlib.new(CHECKSUM_ALGORITHM)
    _hash_value(h, {k: v for k, v in obj.items() if k != "checksum"})
    return h.hexdigest()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``state_dict`` keys are the plain model's: strips ``torch.compile``
    (``_orig_mod``) and DistributedDataParallel / DataParallel (``module``) wrappers. FSDP needs
    its own state-dict API (``torch.distributed.checkpoint``) and is not handled here."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        else:
            return model


def _plain(value: Any, where: str) -> Any:
    """``value`` with numpy values turned into Python ones; TypeError for anything
    ``torch.load(weights_only=True)`` would refuse."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return _plain(OmegaConf.to_container(value, resolve=True), where)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint extra {where}: key {k!r} is a {type(k).__name__}; expected str or int")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        seq = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if isinstance(value, tuple) else seq
    raise TypeError(f"checkpoint extra {where} is a {type(value).__name__}: torch.load(weights_only=True) cannot "
                    f"read it back; store tensors, numbers, strings, lists or dicts (e.g. obj.state_dict())")


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, iteration: int,
                    out: PathOrFile, **extra: Any) -> None:
    """Write ``model`` and ``optimizer`` state, ``iteration`` and named extras to ``out``.

    Args:
        model: the model (``torch.compile`` / DDP wrappers are unwrapped, so keys are the plain
            model's, e.g. ``layers.0.attn.q_proj.weight``).
        optimizer: its ``state_dict()`` is saved (None: no optimizer state).
        iteration: the number of optimizer steps taken (the step to resume after).
        out: a path (written atomically; parent folders are created) or a binary file object.
        **extra: e.g. ``schedule=...``, ``rng=rng_state()``, ``data=stream.state_dict()``,
            ``config=OmegaConf.to_container(cfg)``, ``tokenizer={...identity...}``.

    Raises TypeError (naming the key) for an extra that ``weights_only`` loading would refuse,
    ValueError for an extra named like a reserved key (format_version, iteration, model,
    optimizer, checksum), OSError if the file cannot be written (the previous file at ``out`` is
    kept). The dict gets a ``checksum`` (:func:`checkpoint_digest`) that loading verifies.
    """
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"checkpoint extras {clash}: these names are reserved ({', '.join(RESERVED)})")
    obj = {"format_version": FORMAT_VERSION, "iteration": int(iteration),
           "model": unwrap_model(model).state_dict(),
           "optimizer": optimizer.state_dict() if optimizer is not None else None}
    obj.update({k: _plain(v, k) for k, v in extra.items()})
    obj["checksum"] = {"algorithm": CHECKSUM_ALGORITHM, "digest": checkpoint_digest(obj)}
    if isinstance(out, (str, os.PathLike)):
        atomic_write(out, lambda f: torch.save(obj, f))
    else:
        torch.save(obj, out)


def _describe(src: PathOrFile) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def read_checkpoint(src: PathOrFile, map_location: str | torch.device | None = "cpu") -> dict:
    """The whole checkpoint dict (model and optimizer state dicts, iteration, extras, checksum),
    loaded with ``torch.load(src, map_location, weights_only=True)``; ``src`` a path or binary
    file object. Its checksum is verified (a file from before checksums existed has none: it
    loads unverified).

    Raises DataError if the path does not exist; CorruptCheckpointError (a FormatError; one line
    naming the file) if it is truncated, corrupt, not a checkpoint, holds objects ``weights_only``
    refuses, or its contents do not match its checksum."""
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise DataError(f"{name}: no such checkpoint file")
    try:
        obj = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- zip, pickle and weights_only errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise CorruptCheckpointError(f"{name}: not a readable checkpoint (corrupt or truncated?): {reason}") from None
    if not isinstance(obj, dict) or "model" not in obj or "iteration" not in obj:
        raise CorruptCheckpointError(f"{name}: not an lmrun checkpoint (expected a dict with 'model' and 'iteration')")
    _verify(obj, name)
    return obj


def _verify(obj: dict, name: str) -> None:
    """CorruptCheckpointError unless ``obj`` matches its checksum (none: nothing to check)."""
    checksum = obj.get("checksum")
    if checksum is None:
        log.debug("%s: no checksum (written before checkpoints had one): loaded unverified", name)
        return
    if not isinstance(checksum, dict) or checksum.get("algorithm") != CHECKSUM_ALGORITHM:
        raise CorruptCheckpointError(f"{name}: checksum entry {checksum!r:.80} is not a {CHECKSUM_ALGORITHM} digest "
                                     "(corrupt, or written by a newer lmrun)")
    try:
        actual = checkpoint_digest(obj)
    except Exception as e:  # noqa: BLE001 -- e.g. a tensor whose storage is shorter than its shape
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CorruptCheckpointError(f"{name}: corrupt checkpoint: its contents cannot be hashed ({reason})") from None
    saved = str(checksum.get("digest"))
    if actual != saved:
        raise CorruptCheckpointError(f"{name}: corrupt checkpoint: its contents do not match the checksum saved with "
                                     f"it ({CHECKSUM_ALGORITHM} {actual[:12]}... != {saved[:12]}...)")


def _check_compatible(state: dict, model: torch.nn.Module, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s) e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[0]}")
    if problems:
        raise FormatError(f"{name}: does not fit this model ({'; '.join(problems)}); was it saved with another "
                          f"model config?")


def load_checkpoint(src: PathOrFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    map_location: str | torch.device | None = "cpu", return_extra: bool = False):
    """Restore ``model`` (and ``optimizer`` if given) from a checkpoint; return the iteration.

    Args:
        src: a path or binary file object written by :func:`save_checkpoint`.
        model: receives the model state (wrappers unwrapped; tensors are copied onto the
            model's own device and dtype).
        optimizer: receives the optimizer state if given and the checkpoint has one
            (``Optimizer.load_state_dict`` moves it to the parameters' device).
        map_location: where tensors are loaded before being copied (default CPU).
        return_extra: also return the extras dict (everything but format_version, iteration,
            model, optimizer and checksum).

    Returns ``iteration``, or ``(iteration, extra)`` with ``return_extra``.
    Raises DataError (missing file), CorruptCheckpointError (a corrupt, truncated or tampered
    file: see :func:`read_checkpoint`), FormatError (model keys/shapes that do not match — one
    line naming the file and the first mismatch).
    """
    obj = read_checkpoint(src, map_location)
    iteration = load_state(obj, model, optimizer, name=_describe(src))
    if return_extra:
        return iteration, {k: v for k, v in obj.items() if k not in RESERVED}
    return iteration


def load_state(obj: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               name: str = "checkpoint") -> int:
    """Restore ``model`` (and ``optimizer`` if given and ``obj`` has its state) from a checkpoint
    dict already read by :func:`read_checkpoint`; returns its iteration. FormatError (one line
    starting with ``name``) when the model's keys or shapes, or the optimizer state, do not fit."""
    target = unwrap_model(model)
    _check_compatible(obj["model"], target, name)
    target.load_state_dict(obj["model"])
    if optimizer is not None and obj.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(obj["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FormatError(f"{name}: optimizer state does not fit this optimizer: {reason}") from None
    return int(obj["iteration"])


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every global RNG's state as plain values: ``python`` (``random.getstate()`` as lists),
    ``numpy`` (the legacy global ``np.random`` state as a dict of lists/ints/floats), ``torch``
    (the CPU generator's ByteTensor) and, when CUDA is available, ``cuda`` (a list of ByteTensors,
    one per device). Safe for ``weights_only`` loading; restore with :func:`set_rng_state`."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states captured by :func:`rng_state` (the parts present; ``cuda`` only
    when CUDA is available, for as many devices as both have)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], np.asarray(s["keys"], dtype=np.uint32), int(s["pos"]), int(s["has_gauss"]),
                             float(s["cached_gaussian"])))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        for i in range(min(len(saved), torch.cuda.device_count())):
            torch.cuda.set_rng_state(saved[i].cpu().to(torch.uint8), i)


# ----------------------------------------------------------------------------- a folder of checkpoints

class CheckpointManager:
    """A folder of checkpoints ``ckpt_{step:08d}.pt``, keeping the newest ``keep_last``.

    Args:
        directory: the folder (created on the first save).
        keep_last: how many checkpoints to keep (the highest steps); None or 0 keeps all.

    ``save(step, model, optimizer, **extra)`` writes ``ckpt_{step:08d}.pt`` atomically (see
    :func:`save_checkpoint`, with ``iteration=step``) and only then deletes older checkpoints
    beyond ``keep_last``; ``latest()`` is the highest-step checkpoint or None (temporary files from
    an interrupted save are ignored; :meth:`remove_stale_temp_files` deletes those of killed
    writers); ``read_latest()`` / ``load_latest(model, optimizer)`` read the newest checkpoint that
    is not corrupt, falling back to older ones.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int | None = None):
        if keep_last is not None and keep_last < 0:
            raise ValueError(f"keep_last={keep_last}: expected null (keep all), 0 (keep all) or an integer >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last or None

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt_{int(step):08d}.pt"

    def checkpoints(self) -> list[Path]:
        """The checkpoint files present, in increasing step order."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files that killed writers (``kill -9``, a node crash mid-save) left
        in the folder — never a live process's file being written — and log them; returns the
        removed paths (see ``lmrun.tracking.files.remove_stale_temp_files``)."""
        from lmrun.tracking.files import remove_stale_temp_files

        removed = remove_stale_temp_files(self.directory)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted checkpoint write in %s: %s", len(removed),
                     self.directory, ", ".join(p.name for p in removed))
        return removed

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
             **extra: Any) -> Path:
        path = self.path(step)
        save_checkpoint(model, optimizer, step, path, **extra)
        self.prune()
        return path

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
        if self.keep_last is None:
            return []
        old = self.checkpoints()[:-self.keep_last]
        for p in old:
            p.unlink(missing_ok=True)
        return old

    def read_latest(self, map_location: str | torch.device | None = "cpu",
                    quarantine: bool = False) -> tuple[Path, dict] | None:
        """The newest checkpoint that reads back intact, as ``(path, checkpoint dict)`` (see
        :func:`read_checkpoint`), or None when the folder holds no checkpoint.

        A corrupt newer checkpoint (truncated, unreadable, checksum mismatch) is skipped with a
        warning naming the file and why, and the next older one is tried. ``quarantine`` (the
        process that writes the folder) renames each corrupt file to ``<name>.corrupt`` (kept for
        inspection), so that it no longer counts as the latest or against ``keep_last``. A file
        that vanishes while being read (another process quarantined it) is skipped.

        Raises CorruptCheckpointError (one line naming the folder and the newest file's problem)
        when there are checkpoints but none of them is readable."""
        found = self.checkpoints()
        problems = []
        for path in reversed(found):
            try:
                obj = read_checkpoint(path, map_location)
            except DataError:  # gone meanwhile
                continue
            except CorruptCheckpointError as e:
                moved = self._quarantine(path) if quarantine else None
                problems.append(str(e))
                log.warning("%s%s; trying the previous checkpoint", e, f" (moved to {moved.name})" if moved else "")
                continue
            if problems:
                log.warning("resuming from %s, the newest checkpoint that is not corrupt", path)
            return path, obj
        if problems:
            raise CorruptCheckpointError(f"{self.directory}: none of its {len(found)} checkpoint(s) is readable; the "
                                         f"newest: {problems[0]}")
        return None

    @staticmethod
    def _quarantine(path: Path) -> Path | None:
        """Rename a corrupt checkpoint to ``<name>.corrupt`` (``.corrupt.1``, ... if taken)."""
        target, n = path.with_name(path.name + ".corrupt"), 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt.{n}")
        try:
            path.rename(target)
        except OSError as e:
            log.warning("could not move the corrupt checkpoint %s aside: %s", path, e)
            return None
        return target

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device | None = "cpu") -> tuple[int, dict] | None:
        """Restore the newest intact checkpoint into ``model``/``optimizer`` (corrupt newer ones
        are skipped with a warning, see :meth:`read_latest`); returns ``(iteration, extra)`` or
        None when there is none. Errors as :meth:`read_latest` and :func:`load_state`."""
        found = self.read_latest(map_location)
        if found is None:
            return None
        path, obj = found
        iteration = load_state(obj, model, optimizer, name=str(path))
        return iteration, {k: v for k, v in obj.items() if k not in RESERVED}
