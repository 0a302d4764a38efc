"""The exact loss gradient of a LoRA on the top decoder blocks of a Llama-family causal LM, in numpy.

The input is the hidden state x entering the lowest of the top K blocks (``hidden.<ℓ>``, see below).
From x this module recomputes the K blocks' forward, as the model runs them (pre-norm):

    n = rms(x)·w₁;  q, k, v = n·W_qᵀ, n·W_kᵀ, n·W_vᵀ  (heads of head_dim; each KV head serves heads/kv_heads)
    q, k ← q·cos + rot(q)·sin   (RoPE at positions 0…T−1; rot(z) = [−z₂, z₁] on the two halves)
    P = softmax(q kᵀ/√d + causal mask);  x' = x + (P v)·W_oᵀ
    m = rms(x')·w₂;  x'' = x' + (silu(m W_gᵀ) ⊙ m W_uᵀ)·W_dᵀ

keeping what the backward pass reads, then the logits W_lm·rms(x)·w + b (b the output bias), and
differentiates it all by hand from the top down: the
final residual's gradient is the output fit's (``top_fit.rms_norm_backward`` of (softmax − one-hot)·W_lm),
each block adds its MLP's and attention's input gradients to the residual stream's, RoPE's adjoint
is z·cos − rot(z·sin), and the softmax's is P ⊙ (dP − Σ dP⊙P). A LoRA y = z·Wᵀ + s·(z Aᵀ) Bᵀ runs
without forming W + s·BA, and its factors' gradients are ``top_fit.lora_gradients``. Written by hand
because the device has numpy only (no autograd); one sequence at a time, so the saved activations
stay at K blocks × one sequence; tested against torch autograd (tests/test_top_blocks.py).

x itself comes, in a bundle exported since session 18, from the embedding table (numpy) and the graph
of the layers below the blocks (``TopBlocks.below``; nothing where the blocks start at layer 0): the
fit and its held-out scoring then never open the whole graph, so each weight is in memory once.
An int8/int4 bundle's graph below (since session 22) starts at the token ids, with its quantised weights,
and (since session 23) its blocks' and LM head's weights are stored as that graph holds them, 8- or 4-bit codes with
block scales (``edgeft/block_weights.py``), each matrix dequantised where it is used: the fit holds them at
one byte a weight or half and fits the quantised model the graph runs. Older bundles read x from the whole graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.block_weights import grouped, rows, times, times_transposed
from edgeft.errors import EdgeftError
from edgeft.manifest import bundle_file

from .top_fit import lora_gradients, rms_norm_backward, scored_softmax_chunks, silu, silu_derivative

ATTENTION = ("q", "k", "v", "o")


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = (x.astype(np.float64) ** 2).mean(-1, keepdims=True)
    return (weight * (x / np.sqrt(variance + eps))).astype(np.float32)


def _rotate_half(z: np.ndarray) -> np.ndarray:
    half = z.shape[-1] // 2
    return np.concatenate([-z[..., half:], z[..., :half]], axis=-1)


class TopBlocksFit:
    """The frozen weights and names the device's gradient of the top blocks' LoRA needs."""

    def __init__(self, folder: Path, manifest, below=None):
        """``below``: the session of ``manifest.top_blocks.below`` (``Bundle.below_session``), if the fit is to use it."""
        from edgeft.tensor_file import read_tensors

        top = manifest.top_blocks
        path = bundle_file(folder, top.weights)
        try:
            weights = grouped(read_tensors(path))  # one copy, read in place (an int8/int4 bundle's: 8- or 4-bit codes)
        except (OSError, ValueError, KeyError, TypeError) as err:  # missing, truncated or foreign file
            raise EdgeftError(f"{path}: cannot read the top blocks' weights ({str(err).splitlines()[0][:200]})") from None
        keys = ["lm_head", "final_norm"] + [f"{i}.{k}" for i in top.layers
                                            for k in ("input_norm", "post_norm", *top.modules[0])]
        if top.embedding is not None:
            keys.append(top.embedding)
        missing = [k for k in keys if k not in weights]
        if missing:
            raise EdgeftError(f"{path}: has no {missing[0]} (not this bundle's top blocks?)")
        self.weights = weights
        self.layers, self.fitted = list(top.layers), set(top.fitted)
        self.eps, self.scale = float(top.norm_eps), manifest.adapter.scale
        self.heads, self.kv_heads, self.head_dim = int(top.heads), int(top.kv_heads), int(top.head_dim)
        hidden = weights["final_norm"].shape[0]
        if weights[f"{self.layers[0]}.q"].shape != (self.heads * self.head_dim, hidden):
            raise EdgeftError(f"{path}: q projection shape does not match the manifest's heads")
        self.inv_freq = (1.0 / (float(top.rope_theta) ** (np.arange(0, self.head_dim, 2, dtype=np.float32)
                                                         / self.head_dim))).astype(np.float32)
        self.outputs = [top.input]
        self.embedding = weights[top.embedding] if top.embedding is not None else None
        # without the graph below (not given: the whole graph is open anyway), x comes from the whole graph
        self.standalone = top.standalone() and (top.below is None or below is not None)
        self.below = below
        names = {t.name for t in manifest.adapter.tensors}
        self.bias = next(t.name for t in manifest.adapter.tensors if t.role == "output_bias")
        # a prompt bundle: its answer's logits are the label words' rows of the LM head + the output adapter's h·Wᵀ + b
        self.output_weight = next((t.name for t in manifest.adapter.tensors if t.role == "output_weight"), None)
        self.label_tokens = None if top.label_tokens is None else np.asarray(top.label_tokens, dtype=np.int64)
        if self.label_tokens is not None and (self.output_weight is None
                                              or self.label_tokens.max() >= weights["lm_head"].shape[0]):
            raise EdgeftError(f"{path}: the manifest's label tokens are not rows of its LM head")
        # the label words' LM-head rows, the only ones a prompt bundle's answer reads
        self.label_rows = None if self.label_tokens is None else rows(weights["lm_head"], self.label_tokens)
        # per layer: role -> (A name, B name) for every role the graph runs with a LoRA
        self.lora = [{role: (f"{m}.lora_A", f"{m}.lora_B") for role, m in modules.items() if f"{m}.lora_A" in names}
                     for modules in top.modules]

    def tensor_names(self) -> list[str]:
        """The fitted LoRA tensors, bottom block first."""
        return [n for layer in self.lora for role, pair in layer.items() if role in self.fitted for n in pair]

    # --- forward, one sequence [T, hidden] -------------------------------------------

    def _linear(self, z, layer: int, role: str, adapters) -> np.ndarray:
        y = times_transposed(z, self.weights[f"{self.layers[layer]}.{role}"])
        pair = self.lora[layer].get(role)
        if pair:
            a, b = (adapters[n] for n in pair)
            y += self.scale * ((z @ a.T) @ b.T)
        return y

    def _linear_backward(self, error, z, layer: int, role: str, adapters, into) -> np.ndarray:
        """dL/dz of ``_linear`` given dL/dy; adds the LoRA's factor gradients to ``into`` where fitted."""
        dz = times(error, self.weights[f"{self.layers[layer]}.{role}"])
        pair = self.lora[layer].get(role)
        if pair:
            a, b = (adapters[n] for n in pair)
            dz += self.scale * ((error @ b) @ a)
            if role in self.fitted:
                dA, dB = lora_gradients(error, z, a, b, self.scale)
                into[pair[0]] += dA
                into[pair[1]] += dB
        return dz

    def _rope(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        freqs = np.arange(length, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        angles = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(angles), np.sin(angles)

    def _block(self, x, layer: int, adapters, rope) -> tuple[np.ndarray, dict]:
        i, (cos, sin) = self.layers[layer], rope
        length = x.shape[0]
        n1 = _rms_norm(x, self.weights[f"{i}.input_norm"], self.eps)

        def heads(role, count):
            return self._linear(n1, layer, role, adapters).reshape(length, count, self.head_dim).transpose(1, 0, 2)

        q, k, v = heads("q", self.heads), heads("k", self.kv_heads), heads("v", self.kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        _, attended, _, _ = self._attention(q, k, v)
        x2 = x + self._linear(attended, layer, "o", adapters)
        n2 = _rms_norm(x2, self.weights[f"{i}.post_norm"], self.eps)
        gate, up = self._linear(n2, layer, "gate", adapters), self._linear(n2, layer, "up", adapters)
        mixed = silu(gate) * up
        out = x2 + self._linear(mixed, layer, "down", adapters)
        # what the backward reads, less what it recomputes cheaply (both norms' outputs, silu(gate)·up, the
        # KV heads' repeats, the attention weights and output: no weight matrix in them; the attention weights
        # grow with the length squared)
        saved = dict(x=x, q=q, k=k, v=v, x2=x2, gate=gate, up=up)
        return out, saved

    def _attention(self, q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(P [heads, T, T], the heads' outputs [T, heads × head_dim], k and v repeated to one per head) from
        q [heads, T, d] and k, v [kv_heads, T, d] after RoPE: causal softmax attention, KV head h // group
        serving head h."""
        group, length = self.heads // self.kv_heads, q.shape[1]
        kh, vh = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
        scores = (q @ kh.transpose(0, 2, 1)) / np.float32(np.sqrt(self.head_dim))
        scores[:, np.triu(np.ones((length, length), dtype=bool), 1)] = -np.inf
        scores -= scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(-1, keepdims=True)
        return p, (p @ vh).transpose(1, 0, 2).reshape(length, -1), kh, vh

    # --- backward -------------------------------------------------------------------

    def _block_backward(self, upstream, layer: int, s: dict, adapters, rope, into, below: bool):
        """dL/dx of one block given dL/d(its output); ``below``: whether anything under it needs dL/dx
        (else the attention half is differentiated only if it has a fitted LoRA)."""
        i, (cos, sin) = self.layers[layer], rope
        length, group = upstream.shape[0], self.heads // self.kv_heads
        activated = silu(s["gate"])
        d_mixed = self._linear_backward(upstream, activated * s["up"], layer, "down", adapters, into)
        d_up = d_mixed * activated
        d_gate = d_mixed * s["up"] * silu_derivative(s["gate"])
        n2 = _rms_norm(s["x2"], self.weights[f"{i}.post_norm"], self.eps)
        d_n2 = (self._linear_backward(d_up, n2, layer, "up", adapters, into)
                + self._linear_backward(d_gate, n2, layer, "gate", adapters, into))
        d_x2 = upstream + rms_norm_backward(d_n2, s["x2"], self.weights[f"{i}.post_norm"], self.eps).astype(np.float32)
        if not below and not any(r in self.fitted for r in self.lora[layer] if r in ATTENTION):
            return None
        p, attended, kh, vh = self._attention(s["q"], s["k"], s["v"])
        d_attended = self._linear_backward(d_x2, attended, layer, "o", adapters, into)
        d_heads = d_attended.reshape(length, self.heads, self.head_dim).transpose(1, 0, 2)
        d_p = d_heads @ vh.transpose(0, 2, 1)
        d_vh = p.transpose(0, 2, 1) @ d_heads
        d_scores = p * (d_p - (d_p * p).sum(-1, keepdims=True)) / np.float32(np.sqrt(self.head_dim))
        d_q, d_kh = d_scores @ kh, d_scores.transpose(0, 2, 1) @ s["q"]

        def merged(d, count, rotated):
            if count != self.heads:  # the heads a KV head served add up
                d = d.reshape(count, group, length, self.head_dim).sum(1)
            if rotated:  # RoPE's adjoint
                d = d * cos - _rotate_half(d * sin)
            return d.transpose(1, 0, 2).reshape(length, -1)

        n1 = _rms_norm(s["x"], self.weights[f"{i}.input_norm"], self.eps)
        d_n1 = (self._linear_backward(merged(d_q, self.heads, True), n1, layer, "q", adapters, into)
                + self._linear_backward(merged(d_kh, self.kv_heads, True), n1, layer, "k", adapters, into)
                + self._linear_backward(merged(d_vh, self.kv_heads, False), n1, layer, "v", adapters, into))
        return d_x2 + rms_norm_backward(d_n1, s["x"], self.weights[f"{i}.input_norm"], self.eps).astype(np.float32)

    def entering(self, feeds: dict, adapters: dict[str, np.ndarray]) -> np.ndarray:
        """x [B, T, hidden] for these inputs without the whole graph (``self.standalone``): the
        token embeddings, through the graph of the layers below the blocks where there are any (an int8/int4
        bundle with an untied table starts that graph at the token ids: no table here)."""
        values = {**adapters, **feeds}
        if self.embedding is not None:
            values["hidden.0"] = rows(self.embedding, feeds["input_ids"])
            if self.below is None:
                return values["hidden.0"]
        return self.below.run(self.outputs, {i.name: values[i.name] for i in self.below.get_inputs()})[0]

    def _logits(self, x: np.ndarray, adapters) -> np.ndarray:
        """One sequence's logits [T, vocab] from the top block's output (the final norm, the LM head, the bias)."""
        logits = times_transposed(_rms_norm(x, self.weights["final_norm"], self.eps), self.weights["lm_head"])
        logits += adapters[self.bias]
        return logits

    def _head_backward(self, g: np.ndarray) -> np.ndarray:
        """g · W_lm: the gradient at the final norm's output from the logits' (``g`` [n, vocab])."""
        return times(g, self.weights["lm_head"])

    def _rows(self, feeds: dict, hidden: np.ndarray, adapters, keep: bool, shortest: int = 2):
        """Per sequence of ``shortest`` or more tokens (a causal LM scores from two): (row, its length, RoPE
        tables, the top block's output, the blocks' saved values if ``keep``)."""
        mask = feeds["attention_mask"]
        for row in range(mask.shape[0]):
            length = int(mask[row].sum())
            if length < shortest:
                continue
            if not mask[row, :length].all():
                raise EdgeftError("top-block fit: expects right-padded rows (Bundle.feeds)")
            rope = self._rope(length)
            x, saved = np.asarray(hidden[row, :length], dtype=np.float32), []
            for layer in range(len(self.layers)):
                x, s = self._block(x, layer, adapters, rope)
                saved.append(s if keep else None)
            yield row, length, rope, x, saved

    def score(self, feeds: dict, hidden: np.ndarray, adapters: dict[str, np.ndarray]) -> tuple[float, int]:
        """(summed next-token NLL, scored tokens) of the batch: the graph's loss, computed here."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        ids, mask, nll, tokens = feeds["input_ids"], feeds["attention_mask"], 0.0, 0
        for row, length, _, x, _ in self._rows(feeds, hidden, adapters, keep=False):
            logits = self._logits(x, adapters)[None]
            for _, cols, _, summed in scored_softmax_chunks(logits, ids[row : row + 1, :length], mask[row : row + 1, :length]):
                nll, tokens = nll + summed, tokens + len(cols)
        return nll, tokens

    def accumulate(self, feeds: dict, hidden: np.ndarray, adapters: dict[str, np.ndarray],
                   into: dict[str, np.ndarray]) -> tuple[float, int]:
        """Add the summed gradients over this batch's scored tokens of the output bias (``into["bias"]``)
        and the fitted LoRA tensors to ``into``; returns (summed NLL, scored tokens). ``hidden`` is
        ``self.outputs``' value for ``feeds`` with these ``adapters`` (``entering``, or the whole graph's)."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        final_norm = self.weights["final_norm"].astype(np.float64)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        nll, tokens = 0.0, 0
        for row, length, rope, x, saved in self._rows(feeds, hidden, adapters, keep=True):
            logits = self._logits(x, adapters)[None]
            upstream = np.zeros_like(x)
            for _, cols, g, summed in scored_softmax_chunks(logits, ids[row : row + 1, :length], mask[row : row + 1, :length]):
                into["bias"] += g.sum(0, dtype=np.float64)
                upstream[cols] = rms_norm_backward(self._head_backward(g), x[cols], final_norm, self.eps)
                nll, tokens = nll + summed, tokens + len(cols)
            del logits
            for layer in reversed(range(len(self.layers))):
                upstream = self._block_backward(upstream, layer, saved[layer], adapters, rope, into, below=layer > 0)
                saved[layer] = None  # freed as the backward goes down
        return nll, tokens

    # --- prompt mode: the loss at the answer position ----------------------------------

    def _answer(self, x: np.ndarray, adapters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h, the label words' LM-head rows + the output adapter's W, the label logits) from the top block's
        output at the answer position x [hidden]: h = the final norm of x (the graph's ``pooled``)."""
        h = _rms_norm(x[None], self.weights["final_norm"], self.eps)[0]
        rows = self.label_rows + adapters[self.output_weight]
        return h, rows, rows @ h + adapters[self.bias]

    def answers(self, feeds: dict, hidden: np.ndarray, adapters: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """A prompt batch's (h [B, hidden], label logits [B, labels]): the graph's ``pooled`` and ``logits``."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        rows = feeds["attention_mask"].shape[0]
        states = np.zeros((rows, self.weights["final_norm"].shape[0]), dtype=np.float32)
        logits = np.zeros((rows, len(self.label_tokens)), dtype=np.float32)
        for row, length, _, x, _ in self._rows(feeds, hidden, adapters, keep=False, shortest=1):
            states[row], _, logits[row] = self._answer(x[length - 1], adapters)
        return states, logits

    def accumulate_answers(self, feeds: dict, hidden: np.ndarray, adapters: dict[str, np.ndarray],
                           into: dict[str, np.ndarray]) -> float:
        """Add the summed gradients over this prompt batch of its cross-entropy on ``feeds["labels"]`` (the
        graph's loss) with respect to the output adapter and the fitted LoRA to ``into`` (keyed by tensor
        name); returns the summed loss. Only the answer position is scored: the gradient enters the top
        block's output there and spreads to the earlier positions through attention on the way down."""
        adapters = {n: np.asarray(v, dtype=np.float32) for n, v in adapters.items()}
        final_norm = self.weights["final_norm"].astype(np.float64)
        labels, summed = feeds["labels"], 0.0
        for row, length, rope, x, saved in self._rows(feeds, hidden, adapters, keep=True, shortest=1):
            h, rows, logits = self._answer(x[length - 1], adapters)
            z = logits.astype(np.float64) - logits.max()
            p = np.exp(z) / np.exp(z).sum()
            summed -= float(np.log(p[labels[row]]))
            g = p
            g[labels[row]] -= 1.0
            into[self.bias] += g
            into[self.output_weight] += np.outer(g, h)
            upstream = np.zeros_like(x)
            upstream[length - 1] = rms_norm_backward((g @ rows)[None], x[length - 1][None], final_norm, self.eps)[0]
            for layer in reversed(range(len(self.layers))):
                upstream = self._block_backward(upstream, layer, saved[layer], adapters, rope, into, below=layer > 0)
                saved[layer] = None
        return summed
