"""Adapter values: a flat vector for optimizers, named tensors for the graph, PEFT files on disk.

Optimizers see one float32 vector (the *adapter vector*); the graph sees named
inputs; users and PEFT see ``adapter_config.json`` + ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight``. The classification head is
not a PEFT module: it is saved beside the adapter as ``head.safetensors``
(``weight`` [labels, hidden], ``bias`` [labels]), applied after pooling.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterSpec, AdapterTensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"


def layer_of(name: str) -> int:
    """The transformer layer an adapter tensor belongs to (-1: not in a layer, e.g. the head)."""
    match = re.search(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


class AdapterLayout:
    """Where each adapter tensor lives in the flat adapter vector."""

    def __init__(self, spec: AdapterSpec):
        self.spec = spec
        self.tensors: list[AdapterTensor] = list(spec.tensors)
        self.offsets: list[int] = []
        offset = 0
        for t in self.tensors:
            self.offsets.append(offset)
            offset += int(np.prod(t.shape))
        self.size = offset

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def slice_of(self, name: str) -> slice:
        for t, off in zip(self.tensors, self.offsets):
            if t.name == name:
                return slice(off, off + int(np.prod(t.shape)))
        raise KeyError(name)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Named views of ``vector`` (no copy) shaped for the graph inputs."""
        if vector.shape != (self.size,):
            raise EdgeftError(f"adapter vector has {vector.shape} values, the bundle expects ({self.size},)")
        out = {}
        for t, off in zip(self.tensors, self.offsets):
            n = int(np.prod(t.shape))
            out[t.name] = vector[off : off + n].reshape(t.shape)
        return out

    def flatten(self, named: dict[str, np.ndarray]) -> np.ndarray:
        vector = np.empty(self.size, dtype=np.float32)
        for t, off in zip(self.tensors, self.offsets):
            value = np.asarray(named[t.name], dtype=np.float32)
            if list(value.shape) != list(t.shape):
                raise EdgeftError(f"adapter tensor {t.name}: shape {list(value.shape)} does not fit the bundle's {t.shape}")
            vector[off : off + value.size] = value.ravel()
        return vector

    def initial(self, seed: int = 0) -> np.ndarray:
        """PEFT's LoRA init: A ~ kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0.

        B = 0 makes the adapted model start exactly at the base model. The head
        starts at zero until a linear probe fits it.
        """
        rng = np.random.default_rng(seed)
        vector = np.zeros(self.size, dtype=np.float32)
        for t, off in zip(self.tensors, self.offsets):
            n = int(np.prod(t.shape))
            if t.init == "kaiming-uniform":
                bound = 1.0 / math.sqrt(t.shape[-1])
                vector[off : off + n] = rng.uniform(-bound, bound, size=n).astype(np.float32)
        return vector

    def lora_mask(self) -> np.ndarray:
        """True where the vector holds LoRA values (not the head)."""
        mask = np.zeros(self.size, dtype=bool)
        for t, off in zip(self.tensors, self.offsets):
            if t.role.startswith("lora"):
                mask[off : off + int(np.prod(t.shape))] = True
        return mask


# --- PEFT-format files -------------------------------------------------------


def save_adapter(folder: Path, layout: AdapterLayout, vector: np.ndarray, base_model: str, task_type: str | None) -> None:
    """Write a PEFT LoRA adapter folder (+ head.safetensors when the bundle has a head).

    Files are written under temporary names and renamed, so a crash never leaves a
    half-written adapter over a good one.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    named = layout.unflatten(np.asarray(vector, dtype=np.float32))
    lora, head = {}, {}
    for t in layout.tensors:
        value = np.ascontiguousarray(named[t.name])
        if t.peft_key:
            lora[t.peft_key] = value
        elif t.role == "head_weight":
            head["weight"] = value
        elif t.role == "head_bias":
            head["bias"] = value
    spec = layout.spec
    config = {
        "peft_type": "LORA",
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": sorted(spec.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
        "task_type": task_type,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    _atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    _atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(lora, str(p), metadata={"format": "pt"}))
    if head:
        _atomic_write(folder / HEAD_WEIGHTS, lambda p: save_file(head, str(p)))


def load_adapter(folder: Path, layout: AdapterLayout, base: np.ndarray | None = None) -> np.ndarray:
    """Read a PEFT LoRA adapter folder into an adapter vector for this bundle.

    Tensors absent from the file keep their value in ``base`` (e.g. the head when a
    plain PEFT adapter is loaded). A different ``lora_alpha/r`` in the file is folded
    into B so that the adapted weights are the same.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise EdgeftError(f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeftError(f"{config_path}: not valid JSON ({err})") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise EdgeftError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    rank = int(config.get("r", 0))
    if rank != layout.spec.rank:
        raise EdgeftError(f"{folder}: adapter rank {rank} does not fit the bundle's rank {layout.spec.rank}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EdgeftError(f"{weights_path}: not a readable safetensors file ({err})") from None
    # PEFT saves keys without the adapter name ("default"); accept both spellings.
    weights = {k.replace(".default.weight", ".weight"): v for k, v in weights.items()}
    file_scale = float(config.get("lora_alpha", rank)) / rank
    rescale = file_scale / layout.spec.scale

    named = layout.unflatten(np.array(base if base is not None else layout.initial(), dtype=np.float32, copy=True))
    matched = 0
    for t in layout.tensors:
        if t.peft_key is None:
            continue
        if t.peft_key not in weights:
            raise EdgeftError(f"{weights_path}: missing tensor {t.peft_key}")
        value = np.asarray(weights[t.peft_key], dtype=np.float32)
        if list(value.shape) != list(t.shape):
            raise EdgeftError(f"{weights_path}: {t.peft_key} has shape {list(value.shape)}, the bundle expects {t.shape}")
        if t.role == "lora_B":
            value = value * np.float32(rescale)
        named[t.name][...] = value
        matched += 1
    if matched == 0:
        raise EdgeftError(f"{weights_path}: no tensor matches this bundle's adapter modules")
    head_path = folder / HEAD_WEIGHTS
    if head_path.is_file():
        try:
            head = load_file(str(head_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise EdgeftError(f"{head_path}: not a readable safetensors file ({err})") from None
        for t in layout.tensors:
            key = {"head_weight": "weight", "head_bias": "bias"}.get(t.role)
            if key is None:
                continue
            if key not in head or list(head[key].shape) != list(t.shape):
                raise EdgeftError(f"{head_path}: head {key} does not fit the bundle's {t.shape} (other labels?)")
            named[t.name][...] = head[key]
    vector = layout.flatten(named)
    if not np.all(np.isfinite(vector)):
        raise EdgeftError(f"{folder}: adapter holds non-finite values")
    return vector


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
