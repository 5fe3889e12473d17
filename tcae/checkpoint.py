"""Training checkpoints: atomic writes, a checksum, a compatibility check, the model rebuilt from one,
and the RNG states a resumed run needs.

On disk a checkpoint is ``MAGIC``, the sha256 of the payload in hex, a
newline, then the payload (``torch.save`` of a dict of tensors and plain
Python values, loaded back with ``weights_only=True``)::

    save_checkpoint(path, state)          # temp file + fsync + os.replace
    state = load_checkpoint(path)         # CheckpointError if damaged
    check_compatible(state["config"], config.as_dict())
    model = load_model(path)              # the TCAE rebuilt from the config inside (nanoGPT's way)

A write goes to ``<name>.tmp`` in the same folder, is flushed to disk, and
only then renamed over the old file, so a crash or kill at any point leaves
the previous checkpoint whole (and at worst a stale ``.tmp``, overwritten by
the next save). The checksum catches files damaged later (truncated copies,
full disks).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CHECKPOINT_NAME
from .errors import TCAEError
from .model import TCAE, TCAEConfig

MAGIC = b"TCAE-CKPT-1\n"
_DIGEST_LEN = 64  # sha256 in hex

# Fields that change the shape of the model's or optimizer's state: a
# checkpoint whose values differ cannot be loaded. "model.x" is TCAEConfig's x.
SHAPE_FIELDS = ("model.image_size", "model.in_channels", "model.width", "model.embed_dim", "optimizer")


# What each use of a checkpoint reads from it.
MODEL_KEYS = ("config", "model")
TRAINING_KEYS = (*MODEL_KEYS, "step", "epoch", "consumed", "optimizer", "scheduler", "curriculum", "rng")


class CheckpointError(TCAEError, RuntimeError):
    """A checkpoint that cannot be used: damaged, not a checkpoint, incomplete, from an incompatible config,
    or one that could not be written."""


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not
    # every platform lets a directory be opened for that.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getbuffer()
    digest = hashlib.sha256(payload).hexdigest().encode()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + digest + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    keys: tuple[str, ...] = MODEL_KEYS) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`, which must hold ``keys``
    (:data:`MODEL_KEYS`, or :data:`TRAINING_KEYS` to resume training).

    Raises ``FileNotFoundError`` if it is missing and :class:`CheckpointError`
    if it is a folder, not a TCAE checkpoint, corrupt (truncated or damaged,
    found by its checksum), holds Python objects other than tensors and plain
    values, or lacks one of ``keys``.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        raise CheckpointError(f"{path} is a folder, not a checkpoint file"
                              + (f"; its checkpoint is {inside}" if inside.is_file() else ""))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    header = len(MAGIC) + _DIGEST_LEN + 1
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a TCAE checkpoint (no {MAGIC.strip().decode()} header)")
    if len(data) < header:
        raise CheckpointError(f"{path} is corrupt: truncated inside its header ({len(data)} bytes)")
    expected = data[len(MAGIC) : header - 1].decode("ascii", "replace")
    payload = memoryview(data)[header:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"{path} is corrupt: sha256 of its {len(payload)} payload bytes is {actual[:12]}…, "
            f"the header says {expected[:12]}… (truncated or damaged file; use an earlier checkpoint)"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises loading with full pickle, which would run whatever code the file names.
        raise CheckpointError(f"{path} holds Python objects other than tensors and plain values; they are not "
                              "loaded, since unpickling them could run code. Only files tcae train writes "
                              "load") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a TCAE checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [k for k in keys if k not in state]
    if not missing and "config" in keys and not isinstance(state["config"].get("model"), dict):
        missing = ["config['model']"]
    if missing:
        raise CheckpointError(f"{path} is not a complete TCAE checkpoint: it lacks {', '.join(missing)}")
    return state


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | Path = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing every :data:`SHAPE_FIELDS` value that differs."""
    def get(config: Mapping[str, Any], name: str) -> Any:
        for part in name.split("."):
            config = config.get(part, {}) if isinstance(config, Mapping) else {}
        return config

    diffs = [
        f"{name.removeprefix('model.')}: checkpoint {get(saved, name)!r}, config {get(current, name)!r}"
        for name in SHAPE_FIELDS
        if get(saved, name) != get(current, name)
    ]
    if diffs:
        raise CheckpointError(
            f"{path} was written with an incompatible config; these fields differ:\n  " + "\n  ".join(diffs)
        )


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(weights)``, or :class:`CheckpointError` naming what does not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing, unexpected or wrongly shaped tensors
        details = " ".join(str(e).split())
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes: "
                              f"{details[:300]}{'…' if len(details) > 300 else ''}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TCAE, dict]:
    """The TCAE a training checkpoint holds, rebuilt from the model config stored beside its weights
    (eval mode), and the run's config as a dict."""
    state = load_checkpoint(path)
    config = state["config"]
    try:
        model = TCAE(TCAEConfig(**config["model"]))
    except TypeError as e:  # a setting this version does not know
        raise CheckpointError(f"{path}: its model settings do not fit this version of tcae: {e}") from None
    load_weights(model, state["model"], path)
    return model.to(device).eval(), config


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states, as tensors and plain values (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
