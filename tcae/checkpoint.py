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
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import TCAE, TCAEConfig

MAGIC = b"TCAE-CKPT-1\n"
_DIGEST_LEN = 64  # sha256 in hex

# Fields that change the shape of the model's or optimizer's state: a
# checkpoint whose values differ cannot be loaded. "model.x" is TCAEConfig's x.
SHAPE_FIELDS = ("model.image_size", "model.in_channels", "model.width", "model.embed_dim", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, not a checkpoint, or from an incompatible config."""


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` if it is missing and :class:`CheckpointError`
    if it is not a TCAE checkpoint or its checksum does not match (truncated
    or damaged file).
    """
    path = Path(path)
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
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[TCAE, dict]:
    """The TCAE a training checkpoint holds, rebuilt from the model config stored beside its weights
    (eval mode), and the run's config as a dict."""
    state = load_checkpoint(path)
    config = state["config"]
    model = TCAE(TCAEConfig(**config["model"]))
    model.load_state_dict(state["model"])
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
