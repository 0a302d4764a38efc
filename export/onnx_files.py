"""Reading and writing ONNX files: protobuf cannot hold a message over 2 GB, so larger graphs keep weights in a
side file; a graph whose side file lies outside its folder (``../``, an absolute path, a symlink out) is refused."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from edgeft.errors import EdgeftError

EXTERNAL_DATA_BYTES = 1_800_000_000
PAGE = 4096


def external_data_bytes() -> int:
    """Graphs larger than this keep their weights in ``NAME.data`` (below protobuf's 2 GB); the variable
    ``EDGEFT_EXTERNAL_DATA_BYTES`` lowers it, so tests take the large-model path with tiny models."""
    return int(os.environ.get("EDGEFT_EXTERNAL_DATA_BYTES", EXTERNAL_DATA_BYTES))


def save_model(model: onnx.ModelProto, path: Path, external: bool | None = None) -> None:
    """Write ``model``; with ``external`` (default: when over ``external_data_bytes()``) its weights go to
    ``NAME.data`` beside it (and leave the in-memory graph, as with ``onnx.save_model``)."""
    path = Path(path)
    if external if external is not None else approx_bytes(model) > external_data_bytes():
        _write_external_data(model, path)
    with open(path, "wb") as f:
        write_in_parts(model, f.write)


def serialized(model: onnx.ModelProto) -> bytes:
    """``model.SerializeToString()`` without protobuf's growing buffer: the parts, then one join."""
    parts: list[bytes] = []
    write_in_parts(model, parts.append)
    return b"".join(parts)


def write_in_parts(model: onnx.ModelProto, write) -> None:
    """Serialise ``model`` one graph item at a time. protobuf's encoder grows one buffer by doubling and
    holds the old ones until it is done, so a 543 MB graph peaked at 3.3 GB in ``SerializeToString``. The
    wire format merges a message field that appears several times and appends to repeated fields, so the
    graph can go out as a run of one-item graphs; it parses back to the same message."""
    shell = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(shell, field, value)
    write(shell.SerializeToString())
    graph_tag = _tag(onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number)
    for field, value in model.graph.ListFields():
        if field.message_type is None:
            part = onnx.GraphProto()
            _copy_field(part, field, value)
            parts = [part.SerializeToString()]
        else:
            parts = (_length_delimited(_tag(field.number), item.SerializeToString()) for item in value)
        for body in parts:
            write(_length_delimited(graph_tag, body))


def _copy_field(message, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _length_delimited(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _write_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Move every initializer of 1 KB or more into ``NAME.data``, each at a page-aligned offset (ORT maps
    aligned data instead of copying it). Written here rather than by ``onnx.save_model``, which checks for
    the side file relative to the working directory and appends to one left by an earlier save."""
    from onnx.external_data_helper import set_external_data

    location = path.name + ".data"
    with open(path.with_name(location), "wb") as side:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or _tensor_bytes(tensor) < 1024:
                continue
            side.write(b"\0" * (-side.tell() % PAGE))
            data = tensor.raw_data  # protobuf hands out a copy on every access: take it once
            offset = side.tell()
            side.write(data)
            set_external_data(tensor, location, offset, len(data))
            tensor.ClearField("raw_data")
            del data


def approx_bytes(model: onnx.ModelProto) -> int:
    """The serialised size of ``model`` without serialising it: protobuf's ``ByteSize`` encodes the whole
    message to count it (a 543 MB graph peaked at 3.3 GB), so initializers count by shape and type and the
    rest (nodes, with any Constant tensors, and signatures) by their own, small, sizes."""
    graph = model.graph
    size = sum(_tensor_bytes(t) + len(t.name) + 16 * len(t.dims) + 16 for t in graph.initializer)
    for part in (graph.node, graph.sparse_initializer, graph.input, graph.output, graph.value_info,
                 model.functions, model.opset_import, model.metadata_props):
        size += sum(item.ByteSize() + 4 for item in part)  # + each item's field tag and length
    return size + len(model.producer_name) + len(model.producer_version) + len(graph.name) + 64


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's data takes inside the protobuf (none when it lives in an external file)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    if tensor.HasField("raw_data"):
        count = 1
        for dim in tensor.dims:
            count *= dim
        return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return (4 * (len(tensor.float_data) + len(tensor.int32_data)) + sum(len(s) for s in tensor.string_data)
            + 8 * (len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)))


def fits_in_memory(model: onnx.ModelProto) -> bool:
    """Whether protobuf can serialise ``model`` as one message (graphs over 2 GB cannot)."""
    return approx_bytes(model) < (1 << 31) - (1 << 20)


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
        return ort.InferenceSession(serialized(model), providers=["CPUExecutionProvider"])
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / "probe.onnx"
    save_model(model, path, external=True)
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
