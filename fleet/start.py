"""The shared start of a classification fleet: a class-mean head (FedNCM), from forward passes only.

The seeds protocol needs every device to start from one adapter bit for bit, and a head from zero learns
next to nothing in a device's budget (runtime/start.py). ``edgeft train`` starts from a linear probe, but a
probe needs every example in one place, and the average of probes fitted on each device's own rows
collapses under a label skew (measured: 20 Newsgroups, MiniLM, 40 examples per label over 10 clients with a
Dirichlet 0.3 skew: 6.7–11.2% test accuracy over three splits, against 73.5% for the probe on the pooled
rows). Class means are exact under any split — the server adds up what each device sums per label — so this
head is the one the pooled data would give (72.3% there, at a lower test loss than the probe's). The idea
is FedNCM (Legate et al., "Guiding the last layer in federated learning with pre-trained models", 2023).

Three exchanges before round 0 (Flower "query" messages; ConfigRecords, no arrays):
  1. sums    device: the pooled features of its rows at the bundle's start, summed per label → labels
             present, their counts, the sums (row-major). The only upload of its size (labels × features).
  2. losses  server: the class means and a temperature grid down; device: its mean cross-entropy at every
             temperature τ of the head below → one scalar per τ up. The server keeps the τ with the lowest
             example-weighted mean.
  3. hold    server: the head (float32 values) down; device: keeps it, reports the digest of its start.
Head (nearest class mean by squared distance, as logits): W_c = 2τ·μ_c, b_c = −τ·‖μ_c‖²; a label no
device holds gets W_c = 0, b_c = 0.

What a hostile device can do: an upload that is malformed, non-finite, names an unknown or repeated label,
or declares a count outside 1..reject_above is rejected whole; a class mean whose norm exceeds twice the
median over all devices' class means is scaled down to it. Counts weight the means as declared, so a device
that lies about its counts can pull a class mean anywhere within that norm bound.
"""

from __future__ import annotations

import math

import numpy as np

TEMPERATURES = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 70.0, 100.0)
HEAD_ROLES = ("head_weight", "head_bias")


def needs_start(bundle, init_adapter) -> bool:
    """A classification bundle without a shared --init-adapter: the fleet fits its head first."""
    return init_adapter is None and any(t.role == "head_weight" for t in bundle.layout.tensors)


# --- on the device ---------------------------------------------------------------


def class_sums(features: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Step 1's upload: per label present, its count and the sum of its rows' features."""
    present = [int(c) for c in range(num_labels) if np.any(labels == c)]
    sums = [features[labels == c].astype(np.float64).sum(0) for c in present]
    return {"labels": present, "counts": [int(np.sum(labels == c)) for c in present],
            "sums": np.concatenate(sums).tolist() if sums else [], "dim": int(features.shape[1])}


def head_from_means(means: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """The nearest-class-mean head at temperature ``tau`` (float32, as it goes into the adapter)."""
    means = np.asarray(means, dtype=np.float64)
    return (2.0 * tau * means).astype(np.float32), (-tau * (means * means).sum(1)).astype(np.float32)


def temperature_losses(features: np.ndarray, labels: np.ndarray, means: np.ndarray, taus) -> list[float]:
    """Step 2's upload: this device's mean cross-entropy of the class-mean head at each temperature."""
    out = []
    x = features.astype(np.float64)
    for tau in taus:
        weight, bias = head_from_means(means, float(tau))
        z = x @ weight.T.astype(np.float64) + bias
        z -= z.max(1, keepdims=True)
        out.append(float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels])))
    return out


# --- on the server -----------------------------------------------------------------


def check_sums(raw: dict, num_labels: int, dim: int, reject_above: float) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Step 1's upload, validated: (labels, counts [k], sums [k, dim]); ValueError naming the problem."""
    labels, counts, sums = raw.get("labels"), raw.get("counts"), raw.get("sums")
    if not all(isinstance(v, list) for v in (labels, counts, sums)):
        raise ValueError("start upload without labels, counts and sums lists")
    if not labels or len(counts) != len(labels) or len(sums) != len(labels) * dim:
        raise ValueError(f"start upload of {len(labels)} labels, {len(counts)} counts and {len(sums)} sums "
                         f"(expected one count and {dim} sums per label)")
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_labels for c in labels) \
            or len(set(labels)) != len(labels):
        raise ValueError(f"start upload names an unknown or repeated label ({num_labels} labels)")
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= reject_above for n in counts):
        raise ValueError(f"start upload has a count outside 1..{reject_above:g}")
    values = np.asarray(sums, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("start upload holds a non-finite sum")
    return labels, np.asarray(counts, dtype=np.float64), values.reshape(len(labels), dim)


def combine_means(uploads: list[tuple[list[int], np.ndarray, np.ndarray]], num_labels: int, dim: int,
                  log=lambda message: None) -> tuple[np.ndarray, np.ndarray]:
    """Class means over all devices (count-weighted), each device's class mean first held to twice the
    median norm; returns (means [labels, dim], counts [labels])."""
    norms = [np.linalg.norm(sums[i] / counts[i]) for labels, counts, sums in uploads for i in range(len(labels))]
    bound = 2.0 * float(np.median(norms)) if norms else 0.0
    total = np.zeros((num_labels, dim))
    weight = np.zeros(num_labels)
    for n, (labels, counts, sums) in enumerate(uploads):
        for i, c in enumerate(labels):
            mean = sums[i] / counts[i]
            norm = float(np.linalg.norm(mean))
            if norm > bound > 0:
                log(f"start: upload {n}'s mean of label {c} has norm {norm:.3g} > {bound:.3g} (twice the median): scaled down")
                mean = mean * (bound / norm)
            total[c] += counts[i] * mean
            weight[c] += counts[i]
    means = np.divide(total, weight[:, None], out=np.zeros_like(total), where=weight[:, None] > 0)
    return means, weight


def check_losses(raw: dict, count: int) -> tuple[list[float], int]:
    """Step 2's upload, validated: (one loss per temperature, examples)."""
    losses, examples = raw.get("losses"), raw.get("examples")
    if not isinstance(losses, list) or len(losses) != count:
        raise ValueError(f"start upload without one loss per temperature ({count})")
    if not all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in losses):
        raise ValueError("start upload holds a loss that is not a finite number ≥ 0")
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
        raise ValueError("start upload has a non-positive example count")
    return losses, examples


def pick_temperature(uploads: list[tuple[list[float], int]], taus) -> float:
    """The temperature with the lowest example-weighted mean loss over the devices."""
    losses = np.array([u[0] for u in uploads], dtype=np.float64)
    examples = np.array([u[1] for u in uploads], dtype=np.float64)
    return float(taus[int(np.argmin(examples @ losses / examples.sum()))])
