"""Which parameters of MiniLM, trained with exact gradients (torch backprop), beat the linear probe?

Decided (session 9, docs/learning-notes.md): the top feed-forward block + head, whose gradient a device
could compute from forward outputs as it does for a causal LM's top MLP, lowered the loss and *lost*
accuracy on both tasks, so that fit was not built; LoRA on q, v of every layer (a backward pass)
gained a little.

    python benchmarks/trial_top_ffn.py CONFIG [--seed 0] [--task 20ng|rt | --data-prefix P] [--steps 60]

The trial that decides the classification counterpart of the causal LM's top MLP fit: all-MiniLM-L6-v2,
mean-pooled and normalised embeddings (the bundle's pooling), k = 16 examples per label drawn per seed,
a linear-probe head fitted first (C = 1, edgeft's start), then Adam on the CONFIG's parameters for
--steps steps of batch 32 (edgeft's batch order), the rest frozen; scored every 20 steps on 200 dev
examples (the kept step) and 1,000 test examples. CONFIG joins with "+": ``probe`` (no training),
``head`` (the head, lr 1e-3), ``ffn5`` (LoRA r=8 on the top layer's intermediate and output dense, lr
1e-3), ``qvall`` (LoRA r=8 on q, v of every layer, lr 1e-3: the backprop reference), ``hi`` (LoRA lr
1e-2). One JSON line per run is appended to docs/top-trial/classification.jsonl. Needs torch and peft.

``--data-prefix P`` (bench_learning.py's backprop line for its classification tasks): P-train.jsonl,
P-dev.jsonl and P-test.jsonl, the k-shot draw ``edgeft train --k-shot 16 --seed S`` makes of P-train.jsonl;
the JSON line is printed only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "top-trial" / "classification.jsonl"


def task_data(task: str, seed: int, k: int = 16, dev: int = 200, test: int = 1000):
    import numpy as np

    from edgeft import assets

    if task == "rt":
        texts, names = assets.rotten_tomatoes()
        order = np.random.default_rng(1234).permutation(len(texts))
        pool_texts = [texts[i] for i in order[test + dev:]]
        pool_names = [names[i] for i in order[test + dev:]]
        held = [(texts[i], names[i]) for i in order[:test + dev]]
    else:
        pool_texts, pool_names = assets.newsgroups("train")
        te_texts, te_names = assets.newsgroups("test")
        order = np.random.default_rng(1234).permutation(len(te_texts))[: test + dev]
        held = [(te_texts[i], te_names[i]) for i in order]
    labels = sorted(set(pool_names))
    rng = np.random.default_rng(seed)
    train = []
    for label in labels:
        idx = [i for i, n in enumerate(pool_names) if n == label]
        train += [(pool_texts[i], label) for i in rng.choice(idx, k, replace=False)]
    return labels, train, held[test:], held[:test]


def file_data(prefix: str, seed: int, k: int = 16):
    """bench_learning.py's files: the same k-shot draw as ``edgeft train`` (edgeft.data.k_shot)."""
    from edgeft.data import k_shot, load_dataset

    rows = {part: [json.loads(line) for line in Path(f"{prefix}-{part}.jsonl").read_text().splitlines()]
            for part in ("train", "dev", "test")}
    labels = sorted({r["label"] for r in rows["train"]})
    shots = k_shot(load_dataset(Path(f"{prefix}-train.jsonl"), labels), k, seed)
    train = [(text, labels[y]) for text, y in zip(shots.texts, shots.labels)]
    return labels, train, [(r["text"], r["label"]) for r in rows["dev"]], [(r["text"], r["label"]) for r in rows["test"]]


def main(argv=None) -> None:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from edgeft import assets
    from edgeft.data import epoch_batch
    from edgeft.runtime.probe import fit_linear_probe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="20ng", choices=("20ng", "rt"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data-prefix", help="P-train/dev/test.jsonl instead of --task's data (print only)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    import resource
    parts = args.config.split("+")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    folder = assets.minilm_folder()
    model, tok = AutoModel.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    labels, train, dev, test = (file_data(args.data_prefix, args.seed) if args.data_prefix
                                else task_data(args.task, args.seed))
    index = {n: i for i, n in enumerate(labels)}

    def encode(rows):
        enc = tok([t for t, _ in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")
        return enc, torch.tensor([index[n] for _, n in rows])

    targets = []
    if "ffn5" in parts:
        targets += ["encoder.layer.5.intermediate.dense", "encoder.layer.5.output.dense"]
    if "qvall" in parts:
        targets += [f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]
    if targets:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    for p_ in model.parameters():
        p_.requires_grad_(False)
    lora = [p_ for n, p_ in model.named_parameters() if "lora_" in n]
    for p_ in lora:
        p_.requires_grad_(True)

    def embed(enc):
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def features(rows, chunk=64):
        out = []
        with torch.no_grad():
            for s in range(0, len(rows), chunk):
                out.append(embed(encode(rows[s:s + chunk])[0]))
        return torch.cat(out)

    t0 = time.perf_counter()
    y_train = np.array([index[n] for _, n in train])
    w, b = fit_linear_probe(features(train).numpy(), y_train, len(labels))
    head_w, head_b = torch.nn.Parameter(torch.tensor(w)), torch.nn.Parameter(torch.tensor(b))
    groups = [{"params": lora, "lr": 1e-2 if "hi" in parts else 1e-3}] if lora else []
    if "head" in parts:
        groups.append({"params": [head_w, head_b], "lr": 1e-3})

    def score(rows):
        with torch.no_grad():
            f = features(rows)
            logits = f @ head_w.T + head_b
            y = torch.tensor([index[n] for _, n in rows])
            return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    curve = [(0, *score(dev), *score(test))]
    steps = args.steps if groups else 0
    if groups:
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        for step in range(steps):
            batch = epoch_batch(len(train), args.batch_size, args.seed, 0, step)
            enc, y = encode([train[i] for i in batch])
            loss = torch.nn.functional.cross_entropy(embed(enc) @ head_w.T + head_b, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 20 == 0:
                curve.append((step + 1, *score(dev), *score(test)))
    kept = max(curve, key=lambda r: (r[2], -r[1]))  # dev accuracy, then dev loss (the trainer's rank)
    record = {"task": args.data_prefix or args.task, "config": args.config, "seed": args.seed, "steps": steps,
              "start_test_accuracy": curve[0][4], "kept_step": kept[0], "test_accuracy": kept[4], "test_loss": kept[3],
              "last_test_accuracy": curve[-1][4], "curve": curve, "wall_s": round(time.perf_counter() - t0, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if not args.data_prefix:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
