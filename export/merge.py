"""Merge pass: fold adapter values into the frozen weights → a plain inference graph.

LoRA: for every adapted layer, W ← W + scale·Aᵀ·Bᵀ (W stored [in, out] for MatMul,
[out, in] for a Gemm with transB), and the branch x·Aᵀ·Bᵀ·scale + base(x) is cut back
to base(x). Weight-side adapters (LoLDU, TT, Bone) compute W + ΔW from constants and
their inputs only: that subgraph is evaluated once and its result stored as the weight
(``fold_weight_updates``). Any other adapter input (the classification head, a causal LM's output bias) becomes a constant.
Then outputs that need ``labels`` (the loss) are dropped and the graph is pruned:
what remains takes the bundle's original inputs and returns logits.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeft.errors import EdgeftError
from edgeft.manifest import Manifest

from .onnx_files import clone
from .onnx_files import session as ort_session


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.refresh()

    def refresh(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.graph.initializer}

    def only_consumer(self, tensor: str, op: str):
        users = [n for n in self.consumers.get(tensor, []) if n.op_type == op]
        if len(users) != 1:
            raise EdgeftError(f"merge: expected one {op} after {tensor}, found {len(users)}")
        return users[0]

    def constant(self, name: str) -> np.ndarray:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        raise EdgeftError(f"merge: {name} is not a constant")


def _base_weight(g: _Graph, base_out: str, fan_in: int, fan_out: int, depth: int = 4):
    """Walk up from the base branch's output to the MatMul/Gemm holding W; return (initializer, layout,
    second initializer): layout "in_out", "out_in" (Gemm transB) or "lord" (LoRD's W1 [in, k], W2 [k, out])."""
    frontier = [base_out]
    for _ in range(depth):
        next_frontier = []
        for tensor in frontier:
            node = g.producer.get(tensor)
            if node is None:
                continue
            if node.op_type in ("MatMul", "Gemm"):
                w = node.input[1]
                if w in g.inits:
                    dims = list(g.inits[w].dims)
                    trans_b = any(a.name == "transB" and a.i for a in node.attribute) if node.op_type == "Gemm" else False
                    if not trans_b and dims == [fan_in, fan_out]:
                        return g.inits[w], "in_out", None
                    if trans_b and dims == [fan_out, fan_in]:
                        return g.inits[w], "out_in", None
                    first = g.producer.get(node.input[0])
                    if w.endswith(".lord_out") and dims[1] == fan_out and first is not None and first.op_type == "MatMul" \
                            and list(g.inits.get(first.input[1], onnx.TensorProto()).dims) == [fan_in, dims[0]]:
                        return g.inits[first.input[1]], "lord", g.inits[w]
            next_frontier += list(node.input)
        frontier = next_frontier
    raise EdgeftError(f"merge: no frozen weight of shape [{fan_in}, {fan_out}] under {base_out}")


@dataclass
class LoRABranch:
    """One LoRA branch of the bundle graph: x·Aᵀ·Bᵀ·scale added to the output of a frozen weight."""

    module: str
    a: str  # the adapter inputs
    b: str
    scale: float
    weight: str  # the frozen weight's initializer
    layout: str  # "in_out" (MatMul), "out_in" (Gemm with transB) or "lord" (W1·W2, export/lord.py)
    nodes: list[str]  # the branch's nodes (Transpose, MatMul, MatMul, Mul, Add)
    output: str  # the Add's output: base output + branch
    base_output: str
    weight_out: str | None = None  # LoRD: W2 [k, out] (``weight`` is W1 [in, k])

    def delta(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """ΔW in the weight's own layout."""
        delta = self.scale * (a.astype(np.float64).T @ b.astype(np.float64).T)  # [in, out]
        return delta if self.layout == "in_out" else delta.T


def lora_branches(model: onnx.ModelProto, manifest: Manifest, g: _Graph | None = None) -> list[LoRABranch]:
    """Every LoRA branch and the frozen weight it adds to (graph walk from the adapter inputs)."""
    g = g or _Graph(model)
    pairs = {}
    for t in manifest.adapter.tensors:
        if t.role in ("lora_A", "lora_B"):
            pairs.setdefault(t.module, {})[t.role] = t
    out = []
    for module, pair in pairs.items():
        a_t, b_t = pair["lora_A"], pair["lora_B"]
        ta = g.only_consumer(a_t.name, "Transpose")
        m1 = g.only_consumer(ta.output[0], "MatMul")
        m2 = g.only_consumer(m1.output[0], "MatMul")
        tb = g.producer[[i for i in m2.input if i != m1.output[0]][0]]
        mul = g.only_consumer(m2.output[0], "Mul")
        scale = float(g.constant([i for i in mul.input if i != m2.output[0]][0]))
        add = g.only_consumer(mul.output[0], "Add")
        base_out = [i for i in add.input if i != mul.output[0]][0]
        init, layout, second = _base_weight(g, base_out, a_t.shape[1], b_t.shape[0])
        out.append(LoRABranch(module, a_t.name, b_t.name, scale, init.name, layout,
                              [n.name for n in (ta, tb, m1, m2, mul, add)], add.output[0], base_out,
                              second.name if second is not None else None))
    return out


def merge_adapters(model: onnx.ModelProto, manifest: Manifest, values: dict[str, np.ndarray],
                   in_place: bool = False) -> onnx.ModelProto:
    """The graph with ``values`` folded into its weights. ``in_place``: change ``model`` itself (a caller
    that loaded it for this alone; a billion-parameter graph is not held twice)."""
    model = model if in_place else clone(model)
    g = _Graph(model)
    removed: set[str] = set()
    renames: dict[str, str] = {}
    for branch in lora_branches(model, manifest, g):
        init = g.inits[branch.weight]
        a, b = values[branch.a], values[branch.b]
        if branch.layout == "lord":  # exact, and still low rank: W1·W2 + s·AᵀBᵀ = [W1 | s·Aᵀ]·[W2 ; Bᵀ]
            second = g.inits[branch.weight_out]
            w1 = np.concatenate([numpy_helper.to_array(init), branch.scale * a.T], axis=1)
            w2 = np.concatenate([numpy_helper.to_array(second), b.T], axis=0)
            init.CopyFrom(numpy_helper.from_array(w1.astype(np.float32), init.name))
            second.CopyFrom(numpy_helper.from_array(w2.astype(np.float32), second.name))
        else:
            merged = numpy_helper.to_array(init).astype(np.float64) + branch.delta(a, b)
            init.CopyFrom(numpy_helper.from_array(merged.astype(np.float32), init.name))
        removed.update(branch.nodes)
        renames[branch.output] = branch.base_output
    # cut the branches out and point their users at the base outputs
    keep = [n for n in g.graph.node if n.name not in removed]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in renames:
                n.input[i] = renames[name]
    for o in g.graph.output:
        if o.name in renames:
            raise EdgeftError("merge: an adapted layer's output is a graph output")
    del g.graph.node[:]
    g.graph.node.extend(keep)
    weight_side = {t.name: values[t.name] for t in manifest.adapter.tensors
                   if not t.role.startswith(("lora", "head", "output"))}
    if weight_side:
        fold_weight_updates(model, weight_side)
    # every other adapter input (the head, the output bias) becomes a constant
    for t in manifest.adapter.tensors:
        if t.role.startswith(("head", "output")):
            g.graph.initializer.append(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
    adapter_names = {t.name for t in manifest.adapter.tensors}
    inputs = [i for i in g.graph.input if i.name not in adapter_names]
    del g.graph.input[:]
    g.graph.input.extend(inputs)
    return model


def fold_weight_updates(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    """Evaluate every tensor computed from constants and ``values`` alone where the rest of the graph
    reads it (e.g. W + ΔW before its MatMul), store it as an initializer and drop the nodes that made it.

    Evaluated with ONNX Runtime, the kernels training used. In place; ``values`` stop being inputs.
    """
    graph = model.graph
    constant = {i.name for i in graph.initializer} | set(values)
    depends = set(values)  # constant tensors that depend on the adapter values
    folded = set()  # indices of the nodes that compute from constants and adapter values only
    for index, node in enumerate(graph.node):  # graph nodes are in topological order
        inputs = [i for i in node.input if i]
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if not has_subgraph and all(i in constant for i in inputs):
            constant.update(node.output)
            if any(i in depends for i in inputs):
                depends.update(node.output)
                folded.add(index)
    readers = [n for index, n in enumerate(graph.node) if index not in folded]
    frontier = sorted({i for n in readers for i in n.input if i in depends} | {o.name for o in graph.output if o.name in depends})
    if not frontier:
        return
    # a graph that computes only the frontier, from initializers and the adapter values
    probe = inference_only(model, frontier, extra_initializers={k: np.asarray(v, dtype=np.float32)
                                                                for k, v in values.items()})
    with tempfile.TemporaryDirectory(prefix="edgeft-merge-") as scratch:
        results = dict(zip(frontier, ort_session(probe, Path(scratch)).run(frontier, {})))
    del probe
    keep = [onnx.NodeProto.FromString(n.SerializeToString()) for n in readers]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(results[name], name) for name in frontier)
    inputs = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(inputs)


def inference_only(model: onnx.ModelProto, outputs: list[str], in_place: bool = False,
                   extra_initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Keep ``outputs``, drop every node, initializer and input they do not need (e.g. labels, loss).

    A new graph copies only what it keeps (a probe of a few weights of a billion-parameter graph copies
    those few); ``in_place`` prunes ``model`` itself. ``extra_initializers`` become constants (inputs of
    the same name are dropped)."""
    graph = model.graph
    extra = {k: numpy_helper.from_array(v, k) for k, v in (extra_initializers or {}).items()}
    producer = {o: n for n in graph.node for o in n.output}
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None:
            stack += [i for i in node.input if i]
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names
                for sub in list(attr.g.node if attr.HasField("g") else []):
                    stack += list(sub.input)
    keep = {
        "node": lambda n: any(o in needed for o in n.output),
        "initializer": lambda i: i.name in needed,
        "input": lambda i: i.name in needed and i.name not in extra,
        "output": lambda o: o.name in outputs,
        "value_info": lambda v: v.name in needed,
    }
    if in_place:
        target = model
        for field, wanted in keep.items():
            items = getattr(graph, field)
            for index in reversed(range(len(items))):  # deleting in place copies nothing
                if not wanted(items[index]):
                    del items[index]
    else:
        target = onnx.ModelProto()
        _copy_fields(model, target, skip={"graph"})
        _copy_fields(graph, target.graph, skip=set(keep))
        for field, wanted in keep.items():
            getattr(target.graph, field).extend(item for item in getattr(graph, field) if wanted(item))
    names = {o.name for o in target.graph.output}
    target.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs if o not in names)
    target.graph.initializer.extend(t for name, t in extra.items() if name in needed)
    return target


def _copy_fields(source, target, skip: set[str]) -> None:
    """Copy every field of a protobuf message but ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(target, descriptor.name, value)
        elif hasattr(value, "extend"):
            getattr(target, descriptor.name).extend(value)
        else:
            getattr(target, descriptor.name).CopyFrom(value)
