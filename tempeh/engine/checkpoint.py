"""Checkpoints: atomic writes, keep-last-k, ``last.pt``, RNG states, safe loading.

A checkpoint is one ``torch.save`` dict of tensors and plain Python values only (so it loads
with ``torch.load(..., weights_only=True)``; numpy arrays are converted to tensors)::

    {"format": 1, "kind": "coarse" | "refine", "stage": str, "step": int,
     "batches_seen": int, "model": state_dict, "optimizer": state_dict, "scaler": state_dict,
     "schedule": dict, "sampler": dict, "rng": dict (see capture_rng_state),
     "generator": ByteTensor, "skipped_batches": int, "config_hash": str}

Files of a stage directory::

    checkpoints/step_00001000.pt   one per save, the newest ``keep_last_k`` kept (0: all)
    checkpoints/last.pt            the newest checkpoint (a hard link to it, or a copy)

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so a run killed while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from tempeh.io.mesh import atomic_write
from tempeh.errors import TempehDataError

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "CheckpointManager",
           "find_checkpoint", "capture_rng_state", "restore_rng_state", "step_of"]

PathLike = Union[str, os.PathLike]
CHECKPOINT_FORMAT = 1
_STEP_RE = re.compile(r"^step_(\d{8,})\.pt$")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    _atomic_torch_save(state, path)
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); TempehDataError naming the file when
    it is missing, truncated or holds anything but tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise TempehDataError(path, "checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling error means an unusable file
        raise TempehDataError(path, f"cannot load checkpoint ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise TempehDataError(path, "not a tempeh checkpoint (no 'model' entry)")
    return ckpt


def step_of(path: PathLike) -> Optional[int]:
    """Step number of a ``step_XXXXXXXX.pt`` file name, else None."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def find_checkpoint(path: PathLike) -> Optional[Path]:
    """The checkpoint a path refers to: a ``.pt`` file itself; a stage directory or its
    ``checkpoints/`` folder -> ``last.pt`` or else the highest ``step_*.pt``; None if there is
    none."""
    p = Path(path)
    if p.is_file():
        return p
    for d in (p / "checkpoints", p):
        if (d / "last.pt").is_file():
            return d / "last.pt"
        steps = sorted((s for s in d.glob("step_*.pt") if step_of(s) is not None), key=step_of)
        if steps:
            return steps[-1]
    return None


class CheckpointManager:
    """Saves ``checkpoints/step_XXXXXXXX.pt`` + ``last.pt`` and keeps the newest ``keep_last_k``.

    Args:
        directory: the ``checkpoints/`` folder (created on the first save).
        keep_last_k: step files kept (0: keep all). ``last.pt`` is always kept.
    """

    def __init__(self, directory: PathLike, keep_last_k: int = 3):
        self.directory = Path(directory)
        self.keep_last_k = int(keep_last_k)

    @property
    def last(self) -> Path:
        return self.directory / "last.pt"

    def step_files(self) -> List[Path]:
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.glob("step_*.pt") if step_of(p) is not None),
                      key=step_of)

    def save(self, state: Dict[str, Any], step: int) -> Path:
        """Write the step file, point ``last.pt`` at it (atomically), prune old step files."""
        path = save_checkpoint(state, self.directory / f"step_{int(step):08d}.pt")
        tmp = self.directory / f".last.pt.{os.getpid()}.tmp"
        try:
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(path, tmp)  # no second copy of the bytes
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, self.last)
        finally:
            if tmp.exists():
                tmp.unlink()
        if self.keep_last_k > 0:
            for old in self.step_files()[:-self.keep_last_k]:
                try:
                    old.unlink()
                except OSError as err:
                    logger.warning("could not delete old checkpoint %s: %s", old, err)
        logger.info("saved checkpoint %s", path)
        return path


# ============================================================================ RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Global RNG states as tensors / plain values (loadable with ``weights_only=True``):
    torch CPU, every CUDA device (if initialised), numpy's legacy global generator and
    Python's ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(py_version), "state": [int(x) for x in py_state],
                   "gauss": None if py_gauss is None else float(py_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached"])))
    if "python" in state:
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(x) for x in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has %d CUDA RNG states, this machine %d devices: "
                           "CUDA RNG states not restored", len(cuda), torch.cuda.device_count())
