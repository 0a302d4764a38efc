"""A BERT-family classifier's encoder fit: Adam on its layers' LoRA and its head from their exact gradient
(``runtime/encoder_blocks.py``), its best held-out point kept and, with ``calibrate``, that point's head scaled to
the held-out data. The classification counterpart of the causal LM's output fit (``output_fit.py``), which runs it
from ``fit_output_adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.data import epoch_batch

from .bundle import Bundle, Encoded
from .encoder_blocks import HEAD, EncoderBlocksFit, Embedded
from .optimizers.updates import Adam
from .output_fit import FIT_STREAM


@dataclass(frozen=True)
class EncoderFitConfig:
    steps: int = 40  # forward passes: the one over the training set that caches the layers' input, then a batch per step
    lr: float = 1e-3  # Adam, the LoRA's and the head's: the backprop reference's (benchmarks/trial_top_ffn.py)
    decay: bool = True  # the lr falls linearly to zero over the budget, as the causal LM's fit's


def _cached_inputs(bundle: Bundle, fit: EncoderBlocksFit, encoded: Encoded, theta: np.ndarray, batch_size: int):
    """Each example's hidden state entering the fitted layers, trimmed to its tokens: from the embedding tables
    as each step reads them, or cached from one pass of the graph over the set. Returns (them, the graph passes run)."""
    from .evaluate import length_sorted_batches

    if fit.embedding is not None:
        return Embedded(fit, encoded.ids), 0
    cached, passes = [None] * len(encoded), 0
    for index in length_sorted_batches(encoded, batch_size):
        feeds = bundle.feeds(encoded, index)
        (hidden,) = bundle.run(feeds, theta, [fit.input])
        passes += 1
        for row, i in enumerate(index):
            cached[i] = np.array(hidden[row, : int(feeds["attention_mask"][row].sum())])
    return cached, passes


def fit_encoder(bundle: Bundle, train: Encoded, theta: np.ndarray, batch_size: int, seed: int = 0,
                config: EncoderFitConfig = EncoderFitConfig(), held_out: Encoded | None = None, eval_every: int = 50,
                time_share=lambda: 0.0, on_step=None, calibrate: bool = False) -> tuple[np.ndarray, list[float], dict]:
    """Adam on a BERT-family classifier's LoRA of its encoder layers and its head (``runtime/encoder_blocks.py``)
    over ``config.steps`` batches of ``train`` (fewer if ``time_share()`` reaches 1), from their exact gradient.
    The layers' input comes from the embedding tables (or one graph pass over ``train`` and ``held_out``); the steps
    are numpy alone.
    With ``held_out`` the fit is scored on it at the start, every ``eval_every`` steps and at the end, and the best
    point (accuracy, then loss: the trainer's rank) is returned; with ``calibrate`` too, its head scaled by the
    temperature with the least held-out loss (``probe.best_temperature`` over ``CALIBRATION_TEMPERATURES``: no
    prediction changes). Returns (vector, each step's mean training loss before its update, {"best_step", "evals",
    "forward_passes", "start" and "returned": the start's and the returned vector's held-out metrics, each calibrated
    where ``calibrate``, "temperature"})."""
    from .evaluate import classification_metrics
    from .probe import CALIBRATION_TEMPERATURES, best_temperature
    from .trainer import rank_key

    if bundle.manifest.encoder_blocks.embedding is not None and bundle.chain is None:
        # numpy alone from here: the session and ORT's arena are released before the fit reads its own weights (a
        # search that follows opens it again). 20NG, batch 32: peak 839 MB with the session held, 522-529 with the
        # weights read beside it and the embeddings cached, 451-453 now; eval's 455
        bundle.close_graph()
    fit = EncoderBlocksFit(bundle.folder, bundle.manifest)
    theta = np.array(theta, dtype=np.float32, copy=True)
    named = bundle.layout.unflatten(theta)  # views: updating them updates theta
    names = fit.tensor_names()
    adam = Adam()
    states = {k: adam.init(named[k].size) for k in names}
    hidden, passes = _cached_inputs(bundle, fit, train, theta, batch_size)
    scored = _cached_inputs(bundle, fit, held_out, theta, batch_size)[0] if held_out is not None else None
    n, losses, evals, best, start_logits = len(train), [], [], None, None

    def consider(step):
        nonlocal best, start_logits
        logits = fit.logits(scored, np.arange(len(held_out)), named)
        start_logits = logits if step == 0 else start_logits
        metrics = classification_metrics(logits, held_out.labels)
        evals.append((step, metrics))
        key = rank_key(bundle.task, metrics, True)
        if best is None or key > best[0]:
            best = (key, step, theta.copy(), logits)

    if held_out is not None:
        consider(0)
    steps = max(0, config.steps - passes)  # the budget's passes include the one over the training set
    for step in range(steps):
        share = time_share()
        if share >= 1.0:
            break
        scale = 1.0 - max(step / steps, share) if config.decay else 1.0
        batch = epoch_batch(n, batch_size, seed, FIT_STREAM, step)
        gradients = {k: np.zeros(named[k].shape, dtype=np.float64) for k in names}
        summed, _ = fit.accumulate(hidden, train.labels, batch, named, gradients)
        losses.append(summed / len(batch))
        adam.descend(named, names, gradients, states, config.lr * scale, len(batch), len(losses) - 1)
        if on_step:
            on_step(len(losses), losses[-1])
        if held_out is not None and len(losses) % eval_every == 0:
            consider(len(losses))
    info = {"forward_passes": passes + len(losses), "cache_passes": passes, "temperature": 1.0}
    if held_out is None:
        return theta, losses, {**info, "best_step": len(losses), "evals": evals, "returned": None}
    if evals[-1][0] != len(losses):
        consider(len(losses))
    _, best_step, vector, logits = best
    start, returned = evals[0][1], dict(evals)[best_step]
    if calibrate:  # the start's and the kept point's metrics each at their own best temperature
        start_t, _ = best_temperature(start_logits, held_out.labels, CALIBRATION_TEMPERATURES)
        start = classification_metrics(np.float32(start_t) * start_logits, held_out.labels)
        t, _ = best_temperature(logits, held_out.labels, CALIBRATION_TEMPERATURES)
        kept = bundle.layout.unflatten(vector)
        for name in HEAD:
            kept[name] *= np.float32(t)
        info["temperature"], returned = t, classification_metrics(np.float32(t) * logits, held_out.labels)
    return vector, losses, {**info, "best_step": best_step, "evals": evals, "start": start, "returned": returned}
