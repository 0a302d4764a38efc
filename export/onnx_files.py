"""Reading and writing ONNX files: protobuf cannot hold a message over 2 GB, so larger graphs keep weights in a
side file; a graph whose side file lies outside its folder (``../``, an absolute path, a symlink out) is refused."""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeft.errors import EdgeftError

EXTERNAL_DATA_BYTES = 1_800_000_000


def save_model(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, location=Path(path).name + ".data",
                        all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(path))


def load_model(path: Path) -> onnx.ModelProto:
    """``onnx.load`` with every failure as one line: a corrupt file, or external data that is missing or
    not inside the graph's folder (onnx checks the location; ONNX Runtime does the same on the device)."""
    try:
        return onnx.load(str(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise EdgeftError(f"{path}: cannot load ONNX graph ({first})") from None
    except Exception as err:  # protobuf's DecodeError and friends: a file that is not a graph
        raise EdgeftError(f"{path}: not an ONNX graph ({type(err).__name__})") from None
