"""Choosing a prompt template by its zero-shot score: the template only shapes the text before tokenizing,
so one exported graph scores every candidate, each with forward passes over the user's held-out data."""

from __future__ import annotations

from pathlib import Path

BATCH = 16


def choose_template(folder: Path, candidates: list[str], data: Path, log=print) -> list[dict]:
    """Score each candidate (already in the bundle's spelling, e.g. a masked LM's mask token) on ``data`` with
    the adapters at their start (the model's zero-shot answer) and write the best into the bundle's manifest:
    highest accuracy, then lowest loss. Returns every candidate's scores, best first."""
    from edgeft.data import load_dataset
    from edgeft.runtime import Bundle
    from edgeft.runtime.evaluate import evaluate

    bundle = Bundle(folder)
    dataset = load_dataset(data, bundle.labels)  # refuses an empty file
    start = bundle.layout.initial(0)
    scores = []
    for template in candidates:
        bundle.manifest.template = template  # Bundle.prepare reads it for every text it encodes
        metrics = evaluate(bundle, start, bundle.encode(dataset.texts, dataset.labels), BATCH)
        scores.append({"template": template, "accuracy": metrics["accuracy"], "loss": metrics["loss"]})
        log(f"template {template!r}: zero-shot accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.4f} "
            f"({len(dataset.texts)} examples)")
    scores.sort(key=lambda s: (-s["accuracy"], s["loss"]))
    bundle.manifest.template = scores[0]["template"]
    bundle.manifest.save(folder)
    return scores
