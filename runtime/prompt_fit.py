"""A causal prompt bundle's fit: the label-word output adapter and the top blocks' MLP LoRA (Llama exports,
``export/top_blocks.py``) by Adam on the exact gradient of the prompt's loss, computed in numpy
(``TopBlocksFit.accumulate_answers``: cross-entropy over the label words' logits at the answer position).

It starts from the label-word probe (``output_fit.fit_label_probe``'s fit, from the same forward: h and the
zero-shot logits at the answer position), keeps its best held-out point (accuracy, then loss: the trainer's
rank) and is kept only where that point beats the zero-shot prompt there. Like the causal LM's fit it never
opens the whole graph: numpy embeds the tokens, the graph below the blocks runs the layers under them,
numpy the blocks and the answer. The prompt-mode counterpart of the encoder fit (``encoder_fit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeft.data import epoch_batch

from .bundle import Bundle, Encoded
from .optimizers.updates import Adam
from .top_blocks import TopBlocksFit

ROWS = 8  # prompts per run of the graph below the blocks when scoring a set (the fit's steps run their batch)


@dataclass(frozen=True)
class PromptFitConfig:
    steps: int = 40  # forward passes: the probe's pass over the training set, then one batch per step
    lr: float = 1e-3  # Adam, the output adapter's and the LoRA's
    decay: bool = True  # the lr falls linearly to zero over the budget, as the other fits'


def answers(bundle: Bundle, blocks: TopBlocksFit, encoded: Encoded, named: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(h, label logits) of every example of ``encoded`` (``TopBlocksFit.answers``), in runs of ``ROWS``."""
    from .evaluate import length_sorted_batches

    states, logits = None, np.zeros((len(encoded), len(bundle.labels)), dtype=np.float32)
    for index in length_sorted_batches(encoded, ROWS):
        feeds = bundle.feeds(encoded, index)
        h, z = blocks.answers(feeds, blocks.entering(feeds, named), named)
        if states is None:
            states = np.zeros((len(encoded), h.shape[1]), dtype=np.float32)
        states[index], logits[index] = h, z
    return states, logits


