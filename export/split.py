"""Split a bundle graph at a layer boundary: compute the part below it once per batch.

When the candidates of one step differ only in the adapters of layers ≥ ℓ (layer-wise
DFO, adapters only on the top layers), every tensor that does not depend on those
adapters is the same for all candidates on a batch. This pass finds that part by data
flow, not by architecture: a node is *varying* if it reads a varying adapter input
(directly or through other nodes), *per-batch* if it reads any other graph input, and
*constant* otherwise. The ``lower`` graph computes every per-batch tensor a varying
node reads (the boundary: hidden states entering layer ℓ, attention-mask expansions,
even the frozen projections of layer ℓ's input); the ``upper`` graph takes the
boundary plus the varying adapters and computes the loss. Constant subgraphs (weight
transposes and the like) stay in whichever graph uses them, so no weight copy crosses
the boundary.

The split files are written into the bundle and listed in its manifest; the runtime
uses them when a step's candidates qualify (``edgeft.runtime.split``).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import shape_inference, utils

from edgeft.adapters import layer_of
from edgeft.errors import EdgeftError
from edgeft.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, SplitSpec


def varying_tensors(manifest: Manifest, at: int) -> list[str]:
    """Adapter inputs of layers ≥ ``at``; the head (no layer) sits above every layer."""
    return [t.name for t in manifest.adapter.tensors if layer_of(t.name) >= at or layer_of(t.name) < 0]


def split_graph(model: onnx.ModelProto, varying: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """(lower, upper, boundary) for a graph whose inputs ``varying`` change between candidates."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise EdgeftError("cannot split a graph with control flow (If/Loop/Scan)")
    inputs = {i.name for i in graph.input}
    moving = set(varying)
    per_batch = inputs - moving
    consumed_by_varying: set[str] = set()
    for node in graph.node:  # nodes are stored in topological order
        reads = [x for x in node.input if x]
        if any(x in moving for x in reads):
            moving.update(o for o in node.output if o)
            consumed_by_varying.update(reads)
        elif any(x in per_batch for x in reads):
            per_batch.update(o for o in node.output if o)
    boundary = sorted(consumed_by_varying & per_batch)
    outputs = [o.name for o in graph.output]
    upper_outputs = [o for o in outputs if o in moving]
    lower_outputs = [b for b in boundary if b not in inputs] + [o for o in outputs if o not in moving and o in per_batch]
    if not upper_outputs:
        raise EdgeftError("no graph output depends on the adapters above the split")

    model = _with_value_info(model, boundary)
    extractor = utils.Extractor(model)
    lower_inputs = sorted(i for i in inputs if i not in varying)
    lower = extractor.extract_model(lower_inputs, lower_outputs)
    upper = extractor.extract_model(boundary + list(varying), upper_outputs)
    # The extractor keeps every input it was given; drop the ones a part never reads.
    for part in (lower, upper):
        read = {x for n in part.graph.node for x in n.input} | {o.name for o in part.graph.output}
        keep = [i for i in part.graph.input if i.name in read]
        del part.graph.input[:]
        part.graph.input.extend(keep)
    return lower, upper, boundary


def _with_value_info(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The extractor needs a type for every tensor that becomes a graph input or output."""
    known = {v.name for v in model.graph.value_info} | {i.name for i in model.graph.input}
    if all(n in known for n in names):
        return model
    inferred = shape_inference.infer_shapes(model)
    missing = [n for n in names if n not in {v.name for v in inferred.graph.value_info} | known]
    if missing:
        raise EdgeftError(f"cannot split: no type known for {', '.join(missing[:3])}")
    return inferred


def split_bundle(folder: Path, at: int, log=print) -> SplitSpec:
    """Write ``split-AT/{lower,upper}.onnx`` into the bundle and list the split in its manifest."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    layers = sorted({layer_of(t.name) for t in manifest.adapter.tensors} - {-1})
    if at not in layers or at == layers[0]:
        choices = ", ".join(str(x) for x in layers[1:]) or "none: the adapters sit in fewer than two layers"
        raise EdgeftError(f"--at {at}: split at a layer that has adapters, above the lowest (choices: {choices})")
    varying = varying_tensors(manifest, at)
    model = onnx.load(str(folder / MODEL_NAME))
    lower, upper, boundary = split_graph(model, varying)
    sub = folder / f"split-{at}"
    sub.mkdir(exist_ok=True)
    for name, part in (("lower.onnx", lower), ("upper.onnx", upper)):
        _save(part, sub / name)
    spec = SplitSpec(at=at, lower=f"split-{at}/lower.onnx", upper=f"split-{at}/upper.onnx",
                     boundary=boundary, varying=varying)
    manifest.splits = [s for s in manifest.splits if s.at != at] + [spec]
    manifest.splits.sort(key=lambda s: s.at)
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json() + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)  # atomic: the bundle is never left with a half-written manifest
    log(f"split at layer {at}: {len(boundary)} boundary tensors, {len(varying)} adapter tensors above, "
        f"{len(lower.graph.node)} nodes below / {len(upper.graph.node)} above")
    return spec


def _save(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data",
                        all_tensors_to_one_file=True)
    else:
        onnx.save_model(model, str(path))
