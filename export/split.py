"""Cut a bundle graph into segments at layer boundaries, so unchanged layers run once per batch.

When the candidates of one step differ only in the adapters of layers ≥ ℓ (layer-wise
DFO, adapters only on the top layers), everything below ℓ is the same for all of them
on a batch. This pass cuts the graph at layers c1 < c2 < ... into segments by data
flow, not by architecture: a node belongs to the segment of the highest cut whose
adapters it (transitively) reads; nodes that read only the token inputs belong to
segment 0; nodes that read no input at all (weight transposes, constants) go into
whichever segment uses them. A segment's inputs are the tensors of earlier segments it
reads (hidden states entering layer ℓ, attention-mask expansions, even the frozen
projections of layer ℓ's input) plus its own adapters. Each weight lives in the
segment that uses it, so the segments together weigh about one model.

The segments are written into the bundle and listed in its manifest; the runtime
(``edgeft.runtime.split``) re-runs only the segments from the lowest changed one up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
from onnx import shape_inference, utils

from edgeft.adapters import layer_of
from edgeft.errors import EdgeftError
from edgeft.manifest import MANIFEST_NAME, MODEL_NAME, Manifest, Segments

from .onnx_files import load_model, save_model

FOLDER = "segments"


def adapter_groups(manifest: Manifest, cuts: list[int]) -> list[list[str]]:
    """Adapter inputs per segment: segment i holds layers [cuts[i-1], cuts[i]); the head
    (not in a layer) sits above every layer, in the top segment."""
    bounds = [-1] + list(cuts)
    groups: list[list[str]] = [[] for _ in bounds]
    for t in manifest.adapter.tensors:
        layer = layer_of(t.name)
        index = len(bounds) - 1 if layer < 0 else max(i for i, b in enumerate(bounds) if layer >= b)
        groups[index].append(t.name)
    return groups


def segment_graph(model: onnx.ModelProto, groups: list[list[str]]) -> list[onnx.ModelProto]:
    """One model per adapter group; segment i's adapters are inputs of segment i only."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise EdgeftError("cannot split a graph with control flow (If/Loop/Scan)")
    level = {i.name: 0 for i in graph.input}  # tensor -> segment that computes it (absent: constant)
    for index, names in enumerate(groups):
        level.update({name: index for name in names})
    readers: dict[str, set[int]] = {}  # tensor -> segments that read it
    nodes_of: list[int] = [0] * len(groups)
    for node in graph.node:  # stored in topological order
        reads = [x for x in node.input if x]
        levels = [level[x] for x in reads if x in level]
        if not levels:
            continue  # constant: pulled into each segment that needs it
        mine = max(levels)
        nodes_of[mine] += 1
        level.update({o: mine for o in node.output if o})
        for x in reads:
            readers.setdefault(x, set()).add(mine)
    outputs = [o.name for o in graph.output]
    empty = [i for i, n in enumerate(nodes_of) if n == 0]
    if empty:
        raise EdgeftError(f"segment {empty[0]} would be empty: cut where the graph has adapters")

    inputs = {i.name for i in graph.input}
    # tensors computed in one segment and read in a later one: a segment's outputs
    crossing = sorted(t for t, rs in readers.items() if t in level and any(r > level[t] for r in rs))
    extractor = utils.Extractor(_with_value_info(model, [t for t in crossing if t not in inputs]))
    parts = []
    for index in range(len(groups)):
        ins = [t for t in sorted(readers) if t in level and level[t] <= index and index in readers[t]
               and (t in inputs or level[t] < index)]
        outs = [t for t in crossing if level[t] == index and t not in inputs]
        outs += [o for o in outputs if level.get(o) == index and o not in outs]
        parts.append(extractor.extract_model(ins, outs))
    return parts


def _with_value_info(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The extractor needs a type for every tensor that becomes a segment's input or output."""
    known = {v.name for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    if all(n in known for n in names):
        return model
    inferred = shape_inference.infer_shapes(model)
    missing = [n for n in names if n not in {v.name for v in inferred.graph.value_info} | known]
    if missing:
        raise EdgeftError(f"cannot split: no type known for {', '.join(missing[:3])}")
    return inferred


def split_bundle(folder: Path, cuts: list[int], log=print) -> Segments:
    """Write ``segments/segment-I.onnx`` into the bundle and list them in its manifest
    (replacing an earlier split). The manifest changes last, atomically."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    layers = sorted({layer_of(t.name) for t in manifest.adapter.tensors} - {-1})
    cuts = sorted(set(cuts))
    bad = [c for c in cuts if not 0 < c <= (layers[-1] if layers else -1)]
    if not cuts or bad:
        raise EdgeftError(f"--at {bad[0] if bad else ''}: cut above layer 0 and at most at the top adapted layer "
                          f"(adapted layers: {', '.join(map(str, layers)) or 'none'})")
    groups = adapter_groups(manifest, cuts)
    # cut the structure; each segment then reads its own weights, is saved and dropped: a billion-parameter
    # graph is never held more than once (inline weights come along with the structure of a small graph)
    parts = segment_graph(load_model(folder / MODEL_NAME, weights=False), groups)
    staging = folder / (FOLDER + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files, summary = [], []
    for index in range(len(parts)):
        part = parts[index]
        parts[index] = None
        summary.append(len(part.graph.node))
        onnx.load_external_data_for_model(part, str(folder))
        save_model(part, staging / f"segment-{index}.onnx")
        del part
        files.append(f"{FOLDER}/segment-{index}.onnx")
    manifest.segments = Segments(cuts=cuts, files=files, adapters=groups)
    manifest.validate()
    shutil.rmtree(folder / FOLDER, ignore_errors=True)
    os.replace(staging, folder / FOLDER)
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json() + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    log(f"cut at layers {', '.join(map(str, cuts))}: " + ", ".join(
        f"segment {i} {n} nodes, {len(groups[i])} adapter tensors" for i, n in enumerate(summary)))
    return manifest.segments

