"""The exact loss gradient of a BERT-family classifier's LoRA and linear head, in numpy.

The input is the hidden state x entering the lowest fitted layer (``hidden.<ℓ>``), computed once per
example: the layers below have no fitted adapter, so it stays fixed while the fit runs. Where the fit
starts at the bottom (the default) ``embed`` computes it from the bundle's embedding tables, else one
pass of the graph reads it.
From x this module recomputes the layers as BERT runs them (post-norm, biases everywhere):

    q, k, v = x·W_qᵀ + b_q, …  (heads of head_dim);  P = softmax(q kᵀ/√d, padded keys masked)
    h = LN(x + (P v)·W_oᵀ + b_o);  out = LN(h + gelu(h·W_uᵀ + b_u)·W_dᵀ + b_d)

then the pooling (the mean over real tokens, L2-normalised for sentence-transformers models, or the
first token), the head's logits pooled·Wᵀ + b and the cross-entropy, and differentiates it all by hand
from the top down. A LoRA y = z·Wᵀ + b + s·(z Aᵀ) Bᵀ runs without forming W + s·BA; its factors'
gradients are ``top_fit.lora_gradients``. Padded positions never receive a gradient (their keys are
masked and the pooling skips them), so a right-padded batch gives each example's exact gradient. Written
by hand because the device has numpy only (no autograd); batches run in chunks of ``ROWS`` examples so
the saved activations stay small; tested against torch autograd and the bundle graph at two shapes
(tests/test_encoder_blocks.py). An int8/int4 bundle's matrices (since session 23) are the compressed graph's,
stored as 8- or 4-bit codes with block scales (``edgeft/block_weights.py``) and dequantised where each is used.

GELU is BERT's exact one, x·Φ(x) = 0.5·x·(1 + erf(x/√2)); numpy has no erf, so ``_normal_cdf`` uses Abramowitz &
Stegun 7.1.26 (erf's absolute error below 1.5e-7, float32's resolution at 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.block_weights import grouped, rows, times, times_transposed
from edgeft.errors import EdgeftError
from edgeft.manifest import ENCODER_ROLES, bundle_file

from .top_fit import lora_gradients

HEAD = ("head.weight", "head.bias")
ROWS = 4  # examples per chunk of the forward and backward (MiniLM, 128 tokens: ~15 MB saved per layer; 8 or more rows ran slower)
_AS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) = erfc(−x/√2)/2, the tail computed directly (no 1 + erf cancellation where erf ≈ −1)."""
    z = np.abs(x) * np.float32(1 / np.sqrt(2))
    t = 1.0 / (1.0 + np.float32(0.3275911) * z)
    tail = 0.5 * t * (_AS[0] + t * (_AS[1] + t * (_AS[2] + t * (_AS[3] + t * _AS[4])))) * np.exp(-z * z)
    return np.where(x < 0, tail, 1.0 - tail)


def gelu(x: np.ndarray) -> np.ndarray:
    return (x * _normal_cdf(x)).astype(np.float32)


def gelu_derivative(x: np.ndarray, cdf: np.ndarray | None = None) -> np.ndarray:
    """d gelu/dx = Φ(x) + x·φ(x); ``cdf``: Φ(x) where the forward kept it."""
    cdf = _normal_cdf(x) if cdf is None else cdf
    return (cdf + x * np.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi))).astype(np.float32)


def _layer_norm(s: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float):
    """(LN(s), its normalised input x̂, 1/σ): what the backward reads."""
    mean = s.mean(-1, keepdims=True)
    centred = s - mean
    inv = 1.0 / np.sqrt((centred * centred).mean(-1, keepdims=True) + np.float32(eps))
    normed = centred * inv
    return normed * weight + bias, normed, inv


def _layer_norm_backward(dy: np.ndarray, normed: np.ndarray, inv: np.ndarray, weight: np.ndarray) -> np.ndarray:
    g = dy * weight
    return (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True)) * inv


