"""Does MiniLM's encoder fit gain more from the probe at C = 1's own scale than from its temperature-scaled start?

    python benchmarks/trial_fit_start.py BUNDLE PREFIX SEED VARIANT STEPS

Decided (session 20, docs/learning-notes.md): yes. On 20 Newsgroups the cross-validated temperature (4) leaves the
k-shot set fitted before the fit starts (training loss 0.10–0.28), and session 19's 10-minute fits gained half of
backprop's; from the unscaled probe (the backprop reference's start) 100 steps gained +1.7 / +4.5 / +1.6 against
backprop's +1.9 / +5.4 / +0.8. The head kept is then scaled by the temperature with the least dev loss.

PREFIX: bench_learning.py's files (PREFIX-train/dev/test.jsonl; the k-shot draw of ``edgeft train --k-shot 16``).
VARIANT: ``tempered`` (the start ``edgeft train`` made in session 19) or ``untempered``, with ``-const`` (no lr decay)
and ``-lr3`` (lr 3e-3) suffixes. Runs ``encoder_fit.fit_encoder`` for STEPS steps of batch 32, kept on dev every 25,
scores the kept point on test (numpy, equal to the graph's: tests/test_encoder_blocks.py) at τ = 1 and at the dev
temperature; one JSON line appended to docs/encoder-fit-trial/start-temperature.jsonl (its first four lines were
measured with this code before it moved here, the dev temperature chosen on a 25-point grid 0.25–16).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from edgeft.data import k_shot, load_dataset
from edgeft.runtime import Bundle
from edgeft.runtime.encoder_blocks import EncoderBlocksFit, Embedded
from edgeft.runtime.evaluate import classification_metrics, pooled_features
from edgeft.runtime.encoder_fit import EncoderFitConfig, fit_encoder
from edgeft.runtime.probe import best_temperature, fit_linear_probe, probe_temperature

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "encoder-fit-trial" / "start-temperature.jsonl"


def main(bundle_dir: str, prefix: str, seed: int, variant: str, steps: int) -> dict:
    b = Bundle(bundle_dir)
    shots = k_shot(load_dataset(prefix + "-train.jsonl", b.labels), 16, seed)
    train = b.encode(shots.texts, shots.labels)
    dev_set, test_set = (load_dataset(f"{prefix}-{part}.jsonl", b.labels) for part in ("dev", "test"))
    dev, test = b.encode(dev_set.texts, dev_set.labels), b.encode(test_set.texts, test_set.labels)
    theta = b.layout.initial(seed)
    features = pooled_features(b, theta, train, 32)
    weight, bias = fit_linear_probe(features, train.labels, len(b.labels))
    t, _, _ = probe_temperature(features, train.labels, len(b.labels), folds=4, seed=seed)
    scale = t if variant.startswith("tempered") else 1.0
    named = b.layout.unflatten(theta)
    named["head.weight"][...], named["head.bias"][...] = weight * scale, bias * scale
    config = EncoderFitConfig(steps=steps, lr=3e-3 if "lr3" in variant else 1e-3, decay="const" not in variant)
    started = time.perf_counter()
    fitted, losses, info = fit_encoder(b, train, theta, 32, seed, config, dev, eval_every=25)
    wall = time.perf_counter() - started
    fit = EncoderBlocksFit(b.folder, b.manifest)
    kept = b.layout.unflatten(fitted)
    dev_t, _ = best_temperature(fit.logits(Embedded(fit, dev.ids), np.arange(len(dev)), kept), dev.labels)
    test_logits = fit.logits(Embedded(fit, test.ids), np.arange(len(test)), kept)
    record = {"variant": variant, "seed": seed, "probe_temperature": t, "steps": len(losses), "wall_s": round(wall, 1),
              "best_step": info["best_step"], "dev": [(s, m["accuracy"], m["loss"]) for s, m in info["evals"]],
              "train_loss": [losses[0], losses[-1]], "test": classification_metrics(test_logits, test.labels),
              "test_at_dev_temperature": {**classification_metrics(dev_t * test_logits, test.labels), "t": dev_t}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    bundle, prefix, seed, variant, steps = sys.argv[1:6]
    print(json.dumps(main(bundle, prefix, int(seed), variant, int(steps))))
