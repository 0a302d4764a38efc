"""A text classifier that learns from its user's corrections, on the device.

Embeds only ``edgeft.runtime`` (numpy + onnxruntime): no torch. Every correction is
added to a small memory; the head is refitted on it with a linear probe (forward
passes only) and a few MeZO steps then tune LoRA + head on the same memory.

    python examples/learn_from_corrections.py BUNDLE [--adapter DIR] [--save DIR]

then type ``text`` to get a prediction, or ``label<TAB>text`` to correct it; an empty
line quits (and saves the adapter with --save).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from edgeft.adapters import load_adapter, save_adapter
from edgeft.runtime import Bundle, MeZO, MeZOConfig, TrainConfig, Trainer, predict, starting_adapter


class CorrectionLearner:
    def __init__(self, bundle: Bundle, adapter: np.ndarray | None = None, steps_per_correction: int = 10):
        self.bundle = bundle
        self.adapter = adapter if adapter is not None else bundle.layout.initial(0)
        self.texts: list[str] = []
        self.labels: list[int] = []
        self.steps = steps_per_correction

    def predict(self, text: str) -> tuple[str, float]:
        probs = predict(self.bundle, self.adapter, [text])[0]
        return self.bundle.labels[int(probs.argmax())], float(probs.max())

    def correct(self, text: str, label: str) -> None:
        if label not in self.bundle.labels:
            raise ValueError(f"unknown label {label!r} (labels: {', '.join(self.bundle.labels)})")
        self.texts.append(text)
        self.labels.append(self.bundle.labels.index(label))
        memory = self.bundle.encode(self.texts, np.array(self.labels))
        if len(set(self.labels)) < 2:
            return  # a probe needs two classes; wait for the second one
        # refit the head on everything the user has said so far, keep the LoRA values learned so far
        start, _ = starting_adapter(self.bundle, memory)
        lora = self.bundle.layout.adapter_mask()
        start[lora] = self.adapter[lora]
        optimizer = MeZO(start, MeZOConfig(lr=1e-3, eps=1e-3, total_steps=self.steps, seed=len(self.texts)))
        trainer = Trainer(self.bundle, memory, optimizer, TrainConfig(steps=self.steps, batch_size=16, eval_every=self.steps))
        trainer.fit()
        self.adapter = trainer.best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--adapter", help="start from this adapter folder")
    parser.add_argument("--save", help="save the adapter here when done")
    args = parser.parse_args(argv)
    bundle = Bundle(args.bundle)
    adapter = load_adapter(args.adapter, bundle.layout) if args.adapter else None
    learner = CorrectionLearner(bundle, adapter)
    print(f"labels: {', '.join(bundle.labels)}. Type a text, or LABEL<TAB>TEXT to correct; empty line quits.")
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line:
            break
        label, tab, text = line.partition("\t")
        if tab:
            learner.correct(text, label)
            print(f"learned from {len(learner.texts)} correction(s)")
        else:
            name, p = learner.predict(line)
            print(f"{name} ({p:.2f})")
    if args.save:
        save_adapter(args.save, bundle.layout, learner.adapter, bundle.manifest.peft_base.get("source", ""), None)
        print(f"adapter saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
