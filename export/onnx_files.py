"""Reading and writing ONNX files: protobuf cannot hold a message over 2 GB, so larger graphs keep weights in a
side file; a graph whose side file lies outside its folder (``../``, an absolute path, a symlink out) is refused."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgeft.errors import EdgeftError

EXTERNAL_DATA_BYTES = 1_800_000_000


def external_data_bytes() -> int:
    """Graphs larger than this keep their weights in ``NAME.data`` (below protobuf's 2 GB); the variable
    ``EDGEFT_EXTERNAL_DATA_BYTES`` lowers it, so tests take the large-model path with tiny models."""
    return int(os.environ.get("EDGEFT_EXTERNAL_DATA_BYTES", EXTERNAL_DATA_BYTES))


def save_model(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > external_data_bytes():
        onnx.save_model(model, str(path), save_as_external_data=True, location=Path(path).name + ".data",
                        all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(path))


def fits_in_memory(model: onnx.ModelProto) -> bool:
    """Whether protobuf can serialise ``model`` as one message (graphs over 2 GB cannot)."""
    try:
        return model.ByteSize() < (1 << 31) - (1 << 20)
    except (ValueError, OverflowError):
        return False


def clone(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy that does not go through serialisation (which fails over 2 GB)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def session(model: onnx.ModelProto, scratch: Path):
    """An ONNX Runtime CPU session on an in-memory graph: from its bytes when protobuf can serialise it,
    otherwise from a copy written with external data under ``scratch`` (a folder the caller removes)."""
    import onnxruntime as ort

    if fits_in_memory(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "probe.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                    all_tensors_to_one_file=True)
    # the file keeps the weights on disk (ORT maps them); the in-memory graph must keep its own
    onnx.load_external_data_for_model(model, str(scratch))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def file_bytes(path: Path) -> int:
    """A graph's size on disk with its external data."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def remove(path: Path) -> None:
    """Delete a graph and its external data."""
    path = Path(path)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    path.unlink()


def large(path: Path) -> bool:
    """Whether a graph derived from ``path`` (quantised, compressed) should be written with external data."""
    return file_bytes(path) > external_data_bytes()


def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    """The rule onnx applies when it reads external data (relative, inside ``folder``, not a symlink),
    applied without reading: onnx offers it only as part of loading the bytes."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    root = folder.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        where = folder / location
        if Path(location).is_absolute():
            problem = f"{location!r} is an absolute path"
        elif where.is_symlink():
            problem = f"{location!r} is a symbolic link"
        elif not where.resolve().is_relative_to(root):
            problem = f"{location!r} points outside the directory"
        else:
            continue
        raise onnx.checker.ValidationError(f"external data of tensor {tensor.name!r}: {problem}")


def load_model(path: Path, weights: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with every failure as one line: a corrupt file, or external data that is missing or
    not inside the graph's folder (onnx checks the location; ONNX Runtime does the same on the device).
    ``weights=False``: the graph's structure only; large weights stay in their external file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        if weights:
            onnx.load_external_data_for_model(model, str(Path(path).parent))
        else:  # nothing read yet, but a later reader (ORT's quantiser, a session) would follow the locations
            _check_external_locations(model, Path(path).parent)
        return model
    except (onnx.checker.ValidationError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise EdgeftError(f"{path}: cannot load ONNX graph ({first})") from None
    except Exception as err:  # protobuf's DecodeError and friends: a file that is not a graph
        raise EdgeftError(f"{path}: not an ONNX graph ({type(err).__name__})") from None
