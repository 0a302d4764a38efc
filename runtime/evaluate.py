"""Candidate evaluation (the only place training calls ONNX Runtime) and held-out metrics."""

from __future__ import annotations

import math

import numpy as np

from .bundle import Bundle, Encoded


class CandidateEvaluator:
    """Given a batch and candidate adapter vectors, return one loss per candidate.

    The loss of a candidate is the mean per-example loss of the batch; for a
    causal LM it is weighted by each example's token count (mean per-token NLL),
    the quantity perplexity is made of.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.forward_passes = 0
        self.split_passes = 0  # candidates that re-ran only the upper segments of a split bundle
        self._chunks: tuple[dict, list[dict]] | None = None  # a causal LM batch and its row chunks
        self._batch: dict | None = None  # the batch the segment cache holds outputs for

    def losses(self, feeds: dict[str, np.ndarray], candidates: list[np.ndarray]) -> np.ndarray:
        chain = self.bundle.chain
        if chain is not None and feeds is not self._batch:
            chain.forget()  # a new batch: the last one's segment outputs are never read again
        self._batch = feeds
        if chain is not None and len(candidates) > 1 and chain.first_changed(candidates) > 0:
            self.split_passes += len(candidates)  # the segments below the change run once for all of them
        out = np.empty(len(candidates), dtype=np.float64)
        for i, candidate in enumerate(candidates):
            out[i] = self._loss(feeds, candidate)
        return out

    def _row_chunks(self, feeds: dict) -> list[dict]:
        """A causal LM's batch cut into row chunks (``causal_lm_rows``), made once per batch so that a
        split bundle's segment cache (keyed by the feeds' identity) serves every candidate."""
        if self._chunks is None or self._chunks[0] is not feeds:
            rows = len(feeds["input_ids"])
            step = causal_lm_rows(self.bundle, rows)
            self._chunks = (feeds, [{k: v[i : i + step] for k, v in feeds.items()} for i in range(0, rows, step)])
        return self._chunks[1]

    def _loss(self, feeds, candidate) -> float:
        self.forward_passes += 1
        run = self.bundle.run
        if self.bundle.task == "causal-lm":
            nll, total = 0.0, 0.0
            for chunk in self._row_chunks(feeds):
                loss, count = run(chunk, candidate, ["loss", "token_count"], keep=True)
                nll += float((loss.astype(np.float64) * count).sum())
                total += float(count.sum())
            return nll / total if total else 0.0
        (loss,) = run(feeds, candidate, ["loss"], keep=True)
        return float(loss.astype(np.float64).mean())


def length_sorted_batches(encoded: Encoded, batch_size: int) -> list[np.ndarray]:
    """Batches of similar length, so evaluation pads little."""
    order = np.argsort(encoded.lengths(), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# A causal LM's batches are run in row chunks whose logits stay under this. The in-graph loss holds
# ~3 copies of [rows, length, vocab] and ORT's arena keeps its peak, so the logits decide the peak RSS:
# measured on SmolLM2-135M (128 tokens, 8,750 test tokens, one thread) the evaluation peaked at 2,362 MB
# with 10 rows per run (a 256 MB budget), 1,203 MB with 2 and 898 MB with 1, and took less CPU time with
# fewer rows (28.8, 25.2, 25.0 s). So: one row at a time for a 49k vocabulary.
LOGITS_BUDGET_BYTES = 32 << 20


def causal_lm_rows(bundle: Bundle, batch_size: int) -> int:
    """Rows per run of a causal LM: its [rows, length, vocab] logits (which the in-graph loss needs)
    within LOGITS_BUDGET_BYTES at full length, at least one."""
    shape = bundle.output_shape("logits")
    vocab = shape[-1] if shape and isinstance(shape[-1], int) else 0
    per_row = bundle.max_length * vocab * 4
    return max(1, min(batch_size, LOGITS_BUDGET_BYTES // per_row)) if per_row else batch_size


def evaluate(bundle: Bundle, adapter: np.ndarray, encoded: Encoded, batch_size: int) -> dict[str, float]:
    """accuracy + loss (classification, prompt) or perplexity + loss (causal LM)."""
    if bundle.task == "causal-lm":
        batch_size = causal_lm_rows(bundle, batch_size)
        nll, tokens = 0.0, 0.0
        for index in length_sorted_batches(encoded, batch_size):
            loss, count = bundle.run(bundle.feeds(encoded, index), adapter, ["loss", "token_count"])
            nll += float((loss.astype(np.float64) * count).sum())
            tokens += float(count.sum())
        return lm_metrics(nll, tokens)
    total_loss, correct = 0.0, 0
    probs = np.empty((len(encoded), len(bundle.labels)), dtype=np.float64)
    for index in length_sorted_batches(encoded, batch_size):
        loss, logits = bundle.run(bundle.feeds(encoded, index), adapter, ["loss", "logits"])
        total_loss += float(loss.astype(np.float64).sum())
        correct += int((logits.argmax(-1) == encoded.labels[index]).sum())
        probs[index] = softmax(logits)
    n = len(encoded)
    return {"loss": total_loss / n, "accuracy": correct / n, "examples": n,
            "ece": calibration_error(probs, encoded.labels)}


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``evaluate``'s classification metrics from logits computed outside the graph (the encoder fit's)."""
    probs = softmax(logits)
    loss = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-300)).mean())
    return {"loss": loss, "accuracy": float((probs.argmax(1) == labels).mean()), "examples": len(labels),
            "ece": calibration_error(probs, labels)}


