"""Checkpoints: model, optimizer and iteration (CS336 assignment 1's ``save_checkpoint`` /
``load_checkpoint``) plus whatever else a resumed run needs — schedule position, RNG states, data
position, the resolved config, the tokenizer identity — as named extras.

A checkpoint is one ``torch.save`` file holding a dict::

    {"format_version": 1, "iteration": int, "model": state_dict, "optimizer": state_dict | None,
     **extra}

It is read back with ``torch.load(..., weights_only=True)``, which refuses arbitrary pickled
objects, so extras must be plain: tensors, None, bool, int, float, str, bytes, and lists, tuples
and dicts of them (numpy arrays and scalars are converted to lists and numbers on save; an
OmegaConf config to a container). Saving to a path is atomic (temporary file in the same folder,
fsync, rename): a crash leaves the previous checkpoint, never half a file.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lmrun.errors import DataError, FormatError
from lmrun.tracking.files import atomic_write

__all__ = ["FORMAT_VERSION", "CheckpointManager", "load_checkpoint", "read_checkpoint", "rng_state",
           "save_checkpoint", "set_rng_state", "unwrap_model"]

FORMAT_VERSION = 1
RESERVED = ("format_version", "iteration", "model", "optimizer")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")

PathOrFile = str | os.PathLike | IO[bytes]


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
    optimizer), OSError if the file cannot be written (the previous file at ``out`` is kept).
    """
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"checkpoint extras {clash}: these names are reserved ({', '.join(RESERVED)})")
    obj = {"format_version": FORMAT_VERSION, "iteration": int(iteration),
           "model": unwrap_model(model).state_dict(),
           "optimizer": optimizer.state_dict() if optimizer is not None else None}
    obj.update({k: _plain(v, k) for k, v in extra.items()})
    if isinstance(out, (str, os.PathLike)):
        atomic_write(out, lambda f: torch.save(obj, f))
    else:
        torch.save(obj, out)


def _describe(src: PathOrFile) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or f"<{type(src).__name__}>")


def read_checkpoint(src: PathOrFile, map_location: str | torch.device | None = "cpu") -> dict:
    """The whole checkpoint dict (model and optimizer state dicts, iteration, extras), loaded with
    ``torch.load(src, map_location, weights_only=True)``; ``src`` a path or binary file object.

    Raises DataError if the path does not exist; FormatError (one line naming the file) if it is
    truncated, corrupt, not a checkpoint, or holds objects ``weights_only`` refuses."""
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise DataError(f"{name}: no such checkpoint file")
    try:
        obj = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- zip, pickle and weights_only errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise FormatError(f"{name}: not a readable checkpoint (corrupt or truncated?): {reason}") from None
    if not isinstance(obj, dict) or "model" not in obj or "iteration" not in obj:
        raise FormatError(f"{name}: not an lmrun checkpoint (expected a dict with 'model' and 'iteration')")
    return obj


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
            model and optimizer).

    Returns ``iteration``, or ``(iteration, extra)`` with ``return_extra``.
    Raises DataError (missing file), FormatError (corrupt file, or model keys/shapes that do not
    match — one line naming the file and the first mismatch).
    """
    name = _describe(src)
    obj = read_checkpoint(src, map_location)
    target = unwrap_model(model)
    _check_compatible(obj["model"], target, name)
    target.load_state_dict(obj["model"])
    if optimizer is not None and obj.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(obj["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FormatError(f"{name}: optimizer state does not fit this optimizer: {reason}") from None
    iteration = int(obj["iteration"])
    if return_extra:
        return iteration, {k: v for k, v in obj.items() if k not in RESERVED}
    return iteration


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
    an interrupted save are ignored); ``load_latest(model, optimizer)`` restores it.
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

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device | None = "cpu") -> tuple[int, dict] | None:
        """Restore the latest checkpoint into ``model``/``optimizer``; returns ``(iteration, extra)``
        or None when there is none. Errors as :func:`load_checkpoint`."""
        path = self.latest()
        if path is None:
            return None
        return load_checkpoint(path, model, optimizer, map_location=map_location, return_extra=True)
