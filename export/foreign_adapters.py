"""The trained LoRA under the tensor names other ONNX Runtime tools give their LoRA inputs.

An ONNX Runtime adapter file (``.onnx_adapter``) is only a set of named tensors; a model takes them as the graph
inputs of the same names. edgeft's own graph names them after the module (``...q_proj.lora_A``, PEFT's
[r, in] / [out, r] layout, the alpha/r scale in the graph). Two other producers of LoRA-ready ONNX models name and
lay them out differently (both checked against their public code):

* ORT GenAI's model builder (``python -m onnxruntime_genai.models.builder ... --extra_options
  adapter_path=PEFT_FOLDER``, what ``og.Adapters`` loads for): ``model.layers.{n}.attn.{q,k,v,o}_proj`` and
  ``model.layers.{n}.mlp.{gate,up,down}_proj``, each ``.lora_A.MatMul.weight`` stored [in, r] and
  ``.lora_B.MatMul.weight`` stored [r, out] with alpha/r multiplied in;
* Olive (``olive convert-adapters``, for models from its ExtractAdapters pass): PEFT's own key with
  ``base_model.model.model`` shortened to ``model`` (``model.layers.0.self_attn.q_proj.lora_A.weight``), the same
  orientation and scale.

Only LoRA on the unchanged base maps (not PiSSA, whose frozen weights are residuals); tensors with no LoRA
counterpart there (a causal LM's output bias, a classifier's head) are left out and listed.
"""

from __future__ import annotations

import re

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.manifest import Manifest

CONVENTIONS = ("genai", "olive")
GENAI_ARCHITECTURES = ("llama", "mistral", "qwen2")  # decoders the builder names model.layers.{n}.attn/mlp
_GENAI_MODULE = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.((?:q|k|v|o|gate|up|down)_proj)")


def file_name(convention: str) -> str:
    return f"adapter.{convention}.onnx_adapter"


def foreign_values(manifest: Manifest, values: dict[str, np.ndarray], convention: str
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(tensors under ``convention``'s names, in its layout; names of the adapter's tensors left out)."""
    spec = manifest.adapter
    if convention not in CONVENTIONS:
        raise EdgeftError(f"unknown adapter naming {convention!r} ({', '.join(CONVENTIONS)})")
    if spec.kind != "lora":
        raise EdgeftError(f"--also-for {convention}: only LoRA maps onto its LoRA inputs (this bundle trains {spec.kind})")
    if spec.init == "pissa":
        raise EdgeftError(f"--also-for {convention}: a PiSSA adapter sits on residual weights, not on the base model "
                          "such a model is built from")
    if convention == "genai" and manifest.architecture not in GENAI_ARCHITECTURES:
        raise EdgeftError(f"--also-for genai: ORT GenAI's builder names LoRA inputs of {', '.join(GENAI_ARCHITECTURES)} "
                          f"decoders; this bundle is {manifest.architecture or 'an unknown architecture'}")
    pairs: dict[str, dict[str, object]] = {}
    left_out = []
    for tensor in spec.tensors:
        if tensor.role in ("lora_A", "lora_B"):
            pairs.setdefault(tensor.module, {})[tensor.role] = tensor
        else:
            left_out.append(tensor.name)
    out = {}
    for module, pair in pairs.items():
        a, b = pair["lora_A"], pair["lora_B"]
        if convention == "genai":
            match = _GENAI_MODULE.fullmatch(module)
            if match is None:
                raise EdgeftError(f"--also-for genai: module {module} has no name in ORT GenAI's builder")
            layer, block, proj = match.groups()
            prefix = f"model.layers.{layer}.{'attn' if block == 'self_attn' else 'mlp'}.{proj}"
            names = (f"{prefix}.lora_A.MatMul.weight", f"{prefix}.lora_B.MatMul.weight")
        else:
            names = tuple(t.peft_key.replace("base_model.model.model", "model", 1) for t in (a, b))
        out[names[0]] = np.ascontiguousarray(values[a.name].T, dtype=np.float32)  # [in, r]
        out[names[1]] = np.ascontiguousarray((spec.scale * values[b.name]).T, dtype=np.float32)  # [r, out], scaled
    return out, left_out
