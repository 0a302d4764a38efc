"""Atomic checkpoints: arrays in safetensors, the rest in JSON, swapped in by rename.

A checkpoint folder is written complete under a temporary name, then renamed over
the previous one, so a kill at any moment leaves either the old or the new
checkpoint intact — never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from edgeft.errors import EdgeftError

ARRAYS, SCALARS = "arrays.safetensors", "state.json"


def save_checkpoint(folder: Path, arrays: dict[str, np.ndarray], scalars: dict) -> None:
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / ARRAYS))
    (tmp / SCALARS).write_text(json.dumps(scalars, sort_keys=True))
    _fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    folder = Path(folder)
    if not folder.exists():  # killed between the two renames: the previous one is complete
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            folder = old
    if not (folder / SCALARS).is_file() or not (folder / ARRAYS).is_file():
        raise EdgeftError(f"{folder}: no complete checkpoint to resume from")
    try:
        return load_file(str(folder / ARRAYS)), json.loads((folder / SCALARS).read_text())
    except Exception as err:
        raise EdgeftError(f"{folder}: checkpoint is unreadable ({err})") from None


def _fsync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
