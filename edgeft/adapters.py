"""Adapter values: a flat vector for optimizers, named tensors for the graph, adapter folders on disk.

Optimizers see one float32 vector (the *adapter vector*); the graph sees named inputs; users
see an adapter folder, ``adapter_config.json`` + ``adapter_model.safetensors``:

* ``lora``: PEFT's LoRA layout (keys ``base_model.model.<module>.lora_A.weight``/``lora_B``).
  A PiSSA-initialised LoRA trains on residual weights; it is saved the way PEFT converts
  PiSSA for the original model: rank 2r, alpha 2·alpha, A' = [A; −A₀], B' = [B, B₀], so
  W + scale·B'A' is the trained weight.
* ``bone``: PEFT's MiSS layout with ``init_weights: "bat"`` (key ``<module>.miss_block``,
  [out/r, r, r]).
* ``loldu`` and ``tt``: edgeft's own layout (PEFT has neither): the same two files,
  ``peft_type`` ``EDGEFT_LOLDU`` / ``EDGEFT_TT``; keys ``base_model.model.<module>.loldu_z`` [r]
  and ``.loldu_scale`` [1] (W_eff = W_res + scale·(P L_r D_r)·diag(z)·U_r, the frozen factors
  recomputed from the base weight by LU with partial pivoting), or ``.tt_core_<j>``
  [r_{j-1}, o_j, i_j, r_j] (ΔW = (alpha/r)·TT-matrix of the cores; ``tt_cores`` in the config).

The classification head is not a PEFT module: it is saved beside the adapter as
``head.safetensors`` (``weight`` [labels, hidden], ``bias`` [labels]), applied after pooling.
The output adapter, fitted on the device in closed form before the search, is not a PEFT module
either: ``output_adapter.safetensors`` — a causal LM's ``bias`` [vocab] added to the LM head's
logits; a prompt bundle's ``weight`` [labels, hidden] and ``bias`` [labels] added to the label
words' logits (a linear probe on the hidden state at the answer position).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterSpec, AdapterTensor, Manifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
OUTPUT_ADAPTER_WEIGHTS = "output_adapter.safetensors"
# The output adapter: fitted in closed form at the start (runtime/output_fit.py), never searched.
FITTED_ROLES = ("output_weight", "output_bias")
# Tensors outside the transformer body, saved beside the PEFT files.
OUTPUT_ROLES = ("head_weight", "head_bias", *FITTED_ROLES)
PEFT_TYPES = {"lora": "LORA", "bone": "MISS", "loldu": "EDGEFT_LOLDU", "tt": "EDGEFT_TT"}


def layer_of(name: str) -> int:
    """The transformer layer an adapter tensor belongs to (-1: not in a layer, e.g. the head)."""
    match = re.search(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


class AdapterLayout:
    """Where each adapter tensor lives in the flat adapter vector."""

    def __init__(self, spec: AdapterSpec, stored: dict[str, np.ndarray] | None = None):
        self.spec = spec
        self.stored = stored or {}  # start values of "stored" tensors (the bundle's init file)
        self.tensors: list[AdapterTensor] = list(spec.tensors)
        self.offsets: list[int] = []
        offset = 0
        for t in self.tensors:
            self.offsets.append(offset)
            offset += int(np.prod(t.shape))
        self.size = offset

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def subset(self, names: list[str]) -> tuple["AdapterLayout", np.ndarray]:
        """The layout of some tensors only, and where their values lie in this layout's vector."""
        from dataclasses import replace

        keep = [t for t in self.tensors if t.name in set(names)]
        index = np.concatenate([np.arange(self.slice_of(t.name).start, self.slice_of(t.name).stop) for t in keep])
        return AdapterLayout(replace(self.spec, tensors=keep), self.stored), index

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
        """Where training starts: every adapter type at a zero update, so the model is the base model.

        LoRA as PEFT: A ~ kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0 (or
        PiSSA's stored A₀, B₀ on residual weights); LoLDU z = 1, scale = 1; TT: Gaussian cores,
        the last zero; Bone: B = 0. The head starts at zero until a linear probe fits it.
        """
        rng = np.random.default_rng(seed)
        vector = np.zeros(self.size, dtype=np.float32)
        for t, off in zip(self.tensors, self.offsets):
            n = int(np.prod(t.shape))
            if t.init == "kaiming-uniform":
                bound = 1.0 / math.sqrt(t.shape[-1])
                vector[off : off + n] = rng.uniform(-bound, bound, size=n).astype(np.float32)
            elif t.init == "tt-normal":  # core [r_prev, o, i, r_next]
                std = 1.0 / math.sqrt(t.shape[0] * t.shape[2])
                vector[off : off + n] = (rng.standard_normal(n) * std).astype(np.float32)
            elif t.init == "ones":
                vector[off : off + n] = 1.0
            elif t.init == "stored":
                if t.name not in self.stored:
                    raise EdgeftError(f"adapter tensor {t.name}: its start value is not in the bundle's init file")
                vector[off : off + n] = np.asarray(self.stored[t.name], dtype=np.float32).ravel()
        return vector

    def adapter_mask(self) -> np.ndarray:
        """True where the vector holds adapter values (not the classification head or output bias)."""
        mask = np.zeros(self.size, dtype=bool)
        for t, off in zip(self.tensors, self.offsets):
            if t.role not in OUTPUT_ROLES:
                mask[off : off + int(np.prod(t.shape))] = True
        return mask

    @property
    def trainable_adapter_values(self) -> int:
        return int(self.adapter_mask().sum())


