"""``edgeft compress``: bundle → lighter bundle that still trains (int8 frozen weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.manifest import MANIFEST_NAME, MODEL_NAME, TOKENIZER_NAME, Manifest

from .quantize import quantize_int8


def quantize_bundle(bundle: Path, out: Path) -> int:
    """Copy ``bundle`` to ``out`` with int8 MatMul weights; adapter inputs and the loss stay fp32."""
    bundle, out = Path(bundle), Path(out)
    manifest = Manifest.load(bundle)
    if out.exists() and any(out.iterdir()):
        raise EdgeftError(f"{out}: already exists and is not empty (choose another -o)")
    out.mkdir(parents=True, exist_ok=True)
    excluded = quantize_int8(bundle / MODEL_NAME, out / MODEL_NAME, manifest)
    shutil.copy(bundle / TOKENIZER_NAME, out / TOKENIZER_NAME)
    shutil.copy(bundle / MANIFEST_NAME, out / MANIFEST_NAME)
    return len(excluded)
