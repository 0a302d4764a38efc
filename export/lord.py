"""LoRD pass (arXiv 2309.14021): replace frozen linear weights by two thinner ones from a truncated SVD.

W [in, out] ≈ W1·W2 with W1 = U_k·S_k [in, k], W2 = V_kᵀ [k, out]: one MatMul becomes
two and the layer keeps k·(in + out) parameters instead of in·out — done only where
that is fewer. Adapter branches read the layer's input, not W, so LoRA trains on top
of a compressed bundle unchanged.

Activation-aware (``covariances``): the error that matters is ‖X(W − Ŵ)‖, not ‖W − Ŵ‖.
With the input covariance C = XᵀX/n = L·Lᵀ, the SVD is taken of Lᵀ·W and mapped back
with L⁻ᵀ, so the kept directions are those the data actually excites.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeft.errors import EdgeftError

from .onnx_files import clone
from .onnx_files import session as ort_session


@dataclass
class LayerPlan:
    node: str  # the MatMul node
    weight: str  # its initializer
    shape: tuple[int, int]  # (in, out)
    rank: int  # kept rank; min(in, out) or more = left as it is
    energy: float  # spectral energy kept (of the whitened weight when activation-aware)

    @property
    def compressed(self) -> bool:
        return self.rank * sum(self.shape) < self.shape[0] * self.shape[1]

    @property
    def params(self) -> int:
        return self.rank * sum(self.shape) if self.compressed else self.shape[0] * self.shape[1]


def linear_weights(model: onnx.ModelProto, min_size: int = 16) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """The MatMul nodes whose right operand is a 2-D float initializer (the frozen linear layers)."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    out = []
    for node in model.graph.node:
        # a weight read by more than one node (tied embeddings) is left alone
        if node.op_type == "MatMul" and node.input[1] in inits and uses[node.input[1]] == 1:
            w = inits[node.input[1]]
            if len(w.dims) == 2 and min(w.dims) >= min_size and w.data_type == onnx.TensorProto.FLOAT:
                out.append((node, w))
    return out


def _svd(m: np.ndarray):
    """Thin SVD; LAPACK's divide-and-conquer (gesdd) can fail to converge on a badly scaled matrix (seen on
    SmolLM2's whitened weights after trained-rank cuts): then the eigendecomposition of the smaller Gram matrix."""
    try:
        return np.linalg.svd(m, full_matrices=False)
    except np.linalg.LinAlgError:
        tall = m.shape[0] >= m.shape[1]
        gram = m.T @ m if tall else m @ m.T
        values, vectors = np.linalg.eigh(gram)
        vectors = vectors[:, np.argsort(values)[::-1]]
        # singular values as the norms of m's projections on the eigenvectors, not √eigenvalue: the Gram
        # squares the condition number, the norms do not (small singular values keep ~12 digits, not ~5)
        proj = m @ vectors if tall else vectors.T @ m
        s = np.linalg.norm(proj, axis=0 if tall else 1)
        safe = np.where(s > s.max() * 1e-12, s, np.inf)
        if tall:  # m = U S Vᵀ with V the Gram's eigenvectors
            return proj / safe, s, vectors.T
        return vectors, s, proj / safe[:, None]


def _factor(w: np.ndarray, cov: np.ndarray | None):
    """Return (left, singular values, right) with w ≈ left[:, :k] @ diag(s[:k]) @ right[:k]."""
    if cov is None:
        return _svd(w)
    # C = L Lᵀ (damped so a rank-deficient covariance still factors)
    damp = 1e-5 * np.trace(cov) / len(cov)
    chol = np.linalg.cholesky(cov + damp * np.eye(len(cov)))
    u, s, vt = _svd(chol.T @ w)
    return np.linalg.solve(chol.T, u), s, vt