def lm_metrics(nll: float, tokens: float) -> dict[str, float]:
    """A causal LM's held-out metrics from its summed next-token NLL over ``tokens`` scored tokens."""
    mean = nll / max(tokens, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": float(tokens)}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Label probabilities of logits [..., labels], in float64."""
    z = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the confidence-weighted gap between confidence and accuracy over
    ``bins`` equal-width confidence bins (Guo et al. 2017)."""
    confidence, correct = probs.max(-1), probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(float(confidence[inside].mean()) - float(correct[inside].mean()))
    return total


def sampled_probabilities(bundle: Bundle, mean: np.ndarray, sigma: np.ndarray, encoded: Encoded, samples: int,
                          batch_size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label probabilities averaged over ``samples`` adapters drawn from N(mean, σ²) (draw k from the
    seed (seed, k)), and each example's spread: the standard deviation over the draws of the
    probability of the averaged prediction's label."""
    from .optimizers.perturbation import direction

    draws = np.empty((samples, len(encoded), len(bundle.labels)), dtype=np.float64)
    for k in range(samples):
        adapter = (mean + sigma * direction((seed, k), mean.size)).astype(np.float32)
        for index in length_sorted_batches(encoded, batch_size):
            (logits,) = bundle.run(bundle.feeds(encoded, index), adapter, ["logits"])
            draws[k, index] = softmax(logits)
    probs = draws.mean(0)
    chosen = probs.argmax(-1)
    spread = draws[:, np.arange(len(encoded)), chosen].std(0)
    return probs, spread


def evaluate_sampled(bundle: Bundle, mean: np.ndarray, sigma: np.ndarray, encoded: Encoded, samples: int,
                     batch_size: int = 16) -> dict[str, float]:
    """accuracy, NLL, expected calibration error and mean spread of the averaged prediction."""
    probs, spread = sampled_probabilities(bundle, mean, sigma, encoded, samples, batch_size)
    labels = encoded.labels
    nll = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-300)).mean())
    return {"accuracy": float((probs.argmax(-1) == labels).mean()), "loss": nll, "nll": nll,
            "ece": calibration_error(probs, labels), "spread": float(spread.mean()), "samples": samples,
            "examples": len(labels)}


def predict(bundle: Bundle, adapter: np.ndarray, texts: list[str], batch_size: int = 16) -> np.ndarray:
    """Label probabilities [n, labels] for classification and prompt bundles."""
    encoded = bundle.encode(texts, np.zeros(len(texts), dtype=np.int64))
    probs = np.empty((len(texts), len(bundle.labels)), dtype=np.float64)
    for index in length_sorted_batches(encoded, batch_size):
        (logits,) = bundle.run(bundle.feeds(encoded, index), adapter, ["logits"])
        probs[index] = softmax(logits)
    return probs


def pooled_features(bundle: Bundle, adapter: np.ndarray, encoded: Encoded, batch_size: int) -> np.ndarray:
    """The head's input for every example (forward passes only): what a linear probe fits."""
    feats = None
    for index in length_sorted_batches(encoded, batch_size):
        (pooled,) = bundle.run(bundle.feeds(encoded, index), adapter, ["pooled"])
        if feats is None:
            feats = np.empty((len(encoded), pooled.shape[-1]), dtype=np.float32)
        feats[index] = pooled
    return feats