def searched_tensors(layout: AdapterLayout, manifest: Manifest) -> list[str]:
    """The tensors zeroth-order search changes: all but those fitted from exact gradients at the start
    (the output adapter; a causal LM's top blocks' or top MLP's LoRA, ``runtime/top_blocks.py``)."""
    fitted = manifest.exact_fit_tensors()
    return [t.name for t in layout.tensors if t.role not in FITTED_ROLES and t.name not in fitted]


def bundle_layout(folder: Path, manifest: Manifest) -> AdapterLayout:
    """The layout of a bundle folder, with its stored start values when it has any."""
    stored = None
    if manifest.adapter.init_file:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(folder) / manifest.adapter.init_file
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise EdgeftError(f"{path}: the bundle's adapter start values are missing or unreadable ({err})") from None
    return AdapterLayout(manifest.adapter, stored)


# --- adapter folders ----------------------------------------------------------


def _config(spec: AdapterSpec, base_model: str, task_type: str | None) -> dict:
    common = {"peft_type": PEFT_TYPES[spec.kind], "r": spec.rank, "target_modules": sorted(spec.targets),
              "base_model_name_or_path": base_model, "task_type": task_type, "inference_mode": True,
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}
    if spec.kind == "lora":
        pissa = spec.init == "pissa"  # saved converted: rank 2r on the original weights
        return {**common, "r": spec.rank * (2 if pissa else 1), "lora_alpha": spec.alpha * (2 if pissa else 1),
                "lora_dropout": 0.0, "init_lora_weights": True}
    if spec.kind == "bone":
        return {**common, "init_weights": "bat", "mini_r": 1, "miss_dropout": 0.0}
    if spec.kind == "tt":
        return {**common, "alpha": spec.alpha, "tt_cores": spec.tt_cores}
    return common


def _pissa_pairs(layout: AdapterLayout):
    """(A spec, B spec) per module of a PiSSA LoRA."""
    pairs: dict[str, dict] = {}
    for t in layout.tensors:
        if t.role in ("lora_A", "lora_B"):
            pairs.setdefault(t.module, {})[t.role] = t
    return [(p["lora_A"], p["lora_B"]) for p in pairs.values()]


