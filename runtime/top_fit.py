"""The exact loss gradient of a causal LM's output side, from forward outputs, in numpy.

The output side is the output bias b over the vocabulary and, where the bundle has one
(``edgeft.manifest.TopMLP``), a LoRA on the top layer's MLP, out = down(silu(gate(n)) ⊙ up(n)). The MLP's
output adds to the final residual r, which only the final RMSNorm and the LM head read:

    logits = W_lm · w ⊙ r / rms(r) + b,   rms(r) = sqrt(mean(r²) + eps)

so for the mean next-token NLL, with g = (softmax(logits) − one-hot(next token)) / tokens per scored
position,

    dL/db = Σ g,   δ = dL/dr = u / rms − r · mean(u ⊙ r) / rms³,  u = w ⊙ (g · W_lm),

and δ is the gradient at the MLP's output too. Backwards through the MLP (x = silu(G) ⊙ U, G and U the
gate and up outputs, adapters included): dL/dx = δ · W_down_eff, dL/dU = dL/dx ⊙ silu(G),
dL/dG = dL/dx ⊙ U ⊙ silu'(G). Each LoRA y = base(z) + s·(z Aᵀ) Bᵀ with output gradient e then has
dB = s · eᵀ (z Aᵀ) and dA = s · (e B)ᵀ z. Every factor is a forward output (r, n, G, U, the logits) or a
frozen weight the bundle ships (W_lm, w, W_down): no backward graph. Written by hand because the
device has numpy only; tested against torch autograd (tests/test_top_fit.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.manifest import bundle_file

ROWS_PER_CHUNK = 64  # scored positions whose softmax is formed at once (64 x 49k vocab = 12.6 MB in fp32)


def scored_softmax_chunks(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray):
    """Per chunk of scored positions (position t predicts token t+1 where that token is real, the
    graph's loss mask): (rows, cols, softmax − one-hot [n, vocab] float32, summed NLL)."""
    scored = attention_mask[:, 1:].astype(bool)
    rows, cols = np.nonzero(scored)
    targets = input_ids[:, 1:][scored]
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        part = slice(start, start + ROWS_PER_CHUNK)
        z = np.array(logits[rows[part], cols[part]], dtype=np.float32)  # [n, vocab], the one working copy
        t = targets[part]
        z -= z.max(-1, keepdims=True)
        target_logit = z[np.arange(len(t)), t].astype(np.float64)
        np.exp(z, out=z)
        total = z.sum(-1, dtype=np.float64)
        z /= total[:, None].astype(np.float32)
        z[np.arange(len(t)), t] -= 1.0
        yield rows[part], cols[part], z, float((np.log(total) - target_logit).sum())


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def silu_derivative(x: np.ndarray) -> np.ndarray:
    sigmoid = 1.0 / (1.0 + np.exp(-x))
    return sigmoid * (1.0 + x * (1.0 - sigmoid))


def rms_norm_backward(upstream: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """dL/dr of y = weight ⊙ r / sqrt(mean(r²) + eps), given dL/dy, row by row (float64)."""
    r = residual.astype(np.float64)
    u = upstream.astype(np.float64) * weight
    rms = np.sqrt((r * r).mean(-1, keepdims=True) + eps)
    return u / rms - r * (u * r).mean(-1, keepdims=True) / rms**3


def lora_gradients(error: np.ndarray, inputs: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float):
    """(dA, dB) of y = base(z) + scale·(z Aᵀ) Bᵀ summed over rows, given dL/dy (``error``) and z."""
    dB = scale * error.T @ (inputs @ a.T.astype(np.float64))
    dA = scale * (error @ b.astype(np.float64)).T @ inputs
    return dA, dB


class TopMLPFit:
    """What the device needs to differentiate the output side: the bundle's frozen weights and names."""

    def __init__(self, folder: Path, manifest):
        from edgeft.tensor_file import read_tensors

        top = manifest.top_mlp
        path = bundle_file(folder, top.weights)
        try:
            weights = read_tensors(path)  # one copy of the 113 MB head (safetensors' loader peaked at two)
        except (OSError, ValueError, KeyError, TypeError) as err:  # missing, truncated or foreign file
            raise EdgeftError(f"{path}: cannot read the top MLP's weights ({str(err).splitlines()[0][:200]})") from None
        self.lm_head, self.final_norm, self.down = weights.get("lm_head"), weights.get("final_norm"), weights.get("down")
        if self.lm_head is None or self.final_norm is None or self.down is None:
            raise EdgeftError(f"{path}: needs lm_head, final_norm and down")
        self.final_norm, self.down = self.final_norm.astype(np.float64), self.down.astype(np.float64)
        self.eps, self.scale = float(top.norm_eps), manifest.adapter.scale
        self.outputs = [top.outputs[k] for k in ("residual", "mlp_input", "gate", "up")]
        self.names = {role: (f"{m}.lora_A", f"{m}.lora_B") for role, m in top.modules.items()}

    def tensor_names(self) -> list[str]:
        return [n for pair in self.names.values() for n in pair]

    def down_projection(self, adapters: dict[str, np.ndarray]) -> np.ndarray:
        """The top down projection the graph runs with these adapter values, W_down + s·B·A (float64);
        once per step: the adapters are the same for every chunk of the batch."""
        a_d, b_d = (adapters[n].astype(np.float64) for n in self.names["down"])
        return self.down + self.scale * (b_d @ a_d)

    def accumulate(self, feeds: dict, logits: np.ndarray, outputs: list[np.ndarray], adapters: dict[str, np.ndarray],
                   into: dict[str, np.ndarray]) -> tuple[float, int]:
        """Add the batch's summed gradients of the output bias (``into["bias"]``) and the six LoRA
        tensors to ``into``; returns (summed NLL, scored tokens). As ``TopBlocksFit.accumulate``."""
        down, nll, tokens = self.down_projection(adapters), 0.0, 0
        for rows, cols, g, summed in scored_softmax_chunks(logits, feeds["input_ids"], feeds["attention_mask"]):
            into["bias"] += g.sum(0, dtype=np.float64)
            self.add(rows, cols, g, outputs, adapters, down, into)
            nll, tokens = nll + summed, tokens + len(rows)
        return nll, tokens

    def add(self, rows, cols, g: np.ndarray, outputs: list[np.ndarray], adapters: dict[str, np.ndarray],
            down: np.ndarray, into: dict[str, np.ndarray]) -> None:
        """Add the six LoRA tensors' summed gradients over one chunk of scored positions (``rows``,
        ``cols`` and g = softmax − one-hot, from ``scored_softmax_chunks``) to ``into``; ``outputs`` are
        the graph's ``self.outputs`` for the batch, ``adapters`` the named adapter values it ran with and
        ``down`` their ``down_projection``."""
        residual, mlp_input, gate, up = outputs
        (a_g, b_g), (a_u, b_u), (a_d, b_d) = ([adapters[n] for n in self.names[r]] for r in ("gate", "up", "down"))
        delta = rms_norm_backward(g @ self.lm_head, residual[rows, cols], self.final_norm, self.eps)
        n = mlp_input[rows, cols].astype(np.float64)
        gt, ut = gate[rows, cols].astype(np.float64), up[rows, cols].astype(np.float64)
        activated = silu(gt)
        dx = delta @ down
        for role, error, inputs, (a, b) in (("down", delta, activated * ut, (a_d, b_d)),
                                            ("up", dx * activated, n, (a_u, b_u)),
                                            ("gate", dx * ut * silu_derivative(gt), n, (a_g, b_g))):
            dA, dB = lora_gradients(error, inputs, a, b, self.scale)
            name_a, name_b = self.names[role]
            into[name_a] += dA
            into[name_b] += dB