def fit_prompt(bundle: Bundle, train: Encoded, theta: np.ndarray, batch_size: int, seed: int = 0,
               config: PromptFitConfig = PromptFitConfig(), held_out: Encoded | None = None, eval_every: int = 50,
               time_share=lambda: 0.0, on_step=None) -> tuple[np.ndarray, list[float], dict]:
    """The label-word probe, then Adam on the output adapter and the top blocks' LoRA over ``config.steps``
    passes (the probe's first; fewer if ``time_share()`` reaches 1). With ``held_out`` the zero-shot prompt, the
    probe (step 0), every ``eval_every`` steps and the last are scored there and the best is returned, its logits
    scaled by the temperature with the least held-out loss (``probe.best_temperature``; no prediction changes);
    without, the last point. Returns (vector, each step's mean training loss before its update, {"best_step", "evals",
    "forward_passes", "probe_c", "start": the zero-shot prompt's held-out metrics, "returned": the returned
    vector's (calibrated), "kept": whether it beat the zero-shot prompt there, "temperature"; without held-out data
    "train_after": the returned vector's metrics on the training set})."""
    from .evaluate import classification_metrics
    from .output_fit import FIT_STREAM, exact_fit
    from .probe import CALIBRATION_TEMPERATURES, best_temperature, fit_linear_probe_cv
    from .trainer import rank_key

    blocks = exact_fit(bundle)
    theta = np.array(theta, dtype=np.float32, copy=True)
    named = bundle.layout.unflatten(theta)  # views: updating them updates theta
    for name in (blocks.output_weight, blocks.bias):
        named[name][...] = 0.0  # the zero-shot prompt
    zero_shot = theta.copy()
    began = time_share()
    states, offset = answers(bundle, blocks, train, named)
    training_pass = time_share() - began  # what scoring the last point on this set (no held-out data) will take
    weight, bias, c = fit_linear_probe_cv(states, train.labels, len(bundle.labels), offset=offset)
    named[blocks.output_weight][...], named[blocks.bias][...] = weight, bias
    passes = -(-len(train) // batch_size)
    names = [blocks.output_weight, blocks.bias, *blocks.tensor_names()]
    adam = Adam()
    moments = {k: adam.init(named[k].size) for k in names}
    n, losses, evals, best, start = len(train), [], [], None, None

    # the budget's share the last scoring took: the last one must fit in the budget too
    scoring = 0.0 if held_out is not None else training_pass

    def consider(step):
        nonlocal best, scoring
        began = time_share()
        logits = answers(bundle, blocks, held_out, named)[1]
        metrics = classification_metrics(logits, held_out.labels)
        evals.append((step, metrics))
        key = rank_key(bundle.task, metrics, True)
        if best is None or key > best[0]:
            best = (key, step, theta.copy(), logits)
        scoring = time_share() - began

    if held_out is not None:
        start = classification_metrics(answers(bundle, blocks, held_out, bundle.layout.unflatten(zero_shot))[1],
                                       held_out.labels)
        consider(0)
    steps = max(0, config.steps - passes)
    for step in range(steps):
        share = time_share()
        # (200 dev prompts through 24 blocks take ~25 s on one core: without the reserve a 10-minute run took 632-646 s)
        if share + (scoring if held_out is None or len(losses) % eval_every else 0.0) >= 1.0:
            break
        scale = 1.0 - max(step / steps, share) if config.decay else 1.0
        batch = epoch_batch(n, batch_size, seed, FIT_STREAM, step)
        gradients = {k: np.zeros(named[k].shape, dtype=np.float64) for k in names}
        summed = 0.0
        for at in range(0, len(batch), ROWS):
            feeds = bundle.feeds(train, batch[at : at + ROWS])
            summed += blocks.accumulate_answers(feeds, blocks.entering(feeds, named), named, gradients)
        losses.append(summed / len(batch))
        adam.descend(named, names, gradients, moments, config.lr * scale, len(batch), len(losses) - 1)
        if on_step:
            on_step(len(losses), losses[-1])
        if held_out is not None and len(losses) % eval_every == 0:
            consider(len(losses))
    info = {"forward_passes": passes + len(losses), "probe_passes": passes, "probe_c": c, "temperature": 1.0}
    if held_out is None:  # the last point, scored on the training set: what the trainer then ranks on
        trained = classification_metrics(answers(bundle, blocks, train, named)[1], train.labels)
        return theta, losses, {**info, "best_step": len(losses), "evals": evals, "start": None, "returned": None,
                               "kept": True, "train_after": trained}
    if evals[-1][0] != len(losses):
        consider(len(losses))
    _, best_step, vector, logits = best
    # its logits scaled by the temperature with the least held-out loss (no prediction changes): 32 examples fitted
    # for 10 minutes end far too sure of themselves (SmolLM2 / Rotten Tomatoes: test loss 2.0 at 84% accuracy)
    t, _ = best_temperature(logits, held_out.labels, CALIBRATION_TEMPERATURES)
    kept_named = bundle.layout.unflatten(vector)
    words = blocks.label_rows
    # τ·(h·(words + W)ᵀ + b) = h·(τ(words + W) − words + words)ᵀ + τb: the output adapter carries the whole scale
    kept_named[blocks.output_weight][...] = np.float32(t) * (words + kept_named[blocks.output_weight]) - words
    kept_named[blocks.bias][...] *= np.float32(t)
    returned = classification_metrics(np.float32(t) * logits, held_out.labels)
    kept = rank_key(bundle.task, returned, True) > rank_key(bundle.task, start, True)
    return (vector if kept else zero_shot), losses, {**info, "best_step": best_step, "evals": evals, "start": start,
                                                    "returned": returned, "kept": kept, "temperature": t}
