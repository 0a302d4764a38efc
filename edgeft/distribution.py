"""An adapter as a distribution (``--optimizer monteclora``): the spread saved beside the mean.

The mean is the adapter folder's ordinary files (PEFT format, ``edgeft.adapters``). The spread is
``distribution.safetensors`` in the same folder, edgeft's layout: one float32 tensor per adapter tensor,
keyed by the bundle's tensor name (its graph input name, e.g. ``encoder.layer.0.attention.self.query.lora_A``
or ``head.weight``), of that tensor's shape, holding σ ≥ 0 of a diagonal Gaussian N(mean, σ²); metadata
``{"format": "edgeft-distribution", "kind": "diagonal-gaussian"}``. ``edgeft predict/eval --samples N``
average the predictions of N adapters drawn from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError

DISTRIBUTION = "distribution.safetensors"
METADATA = {"format": "edgeft-distribution", "kind": "diagonal-gaussian"}


def save_distribution(folder: Path, layout, sigma: np.ndarray) -> None:
    from safetensors.numpy import save_file

    named = layout.unflatten(np.asarray(sigma, dtype=np.float32))
    path = Path(folder) / DISTRIBUTION
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in named.items()}, str(tmp), metadata=METADATA)
    os.replace(tmp, path)  # never a half-written file over a good one


def load_distribution(folder: Path, layout) -> np.ndarray:
    """σ as a flat vector for ``layout``; a one-line error when the file is missing, foreign or does not fit."""
    from safetensors import safe_open

    path = Path(folder) / DISTRIBUTION
    if not path.is_file():
        raise EdgeftError(f"{folder}: no {DISTRIBUTION} (--samples needs an adapter trained with --optimizer monteclora)")
    try:
        with safe_open(str(path), "numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # truncated or not a safetensors file
        raise EdgeftError(f"{path}: not a readable distribution file ({str(err).splitlines()[0][:200]})") from None
    if metadata.get("format") != METADATA["format"]:
        raise EdgeftError(f"{path}: not an edgeft distribution file (format {metadata.get('format')!r})")
    missing = [t.name for t in layout.tensors if t.name not in tensors]
    if missing or set(tensors) - set(layout.names()):
        raise EdgeftError(f"{path}: does not fit this bundle's adapter tensors "
                          f"({'missing ' + missing[0] if missing else 'unknown ' + sorted(set(tensors) - set(layout.names()))[0]})")
    for t in layout.tensors:
        value = tensors[t.name]
        if list(value.shape) != list(t.shape):
            raise EdgeftError(f"{path}: {t.name} has shape {list(value.shape)}, the bundle's is {t.shape}")
        if not np.all(np.isfinite(value)) or np.any(value < 0):
            raise EdgeftError(f"{path}: {t.name} holds a negative or non-finite spread")
    return layout.flatten(tensors)
