"""torch → ONNX with adapter inputs and dynamic batch/sequence, and the check against torch."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from edgeft.errors import EdgeftError
from edgeft.manifest import AdapterTensor, Manifest

from .onnx_files import external_data_bytes


def export_onnx(wrapper: torch.nn.Module, manifest: Manifest, tensors: list[AdapterTensor], path: Path, vocab_size: int) -> None:
    from .bundle import random_adapters, sample_batch, to_torch

    feeds = to_torch(sample_batch(manifest, vocab_size, batch=2, seq=8, seed=0))
    adapters = [torch.from_numpy(v) for v in random_adapters(manifest, seed=0).values()]
    data_names = [n for n in manifest.inputs if n in feeds]
    args = tuple(feeds[n] for n in data_names) + tuple(adapters)
    max_positions = getattr(wrapper.model.config, "max_position_embeddings", None) or 1 << 16
    # min 3: a causal LM shifts by one, and torch.export would otherwise specialise on length-1 rows
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=3, max=max_positions)
    # torch.export mirrors the signature: one spec per named argument, a tuple for *adapters.
    dynamic = [{0: batch, 1: seq} if n != "labels" else {0: batch} for n in data_names] + [(None,) * len(adapters)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # torch.export first (the ONNX wrapper rewrites the *adapters tuple spec into a list it then rejects)
        exported = torch.export.export(wrapper, args, dynamic_shapes=tuple(dynamic), strict=False)
        program = torch.onnx.export(
            exported,
            dynamo=True,
            input_names=manifest.inputs,
            output_names=manifest.graph_outputs,
            opset_version=manifest.opset,
            optimize=True,
            verbose=False,
        )
    graph = program.model.graph  # the exporter's in-memory graph: its weights are still torch's tensors
    for output in graph.outputs:  # the exporter leaves per-example outputs shaped as scalars
        output.shape = None
    names = [v.name for v in graph.inputs]
    if names != manifest.inputs:
        raise EdgeftError(f"export produced inputs {names}, expected {manifest.inputs}")
    weights = sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
    # saved straight from that graph, tensor by tensor: no protobuf copy of a billion-parameter model
    # (``program.model_proto`` would hold every weight a second time); external data as save_model writes it
    program.save(str(path), external_data=weights > external_data_bytes())


def verify_against_torch(wrapper: torch.nn.Module, manifest: Manifest, path: Path, vocab_size: int) -> dict:
    """Run ORT and torch at a second input shape (batch 3, sequence 11) and compare every output."""
    import onnxruntime as ort

    from .bundle import random_adapters, sample_batch, to_torch

    feeds = sample_batch(manifest, vocab_size, batch=3, seq=11, seed=1)
    adapters = random_adapters(manifest, seed=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(manifest.graph_outputs, {**feeds, **adapters})
    data_names = [n for n in manifest.inputs if n in feeds]
    with torch.no_grad():
        want = wrapper(*[to_torch(feeds)[n] for n in data_names], *[torch.from_numpy(v) for v in adapters.values()])
    report = {}
    for name, g, w in zip(manifest.graph_outputs, got, want, strict=True):
        w = w.numpy()
        if g.shape != w.shape:
            raise EdgeftError(f"export check: output {name} has shape {g.shape} in ONNX, {w.shape} in torch")
        report[name] = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
    return report