def plan(model: onnx.ModelProto, params_ratio: float | None = None, energy: float | None = None,
         covariances: dict[str, np.ndarray] | None = None) -> tuple[list[LayerPlan], dict]:
    """Per-layer ranks. ``params_ratio``: keep that fraction of every compressible layer's parameters;
    ``energy``: the smallest rank keeping that fraction of Σσ²."""
    if (params_ratio is None) == (energy is None):
        raise EdgeftError("LoRD needs exactly one of --params-ratio or --energy")
    if params_ratio is not None and not 0 < params_ratio <= 1:
        raise EdgeftError("--params-ratio must be in (0, 1]")
    if energy is not None and not 0 < energy <= 1:
        raise EdgeftError("--energy must be in (0, 1]")
    plans, factors = [], {}
    for node, init in linear_weights(model):
        w = numpy_helper.to_array(init).astype(np.float64)
        cov = covariances.get(node.input[0]) if covariances else None
        left, s, right = _factor(w, cov)
        sq = s**2
        cumulative = np.cumsum(sq) / sq.sum()
        n_in, n_out = w.shape
        if params_ratio is not None:
            rank = max(1, int(params_ratio * n_in * n_out / (n_in + n_out)))
        else:
            rank = int(np.searchsorted(cumulative, energy - 1e-12) + 1)
        rank = min(rank, len(s))
        p = LayerPlan(node.name, init.name, (n_in, n_out), rank, float(cumulative[rank - 1]))
        plans.append(p)
        if p.compressed:  # only the kept rank: a billion-parameter model's full factors would not fit beside it
            factors[node.name] = (left[:, :rank].copy(), s[:rank].copy(), right[:rank].copy())
        del w, left, right
    return plans, factors


def apply(model: onnx.ModelProto, plans: list[LayerPlan], factors: dict, in_place: bool = False) -> onnx.ModelProto:
    """Each compressed layer's MatMul becomes two; ``in_place`` changes ``model`` (no second copy of its weights)."""
    model = model if in_place else clone(model)
    graph = model.graph
    by_node = {p.node: p for p in plans if p.compressed}
    drop = {p.weight for p in by_node.values()}
    new_nodes, new_inits = [], []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        p = by_node.get(node.name)
        if p is None:
            new_nodes.append(node)
            continue
        left, s, right = factors[node.name]
        k = p.rank
        w1 = (left[:, :k] * s[:k]).astype(np.float32)  # [in, k]
        w2 = right[:k].astype(np.float32)  # [k, out]
        n1, n2, mid = f"{p.weight}.lord_in", f"{p.weight}.lord_out", f"{node.output[0]}/lord_mid"
        new_inits += [numpy_helper.from_array(w1, n1), numpy_helper.from_array(w2, n2)]
        new_nodes += [
            helper.make_node("MatMul", [node.input[0], n1], [mid], name=node.name + "/lord_in"),
            helper.make_node("MatMul", [mid, n2], list(node.output), name=node.name + "/lord_out"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    for index in reversed(range(len(graph.initializer))):  # deleting in place copies nothing
        if graph.initializer[index].name in drop:
            del graph.initializer[index]
    graph.initializer.extend(new_inits)
    return model


def reconstructed(model: onnx.ModelProto, plans: list[LayerPlan], factors: dict) -> onnx.ModelProto:
    """The reference for the pass: the original graph with each W replaced by W1·W2 in one MatMul."""
    model = clone(model)
    by_weight = {p.weight: p for p in plans if p.compressed}
    for init in model.graph.initializer:
        p = by_weight.get(init.name)
        if p is not None:
            left, s, right = factors[p.node]
            w = (left[:, : p.rank] * s[: p.rank]) @ right[: p.rank]
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return model


def collect_covariances(bundle, model: onnx.ModelProto, encoded, batch_size: int = 16) -> dict[str, np.ndarray]:
    """XᵀX/n of every linear layer's input over the real (unpadded) tokens of ``encoded``.

    The inputs are exposed as extra graph outputs of a temporary session, then the
    bundle runs forward with its starting adapters (B = 0: the frozen model).
    """
    from edgeft.runtime.evaluate import length_sorted_batches

    names = sorted({node.input[0] for node, _ in linear_weights(model)})
    present = {o.name for o in model.graph.output}
    added = [name for name in names if name not in present]
    # the extra outputs go on the graph itself for the session's creation, then come off again (no copy)
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in added)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeft-lord-") as scratch:
            session = ort_session(model, Path(scratch))
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    adapters = bundle.layout.unflatten(bundle.layout.initial(0))
    if encoded.labels is None and "labels" in bundle.manifest.inputs:  # the loss is not read: any label will do
        encoded = type(encoded)(encoded.ids, np.zeros(len(encoded), dtype=np.int64))
    sums: dict[str, np.ndarray] = {}
    count = 0
    for index in length_sorted_batches(encoded, batch_size):
        feeds = bundle.feeds(encoded, index)
        values = session.run(names, {**feeds, **adapters})
        mask = feeds["attention_mask"].astype(bool)
        count += int(mask.sum())
        for name, x in zip(names, values):
            rows = x[mask].astype(np.float64) if x.ndim == 3 else x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + rows.T @ rows
    return {name: total / max(count, 1) for name, total in sums.items()}