class Embedded:
    """Examples' hidden.0 from the embedding tables, computed when a chunk reads them: caching them would hold
    20 Newsgroups' 320 + 200 examples × ~114 tokens (~90 MB) beside the weights, and a gather costs little."""

    def __init__(self, fit: "EncoderBlocksFit", ids: list[np.ndarray]):
        self.fit, self.ids, self.lengths = fit, ids, [len(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i) -> np.ndarray:
        return self.fit.embed(self.ids[i])


class EncoderBlocksFit:
    """The frozen weights and names the device's gradient of an encoder classifier's LoRA and head needs."""

    def __init__(self, folder: Path, manifest):
        from edgeft.tensor_file import read_tensors

        top = manifest.encoder_blocks
        path = self.check(folder, manifest)
        try:
            self.weights = grouped(read_tensors(path))
        except (OSError, ValueError) as err:  # changed since the check, or a malformed codes/scales trio
            raise EdgeftError(f"{path}: cannot read the encoder layers' weights ({str(err).splitlines()[0][:200]})") from None
        self.layers = list(top.layers)
        self.eps, self.scale, self.pooling = float(top.norm_eps), manifest.adapter.scale, manifest.pooling
        self.heads, self.head_dim = int(top.heads), int(top.head_dim)
        self.input, self.embedding = top.input, top.embedding
        names = {t.name for t in manifest.adapter.tensors}
        self.lora = [{role: (f"{m}.lora_A", f"{m}.lora_B") for role, m in modules.items() if f"{m}.lora_A" in names}
                     for modules in top.modules]

    @staticmethod
    def check(folder: Path, manifest) -> Path:
        """The weights file, its header checked against the manifest (names, the q shape, each tensor's bytes in the
        file) without reading the weights: a run checks it before its folder is touched, beside an open session."""
        from edgeft.block_weights import matrix_shapes
        from edgeft.tensor_file import check_tensors

        top = manifest.encoder_blocks
        path = bundle_file(folder, top.weights)
        try:
            shapes = matrix_shapes(check_tensors(path))  # an int8/int4 bundle's matrices are 8- or 4-bit codes
        except (OSError, ValueError, KeyError, TypeError) as err:  # missing, truncated or foreign file
            raise EdgeftError(f"{path}: cannot read the encoder layers' weights ({str(err).splitlines()[0][:200]})") from None
        keys = [f"{i}.{k}{b}" for i in top.layers for k in (*ENCODER_ROLES, "attention_norm", "output_norm")
                for b in ("", ".bias")]
        if top.embedding is not None:
            keys += [f"{top.embedding}.{k}" for k in ("word", "position", "type", "norm", "norm.bias")]
        missing = [k for k in keys if k not in shapes]
        if missing:
            raise EdgeftError(f"{path}: has no {missing[0]} (not this bundle's encoder layers?)")
        if shapes[f"{top.layers[0]}.q"] != [int(top.heads) * int(top.head_dim)] * 2:
            raise EdgeftError(f"{path}: q projection shape does not match the manifest's heads")
        return path

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """hidden.0 [T, hidden] of one example's token ids: LN(word + position + type 0), as BERT's embeddings
        compute it (where the manifest names the tables)."""
        w = self.weights
        positions = w[f"{self.embedding}.position"].shape[0]
        if len(ids) > positions:
            raise EdgeftError(f"{len(ids)} tokens: longer than the model's {positions} positions")
        summed = (rows(w[f"{self.embedding}.word"], ids) + rows(w[f"{self.embedding}.position"], np.arange(len(ids)))
                  + w[f"{self.embedding}.type"])
        return _layer_norm(summed, w[f"{self.embedding}.norm"], w[f"{self.embedding}.norm.bias"], self.eps)[0]

    def tensor_names(self) -> list[str]:
        """The fitted tensors: the layers' LoRA (bottom layer first), then the head."""
        return [n for layer in self.lora for pair in layer.values() for n in pair] + list(HEAD)

    # --- one layer, a chunk x [rows, T, hidden] --------------------------------------

    def _linear(self, z, layer: int, role: str, adapters) -> np.ndarray:
        key = f"{self.layers[layer]}.{role}"
        y = times_transposed(z, self.weights[key]) + self.weights[f"{key}.bias"]
        pair = self.lora[layer].get(role)
        if pair:
            a, b = (adapters[n] for n in pair)
            y += self.scale * ((z @ a.T) @ b.T)
        return y

    def _linear_backward(self, error, z, layer: int, role: str, adapters, into, need_input: bool = True):
        """dL/dz of ``_linear`` given dL/dy (None unless ``need_input``); adds the LoRA's factor gradients to ``into``."""
        pair = self.lora[layer].get(role)
        if pair:
            a, b = (adapters[n] for n in pair)
            flat_error, flat_z = error.reshape(-1, error.shape[-1]), z.reshape(-1, z.shape[-1])
            dA, dB = lora_gradients(flat_error, flat_z, a, b, self.scale)
            into[pair[0]] += dA
            into[pair[1]] += dB
        if not need_input:
            return None
        dz = times(error, self.weights[f"{self.layers[layer]}.{role}"])
        if pair:
            dz += self.scale * ((error @ b) @ a)
        return dz

    def _split(self, z):
        rows, length, _ = z.shape
        return z.reshape(rows, length, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def _block(self, x, keys, layer: int, adapters):
        i = self.layers[layer]
        q, k, v = (self._split(self._linear(x, layer, r, adapters)) for r in ("q", "k", "v"))
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1 / np.sqrt(self.head_dim))
        scores = np.where(keys[:, None, None, :], scores, np.float32(-np.inf))
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        attended = (p @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        h, normed1, inv1 = _layer_norm(x + self._linear(attended, layer, "o", adapters),
                                       self.weights[f"{i}.attention_norm"], self.weights[f"{i}.attention_norm.bias"], self.eps)
        up = self._linear(h, layer, "up", adapters)
        cdf = _normal_cdf(up).astype(np.float32)
        activated = up * cdf
        out, normed2, inv2 = _layer_norm(h + self._linear(activated, layer, "down", adapters),
                                         self.weights[f"{i}.output_norm"], self.weights[f"{i}.output_norm.bias"], self.eps)
        return out, dict(x=x, q=q, k=k, v=v, p=p, attended=attended, h=h, normed1=normed1, inv1=inv1, up=up,
                         cdf=cdf, activated=activated, normed2=normed2, inv2=inv2)

    def _block_backward(self, upstream, layer: int, s: dict, adapters, into, below: bool):
        """dL/dx of one layer given dL/d(its output); ``below``: whether a layer under it needs dL/dx."""
        i = self.layers[layer]
        d_sum2 = _layer_norm_backward(upstream, s["normed2"], s["inv2"], self.weights[f"{i}.output_norm"])
        d_activated = self._linear_backward(d_sum2, s["activated"], layer, "down", adapters, into)
        d_h = d_sum2 + self._linear_backward(d_activated * gelu_derivative(s["up"], s["cdf"]), s["h"], layer, "up", adapters, into)
        d_sum1 = _layer_norm_backward(d_h, s["normed1"], s["inv1"], self.weights[f"{i}.attention_norm"])
        d_attended = self._linear_backward(d_sum1, s["attended"], layer, "o", adapters, into)
        d_heads = self._split(d_attended)
        p = s["p"]
        d_p = d_heads @ s["v"].transpose(0, 1, 3, 2)
        d_v = p.transpose(0, 1, 3, 2) @ d_heads
        d_scores = p * (d_p - (d_p * p).sum(-1, keepdims=True)) * np.float32(1 / np.sqrt(self.head_dim))
        d_q, d_k = d_scores @ s["k"], d_scores.transpose(0, 1, 3, 2) @ s["q"]
        d_x = d_sum1
        for role, d in (("q", d_q), ("k", d_k), ("v", d_v)):
            merged = d.transpose(0, 2, 1, 3).reshape(s["x"].shape)
            dz = self._linear_backward(merged, s["x"], layer, role, adapters, into, need_input=below)
            if below:
                d_x = d_x + dz
        return d_x

    # --- pooling and head -----------------------------------------------------------

    def _pool(self, x, mask):
        if self.pooling == "cls":
            return x[:, 0], None
        count = mask.sum(1, keepdims=True).astype(np.float32)
        summed = (x * mask[..., None]).sum(1) / np.maximum(count, np.float32(1e-9))
        if self.pooling == "mean":
            return summed, (count, None)
        norm = np.maximum(np.linalg.norm(summed, axis=-1, keepdims=True), np.float32(1e-12))
        return summed / norm, (count, norm)

    def _pool_backward(self, d_pooled, pooled, saved, mask, shape) -> np.ndarray:
        d_x = np.zeros(shape, dtype=np.float32)
        if self.pooling == "cls":
            d_x[:, 0] = d_pooled
            return d_x
        count, norm = saved
        if norm is not None:  # y = u/|u|: du = (dy − y (y·dy)) / |u|
            d_pooled = (d_pooled - pooled * (pooled * d_pooled).sum(-1, keepdims=True)) / norm
        return (d_pooled / count)[:, None, :] * mask[..., None]

    def _chunks(self, hidden, index):
        """Right-padded chunks (x [rows, T, hidden], mask [rows, T] as float32, key mask as bool, their rows of
        ``index``), of examples of similar length: they pad little. ``hidden``: cached arrays or ``Embedded``."""
        lengths = hidden.lengths if isinstance(hidden, Embedded) else [len(h) for h in hidden]
        index = np.asarray(index)[np.argsort([lengths[i] for i in index], kind="stable")]
        for start in range(0, len(index), ROWS):
            rows = index[start : start + ROWS]
            width = max(lengths[r] for r in rows)
            x = np.zeros((len(rows), width, self.weights[f"{self.layers[0]}.q"].shape[0]), dtype=np.float32)
            keys = np.zeros((len(rows), width), dtype=bool)
            for j, r in enumerate(rows):
                x[j, : lengths[r]], keys[j, : lengths[r]] = hidden[r], True
            yield x, keys.astype(np.float32), keys, rows

    def _forward(self, x, keys, adapters, keep: bool):
        saved = []
        for layer in range(len(self.layers)):
            x, s = self._block(x, keys, layer, adapters)
            saved.append(s if keep else None)
        return x, saved

    def logits(self, hidden, index, adapters) -> np.ndarray:
        """The head's logits [len(index), labels] for these examples (their ``input`` states, see ``_chunks``)."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        out = np.empty((len(index), adapters[HEAD[1]].shape[0]), dtype=np.float32)
        where = {r: j for j, r in enumerate(index)}
        for x, mask, keys, rows in self._chunks(hidden, index):
            top, _ = self._forward(x, keys, adapters, keep=False)
            pooled, _ = self._pool(top, mask)
            out[[where[r] for r in rows]] = pooled @ adapters[HEAD[0]].T + adapters[HEAD[1]]
        return out

    def accumulate(self, hidden, labels: np.ndarray, index, adapters, into) -> tuple[float, int]:
        """Add the summed cross-entropy gradients over the examples ``index`` of the fitted tensors to ``into``;
        returns (summed loss, correct predictions)."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        weight, bias = adapters[HEAD[0]], adapters[HEAD[1]]
        loss, correct = 0.0, 0
        for x, mask, keys, rows in self._chunks(hidden, index):
            top, saved = self._forward(x, keys, adapters, keep=True)
            pooled, pool_saved = self._pool(top, mask)
            z = (pooled @ weight.T + bias).astype(np.float64)
            z -= z.max(1, keepdims=True)
            probs = np.exp(z)
            probs /= probs.sum(1, keepdims=True)
            y = labels[rows]
            loss -= float(np.log(probs[np.arange(len(rows)), y]).sum())
            correct += int((probs.argmax(1) == y).sum())
            g = probs
            g[np.arange(len(rows)), y] -= 1.0
            into[HEAD[0]] += g.T @ pooled
            into[HEAD[1]] += g.sum(0)
            upstream = self._pool_backward((g @ weight).astype(np.float32), pooled, pool_saved, mask, top.shape)
            for layer in reversed(range(len(self.layers))):
                upstream = self._block_backward(upstream, layer, saved[layer], adapters, into, below=layer > 0)
                saved[layer] = None  # freed as the backward goes down
        return loss, correct
