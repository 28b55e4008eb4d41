"""Checkpoints are data, never code: every `.pt` file rayeff or DeepSpeed reads back is loaded with
`torch.load(weights_only=True)`.

A checkpoint folder may come from a shared bucket that others can write to. A pickle can name any importable
function and have the loader call it, so `torch.load(weights_only=False)` on such a file runs whatever its writer
put there. `weights_only=True` rebuilds tensors and plain Python data only, plus the few classes listed in
`ALLOWED_GLOBALS` (DeepSpeed's optimizer checkpoints hold a loss-scaler object, the ZeRO stage as an enum and
dataclasses of partition offsets; found by saving ZeRO 0-3 checkpoints, fp32 and bf16, and asking
`torch.serialization.get_unsafe_globals_in_checkpoint`).

    check_checkpoint_files(folder)      # before anything reads the folder: one line naming a refused file
    with weights_only_loads():          # around a library's own loads (DeepSpeed's engine.load_checkpoint)
        engine.load_checkpoint(folder)
    state = safe_load(path)             # rayeff's own .pt files

RNG states are saved as tensors and ints (`rng_state` / `set_rng_state`): numpy's and Python's generator states
are tuples holding a numpy array and a tuple of 625 ints, which `weights_only` would refuse.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from rayeff.errors import UserError


class CheckpointRefused(UserError):
    """A checkpoint file that holds pickled objects beyond tensors and plain data, or that cannot be read."""


def _deepspeed_globals() -> list:
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:   # no DeepSpeed: nothing of it can be in a checkpoint we read
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@functools.cache
def allowed_globals() -> list:
    """The classes (beyond torch's own weights-only set) a rayeff checkpoint may hold: plain DeepSpeed data
    classes whose unpickling only sets attributes."""
    return _deepspeed_globals()


def _refusal(path: Path, err: BaseException) -> CheckpointRefused:
    text = str(err)
    trusted = ("rayeff checkpoints hold tensors and plain data only, so this one was written by something else or "
               "tampered with: delete that checkpoint or resume from a trusted copy")
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return CheckpointRefused(f"{path}: refused: the checkpoint file holds pickled code ({found.group(1)}), "
                                 f"which loading would run; {trusted}")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        return CheckpointRefused(f"{path}: refused: the checkpoint file holds pickled code or objects that a "
                                 f"weights-only load does not accept ({detail.group(1).strip() if detail else '?'}); "
                                 f"{trusted}")
    reason = (text.strip().splitlines() or [type(err).__name__])[0][:160]
    return CheckpointRefused(f"{path}: refused: not a readable torch checkpoint ({reason}); delete that checkpoint "
                             "or resume from a trusted copy")


def safe_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """`torch.load` of a checkpoint file with weights_only=True (and the allowed DeepSpeed classes); a file holding
    anything else is a one-line `CheckpointRefused` naming it."""
    path = Path(path)
    # mmap (no copy of the tensors' bytes) needs the zip format that torch.save writes by default
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001  (UnpicklingError, RuntimeError: not a checkpoint, EOFError ...)
        raise _refusal(path, err) from None


def checkpoint_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*.pt") if p.is_file())


def check_checkpoint_files(folder: str | Path) -> None:
    """Every `.pt` file under `folder` (rayeff's and DeepSpeed's) loads with weights_only=True, else a one-line
    `CheckpointRefused` naming the first one that does not. The tensors are memory-mapped, not read."""
    for path in checkpoint_files(folder):
        safe_load(path, mmap=True)


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every `torch.load` in this process (a library's included, e.g. DeepSpeed's checkpoint
    engine, which passes weights_only=False) loads weights-only with the allowed classes. Use it around a
    library's checkpoint loading after `check_checkpoint_files`: the check gives the clear message, this makes sure
    that the bytes the library then reads are held to the same rule."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        try:
            with torch.serialization.safe_globals(allowed_globals()):
                return original(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except Exception as err:
            if isinstance(f, (str, Path)):
                raise _refusal(Path(f), err) from None
            raise

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


# -- RNG states as weights-only data --------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """torch's, numpy's and Python's global RNG states (and CUDA's on a GPU) as tensors, ints and floats."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put back what `rng_state` saved, exactly."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss_next"]))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