def save_adapter(folder: Path, layout: AdapterLayout, vector: np.ndarray, base_model: str, task_type: str | None) -> None:
    """Write an adapter folder (+ head.safetensors when the bundle has a head); layouts in the module doc.

    Files are written under temporary names and renamed, so a crash never leaves a
    half-written adapter over a good one.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    named = layout.unflatten(np.asarray(vector, dtype=np.float32))
    weights, head, output = {}, {}, {}
    for t in layout.tensors:
        value = np.ascontiguousarray(named[t.name])
        if t.peft_key:
            weights[t.peft_key] = value
        elif t.role == "head_weight":
            head["weight"] = value
        elif t.role == "head_bias":
            head["bias"] = value
        elif t.role in FITTED_ROLES:
            output[t.role.removeprefix("output_")] = value
    spec = layout.spec
    if spec.kind == "lora" and spec.init == "pissa":
        for a, b in _pissa_pairs(layout):
            weights[a.peft_key] = np.ascontiguousarray(np.concatenate([named[a.name], -layout.stored[a.name]], axis=0))
            weights[b.peft_key] = np.ascontiguousarray(np.concatenate([named[b.name], layout.stored[b.name]], axis=1))
    config = _config(spec, base_model, task_type)
    _atomic_write(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    _atomic_write(folder / ADAPTER_WEIGHTS, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    if head:
        _atomic_write(folder / HEAD_WEIGHTS, lambda p: save_file(head, str(p)))
    if output:
        _atomic_write(folder / OUTPUT_ADAPTER_WEIGHTS, lambda p: save_file(output, str(p)))


def load_adapter(folder: Path, layout: AdapterLayout, base: np.ndarray | None = None) -> np.ndarray:
    """Read an adapter folder into an adapter vector for this bundle.

    Tensors absent from the file keep their value in ``base`` (e.g. the head when a
    plain PEFT adapter is loaded). A LoRA with another ``lora_alpha/r`` is folded into B
    so that the adapted weights are the same.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    spec = layout.spec
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise EdgeftError(f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EdgeftError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise EdgeftError(f"{config_path}: not an adapter config object")
    want = PEFT_TYPES[spec.kind]
    if str(config.get("peft_type", "")).upper() != want:
        raise EdgeftError(f"{config_path}: peft_type {config.get('peft_type')!r} does not fit this {spec.kind} bundle ({want})")
    pissa = spec.kind == "lora" and spec.init == "pissa"
    rank = int(config.get("r", 0))
    want_rank = spec.rank * (2 if pissa else 1)
    if rank != want_rank:
        raise EdgeftError(f"{folder}: adapter rank {rank} does not fit the bundle's rank {want_rank}"
                          + (" (a PiSSA bundle takes the rank-2r adapters it saves)" if pissa else ""))
    if spec.kind == "bone" and config.get("init_weights") != "bat":
        raise EdgeftError(f"{config_path}: a MiSS adapter without init_weights 'bat' is not a Bone adapter")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EdgeftError(f"{weights_path}: not a readable safetensors file ({err})") from None
    # PEFT saves keys without the adapter name ("default"); accept both spellings.
    weights = {k.replace(".default.weight", ".weight").removesuffix(".default"): v for k, v in weights.items()}
    rescale = 1.0
    if spec.kind == "lora":
        file_scale = float(config.get("lora_alpha", rank)) / rank
        rescale = file_scale / spec.scale
        if pissa and abs(rescale - 1.0) > 1e-6:
            raise EdgeftError(f"{folder}: lora_alpha/r {file_scale:g} differs from the PiSSA bundle's {spec.scale:g}")

    named = layout.unflatten(np.array(base if base is not None else layout.initial(), dtype=np.float32, copy=True))
    matched = 0
    for t in layout.tensors:
        if t.peft_key is None:
            continue
        if t.peft_key not in weights:
            raise EdgeftError(f"{weights_path}: missing tensor {t.peft_key}")
        value = np.asarray(weights[t.peft_key], dtype=np.float32)
        if pissa:
            value = _pissa_half(weights_path, t, value, layout.stored[t.name])
        if list(value.shape) != list(t.shape):
            raise EdgeftError(f"{weights_path}: {t.peft_key} has shape {list(value.shape)}, the bundle expects {t.shape}")
        if t.role == "lora_B":
            value = value * np.float32(rescale)
        named[t.name][...] = value
        matched += 1
    if matched == 0:
        raise EdgeftError(f"{weights_path}: no tensor matches this bundle's adapter modules")
    for file, keys, what in ((HEAD_WEIGHTS, {"head_weight": "weight", "head_bias": "bias"}, "other labels?"),
                             (OUTPUT_ADAPTER_WEIGHTS, {"output_weight": "weight", "output_bias": "bias"},
                              "another vocabulary or labels?")):
        path = folder / file
        if not path.is_file():
            continue
        try:
            extra = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise EdgeftError(f"{path}: not a readable safetensors file ({err})") from None
        for t in layout.tensors:
            key = keys.get(t.role)
            if key is None:
                continue
            if key not in extra or list(extra[key].shape) != list(t.shape):
                raise EdgeftError(f"{path}: {key} does not fit the bundle's {t.shape} ({what})")
            named[t.name][...] = extra[key]
    vector = layout.flatten(named)
    if not np.all(np.isfinite(vector)):
        raise EdgeftError(f"{folder}: adapter holds non-finite values")
    return vector


def _pissa_half(path: Path, t: AdapterTensor, value: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The trained half of a converted PiSSA tensor; the other half must be this bundle's start (±)."""
    r = start.shape[0] if t.role == "lora_A" else start.shape[1]
    if t.role == "lora_A":
        trained, fixed, expected = value[:r], value[r:], -start
    else:
        trained, fixed, expected = value[:, :r], value[:, r:], start
    if fixed.shape != expected.shape or not np.allclose(fixed, expected, rtol=1e-4, atol=1e-6):
        raise EdgeftError(f"{path}: {t.peft_key} was not saved from this PiSSA bundle (its start half differs)")
    return trained


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
