"""Writing ONNX files: protobuf cannot hold a message over 2 GB, so larger graphs keep weights in a side file."""

from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_DATA_BYTES = 1_800_000_000


def save_model(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, location=Path(path).name + ".data",
                        all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(path))
